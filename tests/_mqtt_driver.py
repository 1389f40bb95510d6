"""The server side of the topic contract as a test drives it (until the fleet server exists): a real MQTT
client that publishes desired state and commands and records everything devices send."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet import open_bundle
from edgefleet._bundle import sha256_file
from edgefleet.protocol import COMMAND_SCHEMA, DESIRED_SCHEMA, ROOT, parse_topic, topic


class Observer:
    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.messages: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.retained: dict[tuple[str, str], dict[str, Any]] = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{time.time_ns()}", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *a: c.subscribe(f"{ROOT}/devices/+/+", qos=1)
        self.c.reconnect_delay_set(0.2, 1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        parsed = parse_topic(msg.topic)
        if parsed is None or not msg.payload:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.messages[parsed].append(body)
            if parsed[1] in ("state", "status"):
                self.retained[parsed] = body

    def events(self, device: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            evs = list(self.messages[(device, "events")])
        return [e for e in evs if kind is None or e["type"] == kind]

    def windows(self, device: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.messages[(device, "telemetry")])

    def state(self, device: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.retained.get((device, "state"), {}))

    def status(self, device: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.retained.get((device, "status"), {}))

    def wait(self, pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def publish(self, device: str, kind: str, payload: bytes | str, retain: bool = False) -> None:
        self.c.publish(topic(device, kind), payload, qos=1, retain=retain).wait_for_publish(5)

    def desire(
        self,
        device: str,
        ref: dict[str, Any],
        rollout: str | None,
        action: str = "update",
        issued_at: float | None = None,
    ) -> None:
        when = time.time() if issued_at is None else issued_at
        doc = {"schema": DESIRED_SCHEMA, "bundle": ref, "action": action, "rollout": rollout, "issued_at": when}
        self.publish(device, "desired", json.dumps(doc), retain=True)

    def command(self, device: str, cid: str, command: str, args: dict[str, Any]) -> None:
        doc = {"schema": COMMAND_SCHEMA, "id": cid, "command": command, "args": args}
        self.publish(device, "commands", json.dumps(doc))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def bundle_ref(path: Path, base_url: str, url_path: str | None = None) -> dict[str, Any]:
    m = open_bundle(path).manifest
    return {
        "name": m.name,
        "version": m.version,
        "url": f"{base_url}/{url_path or path.name}",
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }
