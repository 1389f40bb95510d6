"""What devices send besides telemetry windows: status, state documents and events (docs/topics.md).

Each has a parser that checks the rules the docs list and returns a typed record; every record keeps the
fields it does not know (a newer MINOR's additions) in `extra` and gives the document back with `to_dict`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ._errors import InputError
from ._manifest import _NAME, _SEMVER, _number
from ._topics import EVENT_SCHEMA, STATE_SCHEMA, STATUS_SCHEMA, _check_schema

__all__ = [
    "BUNDLE_FIELDS",
    "EVENT_TYPES",
    "UPDATE_STATES",
    "Event",
    "State",
    "Status",
    "check_bundle_name",
    "parse_event",
    "parse_state",
    "parse_status",
]

UPDATE_STATES = (
    "idle",
    "downloading",
    "verifying",
    "staging",
    "smoke_test",
    "switching",
    "health_watch",
    "committing",
    "rolling_back",
)
# Event type -> the fields of it that name a bundle. A bundle is always named by an object with `name` and
# `version` (plus `sha256`, `url` and `size` when the device knows them), never by a bare version string.
BUNDLE_FIELDS: dict[str, tuple[str, ...]] = {
    "installed": ("bundle",),
    "update_state": ("target",),
    "committed": ("bundle",),
    "rolled_back": ("bundle",),
    "update_failed": ("target",),
    "update_refused": ("bundle",),
    "update_superseded": ("old", "new"),
    "slot_corrupt": ("bundle",),
    "shadow_started": ("candidate",),
    "shadow_report": ("candidate",),
    "shadow_progress": ("candidate",),
    "shadow_failed": (),
    "capture_uploaded": (),
    "capture_refused": (),
    "capture_failed": (),
    "command_done": (),
    "bad_message": (),
    "buffer_reset": (),
    "agent_error": (),
}
EVENT_TYPES = tuple(BUNDLE_FIELDS)
# Fields agents before the bundle-object rule sent as a bare version string (same schema, still in the
# field): a receiver accepts that form there too; agents now always send objects.
LEGACY_VERSION_FIELDS = frozenset(
    {("update_state", "target"), ("update_superseded", "old"), ("update_superseded", "new")}
)
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_KEY = 200
_STATUS_FIELDS = ("schema", "device_id", "online", "ts")
# State fields that are objects of the device's own figures, checked for their type only.
_STATE_OBJECTS = ("buffer", "refused_by_fleet", "capabilities")


def _device(obj: dict[str, Any], device_id: str | None, what: str) -> str:
    dev = obj.get("device_id")
    if not isinstance(dev, str):
        raise InputError(f"{what} field 'device_id' is missing or not a string")
    if device_id is not None and dev != device_id:
        raise InputError(f"{what} names device {dev!r} but came from {device_id!r}")
    return dev


def _ts(obj: dict[str, Any], what: str) -> float:
    ts = obj.get("ts")
    if not isinstance(ts, (int, float)) or not _number(ts) or ts < 0:
        raise InputError(f"{what} field 'ts' must be a finite, non-negative number (seconds since the epoch)")
    return float(ts)


def _rest(obj: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


def check_bundle_name(v: Any, where: str, *, nullable: bool = True) -> dict[str, Any] | None:
    """A bundle named in a device message: null (where allowed) or an object with a valid `name` and
    `version`, and `sha256` / `url` / `size` of the right types when present."""
    if v is None and nullable:
        return None
    if not isinstance(v, dict):
        raise InputError(f"{where} must be a bundle object with 'name' and 'version'")
    name, version = v.get("name"), v.get("version")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"{where}.name must be a bundle name (letters, digits, . _ -)")
    if not isinstance(version, str) or not _SEMVER.fullmatch(version):
        raise InputError(f"{where}.version must be a semantic version")
    for k, t in (("sha256", str), ("url", str), ("model_id", str)):
        if k in v and not isinstance(v[k], t):
            raise InputError(f"{where}.{k} must be a string")
    if "size" in v and not (isinstance(v["size"], int) and not isinstance(v["size"], bool) and v["size"] >= 0):
        raise InputError(f"{where}.size must be a non-negative integer")
    return v


@dataclass(frozen=True)
class Status:
    """`edgefleet.status/1`: whether the device is online (the agent's last will says it is not)."""

    device_id: str
    online: bool
    ts: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"schema": STATUS_SCHEMA, "device_id": self.device_id, "online": self.online, "ts": self.ts}
        return {**d, **self.extra}


