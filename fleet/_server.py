"""The fleet server process: embedded (or external) broker, ingest worker, and one HTTP port for the
REST API, bundle downloads (with Range) and Prometheus `/metrics`."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet import EdgefleetError, InputError, open_bundle
from edgefleet._bundle import sha256_file
from edgefleet._fs import atomic_copy, atomic_write
from edgefleet.protocol import COMMAND_SCHEMA, BundleRef, Desired, parse_command, topic

from ._auth import may_download, may_operate
from ._broker import SERVER_USER, Broker
from ._captures import Captures
from ._db import Database
from ._drift import DriftMonitor
from ._endpoint import BrokerEndpoint
from ._ingest import IngestWorker
from ._metrics import metrics_text
from ._provision import check_tags, record_broker, register_devices, trusted_dir
from ._retention import Housekeeper, Retention
from ._rollout import RolloutEngine
from ._rollups import rebuild
from ._shadows import ShadowDeployments

__all__ = ["FleetServer", "ServerConfig"]

log = logging.getLogger("edgefleet.fleet")
MAX_BUNDLE_BYTES = 2 << 30


@dataclass
class ServerConfig:
    data_dir: Path
    http_port: int = 8080
    mqtt_port: int = 1883
    db_url: str | None = None
    broker_url: str = "embedded"
    # An external broker (broker_url mqtt[s]://...): its CA, the server's own credentials on it (default:
    # the server user in the password file kept under DATA_DIR/mosquitto), and what to run after device
    # credentials change there (e.g. "systemctl reload mosquitto").
    broker_ca: str | None = None
    broker_username: str | None = None
    broker_password: str | None = None
    broker_reload: str | None = None
    # Where devices reach the external broker when it is not where the server's clients do (a listener
    # of its own for devices, see `fleet broker-auth`); default: broker_url.
    broker_device_url: str | None = None
    public_host: str = "127.0.0.1"
    trusted_keys: list[Path] = field(default_factory=list)
    # Drift alerts: how often they are checked and over how much recent telemetry.
    drift_interval_s: float = 30.0
    drift_window_s: float = 900.0
    # /metrics shows device counts, bundle names, tags and drift: behind an API token unless opened.
    metrics_open: bool = False
    mqtt_bind: str = "0.0.0.0"  # the embedded broker's listen address
    retention: Retention = field(default_factory=Retention)
    # The embedded broker's listener for the server's own clients (127.0.0.1; None: a free port).
    mqtt_server_port: int | None = None
    # TLS for HTTPS and the embedded broker's devices' listener (PEM files); TLS_CA: the CA devices are told
    # to trust (None: the system's CAs).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @property
    def db(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.public_host}:{self.http_port}"

    @property
    def tls_ca_pem(self) -> str | None:
        return Path(self.tls_ca).read_text() if self.tls_ca else None


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STALE_S = 90.0  # three of the agents' 30 s heartbeats
# The events that answer a command (they name its id as command_id).
_ANSWERS = ("command_done", "shadow_started", "shadow_failed", "capture_uploaded", "capture_refused", "capture_failed")


class FleetServer:
    """`edgefleet fleet serve`: everything in one process, state in the database."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.dir = Path(config.data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "bundles").mkdir(exist_ok=True)
        tdir = trusted_dir(self.dir)
        tdir.mkdir(exist_ok=True)
        for k in config.trusted_keys:
            shutil.copy(k, tdir / Path(k).name)
        self.db = Database(config.db)
        added = rebuild(self.db)  # once, for a database from before rollups
        if added:
            log.info("rolled up %d stored telemetry windows", added)
        self.external: BrokerEndpoint | None = None
        self.device_broker: BrokerEndpoint | None = None  # where devices reach an external broker
        if config.broker_url != "embedded":
            self.external = BrokerEndpoint.parse(
                config.broker_url, ca=config.broker_ca, username=config.broker_username, password=config.broker_password
            )
            self.device_broker = (
                BrokerEndpoint.parse(config.broker_device_url, ca=config.broker_ca)
                if config.broker_device_url
                else self.external
            )
        self.broker: Broker | None = None
        self.ingest: IngestWorker | None = None
        self.ready = False
        self._pub: Any = None
        # Leases are held in this data directory's name: restarted after a crash, the same server takes its
        # engine back at once instead of waiting for its old lease to expire.
        holder = f"{socket.gethostname()}:{self._instance_id()}"
        self.rollouts = RolloutEngine(self.db, self.set_desired, lease_holder=holder)
        self.drift = DriftMonitor(self.db, config.drift_interval_s, config.drift_window_s, lease_holder=holder)
        self.housekeeper = Housekeeper(self.db, config.retention, lease_holder=holder)
        self.shadows = ShadowDeployments(self)
        self.captures = Captures(self)
        self.drift.on_open = self.captures.on_alerts
        self.housekeeper.also = lambda now: {"captures": self.captures.expire(now, config.retention.captures_s)}

    @property
    def trusted(self) -> list[str]:
        return [str(p) for p in sorted(trusted_dir(self.dir).glob("*.pub"))]

    def start(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        ext = self.external
        if ext is None:
            # The server's clients use a listener of their own on loopback (see _broker).
            server_port = self.config.mqtt_server_port or _free_loopback_port()
            self.broker = Broker(
                self.dir / "mosquitto",
                self.config.mqtt_port,
                host=self.config.mqtt_bind,
                embedded=True,
                server_port=server_port,
                tls=(
                    (self.config.tls_cert, self.config.tls_key, self.config.tls_ca)
                    if self.config.tls_cert and self.config.tls_key
                    else None
                ),
            )
            self.broker.start()
            endpoint = BrokerEndpoint("127.0.0.1", server_port, False, None, SERVER_USER, "")
            self._record_embedded(server_port)
        else:
            # Device credentials are still kept in Mosquitto's file format, for the broker to read.
            self.broker = Broker(self.dir / "mosquitto", ext.port, reload_command=self.config.broker_reload)
            endpoint = ext
            self._record_external(ext)
        if endpoint.username in (None, SERVER_USER) and not endpoint.password:
            endpoint = dataclasses.replace(endpoint, username=SERVER_USER, password=self.broker.server_password)
        self.endpoint = endpoint
        # The server's own worker is durable (it comes back with the server): on a broker that outlives
        # the server, telemetry sent during a restart is queued for it, not dropped.
        self.ingest = IngestWorker(self.db, endpoint, f"server-{self._instance_id()}", durable=True)
        self.ingest.start()
        pub = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgefleet-server-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        endpoint.configure(pub)
        pub.max_inflight_messages_set(200)
        pub.reconnect_delay_set(0.5, 10)  # type: ignore[arg-type]  # paho takes float seconds; its hint says int
        pub.connect_async(endpoint.host, endpoint.port)
        pub.loop_start()
        self._pub = pub
        if not self.ingest.connected.wait(15):
            self.stop()
            where = "the embedded broker" if ext is None else f"the broker at {ext.url()}"
            raise EdgefleetError(
                f"the ingest worker could not connect to {where}; check its address, TLS and credentials"
            )
        self.rollouts.start()
        self.drift.start()
        self.housekeeper.start()
        self.ready = True

    def _record_external(self, ext: BrokerEndpoint) -> None:
        """Remember the external broker, so offline `fleet provision` writes device configs for it: `url`
        for server clients, the rest (devices' listener) for devices."""
        dev = self.device_broker or ext
        doc = {
            "url": ext.url(),
            "host": dev.host,
            "port": dev.port,
            "tls": dev.tls,
            "ca_pem": Path(dev.ca).read_text() if dev.ca else None,
            "embedded": False,
            "reload": self.config.broker_reload,
            "http_url": self.config.base_url,
        }
        record_broker(self.dir, doc, external=True)

    def _record_embedded(self, server_port: int) -> None:
        """Remember the embedded broker's ports and the host devices reach it by (see `recorded_broker`):
        `url` is the server clients' listener, `port` the devices'."""
        doc = {
            "url": f"mqtt://127.0.0.1:{server_port}",
            "embedded": True,
            "host": self.config.public_host,
            "port": self.config.mqtt_port,
            "tls": self.config.tls_cert is not None,
            "ca_pem": self.config.tls_ca_pem if self.config.tls_cert else None,
            "reload": None,
            "http_url": self.config.base_url,
        }
        record_broker(self.dir, doc, external=False)  # forgets an earlier run's --broker

    def device_mqtt(self) -> dict[str, Any]:
        """How devices reach the broker: host, port, and with TLS the CA's PEM (None: the system's CAs)."""
        if self.external is None:
            tls = self.config.tls_cert is not None
            return {
                "host": self.config.public_host,
                "port": self.config.mqtt_port,
                "tls": tls,
                "ca_pem": self.config.tls_ca_pem if tls else None,
            }
        dev = self.device_broker or self.external
        return {
            "host": dev.host,
            "port": dev.port,
            "tls": dev.tls,
            "ca_pem": Path(dev.ca).read_text() if dev.ca else None,
        }

    def stop(self) -> None:
        self.ready = False
        self.rollouts.stop()
        self.drift.stop()
        self.housekeeper.stop()
        if self.ingest is not None:
            self.ingest.stop()
        if self._pub is not None:
            self._pub.disconnect()
            self._pub.loop_stop()
        if self.broker is not None:
            self.broker.stop()

    def _instance_id(self) -> str:
        """A random id made once per data directory: the server's MQTT identity across restarts."""
        p = self.dir / "instance-id"
        if not p.exists():
            atomic_write(p, secrets.token_hex(6).encode())
        return p.read_text().strip()

    # -- operations the API and the CLI share ------------------------------------------------------
    def check_token(self, header: str | None) -> bool:
        """An operator's API token."""
        return may_operate(self.db, header)

    def check_download(self, header: str | None) -> bool:
        """A token that may download bundles: a device's (written into its device.toml) or an operator's."""
        return may_download(self.db, header)

    def publish_bundle(self, data_path: Path) -> dict[str, Any]:
        """Verify an uploaded bundle against the trusted keys and store it; refuse anything invalid."""
        if not self.trusted:
            raise InputError("the server has no trusted keys: restart it with --trusted-key KEY.pub")
        b = open_bundle(data_path, self.trusted)
        m = b.manifest
        sha = sha256_file(data_path)
        rows = self.db.query("SELECT sha256 FROM bundles WHERE name = ? AND version = ?", (m.name, m.version))
        if rows and rows[0][0] != sha:
            raise InputError(f"bundle {m.name} {m.version} is already published with other content; bump the version")
        # Stored under its content's hash: names like coll-1.0.0 version 2.0.0 and coll version 1.0.0-2.0.0
        # can never map to one file.
        dest = self.dir / "bundles" / f"{sha}.efb"
        if not rows:
            atomic_copy(data_path, dest)
            self.db.execute(
                "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (m.name, m.version, sha, dest.stat().st_size, str(dest), m.canonical_bytes().decode(), time.time()),
            )
        return self.bundle_ref(m.name, m.version)

    def published(self) -> list[tuple[str, str]]:
        """(name, version) of every published bundle, oldest first per name."""
        return [(n, v) for n, v in self.db.query("SELECT name, version FROM bundles ORDER BY name, created")]

    def bundle_file(self, name: str, version: str) -> tuple[Path, int] | None:
        """Where a published bundle's file is stored, and its size (None: not published)."""
        rows = self.db.query("SELECT path, size FROM bundles WHERE name = ? AND version = ?", (name, version))
        return (Path(rows[0][0]), int(rows[0][1])) if rows else None

    def has_device(self, device_id: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM devices WHERE id = ?", (device_id,)))

    def bundle_ref(self, name: str, version: str) -> dict[str, Any]:
        rows = self.db.query("SELECT sha256, size FROM bundles WHERE name = ? AND version = ?", (name, version))
        if not rows:
            raise InputError(f"bundle {name}:{version} is not published; 'edgefleet fleet publish' it first")
        return {
            "name": name,
            "version": version,
            "sha256": rows[0][0],
            "size": int(rows[0][1]),
            "url": f"{self.config.base_url}/bundles/{name}/{version}.efb",
        }

    def set_desired(
        self, device: str, name: str, version: str, rollout: str | None, action: str = "update", wait: bool = True
    ) -> Any:
        """Publish DEVICE's desired bundle (retained, QoS 1). Without WAIT the caller waits on the returned
        handle (`wait_for_publish`), so a stage's hundreds of orders go out pipelined, not one round trip each."""
        ref = BundleRef.parse(self.bundle_ref(name, version), f"bundle {name}:{version}")
        self.check_runnable(device, name, version)
        doc = Desired(ref, action, rollout, time.time()).to_dict()
        info = self._pub.publish(topic(device, "desired"), json.dumps(doc), qos=1, retain=True)
        if wait:
            info.wait_for_publish(10)
        return info

    def publish(self, topic_name: str, payload: str, retain: bool = False) -> Any:
        """Publish on the server's own MQTT connection (QoS 1); returns paho's handle to wait on."""
        return self._pub.publish(topic_name, payload, qos=1, retain=retain)

    def register(self, device_id: str, tags: list[str]) -> dict[str, Any]:
        """Provision through the API: credentials and everything a device.toml needs."""
        return self.register_many([(device_id, tags)])[0]

    def register_many(self, devices: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
        """`register` for many devices at once (one broker reload)."""
        assert self.broker is not None
        creds = register_devices(self.db, self.broker, devices)
        keys = {Path(k).name: Path(k).read_text() for k in self.trusted}
        return [
            {
                "device_id": d,
                "tags": check_tags(tags),
                "mqtt": {**self.device_mqtt(), "username": d, "password": creds[d].password},
                "http_token": creds[d].http_token,
                "token_origins": [self.config.base_url],
                "trusted_keys": keys,
            }
            for d, tags in devices
        ]

    def metrics(self) -> str:
        """The Prometheus text of `/metrics`."""
        return metrics_text(self)

    def devices(self) -> list[dict[str, Any]]:
        """Every registered device (see `find_devices` for a page of them)."""
        return self.find_devices(limit=None)[1]

    def device(self, device_id: str) -> dict[str, Any] | None:
        found = self.find_devices(device_id=device_id, limit=1)[1]
        return found[0] if found else None

    def find_devices(
        self,
        *,
        device_id: str | None = None,
        q: str | None = None,
        tag: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        sort: str = "id",
        limit: int | None = 50,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(how many match, the page of them): devices whose id contains Q, carrying TAG, on bundle VERSION,
        online or not, sorted by SORT (`id`, `last_seen`: latest first, `version`), LIMIT from OFFSET. In SQL,
        so a page of a 10,000-device fleet reads that page."""
        where: list[str] = []
        params: list[Any] = []
        if device_id is not None:
            where.append("id = ?")
            params.append(device_id)
        if q:
            where.append("LOWER(id) LIKE ? ESCAPE '\\'")  # case-blind alike on SQLite and PostgreSQL
            params.append("%" + _like(q.lower()) + "%")
        if tag:
            # tags are stored as a JSON list of checked names: the quotes delimit one ('_' is escaped: a
            # character of tags, a wildcard of LIKE)
            where.append("tags LIKE ? ESCAPE '\\'")
            params.append("%" + _like(json.dumps(tag)) + "%")
        if version:
            where.append("bundle_version = ?")
            params.append(version)
        if online is not None:
            where.append("online = ?")
            params.append(1 if online else 0)
        # NULLs (never seen, no bundle) last on both databases (PostgreSQL puts them first in DESC)
        order = {
            "id": "id",
            "last_seen": "last_seen IS NULL, last_seen DESC, id",
            "version": "bundle_version IS NULL, bundle_version, id",
        }.get(sort)
        if order is None:
            raise InputError(f"sort must be id, last_seen or version, not {sort!r}")
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        total = int(self.db.query(f"SELECT COUNT(*) FROM devices{cond}", params)[0][0])
        page = f" LIMIT {int(limit)} OFFSET {max(0, int(offset))}" if limit is not None else ""
        rows = self.db.query(
            "SELECT id, tags, online, bundle_name, bundle_version, staged_version, accelerator, agent_version, "
            f"update_state, last_seen, state FROM devices{cond} ORDER BY {order}{page}",
            params,
        )
        keys = (
            "id",
            "tags",
            "online",
            "bundle_name",
            "bundle_version",
            "staged_version",
            "accelerator",
            "agent_version",
            "update_state",
            "last_seen",
        )
        out = []
        now = time.time()
        for r in rows:
            d = dict(zip(keys, r[:-1], strict=True))
            d["tags"] = json.loads(d["tags"])
            d["online"] = bool(d["online"])
            # Online by its retained status, but silent: an agent republishes its status and state every 30 s
            # (docs/device-agent.md), so a loop that stopped while its MQTT connection lives shows here.
            d["stale"] = d["online"] and (d["last_seen"] is None or now - float(d["last_seen"]) > STALE_S)
            d["capabilities"] = _capabilities(r[-1])
            out.append(d)
        return total, out

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one server per process; a bundle's models never change
    def _formats(self, name: str, version: str) -> frozenset[str]:
        rows = self.db.query("SELECT manifest FROM bundles WHERE name = ? AND version = ?", (name, version))
        models = json.loads(rows[0][0]).get("models", []) if rows else []
        return frozenset(m["format"] for m in models if isinstance(m, dict) and "format" in m)

    def check_runnable(self, device: str, name: str, version: str) -> None:
        """Refuse (InputError) to order DEVICE onto a bundle none of whose model files a runtime the device
        reported can load (a device that reported nothing yet is not refused)."""
        rows = self.db.query("SELECT state FROM devices WHERE id = ?", (device,))
        caps = _capabilities(rows[0][0]) if rows else None
        if not caps or not isinstance(caps.get("runtimes"), dict):
            return
        formats = self._formats(name, version)
        have = {k for k, v in caps["runtimes"].items() if isinstance(v, dict) and not v.get("error")}
        if formats and not formats & have:
            raise InputError(
                f"device {device} cannot run {name}:{version}: its models are {', '.join(sorted(formats))}, and the "
                f"device has runtimes for {', '.join(sorted(have)) or 'none'}"
            )

    def send_command(self, command: str, args: dict[str, Any], devices: list[str], by: str = "operator") -> list[str]:
        """Send COMMAND (flush, report, capture; shadows go through `shadows`) to each of DEVICES, recorded in the
        `commands` audit table; returns the command ids. A command reaches only devices online now."""
        if command == "shadow":
            raise InputError("shadow commands are ordered with 'edgefleet fleet shadow create' (merged reports)")
        if not devices:
            raise InputError("no device to send the command to")
        unknown = [d for d in devices if not self.has_device(d)]
        if unknown:
            raise InputError(
                f"no device {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
        ids, handles, now = [], [], time.time()
        for d in devices:
            cid = "c-" + secrets.token_hex(5)
            doc = {"schema": COMMAND_SCHEMA, "id": cid, "command": command, "args": args}
            parse_command(doc)  # the same check a device makes: an unknown command or bad args stop here
            self.db.execute(
                "INSERT INTO commands (id, device_id, command, args, sent, sent_by) VALUES (?, ?, ?, ?, ?, ?)",
                (cid, d, command, json.dumps(args, sort_keys=True), now, by),
            )
            handles.append(self.publish(topic(d, "commands"), json.dumps(doc)))
            ids.append(cid)
        for h in handles:
            h.wait_for_publish(10)
        return ids

    def commands(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT id, command, args, sent, sent_by FROM commands WHERE device_id = ? ORDER BY sent DESC LIMIT ?",
            (device_id, limit),
        )
        if not rows:
            return []
        oldest = min(float(s) for _, _, _, s, _ in rows)
        answers: dict[str, dict[str, Any]] = {}
        # The device's answer: the first event naming the command; device clocks may run behind, so a minute
        # of slack.
        marks = ", ".join("?" * len(_ANSWERS))
        for ts, typ, body in self.db.query(
            f"SELECT ts, type, body FROM events WHERE device_id = ? AND type IN ({marks}) AND ts >= ? ORDER BY ts",
            (device_id, *_ANSWERS, oldest - 60),
        ):
            b = json.loads(body)
            cid = b.get("command_id")
            if isinstance(cid, str) and cid not in answers:
                reason = b.get("reason")
                answers[cid] = {"type": typ, "ts": ts, "reason": reason if isinstance(reason, str) else None}
        return [
            {"id": i, "command": c, "args": json.loads(a), "sent": s, "by": b, "answer": answers.get(i)}
            for i, c, a, s, b in rows
        ]

    def refusals(self, device_id: str) -> list[dict[str, Any]]:
        """What the ingest refused from DEVICE_ID, per kind and reason, most recent first."""
        rows = self.db.query(
            "SELECT kind, reason, count, last_ts, last_key FROM refusals WHERE device_id = ? ORDER BY last_ts DESC",
            (device_id,),
        )
        return [{"kind": k, "reason": r, "count": int(n), "last": t, "last_key": key} for k, r, n, t, key in rows]

    def events(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT ts, type, body FROM events WHERE device_id = ? ORDER BY ts DESC LIMIT ?", (device_id, limit)
        )
        return [{"device_id": device_id, "ts": ts, "type": t, "body": json.loads(b)} for ts, t, b in rows]


def _like(text: str) -> str:
    """TEXT as itself in a LIKE pattern with ESCAPE '\\' (its %, _ and \\ are not wildcards)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _capabilities(state: str | None) -> dict[str, Any] | None:
    """The capabilities a device's last state document reported (None: none yet, or not an object)."""
    try:
        doc = json.loads(state) if state else None
    except ValueError:
        return None
    caps = doc.get("capabilities") if isinstance(doc, dict) else None
    return caps if isinstance(caps, dict) else None
