"""The device agent's configuration (`device.toml`), checked field by field."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgefleet import InputError
from edgefleet.protocol import check_device_id

__all__ = ["AgentConfig", "HealthPolicy", "MqttConfig", "dump_config", "load_config"]


@dataclass
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    keepalive: int = 30


@dataclass
class HealthPolicy:
    """When a freshly switched bundle is kept: judged over `window_s` of live calls plus golden probes."""

    window_s: float = 30.0
    min_calls: int = 20
    max_error_rate: float = 0.02
    max_nan_rate: float = 0.0
    max_p95_ratio: float = 1.5
    p95_slack_ms: float = 1.0
    probe_interval_s: float = 0.5
    max_restarts: int = 1


@dataclass
class AgentConfig:
    device_id: str
    data_dir: Path
    trusted_keys: list[Path]
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    backend: str = "auto"
    accelerators: list[str] | None = None
    threads: int | None = None
    window_s: float = 60.0
    buffer_max_bytes: int = 64 << 20
    drain_bytes_per_s: float = 256 * 1024
    download_bytes_per_s: float | None = None
    capture_per_hour: float = 0.0
    http_token: str | None = None
    # Origins (scheme://host[:port]) that may receive http_token; `fleet provision` writes the server's.
    # Empty (configs written before it existed): any URL of the server's desired states. A redirect to
    # another origin never gets it.
    token_origins: list[str] = field(default_factory=list)
    # CA certificate (PEM) the fleet server's https:// URLs are checked against (default: the system's).
    http_ca: Path | None = None
    max_bundle_bytes: int = 2 << 30
    initial_bundle: Path | None = None
    # Built-in traffic for a standalone agent: run the bundle's golden inputs at this rate (0: off).
    self_test_hz: float = 0.0
    tags: list[str] = field(default_factory=list)
    # Ground truth: keep the predicted class of this many recent calls for Agent.feedback (0: off).
    feedback_calls: int = 0
    # ... each for at most this long (seconds): feedback that comes later is refused as expired.
    feedback_ttl_s: float = 86400.0
    # Opt-in: captured samples (capture_per_hour) and the labels fed back for them may be uploaded to the
    # fleet server when it asks (a `capture` command), at most this many bytes per request.
    capture_upload: bool = False
    capture_upload_max_bytes: int = 4 << 20
    # ... sent no faster than this (bytes a second; 0: no cap), beside the telemetry drain's own cap.
    capture_upload_bytes_per_s: float = 64 * 1024
    # Shadow runs: the share of the time the candidate's (single) inference thread may be busy; it rests the
    # remainder, so the app's own calls keep their cores.
    shadow_cpu_share: float = 0.25

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        share = self.shadow_cpu_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
            raise InputError(f"shadow_cpu_share must be a number in (0, 1], got {share!r}")
        if not self.trusted_keys:
            raise InputError("agent config needs trusted_keys: the public key(s) bundles must be signed with")


def _section(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    for k in data:
        if k not in known:
            raise InputError(f"{where}: unknown setting '{k}' (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from exc


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read a device.toml; relative paths in it are relative to the file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"agent config {p} does not exist; 'edgefleet fleet provision' writes one") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"agent config {p} is not valid TOML: {exc}") from exc
    base = p.parent

    def rel(v: str) -> Path:
        q = Path(v)
        return q if q.is_absolute() else base / q

    mqtt = _section(MqttConfig, data.pop("mqtt", {}), f"{p} [mqtt]")
    for k in ("ca", "cert", "key"):
        if getattr(mqtt, k):
            setattr(mqtt, k, str(rel(getattr(mqtt, k))))
    health = _section(HealthPolicy, data.pop("health", {}), f"{p} [health]")
    for k in ("device_id", "data_dir", "trusted_keys"):
        if k not in data:
            raise InputError(f"agent config {p} lacks '{k}'")
    data["data_dir"] = rel(data["data_dir"])
    data["trusted_keys"] = [rel(k) for k in data["trusted_keys"]]
    for k in ("initial_bundle", "http_ca"):
        if data.get(k):
            data[k] = rel(data[k])
    cfg: AgentConfig = _section(AgentConfig, {**data, "mqtt": mqtt, "health": health}, str(p))
    return cfg


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        # JSON's string escapes are TOML's basic-string escapes.
        return json.dumps(str(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _fields_toml(obj: Any, keep: tuple[str, ...] = ()) -> list[str]:
    out = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, (MqttConfig, HealthPolicy)):
            continue
        if f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = f.default
        if v is None or (default is not MISSING and v == default and f.name not in keep):
            continue
        out.append(f"{f.name} = {_toml(v)}")
    return out


def dump_config(cfg: AgentConfig) -> str:
    """CFG as the device.toml `load_config` reads back (settings at their defaults are left out, but for
    where the broker is; paths are written as given, so relative ones stay relative to the file)."""
    lines = _fields_toml(cfg)
    for name, section, keep in (("mqtt", cfg.mqtt, ("host", "port")), ("health", cfg.health, ())):
        body = _fields_toml(section, keep)
        if body:
            lines += ["", f"[{name}]", *body]
    return "\n".join(lines) + "\n"
