"""Canary rollouts: stages over the devices a tag selects, each gated on what the fleet reports.

State lives in the database (`_rollout_store`); the engine is a loop that reads it, so a restarted
server carries on where it was. Per stage the engine orders its share of devices onto the new bundle,
waits `min_stage_s` (and for the devices to report), then judges the stage's gates (`_gates.evaluate`,
a pure function of the canary's and the control cohort's figures).

Every change of a rollout's state, the engine's and the operator's alike, is one move of `MOVES`:

    running --stage_passed--> running (next stage)   running --completed--> completed
    running --gates_failed--> rolled_back            running --halt--> halted
    running --pause--> paused --resume--> running    halted --resume--> running
    running | paused | halted --abort--> aborted

All gates pass: next stage, or `completed`. A gate fails: `rolled_back` (devices already updated are
ordered back to the version they ran). Devices that do not report within `stage_timeout_s`: `halted`,
for an operator to resume or abort.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from edgefleet import InputError

from ._db import Database
from ._gates import DEFAULT_GATES, Gates, StageDevices, Verdict, evaluate
from ._lease import Lease, LeasedLoop
from ._rollout_store import AssignedDevice, RolloutRow, RolloutStore, SelectedDevice

__all__ = ["DEFAULT_GATES", "MOVES", "STATES", "RolloutEngine", "stratified_order"]

log = logging.getLogger("edgefleet.fleet.rollout")

STATES = ("running", "paused", "halted", "rolled_back", "completed", "aborted")
OPERATOR_ACTIONS = ("pause", "resume", "abort")
MOVES: dict[tuple[str, str], str] = {
    ("running", "stage_passed"): "running",
    ("running", "completed"): "completed",
    ("running", "gates_failed"): "rolled_back",
    ("running", "halt"): "halted",
    ("running", "pause"): "paused",
    ("paused", "resume"): "running",
    ("halted", "resume"): "running",
    ("running", "abort"): "aborted",
    ("paused", "abort"): "aborted",
    ("halted", "abort"): "aborted",
}

T = TypeVar("T")


def _order(rollout_id: str, device: str) -> str:
    # A stable pseudo-random order: the same devices form the first stage however often the engine runs.
    return hashlib.sha256(f"{rollout_id}/{device}".encode()).hexdigest()


def _dict_ident(d: Any) -> tuple[str, list[str]]:
    return d["id"], d.get("tags") or []


def stratified_order(
    rollout_id: str, devices: Sequence[T], ident: Callable[[T], tuple[str, list[str]]] = _dict_ident
) -> list[T]:
    """DEVICES in the order stages take them: every group of devices with the same tags is represented
    in proportion in any first k (stratified systematic sampling), pseudo-random and stable within a group.
    IDENT gives a device's (id, tags); by default devices are dicts with those keys.

    The gates compare the canary with the control cohort (the devices not yet updated); a canary drawn
    unevenly from differently used groups (sites, hardware, customers) would differ from its control
    before any update, and its drift and latency gates would judge the groups instead of the bundle.
    """
    groups: dict[tuple[str, ...], list[tuple[str, T]]] = {}
    for d in devices:
        i, tags = ident(d)
        groups.setdefault(tuple(sorted(tags)), []).append((_order(rollout_id, i), d))
    ranked = []
    for members in groups.values():
        members.sort(key=lambda m: m[0])
        n = len(members)
        # Each group's devices spread evenly over (0, 1); ties broken by the stable hash.
        ranked += [((k + 0.5) / n, h, d) for k, (h, d) in enumerate(members)]
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [d for _, _, d in ranked]


def _wait_all(handles: list[Any], timeout: float = 30.0) -> None:
    """Wait for the broker to take every published order (each handle from `set_desired(..., wait=False)`)."""
    deadline = time.monotonic() + timeout
    for h in handles:
        if h is not None:
            h.wait_for_publish(max(0.1, deadline - time.monotonic()))


class RolloutEngine:
    """Creates rollouts, takes operators' actions, and (`start`, or `tick` by hand) runs their stages.
    SET_DESIRED(device, name, version, rollout, action, wait=...) orders a device onto a bundle.

    Several server processes may share one database: only the holder of the `rollout-engine` lease runs
    stages (another takes over within LEASE_TTL_S of its death), and every move is a conditional update
    of the rollout's (state, stage), so no stage is judged or ordered twice even if two act at once."""

    def __init__(
        self,
        db: Database,
        set_desired: Any,
        interval: float = 1.0,
        lease_ttl_s: float = 10.0,
        lease_holder: str | None = None,
    ) -> None:
        self.db = db
        self.store = RolloutStore(db)
        self.lease = Lease(db, "rollout-engine", lease_ttl_s, lease_holder)
        self.set_desired = set_desired
        self.interval = interval
        self._lock = threading.Lock()
        # tick() takes the lease itself: it is also called directly (tests, a one-off advance)
        self._loop = LeasedLoop("rollout tick", self.lease, interval, self.tick, acquire=False, join_s=10.0)

    # -- operator actions --------------------------------------------------------------------------
    def create(self, bundle: str, selector: str, stages: list[float], gates: dict[str, float] | None = None) -> str:
        name, _, version = bundle.partition(":")
        if not self.store.bundle_published(name, version):
            raise InputError(f"bundle {bundle} is not published; publish it before rolling it out")
        if not stages or any(not 0 < s <= 100 for s in stages) or sorted(stages) != list(stages) or stages[-1] != 100:
            raise InputError("stages must be increasing percentages ending at 100, e.g. 10,50,100")
        typed = Gates.parse(gates)
        if not self.store.selected(selector):
            raise InputError(f"selector {selector!r} matches no device")
        newer = self.store.newer_devices(name, version, selector)
        if newer:
            shown = ", ".join(f"{d} on {v}" for d, v in newer[:5]) + (" ..." if len(newer) > 5 else "")
            raise InputError(
                f"rolling out {bundle} would downgrade {len(newer)} device(s) running a newer {name} ({shown}), "
                "which refuse downgrades; order a rollback per device ('fleet desire DEVICE --bundle "
                f"{bundle} --action rollback') or select devices on older versions"
            )
        rid = "r-" + uuid.uuid4().hex[:10]
        self.store.insert(rid, name, version, selector, stages, typed)
        return rid

    def set_state(self, rid: str, action: str) -> dict[str, Any]:
        """An operator's `pause`, `resume` or `abort` of rollout RID."""
        if action not in OPERATOR_ACTIONS:
            raise InputError(f"unknown rollout action {action!r}; one of {', '.join(OPERATOR_ACTIONS)}")
        with self._lock:  # not in the middle of the engine judging the same rollout
            r = self._row(rid)
            if (r.state, action) not in MOVES:
                raise InputError(f"rollout {rid} is {r.state}; it cannot be {action}d")
            if not self._move(r, action, note=f"operator: {action}", stage_started=time.time()):
                raise InputError(f"rollout {rid} changed meanwhile; look at it again and retry")
            if action == "resume":
                # Orders a crash may have cut off between recording a device and ordering it go out again
                # (the desired state is retained, so a repeat is harmless to a device that has it).
                pending = [m for m in self.store.assigned(rid) if m.stage == r.stage and m.status == "pending"]
                _wait_all(
                    [self.set_desired(m.device_id, r.name, r.version, rid, "update", wait=False) for m in pending]
                )
        return self.get(rid)

    def note(self, rid: str, note: str) -> None:
        """Add NOTE to rollout RID's history."""
        r = self._row(rid)
        self.store.update(rid, (r.state, r.stage), note=note)

    def get(self, rid: str) -> dict[str, Any]:
        r = self._row(rid)
        devs = self.store.assigned(rid)
        per_stage = []
        for i, pct in enumerate(r.stages):
            mine = [d for d in devs if d.stage == i]
            per_stage.append(
                {
                    "stage": i,
                    "percent": pct,
                    "assigned": len(mine),
                    "updated": sum(1 for d in mine if d.status == "updated"),
                    "failed": sum(1 for d in mine if d.status == "failed"),
                    "gates": r.detail.get("gates", {}).get(str(i)),
                    "status": "done"
                    if i < r.stage or r.state == "completed"
                    else ("current" if i == r.stage else "pending"),
                }
            )
        return {
            "id": r.id,
            "bundle": f"{r.name}:{r.version}",
            "selector": r.selector,
            "stages": per_stage,
            "gates": r.gates.to_dict(),
            "state": r.state,
            "stage": r.stage,
            "created": r.created,
            "updated": r.updated,
            "history": r.detail.get("history", []),
            "devices": self._devices(r, devs),
        }

    def _devices(self, r: RolloutRow, devs: builtins.list[AssignedDevice]) -> builtins.list[dict[str, Any]]:
        """Each assigned device: stage, status, the version it came from, and why it failed when it did
        (its latest update_failed / rolled_back / update_refused event for this rollout)."""
        why = self.store.failure_reasons(r.id, r.created)
        return [
            {
                "id": d.device_id,
                "stage": d.stage,
                "status": d.status,
                "previous_version": d.previous_version,
                **({"reason": why[d.device_id]} if d.device_id in why else {}),
            }
            for d in sorted(devs, key=lambda d: (d.stage, d.device_id))
        ]

    def list(self) -> builtins.list[dict[str, Any]]:
        return [self.get(rid) for rid in self.store.ids()]

    # -- the engine ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def tick(self) -> None:
        """Advance every running rollout as far as its gates allow (only while holding the engine's lease)."""
        with self._lock:
            if not self.lease.acquire():
                return  # another server process runs the engine
            for rid in self.store.ids("running"):
                try:
                    # A passed stage's successor starts at once: its orders go out in the same tick.
                    while self.lease.held() and self._run_stage(self._row(rid)):
                        pass
                except Exception as exc:
                    if self.store.db.unavailable(exc):
                        raise  # the database, not this rollout: the loop backs off and tries again
                    # One rollout's failure (bad data, a bug) must not hold up the others; it is tried again
                    # next tick.
                    log.exception("rollout %s: this tick failed; the other rollouts carry on", rid)
            # rollouts that ended keep watching for devices' own rollbacks, which are recorded
            self.store.record_device_results()

    def judge(self, r: RolloutRow, mine: builtins.list[AssignedDevice]) -> Verdict:
        """The gates' verdict on rollout R's devices MINE so far, against the control cohort."""
        ids = {m.device_id for m in mine}
        updated = [m.device_id for m in mine if m.status == "updated"]
        since = min((m.assigned for m in mine), default=time.time())
        control = [d.id for d in self.store.selected(r.selector) if d.id not in ids and d.version != r.version]
        stage = StageDevices(len(mine), len(updated), sum(1 for m in mine if m.status == "failed"), bool(control))
        # The canary: what the selected devices reported on the new version; the control: what they
        # reported on any other, over the same time (which includes the stage's devices before they updated).
        new = self.store.cohort(r.name, r.selector, since, version=r.version, reporting_of=updated)
        ctl = self.store.cohort(r.name, r.selector, since, exclude_version=r.version)
        return evaluate(new, ctl, stage, r.gates)

    def _row(self, rid: str) -> RolloutRow:
        r = self.store.row(rid)
        if r is None:
            raise InputError(f"no rollout {rid}")
        return r

    def _move(self, r: RolloutRow, event: str, note: str, verdict: Verdict | None = None, **fields: Any) -> bool:
        """Make EVENT's move from R's state; False when R was moved meanwhile (nothing is changed then)."""
        new = MOVES.get((r.state, event))
        if new is None:
            raise InputError(f"rollout {r.id} is {r.state}: '{event}' has no move from there")
        stored = None if verdict is None else (r.stage, verdict.to_dict())
        return self.store.update(r.id, (r.state, r.stage), note=note, verdict=stored, state=new, **fields)

    def _run_stage(self, r: RolloutRow) -> bool:
        """Order the current stage's devices and judge it when due. True: it passed and the next began."""
        if r.state != "running":
            return False
        gates = r.gates
        selected = stratified_order(r.id, self.store.selected(r.selector), lambda d: (d.id, d.tags))
        known = {a.device_id for a in self.store.assigned(r.id)}
        take: builtins.list[SelectedDevice] = [
            d for d in selected[: math.ceil(r.stages[r.stage] / 100 * len(selected))] if d.id not in known
        ]
        # Recorded first, ordered second, and only what this call recorded: a device is ordered once per
        # rollout even when two server processes take the same stage at once.
        added = set(
            self.store.assign(
                r.id, r.stage, [(d.id, d.version, "updated" if d.version == r.version else "pending") for d in take]
            )
        )
        handles = []
        for d in take:
            if d.id not in added or d.version == r.version:
                continue
            try:
                handles.append(self.set_desired(d.id, r.name, r.version, r.id, "update", wait=False))
            except InputError as exc:
                # A device that cannot run the bundle (no runtime for its model files) counts as failed.
                self.store.mark(r.id, d.id, "failed")
                log.warning("rollout %s: not ordering %s: %s", r.id, d.id, exc)
        _wait_all(handles)
        self.store.record_device_results()
        mine = self.store.assigned(r.id)
        pending = [m for m in mine if m.status == "pending"]
        elapsed = time.time() - r.stage_started
        if elapsed < gates.min_stage_s and not any(m.status == "failed" for m in mine):
            return False
        if pending and elapsed < gates.stage_timeout_s:
            return False
        verdict = self.judge(r, mine)
        if pending:
            verdict.ok = False
            verdict.halt = f"{len(pending)} device(s) did not report within {gates.stage_timeout_s} s"
        if verdict.wait_for_labels and not pending and elapsed < gates.stage_timeout_s:
            return False  # a prediction shift the labels coming in may yet show to be right: watch longer
        waiting = verdict.wait_for_predictions or verdict.wait_for_telemetry
        if verdict.ok and waiting and elapsed < gates.stage_timeout_s:
            return False  # too few predictions yet to judge prediction drift, or no telemetry at all: watch longer
        if verdict.ok and verdict.wait_for_telemetry:
            v = verdict.values
            verdict.ok = False
            verdict.halt = (
                f"only {v['devices_reporting']} of {v['devices_updated']} updated device(s) sent telemetry on "
                f"{r.version} within {gates.stage_timeout_s} s"
            )
        if not self.lease.held():
            return False  # judged too late: another process may hold the engine by now
        if verdict.ok and r.stage + 1 < len(r.stages):
            # The next stage starts when its orders go out, at once: judging the gates can take seconds on a
            # large fleet, and that is no part of the next stage's time.
            note = f"stage {r.stage} passed its gates"
            return self._move(r, "stage_passed", note, verdict, stage=r.stage + 1, stage_started=time.time())
        if verdict.ok:
            self._move(r, "completed", "last stage passed: completed", verdict)
        elif verdict.halt and not verdict.failed_gates:
            self._move(r, "halt", verdict.halt, verdict)
        elif self._move(
            r, "gates_failed", "gates failed: " + "; ".join(verdict.failed_gates) + "; rolling back", verdict
        ):
            _wait_all(
                [
                    self.set_desired(m.device_id, r.name, m.previous_version, r.id, "rollback", wait=False)
                    for m in mine
                    if m.status in ("updated", "pending") and m.previous_version and m.previous_version != r.version
                ]
            )
        return False
