"""Provisioning: registering devices (broker passwords, download tokens, tags) and writing their
device.toml, online through the server or offline from its data directory."""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet import InputError
from edgefleet._fs import atomic_write
from edgefleet.protocol import check_device_id
from edgefleet.runtime._config import AgentConfig, MqttConfig, dump_config

from ._auth import hash_token
from ._broker import Broker
from ._db import Database

__all__ = [
    "Credentials",
    "check_tags",
    "device_toml",
    "provision",
    "record_broker",
    "recorded_broker",
    "register_device",
    "register_devices",
    "trusted_dir",
]


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
                (d, hash_token(creds[d].http_token), now, hash_token(creds[d].http_token), now),
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
    http_ca: str | None = None,
) -> str:
    """DEVICE_ID's device.toml, rendered from the agent's own `AgentConfig` (so it always loads)."""
    cfg = AgentConfig(
        device_id=device_id,
        data_dir=Path(f"{device_id}-data"),
        trusted_keys=[Path(k) for k in key_names],
        tags=sorted(set(tags)),
        http_token=creds.http_token,
        # The token goes to the fleet server's origin only (runtime: AgentConfig.token_origins).
        token_origins=[http_url] if http_url else [],
        # A device with no app traffic of its own sends no telemetry; its golden inputs can stand in.
        self_test_hz=self_test_hz,
        http_ca=http_ca,
        mqtt=MqttConfig(host=host, port=port, username=device_id, password=creds.password, tls=tls, ca=ca_name),
    )
    return dump_config(cfg)


_EXTERNAL = "external.json"
_EMBEDDED = "embedded.json"


def record_broker(data_dir: Path, doc: dict[str, Any], external: bool) -> None:
    """Remember how the server runs its broker (see `recorded_broker`); the other kind's record goes."""
    d = Path(data_dir) / "mosquitto"
    (d / (_EMBEDDED if external else _EXTERNAL)).unlink(missing_ok=True)
    atomic_write(d / (_EXTERNAL if external else _EMBEDDED), json.dumps(doc, indent=1).encode())


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
            if not isinstance(doc, dict):
                return None
            doc.setdefault("embedded", name == _EMBEDDED)
            return doc
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
    broker = Broker(data_dir / "mosquitto", port, reload_command=ext.get("reload"), embedded=bool(ext.get("embedded")))
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
        # An https:// server with the embedded broker's CA: downloads trust the same CA.
        ca_name if ca_name and str(ext.get("http_url", "")).startswith("https://") and ext.get("embedded") else None,
    )
    atomic_write(out, text.encode(), mode=0o600)
    return out
