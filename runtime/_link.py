"""The device's MQTT session: connection and last will, the desired / commands subscriptions, status
and state documents. Telemetry goes through the `MqttExporter` it feeds (see `_export`).

Everything off the network is validated here, on paho's network thread, before it reaches the agent:
a malformed message is dropped and reported (`bad_message`), never raised into paho.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from edgefleet._errors import require
from edgefleet.protocol import STATUS_SCHEMA, Command, Desired, parse_command, parse_desired, parse_refusal, topic

from ._config import MqttConfig
from ._export import MqttExporter
from ._netloop import NetworkLoop

__all__ = ["MqttLink"]

log = logging.getLogger("edgefleet.agent")

_RECONNECT_DELAY_S = (1.0, 30.0)


class MqttLink:
    """One MQTT v5 session for DEVICE_ID. Orders received land in `inbox` as ("desired", Desired) or
    ("command", Command); `wake` is set whenever there is something for the agent's loop to do."""

    def __init__(
        self,
        device_id: str,
        config: MqttConfig,
        exporter: MqttExporter,
        *,
        network: NetworkLoop | None,
        wake: threading.Event,
        on_bad_message: Callable[[str, str], None],
    ) -> None:
        self.device_id, self.config, self.exporter = device_id, config, exporter
        self._network = network
        self.wake = wake
        self._on_bad_message = on_bad_message
        self.inbox: queue.Queue[tuple[str, Desired | Command]] = queue.Queue()
        self.connected = threading.Event()
        self.on_connected: Callable[[], None] | None = None
        self._client: Any = None
        # What the fleet refused of this device's messages (they were acknowledged: nothing to send again).
        self.refused = 0
        self.last_refusal: dict[str, Any] | None = None

    def status(self, online: bool) -> bytes:
        return json.dumps(
            {"schema": STATUS_SCHEMA, "device_id": self.device_id, "online": online, "ts": time.time()}
        ).encode()

    def connect(self) -> None:
        """Start connecting in the background (reconnects by itself, 1 s doubling to 30 s)."""
        mqtt = require("paho.mqtt.client", "runtime", "connecting the device agent to the fleet")
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = self.config
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5)
        if c.username:
            client.username_pw_set(c.username, c.password)
        if c.tls:
            client.tls_set(ca_certs=c.ca, certfile=c.cert, keyfile=c.key)
        client.will_set(topic(self.device_id, "status"), self.status(False), qos=1, retain=True)
        client.reconnect_delay_set(*_RECONNECT_DELAY_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        client.connect_async(c.host, c.port, keepalive=c.keepalive, clean_start=True, properties=props)
        self._client = client
        if self._network is not None:
            self._network.add(client, name=self.device_id, reconnect_delay=_RECONNECT_DELAY_S)
        else:
            client.loop_start()

    def publish_status(self) -> None:
        """Publish the retained online status again (its `ts` is the agent's heartbeat)."""
        if self._client is not None and self.connected.is_set():
            self._client.publish(topic(self.device_id, "status"), self.status(True), qos=1, retain=True)

    def publish_state(self, doc: dict[str, Any]) -> bool:
        """Publish the retained state document; False (nothing sent) while disconnected."""
        if self._client is None or not self.connected.is_set():
            return False
        body = json.dumps(doc, default=str).encode()
        self._client.publish(topic(self.device_id, "state"), body, qos=1, retain=True)
        return True

    def close(self) -> None:
        """Say offline (the last will is for crashes) and disconnect."""
        if self._client is None:
            return
        try:
            if self.connected.is_set():
                info = self._client.publish(topic(self.device_id, "status"), self.status(False), 1, True)
                info.wait_for_publish(timeout=2)
            if self._network is not None:
                self._network.disconnect(self._client)
            else:
                self._client.disconnect()
        except (RuntimeError, ValueError, OSError):
            pass
        if self._network is not None:
            self._network.remove(self._client)
        else:
            self._client.loop_stop()
        self._client = None

    # -- paho's network thread ------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connection refused: %s", reason_code)
            return
        self.exporter.connected(client)
        client.subscribe([(topic(self.device_id, k), 1) for k in ("desired", "commands", "refusals")])
        client.publish(topic(self.device_id, "status"), self.status(True), qos=1, retain=True)
        self.connected.set()
        if self.on_connected is not None:
            self.on_connected()
        self.wake.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        self.exporter.disconnected()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            if not msg.payload:
                return  # a cleared retained message
            obj = json.loads(msg.payload)
            if kind == "refusals":
                r = parse_refusal(obj)
                log.warning("the fleet refused this device's %s message %s: %s", r.kind, r.key or "", r.reason)
                self.refused += 1
                self.last_refusal = {"kind": r.kind, "key": r.key, "reason": r.reason, "ts": r.ts}
                return
            self.inbox.put(("desired", parse_desired(obj)) if kind == "desired" else ("command", parse_command(obj)))
            self.wake.set()
        except Exception as exc:  # anything off the network; paho's network thread must survive it
            log.warning("ignoring malformed %s message: %s", kind, exc)
            try:
                self._on_bad_message(kind, f"{type(exc).__name__}: {exc}"[:300])
            except Exception as exc2:
                log.error("could not record bad_message: %s", exc2)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.exporter.published(mid, not reason_code.is_failure)
