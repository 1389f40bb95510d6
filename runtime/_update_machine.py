"""The update state machine: states, events, the transition table and the persisted record.

In the manner of Mender's update agent, every move is `(state, event) -> next` from one table, and
nothing else changes the state: a move the table does not hold is refused (`IllegalTransition`), so
a bug cannot leave a device half-updated in a state nobody planned for. The record is written
(atomically, with a store counter) before the next state's work starts.

    idle --offered--> downloading --downloaded--> verifying --verified--> staging --staged--> smoke_test
    downloading --already_staged--> smoke_test        (the bundle is still in the inactive slot)
    smoke_test --smoke_passed--> switching
    switching --switched--> health_watch --healthy--> committing --committed--> idle
    switching --first_install--> committing           (nothing to roll back to, nothing to watch)
    health_watch --unhealthy--> rolling_back --rolled_back--> idle
    downloading | verifying | staging | smoke_test --failed | superseded--> idle
    idle --installed--> idle                          (the config's initial bundle)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgefleet import EdgefleetError
from edgefleet._fs import atomic_write
from edgefleet.protocol import Desired, parse_desired

from ._slots import SlotInfo

__all__ = [
    "BEFORE_SWITCH",
    "TRANSITIONS",
    "IllegalTransition",
    "UpdateEvent",
    "UpdateMachine",
    "UpdateRecord",
    "UpdateState",
    "UpdateStore",
    "history_key",
]

log = logging.getLogger("edgefleet.agent")


class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SMOKE_TEST = "smoke_test"
    SWITCHING = "switching"
    HEALTH_WATCH = "health_watch"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling_back"


class UpdateEvent(StrEnum):
    OFFERED = "offered"
    INSTALLED = "installed"
    ALREADY_STAGED = "already_staged"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED = "staged"
    SMOKE_PASSED = "smoke_passed"
    SWITCHED = "switched"
    FIRST_INSTALL = "first_install"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    SUPERSEDED = "superseded"


S, E = UpdateState, UpdateEvent
# Before the switch the active slot is untouched: a failure or a newer offer just ends the update.
BEFORE_SWITCH = frozenset({S.DOWNLOADING, S.VERIFYING, S.STAGING, S.SMOKE_TEST})

TRANSITIONS: dict[tuple[UpdateState, UpdateEvent], UpdateState] = {
    (S.IDLE, E.OFFERED): S.DOWNLOADING,
    (S.IDLE, E.INSTALLED): S.IDLE,
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.DOWNLOADING, E.ALREADY_STAGED): S.SMOKE_TEST,
    (S.VERIFYING, E.VERIFIED): S.STAGING,
    (S.STAGING, E.STAGED): S.SMOKE_TEST,
    (S.SMOKE_TEST, E.SMOKE_PASSED): S.SWITCHING,
    (S.SWITCHING, E.SWITCHED): S.HEALTH_WATCH,
    (S.SWITCHING, E.FIRST_INSTALL): S.COMMITTING,
    (S.HEALTH_WATCH, E.HEALTHY): S.COMMITTING,
    (S.HEALTH_WATCH, E.UNHEALTHY): S.ROLLING_BACK,
    (S.COMMITTING, E.COMMITTED): S.IDLE,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.IDLE,
    **{(s, E.FAILED): S.IDLE for s in BEFORE_SWITCH},
    **{(s, E.SUPERSEDED): S.IDLE for s in BEFORE_SWITCH},
}
del S, E

_HISTORY = 32  # committed bundles remembered as rollback targets


def history_key(name: str, version: str, sha256: str) -> str:
    """How a committed bundle is named in `UpdateRecord.history`."""
    return f"{name}:{version}:{sha256}"


class IllegalTransition(EdgefleetError):
    """An event the transition table has no move for in the current state (a bug, never a device fault)."""


def _slot(d: Any) -> SlotInfo | None:
    return None if d is None else SlotInfo(str(d["slot"]), str(d["name"]), str(d["version"]), str(d["sha256"]))


@dataclass
class UpdateRecord:
    """What `agent.json` holds: the update in progress and what the device has committed and refused."""

    state: UpdateState = UpdateState.IDLE
    committed: SlotInfo | None = None
    target: Desired | None = None
    target_slot: str | None = None
    previous: SlotInfo | None = None  # the slot to roll back to, set at the switch
    old_p95_ms: float | None = None  # the previous bundle's golden p95, when no control can be loaded
    resumes: int = 0  # agent restarts during this update
    attempts: int = 0  # failed downloads of this target
    refused: dict[str, str | None] = field(default_factory=dict)  # "name:version" -> rollout it failed in
    last_result: dict[str, Any] | None = None
    # history_key() of the bundles this device committed, oldest first: what a rollback may go to.
    history: list[str] = field(default_factory=list)
    stores: int = 0  # times this record was written: one per transition or change, resumes included

    def to_json(self) -> bytes:
        d = {
            "state": self.state.value,
            "committed": None if self.committed is None else self.committed.to_dict(),
            "target": None if self.target is None else self.target.to_dict(),
            "target_slot": self.target_slot,
            "previous": None if self.previous is None else self.previous.to_dict(),
            "old_p95_ms": self.old_p95_ms,
            "resumes": self.resumes,
            "attempts": self.attempts,
            "refused": self.refused,
            "last_result": self.last_result,
            "history": self.history,
            "stores": self.stores,
        }
        # No indent: json's C encoder does not do indentation, and this is written on every transition.
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UpdateRecord:
        d = json.loads(data)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        refused = d.get("refused") or {}
        history = d.get("history") or []
        if not isinstance(refused, dict) or not isinstance(history, list):
            raise ValueError("'refused' or 'history' has the wrong type")
        return cls(
            state=UpdateState(d["state"]),
            committed=_slot(d.get("committed")),
            target=None if d.get("target") is None else parse_desired(d["target"]),
            target_slot=d.get("target_slot"),
            previous=_slot(d.get("previous")),
            old_p95_ms=d.get("old_p95_ms"),
            # Older files counted restarts in the health window only, as watch_restarts.
            resumes=int(d.get("resumes", d.get("watch_restarts")) or 0),
            attempts=int(d.get("attempts", 0)),
            refused={str(k): v for k, v in refused.items()},
            last_result=d.get("last_result"),
            history=[str(h) for h in history],
            stores=int(d.get("stores", 0)),
        )


class UpdateStore:
    """`agent.json`, written whole through `atomic_write` on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, active: Callable[[], SlotInfo | None]) -> UpdateRecord:
        """The persisted record; none yet, or one nobody can read, starts idle from ACTIVE's slot."""
        if not self.path.exists():
            return UpdateRecord()
        try:
            return UpdateRecord.from_json(self.path.read_bytes())
        except (ValueError, KeyError, TypeError, EdgefleetError) as exc:
            # atomic_write means this only happens if someone edited the file.
            log.error("agent state %s is unreadable (%s); starting idle from the active slot", self.path, exc)
            self.path.replace(self.path.with_suffix(".json.bad"))
            return UpdateRecord(committed=active())

    def save(self, record: UpdateRecord) -> None:
        record.stores += 1
        atomic_write(self.path, record.to_json())


