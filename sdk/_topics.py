"""The MQTT topic contract between device agents and the fleet server (docs/topics.md).

Every device owns the prefix `edgefleet/v1/devices/<device_id>/`; the broker's ACL lets a device
publish and subscribe only there. Payloads are JSON objects with a `schema` field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ._errors import InputError
from ._manifest import _HEX64, _NAME, _SEMVER

__all__ = [
    "COMMANDS",
    "COMMAND_SCHEMA",
    "DESIRED_SCHEMA",
    "DEVICE_ID",
    "EVENT_SCHEMA",
    "REFUSAL_SCHEMA",
    "ROOT",
    "STATE_SCHEMA",
    "STATUS_SCHEMA",
    "BundleRef",
    "Command",
    "Desired",
    "Refusal",
    "check_device_id",
    "parse_command",
    "parse_desired",
    "parse_refusal",
    "parse_topic",
    "topic",
]

ROOT = "edgefleet/v1"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# kind -> (direction, retained, QoS)
KINDS = {
    "status": ("device", True, 1),  # online / offline; the offline message is the last will
    "state": ("device", True, 1),  # full device state: active / staged bundle, update state machine
    "telemetry": ("device", False, 1),  # telemetry windows (edgefleet.telemetry/1), idempotency key each
    "events": ("device", False, 1),  # update transitions, rollbacks, shadow reports, buffer resets
    "desired": ("server", True, 1),  # the bundle this device should run
    "commands": ("server", False, 1),  # one-off orders: shadow, flush, report
    "refusals": ("server", False, 1),  # a device's message the server refused, and why
}

STATUS_SCHEMA = "edgefleet.status/1"
STATE_SCHEMA = "edgefleet.state/1"
EVENT_SCHEMA = "edgefleet.event/1"
DESIRED_SCHEMA = "edgefleet.desired/1"
COMMAND_SCHEMA = "edgefleet.command/1"
REFUSAL_SCHEMA = "edgefleet.refusal/1"
COMMANDS = ("shadow", "flush", "report", "capture")
MAX_CAPTURE_SAMPLES = 10_000


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise InputError(
            f"device id {device_id!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return device_id


def topic(device_id: str, kind: str) -> str:
    """The topic of KIND for DEVICE_ID, e.g. topic('cam-7', 'telemetry')."""
    if kind not in KINDS:
        raise InputError(f"unknown topic kind '{kind}'; one of {', '.join(KINDS)}")
    return f"{ROOT}/devices/{check_device_id(device_id)}/{kind}"


def parse_topic(name: str) -> tuple[str, str] | None:
    """(device_id, kind) of a contract topic, or None for anything else."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{ROOT}/devices" or parts[4] not in KINDS:
        return None
    if not DEVICE_ID.fullmatch(parts[3]):
        return None
    return parts[3], parts[4]


def _field(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    v = obj.get(key)
    if not isinstance(v, types) or (isinstance(v, bool) and types is not bool):
        raise InputError(f"{where} field '{key}' is missing or has the wrong type")
    return v


@dataclass(frozen=True)
class BundleRef:
    """A bundle the server offers: where to fetch it and what it must hash to."""

    name: str
    version: str
    url: str
    sha256: str
    size: int

    @classmethod
    def parse(cls, obj: Any, where: str) -> BundleRef:
        if not isinstance(obj, dict):
            raise InputError(f"{where} must be an object")
        ref = cls(
            name=_field(obj, "name", str, where),
            version=_field(obj, "version", str, where),
            url=_field(obj, "url", str, where),
            sha256=_field(obj, "sha256", str, where),
            size=_field(obj, "size", int, where),
        )
        if not _NAME.fullmatch(ref.name) or not _SEMVER.fullmatch(ref.version):
            raise InputError(f"{where} has an invalid bundle name or version")
        if not _HEX64.fullmatch(ref.sha256) or ref.size <= 0:
            raise InputError(f"{where} needs a sha256 hex digest and a positive size")
        if not re.match(r"^https?://", ref.url):
            raise InputError(f"{where} url must be http:// or https://")
        return ref

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Desired:
    """What the server wants the device to run. `action` is `update`, or `rollback` to allow a downgrade."""

    bundle: BundleRef
    action: str
    rollout: str | None
    issued_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": DESIRED_SCHEMA,
            "bundle": self.bundle.to_dict(),
            "action": self.action,
            "rollout": self.rollout,
            "issued_at": self.issued_at,
        }


