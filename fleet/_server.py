"""The fleet server process: embedded (or external) broker, ingest worker, and one HTTP port for the
REST API, bundle downloads (with Range) and Prometheus `/metrics`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet import EdgefleetError, InputError, open_bundle
from edgefleet._bundle import sha256_file
from edgefleet._fs import atomic_write
from edgefleet._topics import DESIRED_SCHEMA, check_device_id, topic

from ._broker import SERVER_USER, Broker
from ._db import Database
from ._drift import DriftMonitor
from ._endpoint import BrokerEndpoint
from ._ingest import IngestWorker
from ._rollout import RolloutEngine

__all__ = ["FleetServer", "ServerConfig", "create_token", "provision"]

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
    public_host: str = "127.0.0.1"
    trusted_keys: list[Path] = field(default_factory=list)
    # Drift alerts: how often they are checked and over how much recent telemetry.
    drift_interval_s: float = 30.0
    drift_window_s: float = 900.0
    # /metrics shows device counts, bundle names, tags and drift: behind an API token unless opened.
    metrics_open: bool = False
    mqtt_bind: str = "0.0.0.0"  # the embedded broker's listen address

    @property
    def db(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def base_url(self) -> str:
        return f"http://{self.public_host}:{self.http_port}"


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(data_dir: Path, name: str = "operator", db_url: str | None = None) -> str:
    """A new operator API token (only its hash is stored)."""
    db = Database(db_url or f"sqlite:///{Path(data_dir) / 'fleet.db'}")
    token = "eft_" + secrets.token_urlsafe(32)
    db.execute("INSERT INTO tokens (sha256, name, created) VALUES (?, ?, ?)", (_hash_token(token), name, time.time()))
    return token


def trusted_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "trusted"


def check_tags(tags: list[str]) -> list[str]:
    for t in tags:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", t):
            raise InputError(f"tag {t!r} is not valid: use letters, digits, '.', '_', ':' or '-'")
    return sorted(set(tags))


@dataclass(frozen=True)
class Credentials:
    """What a newly registered (or re-keyed) device is given: its broker password and its token for
    bundle downloads. Only hashes stay on the server side (the broker's password file, the database)."""

    password: str
    http_token: str


def register_devices(db: Database, broker: Broker, devices: list[tuple[str, list[str]]]) -> dict[str, Credentials]:
    """Create or re-key devices (id, tags): fresh broker passwords and download tokens (returned), tags
    in the registry.

    Returns once the broker has reloaded its password file, so the credentials work right away."""
    checked = [(check_device_id(d), check_tags(tags)) for d, tags in devices]
    creds = {d: Credentials(secrets.token_urlsafe(24), "efd_" + secrets.token_urlsafe(32)) for d, _ in checked}
    reloaded = broker.set_passwords({d: c.password for d, c in creds.items()})
    now = time.time()
    with db.transaction() as cur:
        for d, tags in checked:
            cur.execute(
                "INSERT INTO devices (id, tags, created) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET tags = ?",
                (d, json.dumps(tags), now, json.dumps(tags)),
            )
            cur.execute(
                "INSERT INTO device_tokens (device_id, sha256, created) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET sha256 = ?, created = ?",
                (d, _hash_token(creds[d].http_token), now, _hash_token(creds[d].http_token), now),
            )
    reloaded.wait(10)
    return creds


def register_device(db: Database, broker: Broker, device_id: str, tags: list[str]) -> Credentials:
    """Create or re-key DEVICE_ID (see `register_devices`)."""
    return register_devices(db, broker, [(device_id, tags)])[device_id]


def device_toml(
    device_id: str,
    creds: Credentials,
    tags: list[str],
    key_names: list[str],
    host: str,
    port: int,
    tls: bool = False,
    ca_name: str | None = None,
    http_url: str | None = None,
    self_test_hz: float = 0.0,
) -> str:
    text = (
        f'device_id = "{device_id}"\n'
        f'data_dir = "{device_id}-data"\n'
        f"trusted_keys = {json.dumps(key_names)}\n"
        f"tags = {json.dumps(sorted(set(tags)))}\n"
        f'http_token = "{creds.http_token}"\n'
        # The token goes to the fleet server's origin only (runtime: AgentConfig.token_origins).
        + (f"token_origins = {json.dumps([http_url])}\n" if http_url else "")
        # A device with no app traffic of its own sends no telemetry; its golden inputs can stand in.
        + (f"self_test_hz = {self_test_hz!r}\n" if self_test_hz > 0 else "")
        + "\n"
        "[mqtt]\n"
        f'host = "{host}"\nport = {port}\n'
        f'username = "{device_id}"\npassword = "{creds.password}"\n'
    )
    if tls:
        text += "tls = true\n" + (f"ca = {json.dumps(ca_name)}\n" if ca_name else "")
    return text


_EXTERNAL = "external.json"
_EMBEDDED = "embedded.json"


def recorded_broker(data_dir: Path) -> dict[str, Any] | None:
    """How the server in DATA_DIR last ran its broker, for offline `fleet provision` and `fleet ingest`:
    `url` (for server-side clients), `host` / `port` / `tls` / `ca_pem` (for devices), `reload`. Written
    at every start: external.json for `--broker`, embedded.json for the embedded one (None: never ran)."""
    for name in (_EXTERNAL, _EMBEDDED):
        p = Path(data_dir) / "mosquitto" / name
        if p.exists():
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            return doc if isinstance(doc, dict) else None
    return None


def provision(
    data_dir: Path,
    device_id: str,
    tags: list[str],
    out: Path,
    mqtt_host: str | None = None,
    mqtt_port: int | None = None,
    db_url: str | None = None,
    self_test_hz: float = 0.0,
) -> Path:
    """Register DEVICE_ID, give it broker credentials, write its device.toml (and the trusted keys) to OUT.

    Host and port default to how the server in DATA_DIR last ran its broker (external or embedded, with
    its public host and MQTT port), else 127.0.0.1:1883. SELF_TEST_HZ > 0: the agent runs the bundle's
    golden inputs that often as traffic (a trial device with no app of its own)."""
    if not (math.isfinite(self_test_hz) and 0 <= self_test_hz <= 1000):
        raise InputError(f"--self-test-hz must be between 0 and 1000 calls a second, got {self_test_hz}")
    data_dir = Path(data_dir)
    keys = sorted(trusted_dir(data_dir).glob("*.pub"))
    if not keys:
        raise InputError(
            f"no trusted keys in {trusted_dir(data_dir)}: start the server with --trusted-key KEY.pub first"
        )
    ext = recorded_broker(data_dir) or {}
    host = mqtt_host or ext.get("host", "127.0.0.1")
    port = mqtt_port or int(ext.get("port", 1883))
    db = Database(db_url or f"sqlite:///{data_dir / 'fleet.db'}")
    broker = Broker(data_dir / "mosquitto", port, reload_command=ext.get("reload"))
    creds = register_device(db, broker, device_id, tags)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in keys:
        shutil.copy(k, out.parent / k.name)
    ca_name = None
    if ext.get("ca_pem"):
        ca_name = "broker-ca.pem"
        atomic_write(out.parent / ca_name, ext["ca_pem"].encode())
    text = device_toml(
        device_id,
        creds,
        tags,
        [k.name for k in keys],
        host,
        port,
        bool(ext.get("tls")),
        ca_name,
        ext.get("http_url"),
        self_test_hz,
    )
    atomic_write(out, text.encode(), mode=0o600)
    return out


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
        self.external: BrokerEndpoint | None = None
        if config.broker_url != "embedded":
            self.external = BrokerEndpoint.parse(
                config.broker_url, ca=config.broker_ca, username=config.broker_username, password=config.broker_password
            )
        self.broker: Broker | None = None
        self.ingest: IngestWorker | None = None
        self.ready = False
        self._pub: Any = None
        self.rollouts = RolloutEngine(self.db, self.set_desired)
        self.drift = DriftMonitor(self.db, config.drift_interval_s, config.drift_window_s)

    @property
    def trusted(self) -> list[str]:
        return [str(p) for p in sorted(trusted_dir(self.dir).glob("*.pub"))]

    def start(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        ext = self.external
        if ext is None:
            self.broker = Broker(self.dir / "mosquitto", self.config.mqtt_port, host=self.config.mqtt_bind)
            self.broker.start()
            endpoint = BrokerEndpoint("127.0.0.1", self.config.mqtt_port, False, None, SERVER_USER, "")
            self._record_embedded()
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
        self.ready = True

    def _record_external(self, ext: BrokerEndpoint) -> None:
        """Remember the external broker, so offline `fleet provision` writes device configs for it."""
        doc = {
            "url": ext.url(),
            "host": ext.host,
            "port": ext.port,
            "tls": ext.tls,
            "ca_pem": Path(ext.ca).read_text() if ext.ca else None,
            "reload": self.config.broker_reload,
            "http_url": self.config.base_url,
        }
        (self.dir / "mosquitto" / _EMBEDDED).unlink(missing_ok=True)
        atomic_write(self.dir / "mosquitto" / _EXTERNAL, json.dumps(doc, indent=1).encode())

    def _record_embedded(self) -> None:
        """Remember the embedded broker's port and the host devices reach it by (see `recorded_broker`)."""
        doc = {
            "url": f"mqtt://127.0.0.1:{self.config.mqtt_port}",
            "host": self.config.public_host,
            "port": self.config.mqtt_port,
            "tls": False,
            "ca_pem": None,
            "reload": None,
            "http_url": self.config.base_url,
        }
        (self.dir / "mosquitto" / _EXTERNAL).unlink(missing_ok=True)  # from an earlier run with --broker
        atomic_write(self.dir / "mosquitto" / _EMBEDDED, json.dumps(doc, indent=1).encode())

    def device_mqtt(self) -> dict[str, Any]:
        """How devices reach the broker: host, port, and with TLS the CA's PEM (None: the system's CAs)."""
        if self.external is None:
            return {"host": self.config.public_host, "port": self.config.mqtt_port, "tls": False, "ca_pem": None}
        ext = self.external
        return {
            "host": ext.host,
            "port": ext.port,
            "tls": ext.tls,
            "ca_pem": Path(ext.ca).read_text() if ext.ca else None,
        }

    def stop(self) -> None:
        self.ready = False
        self.rollouts.stop()
        self.drift.stop()
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
        if not header or not header.startswith("Bearer "):
            return False
        return bool(self.db.query("SELECT 1 FROM tokens WHERE sha256 = ?", (_hash_token(header[7:].strip()),)))

    def check_download(self, header: str | None) -> bool:
        """A token that may download bundles: a device's (written into its device.toml) or an operator's."""
        if not header or not header.startswith("Bearer "):
            return False
        h = _hash_token(header[7:].strip())
        return bool(
            self.db.query("SELECT 1 FROM tokens WHERE sha256 = ?", (h,))
            or self.db.query("SELECT 1 FROM device_tokens WHERE sha256 = ?", (h,))
        )

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
            shutil.copyfile(data_path, dest.with_suffix(".efb.tmp"))
            os.replace(dest.with_suffix(".efb.tmp"), dest)
            self.db.execute(
                "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (m.name, m.version, sha, dest.stat().st_size, str(dest), m.canonical_bytes().decode(), time.time()),
            )
        return self.bundle_ref(m.name, m.version)

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
        doc = {
            "schema": DESIRED_SCHEMA,
            "bundle": self.bundle_ref(name, version),
            "action": action,
            "rollout": rollout,
            "issued_at": time.time(),
        }
        info = self._pub.publish(topic(device, "desired"), json.dumps(doc), qos=1, retain=True)
        if wait:
            info.wait_for_publish(10)
        return info

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

    def devices(self) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT id, tags, online, bundle_name, bundle_version, staged_version, accelerator, agent_version, "
            "update_state, last_seen FROM devices ORDER BY id"
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
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["tags"] = json.loads(d["tags"])
            d["online"] = bool(d["online"])
            out.append(d)
        return out

    def events(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT ts, type, body FROM events WHERE device_id = ? ORDER BY ts DESC LIMIT ?", (device_id, limit)
        )
        return [{"device_id": device_id, "ts": ts, "type": t, "body": json.loads(b)} for ts, t, b in rows]

    def metrics(self) -> str:
        c = self.db.counters()
        lines = [
            "# HELP edgefleet_devices Registered devices.",
            "# TYPE edgefleet_devices gauge",
            f"edgefleet_devices {self.db.query('SELECT COUNT(*) FROM devices')[0][0]}",
            "# HELP edgefleet_devices_online Devices whose last status says online.",
            "# TYPE edgefleet_devices_online gauge",
            f"edgefleet_devices_online {self.db.query('SELECT COUNT(*) FROM devices WHERE online = 1')[0][0]}",
            "# HELP edgefleet_ingest_messages_total Messages handled by ingest workers, by outcome.",
            "# TYPE edgefleet_ingest_messages_total counter",
        ]
        for k in ("received", "stored", "duplicates", "rejected", "unknown_device"):
            lines.append(f'edgefleet_ingest_messages_total{{outcome="{k}"}} {c.get("ingest_" + k, 0)}')
        alerts = self.db.query(
            "SELECT bundle_name, bundle_version, cohort, feature FROM alerts WHERE state = 'open' ORDER BY 1, 2, 3, 4"
        )
        lines += [
            "# HELP edgefleet_drift_alerts_open Open drift alerts.",
            "# TYPE edgefleet_drift_alerts_open gauge",
            f"edgefleet_drift_alerts_open {len(alerts)}",
            "# HELP edgefleet_drift_alert One per open drift alert (bundle, cohort, feature).",
            "# TYPE edgefleet_drift_alert gauge",
        ]
        for n, v, cohort, feature in alerts:
            lines.append(
                f'edgefleet_drift_alert{{bundle="{n}:{v}",cohort="{_label(cohort)}",feature="{_label(feature)}"}} 1'
            )
        lines += [
            "# HELP edgefleet_drift_psi PSI against the bundle's baseline at the last drift check.",
            "# TYPE edgefleet_drift_psi gauge",
        ]
        for (b, cohort, feature), value in sorted(self.drift.last.items()):
            lines.append(
                f'edgefleet_drift_psi{{bundle="{b}",cohort="{_label(cohort)}",feature="{_label(feature)}"}} {value}'
            )
        if self.broker is not None:
            lines += [
                "# TYPE edgefleet_broker_restarts_total counter",
                f"edgefleet_broker_restarts_total {self.broker.restarts}",
            ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