# (old state, new state, the record after the move, the reason given) for each move that changes state.
OnMove = Callable[[UpdateState, UpdateState, UpdateRecord, str | None], None]


class UpdateMachine:
    """The record and the only code that changes it: `fire` for moves of the table, `update` for the rest."""

    def __init__(self, store: UpdateStore, record: UpdateRecord, on_move: OnMove) -> None:
        self.store, self.record, self._on_move = store, record, on_move

    @property
    def state(self) -> UpdateState:
        return self.record.state

    def fire(self, event: UpdateEvent, *, reason: str | None = None, **changes: Any) -> UpdateState:
        """Move on EVENT with CHANGES to the record, persisted before this returns."""
        old = self.record.state
        new = TRANSITIONS.get((old, event))
        if new is None:
            raise IllegalTransition(f"update event '{event}' has no move from state '{old}'")
        if event == UpdateEvent.OFFERED:
            changes = {"resumes": 0, "attempts": 0, "target_slot": None, **changes}
        target = self.record.target
        self._apply(changes)
        self.record.state = new
        self.store.save(self.record)
        if new != old:
            self._on_move(old, new, self.record if self.record.target else _with_target(self.record, target), reason)
        return new

    def update(self, **changes: Any) -> None:
        """Change fields of the record without a move (a retry count, a refusal, a resume), persisted."""
        if "state" in changes:
            raise IllegalTransition("the state changes only through fire()")
        self._apply(changes)
        self.store.save(self.record)

    def _apply(self, changes: dict[str, Any]) -> None:
        for k, v in changes.items():
            if not hasattr(self.record, k):
                raise TypeError(f"UpdateRecord has no field {k!r}")
            setattr(self.record, k, v)
        c = changes.get("committed")
        if c is not None:
            key = history_key(c.name, c.version, c.sha256)
            kept = [h for h in self.record.history if h != key][-(_HISTORY - 1) :]
            self.record.history = [*kept, key]


def _with_target(record: UpdateRecord, target: Desired | None) -> UpdateRecord:
    """RECORD as the move's observer should see it: a move that ends an update still names its target."""
    return replace(record, target=target)