def _check_schema(obj: Any, schema: str, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(f"{what} must be a JSON object")
    if obj.get("schema") != schema:
        raise InputError(f"{what} has schema {obj.get('schema')!r}; expected {schema!r}")
    return obj


def parse_desired(obj: Any) -> Desired:
    d = _check_schema(obj, DESIRED_SCHEMA, "desired state")
    action = d.get("action", "update")
    if action not in ("update", "rollback"):
        raise InputError(f"desired state action {action!r} is unknown; use update or rollback")
    rollout = d.get("rollout")
    if rollout is not None and not isinstance(rollout, str):
        raise InputError("desired state field 'rollout' must be a string or null")
    issued = d.get("issued_at", 0.0)
    if not isinstance(issued, (int, float)):
        raise InputError("desired state field 'issued_at' must be a number")
    return Desired(BundleRef.parse(d.get("bundle"), "desired state bundle"), action, rollout, float(issued))


@dataclass(frozen=True)
class Command:
    """A one-off order to one device (docs/topics.md lists the commands and their arguments)."""

    id: str
    command: str
    args: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": COMMAND_SCHEMA, "id": self.id, "command": self.command, "args": dict(self.args)}


def parse_command(obj: Any) -> Command:
    c = _check_schema(obj, COMMAND_SCHEMA, "command")
    name = _field(c, "command", str, "command")
    if name not in COMMANDS:
        raise InputError(f"command {name!r} is unknown; one of {', '.join(COMMANDS)}")
    args = c.get("args", {})
    if not isinstance(args, dict):
        raise InputError("command field 'args' must be an object")
    if name == "shadow":
        BundleRef.parse(args.get("bundle"), "shadow command bundle")
        rate = _number(args, "sample_rate", 0.1, 0.0, 1.0)
        if rate == 0:
            raise InputError("shadow command argument 'sample_rate' must be in (0, 1], got 0")
        _number(args, "duration_s", 60.0, 0.0, 7 * 86400.0)
        _number(args, "min_samples", 0, 0.0, 1e9, integer=True)
    if name == "capture":
        for k in ("capture_id", "url"):
            if not isinstance(args.get(k), str) or not args[k]:
                raise InputError(f"capture command argument '{k}' must be a non-empty string")
        if not args["url"].startswith(("http://", "https://")):
            raise InputError("capture command argument 'url' must be an http(s) URL")
        if "samples" not in args:
            raise InputError("capture command needs argument 'samples'")
        _number(args, "samples", 0, 1.0, MAX_CAPTURE_SAMPLES, integer=True, command=name)
    return Command(_field(c, "id", str, "command"), name, args)


def _number(
    args: dict[str, Any],
    key: str,
    default: float,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    command: str = "shadow",
) -> float:
    """A numeric command argument within [LO, HI], or an InputError naming it."""
    v = args.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
    if not ok or (integer and float(v) != int(v)):
        kind = "an integer" if integer else "a number"
        raise InputError(f"{command} command argument '{key}' must be {kind} in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Refusal:
    """The server's answer to a device message it refused: which (`kind`, and `key` when the message had
    one) and why. The message was acknowledged and will not be stored; sending it again is pointless."""

    kind: str
    key: str | None
    reason: str
    ts: float

    def to_dict(self, device_id: str) -> dict[str, Any]:
        return {
            "schema": REFUSAL_SCHEMA,
            "device_id": device_id,
            "kind": self.kind,
            "key": self.key,
            "reason": self.reason,
            "ts": self.ts,
        }


def parse_refusal(obj: Any) -> Refusal:
    r = _check_schema(obj, REFUSAL_SCHEMA, "refusal")
    key = r.get("key")
    if key is not None and not isinstance(key, str):
        raise InputError("refusal field 'key' must be a string or null")
    ts = r.get("ts", 0.0)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise InputError("refusal field 'ts' must be a number")
    return Refusal(_field(r, "kind", str, "refusal"), key, _field(r, "reason", str, "refusal")[:500], float(ts))