def parse_status(obj: Any, device_id: str | None = None) -> Status:
    """A status document; with DEVICE_ID (the topic's device), it must name that device."""
    s = _check_schema(obj, STATUS_SCHEMA, "status")
    online = s.get("online")
    if not isinstance(online, bool):
        raise InputError("status field 'online' must be true or false")
    return Status(_device(s, device_id, "status"), online, _ts(s, "status"), _rest(s, _STATUS_FIELDS))


@dataclass(frozen=True)
class Event:
    """`edgefleet.event/1`: one thing that happened on the device, under its idempotency `key`. `fields`
    holds the type's own fields (docs/topics.md lists them per type)."""

    key: str
    device_id: str
    type: str
    ts: float
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": EVENT_SCHEMA,
            "key": self.key,
            "device_id": self.device_id,
            "type": self.type,
            "ts": self.ts,
            **self.fields,
        }


def parse_event(obj: Any, device_id: str | None = None) -> Event:
    """An event. Types this version does not know are accepted (a newer MINOR may add some); a known type's
    bundle fields must be bundle objects, `rollout` a string or null, `reason` a string."""
    e = _check_schema(obj, EVENT_SCHEMA, "event")
    key, typ = e.get("key"), e.get("type")
    if not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY:
        raise InputError(f"event field 'key' must be a string of 1-{_MAX_KEY} characters")
    if not isinstance(typ, str) or not _EVENT_TYPE.fullmatch(typ):
        raise InputError("event field 'type' must be a lower-case name (letters, digits, _)")
    dev = _device(e, device_id, "event")
    ts = _ts(e, "event")
    for name in BUNDLE_FIELDS.get(typ, ()):
        v = e.get(name)
        if (typ, name) in LEGACY_VERSION_FIELDS and isinstance(v, str) and _SEMVER.fullmatch(v):
            continue
        check_bundle_name(v, f"{typ} event field '{name}'")
    if "rollout" in e and e["rollout"] is not None and not isinstance(e["rollout"], str):
        raise InputError(f"{typ} event field 'rollout' must be a string or null")
    if "reason" in e and not isinstance(e["reason"], str):
        raise InputError(f"{typ} event field 'reason' must be a string")
    return Event(key, dev, typ, ts, _rest(e, ("schema", "key", "device_id", "type", "ts")))


@dataclass(frozen=True)
class State:
    """`edgefleet.state/1`: the device's whole state, retained. Only `schema` and `device_id` are required;
    every other documented field is checked when present (docs/topics.md lists them). `document` is the
    state as sent, unknown fields included."""

    device_id: str
    agent_version: str | None
    tags: list[str] | None
    active: dict[str, Any] | None
    committed: dict[str, Any] | None
    staged: dict[str, Any] | None
    update_state: str | None
    rollout: str | None
    ts: float | None
    document: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.document)


def parse_state(obj: Any, device_id: str | None = None) -> State:
    """A state document; with DEVICE_ID (the topic's device), it must name that device."""
    s = _check_schema(obj, STATE_SCHEMA, "state")
    dev = _device(s, device_id, "state")
    if "agent_version" in s and not isinstance(s["agent_version"], str):
        raise InputError("state field 'agent_version' must be a string")
    tags = s.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise InputError("state field 'tags' must be a list of strings")
    active = s.get("active")
    if active is not None:
        if not isinstance(active, dict):
            raise InputError("state field 'active' must be an object or null")
        check_bundle_name({"name": active.get("bundle"), "version": active.get("version")}, "state field 'active'")
        for k in ("model_id", "backend", "accelerator"):
            if active.get(k) is not None and not isinstance(active[k], str):
                raise InputError(f"state field 'active.{k}' must be a string")
    for k in ("committed", "staged"):
        check_bundle_name(s.get(k), f"state field '{k}'")
    update = s.get("update")
    if update is not None:
        if not isinstance(update, dict):
            raise InputError("state field 'update' must be an object")
        if update.get("state") not in UPDATE_STATES:
            raise InputError(f"state field 'update.state' must be one of {', '.join(UPDATE_STATES)}")
        if update.get("rollout") is not None and not isinstance(update["rollout"], str):
            raise InputError("state field 'update.rollout' must be a string or null")
    for k in _STATE_OBJECTS:
        if s.get(k) is not None and not isinstance(s[k], dict):
            raise InputError(f"state field '{k}' must be an object")
    return State(
        device_id=dev,
        agent_version=s.get("agent_version"),
        tags=tags,
        active=active,
        committed=s.get("committed"),
        staged=s.get("staged"),
        update_state=None if update is None else update["state"],
        rollout=None if update is None else update.get("rollout"),
        ts=_ts(s, "state") if "ts" in s else None,
        document=s,
    )
