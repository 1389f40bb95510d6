"""Canary rollouts: stages over the devices a tag selects, each gated on what the fleet reports.

State lives in the database (`rollouts`, `rollout_devices`); the engine is a loop that reads it, so a
restarted server carries on where it was. Per stage the engine orders its share of devices onto the
new bundle, waits `min_stage_s` (and for the devices to report), then checks the gates against the
control cohort (selected devices still on another version):

- enough devices updated (`min_devices`), and as many of them (at most all) sending telemetry on the
  new version: until they do, the error, latency and drift gates would pass on no evidence, so the
  stage waits, and halts at `stage_timeout_s`,
- update failure rate (devices that failed or rolled back by themselves) <= `max_update_failure`,
- post-update error rate <= control + `max_error_increase`,
- p95 latency <= max(control x `max_p95_ratio`, control + `p95_slack_ms`); while the canary has made
  fewer than `reliable_p95_calls` calls its p95 is a handful of calls (a scheduling hiccup can make
  it), so the median must be slower too: > max(control median x ratio, control median + slack / 2),
- prediction drift: PSI of the predicted-class distribution against the control <= `max_prediction_psi`,
  judged once both sides have `min_prediction_samples` predictions and only when the difference is
  also significant (chi-square p < `prediction_p_value`).

All pass: next stage, or `completed`. A gate fails: `rolled_back` (devices already updated are ordered
back to the version they ran). Devices that do not report within `stage_timeout_s`: `halted`, for an
operator to resume or abort.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from typing import Any, NamedTuple

import numpy as np

from edgefleet import InputError
from edgefleet._drift import chi2_two_sample, psi
from edgefleet._manifest import semver_key
from edgefleet._telemetry import latency_quantile, latency_regressed

from ._db import Database
from ._drift import add_counts

__all__ = ["DEFAULT_GATES", "STATES", "RolloutEngine"]

log = logging.getLogger("edgefleet.fleet.rollout")

STATES = ("running", "paused", "halted", "rolled_back", "completed", "aborted")
DEFAULT_GATES: dict[str, float] = {
    "min_devices": 1,
    "max_update_failure": 0.2,
    "max_error_increase": 0.02,
    "max_p95_ratio": 1.5,
    # Sub-millisecond models jitter by more than 50% between devices; below this the ratio is not judged.
    "p95_slack_ms": 1.0,
    "reliable_p95_calls": 1000,
    "max_prediction_psi": 0.25,
    # PSI on a few dozen predictions is noise (an empty class bin alone adds ~0.7): the prediction gate
    # needs this many predictions on each side and a significant chi-square difference as well.
    "min_prediction_samples": 100,
    "prediction_p_value": 0.001,
    "min_stage_s": 10.0,
    "stage_timeout_s": 300.0,
}

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rollouts (
        id TEXT PRIMARY KEY, bundle_name TEXT NOT NULL, bundle_version TEXT NOT NULL, selector TEXT NOT NULL,
        stages TEXT NOT NULL, gates TEXT NOT NULL, state TEXT NOT NULL, stage INTEGER NOT NULL,
        stage_started FLOAT8 NOT NULL, created FLOAT8 NOT NULL, updated FLOAT8 NOT NULL, detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, stage INTEGER NOT NULL, assigned FLOAT8 NOT NULL,
        previous_version TEXT, status TEXT NOT NULL, PRIMARY KEY (rollout_id, device_id))""",
]


def _marks(values: list[Any]) -> str:
    return ",".join("?" for _ in values)


def _order(rollout_id: str, device: str) -> str:
    # A stable pseudo-random order: the same devices form the first stage however often the engine runs.
    return hashlib.sha256(f"{rollout_id}/{device}".encode()).hexdigest()


def stratified_order(rollout_id: str, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DEVICES in the order stages take them: every group of devices with the same tags is represented
    in proportion in any first k (stratified systematic sampling), pseudo-random and stable within a group.

    The gates compare the canary with the control cohort (the devices not yet updated); a canary drawn
    unevenly from differently used groups (sites, hardware, customers) would differ from its control
    before any update, and its drift and latency gates would judge the groups instead of the bundle.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for d in devices:
        groups.setdefault(tuple(sorted(d.get("tags") or [])), []).append(d)
    ranked = []
    for members in groups.values():
        members.sort(key=lambda d: _order(rollout_id, d["id"]))
        n = len(members)
        # Each group's devices spread evenly over (0, 1); ties broken by the stable hash.
        ranked += [((i + 0.5) / n, _order(rollout_id, d["id"]), d) for i, d in enumerate(members)]
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [d for _, _, d in ranked]


def _wait_all(handles: list[Any], timeout: float = 30.0) -> None:
    """Wait for the broker to take every published order (each handle from `set_desired(..., wait=False)`)."""
    deadline = time.monotonic() + timeout
    for h in handles:
        if h is not None:
            h.wait_for_publish(max(0.1, deadline - time.monotonic()))


class _WindowSummary(NamedTuple):
    """What the gates read from one stored telemetry window."""

    device: str
    calls: int
    errors: int
    latency: np.ndarray
    classes: np.ndarray | None


class _WindowSummaries:
    """Parsed windows by key, bounded by the counts they hold (a 1,000-class model's window holds 1,000)."""

    MAX_VALUES = 16_000_000  # about 128 MB of counts; past it the cache starts over

    def __init__(self) -> None:
        self._by_key: dict[str, _WindowSummary] = {}
        self._values = 0

    def fetch(self, db: Database, keys: list[str]) -> list[_WindowSummary]:
        """The summaries of the windows KEYS (in that order), parsing only those not seen before."""
        if self._values > self.MAX_VALUES:
            self._by_key.clear()
            self._values = 0
        missing = [k for k in keys if k not in self._by_key]
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            for key, device, body in db.query(
                f"SELECT key, device_id, body FROM windows WHERE key IN ({_marks(chunk)})", chunk
            ):
                w = json.loads(body)
                cls = (w.get("outputs") or {}).get("predicted_class")
                s = _WindowSummary(
                    device,
                    int(w["calls"]),
                    sum(int(v) for v in w["errors"].values()) + int(w["nan_outputs"]),
                    np.asarray(w["latency_ms"]["counts"], dtype=np.int64),
                    None if cls is None else np.asarray(cls, dtype=np.int64),
                )
                self._by_key[key] = s
                self._values += s.latency.size + (0 if s.classes is None else s.classes.size)
        return [w for w in map(self._by_key.get, keys) if w is not None]


class RolloutEngine:
    def __init__(self, db: Database, set_desired: Any, interval: float = 1.0) -> None:
        self.db = db
        self.set_desired = set_desired
        self.interval = interval
        with db.transaction() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._summaries = _WindowSummaries()

    # -- operator actions --------------------------------------------------------------------------
    def create(self, bundle: str, selector: str, stages: list[float], gates: dict[str, float] | None = None) -> str:
        name, _, version = bundle.partition(":")
        if not self.db.query("SELECT 1 FROM bundles WHERE name = ? AND version = ?", (name, version)):
            raise InputError(f"bundle {bundle} is not published; publish it before rolling it out")
        if not stages or any(not 0 < s <= 100 for s in stages) or sorted(stages) != list(stages) or stages[-1] != 100:
            raise InputError("stages must be increasing percentages ending at 100, e.g. 10,50,100")
        unknown = set(gates or {}) - set(DEFAULT_GATES)
        if unknown:
            raise InputError(f"unknown gate(s) {sorted(unknown)}; known: {sorted(DEFAULT_GATES)}")
        if not self._selected(selector):
            raise InputError(f"selector {selector!r} matches no device")
        newer = self._newer_devices(name, version, selector)
        if newer:
            shown = ", ".join(f"{d} on {v}" for d, v in newer[:5]) + (" ..." if len(newer) > 5 else "")
            raise InputError(
                f"rolling out {bundle} would downgrade {len(newer)} device(s) running a newer {name} ({shown}), "
                "which refuse downgrades; order a rollback per device ('fleet desire DEVICE --bundle "
                f"{bundle} --action rollback') or select devices on older versions"
            )
        rid = "r-" + uuid.uuid4().hex[:10]
        now = time.time()
        self.db.execute(
            "INSERT INTO rollouts (id, bundle_name, bundle_version, selector, stages, gates, state, stage, "
            "stage_started, created, updated, detail) VALUES (?, ?, ?, ?, ?, ?, 'running', 0, ?, ?, ?, ?)",
            (
                rid,
                name,
                version,
                selector,
                json.dumps(stages),
                json.dumps({**DEFAULT_GATES, **(gates or {})}),
                now,
                now,
                now,
                json.dumps({"history": []}),
            ),
        )
        return rid

    def set_state(self, rid: str, action: str) -> dict[str, Any]:
        r = self.get(rid)
        allowed = {"pause": ("running",), "resume": ("paused", "halted"), "abort": ("running", "paused", "halted")}
        if r["state"] not in allowed[action]:
            raise InputError(f"rollout {rid} is {r['state']}; it cannot be {action}d")
        new = {"pause": "paused", "resume": "running", "abort": "aborted"}[action]
        self._update(rid, state=new, note=f"operator: {action}", stage_started=time.time())
        return self.get(rid)

    def get(self, rid: str) -> dict[str, Any]:
        rows = self.db.query(
            "SELECT id, bundle_name, bundle_version, selector, stages, gates, state, stage, stage_started, created, "
            "updated, detail FROM rollouts WHERE id = ?",
            (rid,),
        )
        if not rows:
            raise InputError(f"no rollout {rid}")
        r = rows[0]
        devs = self.db.query("SELECT device_id, stage, status FROM rollout_devices WHERE rollout_id = ?", (rid,))
        stages = json.loads(r[4])
        detail = json.loads(r[11])
        per_stage = []
        for i, pct in enumerate(stages):
            mine = [d for d in devs if d[1] == i]
            per_stage.append(
                {
                    "stage": i,
                    "percent": pct,
                    "assigned": len(mine),
                    "updated": sum(1 for d in mine if d[2] == "updated"),
                    "failed": sum(1 for d in mine if d[2] == "failed"),
                    "gates": detail.get("gates", {}).get(str(i)),
                    "status": "done" if i < r[7] or r[6] == "completed" else ("current" if i == r[7] else "pending"),
                }
            )
        return {
            "id": r[0],
            "bundle": f"{r[1]}:{r[2]}",
            "selector": r[3],
            "stages": per_stage,
            "gates": json.loads(r[5]),
            "state": r[6],
            "stage": r[7],
            "created": r[9],
            "updated": r[10],
            "history": detail.get("history", []),
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.get(r[0]) for r in self.db.query("SELECT id FROM rollouts ORDER BY created DESC")]

    # -- the engine ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgefleet-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:
                log.exception("rollout tick failed")

    def _newer_devices(self, name: str, version: str, selector: str) -> builtins.list[tuple[str, str]]:
        """Selected devices whose active bundle NAME is newer than VERSION (semver precedence)."""
        rows = self.db.query("SELECT id, tags, bundle_name, bundle_version FROM devices WHERE bundle_name = ?", (name,))
        out = []
        for dev, tags, _, active in rows:
            if selector in json.loads(tags) and active:
                try:
                    if semver_key(active) > semver_key(version):
                        out.append((dev, active))
                except ValueError:
                    continue
        return sorted(out)

    def _selected(self, selector: str) -> builtins.list[dict[str, Any]]:
        rows = self.db.query("SELECT id, tags, bundle_version, update_state FROM devices")
        out = []
        for r in rows:
            tags = json.loads(r[1])
            if selector in tags:
                out.append({"id": r[0], "version": r[2], "update_state": r[3], "tags": tags})
        return out

    def _update(self, rid: str, note: str | None = None, **fields: Any) -> None:
        detail = json.loads(self.db.query("SELECT detail FROM rollouts WHERE id = ?", (rid,))[0][0])
        if note:
            detail.setdefault("history", []).append({"ts": time.time(), "note": note})
        if "gates_result" in fields:
            stage, res = fields.pop("gates_result")
            detail.setdefault("gates", {})[str(stage)] = res
        sets = ", ".join(f"{k} = ?" for k in fields)
        params = [*fields.values(), time.time(), json.dumps(detail), rid]
        self.db.execute(
            f"UPDATE rollouts SET {sets + ', ' if sets else ''}updated = ?, detail = ? WHERE id = ?", params
        )

    def tick(self) -> None:
        with self._lock:
            for (rid,) in self.db.query("SELECT id FROM rollouts WHERE state = 'running'"):
                self._advance(rid)
            # rollouts that ended keep watching for devices' own rollbacks, which are recorded
            self._record_device_results()

    def _record_device_results(self) -> None:
        pending = self.db.query("SELECT rollout_id, device_id FROM rollout_devices WHERE status = 'pending'")
        if not pending:
            return
        # A few queries per tick for all pending devices, not two per device (a stage of 500 devices).
        rids = sorted({rid for rid, _ in pending})
        target = dict(self.db.query(f"SELECT id, bundle_version FROM rollouts WHERE id IN ({_marks(rids)})", rids))
        results: dict[tuple[str, str], str] = {}
        registry: dict[str, tuple[Any, Any]] = {}
        devices = sorted({dev for _, dev in pending})
        for i in range(0, len(devices), 500):
            chunk = devices[i : i + 500]
            for dev, typ, body in self.db.query(
                f"SELECT device_id, type, body FROM events WHERE device_id IN ({_marks(chunk)}) "
                "AND type IN ('rolled_back', 'update_failed', 'committed') ORDER BY ts",
                chunk,
            ):
                rid = json.loads(body).get("rollout")
                if rid in target:  # the latest outcome reported for that rollout counts
                    results[(rid, dev)] = "updated" if typ == "committed" else "failed"
            for dev, version, state in self.db.query(
                f"SELECT id, bundle_version, update_state FROM devices WHERE id IN ({_marks(chunk)})", chunk
            ):
                registry[dev] = (version, state)
        changes = []
        for rid, dev in pending:
            status = results.get((rid, dev))
            if status is None and rid in target and registry.get(dev) == (target[rid], "idle"):
                status = "updated"  # on the version already, by whatever route, with no update under way
            if status is not None:
                changes.append((status, rid, dev))
        if changes:
            with self.db.transaction() as cur:
                for change in changes:
                    cur.execute("UPDATE rollout_devices SET status = ? WHERE rollout_id = ? AND device_id = ?", change)

    def _advance(self, rid: str) -> None:
        r = self.get(rid)
        name, version = r["bundle"].split(":")
        stage = r["stage"]
        pct = r["stages"][stage]["percent"]
        gates = r["gates"]
        selected = stratified_order(rid, self._selected(r["selector"]))
        assigned = {
            d[0]: d
            for d in self.db.query(
                "SELECT device_id, stage, status, previous_version FROM rollout_devices WHERE rollout_id = ?", (rid,)
            )
        }
        target = math.ceil(pct / 100 * len(selected))
        now = time.time()
        sent = []
        for d in selected[:target]:
            if d["id"] in assigned:
                continue
            if d["version"] == version:
                status = "updated"
            else:
                status = "pending"
                sent.append(self.set_desired(d["id"], name, version, rid, "update", wait=False))
            self.db.execute(
                "INSERT INTO rollout_devices (rollout_id, device_id, stage, assigned, previous_version, status) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rollout_id, device_id) DO NOTHING",
                (rid, d["id"], stage, now, d["version"], status),
            )
        _wait_all(sent)
        self._record_device_results()
        rows = self.db.query(
            "SELECT device_id, status, previous_version, assigned FROM rollout_devices WHERE rollout_id = ?", (rid,)
        )
        mine = [x for x in rows]
        pending = [x for x in mine if x[1] == "pending"]
        started = self.db.query("SELECT stage_started FROM rollouts WHERE id = ?", (rid,))[0][0]
        if now - started < gates["min_stage_s"] and not any(x[1] == "failed" for x in mine):
            return
        if pending and now - started < gates["stage_timeout_s"]:
            return
        result = self._gates(rid, name, version, r["selector"], mine, gates)
        if pending:
            result["ok"] = False
            result["halt"] = f"{len(pending)} device(s) did not report within {gates['stage_timeout_s']} s"
        waiting = result["wait_for_predictions"] or result["wait_for_telemetry"]
        if result["ok"] and waiting and now - started < gates["stage_timeout_s"]:
            return  # too few predictions yet to judge prediction drift, or no telemetry at all: watch longer
        if result["ok"] and result["wait_for_telemetry"]:
            v = result["values"]
            result["ok"] = False
            result["halt"] = (
                f"only {v['devices_reporting']} of {v['devices_updated']} updated device(s) sent telemetry on "
                f"{version} within {gates['stage_timeout_s']} s"
            )
        if result["ok"]:
            if stage + 1 < len(r["stages"]):
                # The next stage starts when its orders go out, at once: judging the gates can take seconds
                # on a large fleet, and that is no part of the next stage's time.
                self._update(
                    rid,
                    note=f"stage {stage} passed its gates",
                    stage=stage + 1,
                    stage_started=time.time(),
                    gates_result=(stage, result),
                )
                self._advance(rid)
            else:
                self._update(rid, note="last stage passed: completed", state="completed", gates_result=(stage, result))
        elif result.get("halt") and not result["failed_gates"]:
            self._update(rid, note=result["halt"], state="halted", gates_result=(stage, result))
        else:
            self._update(
                rid,
                note="gates failed: " + "; ".join(result["failed_gates"]) + "; rolling back",
                state="rolled_back",
                gates_result=(stage, result),
            )
            _wait_all(
                [
                    self.set_desired(dev, name, prev, rid, "rollback", wait=False)
                    for dev, status, prev, _ in mine
                    if status in ("updated", "pending") and prev and prev != version
                ]
            )

    def _cohort(self, name: str, devices: builtins.list[str], version: str | None, since: float) -> dict[str, Any]:
        if not devices:
            return {
                "calls": 0,
                "errors": 0,
                "latency": None,
                "median": None,
                "classes": None,
                "windows": 0,
                "reporting": 0,
            }
        sql = f"SELECT key FROM windows WHERE bundle_name = ? AND device_id IN ({_marks(devices)}) AND start >= ?"
        params: builtins.list[Any] = [name, *devices, since]
        if version is not None:
            sql += " AND bundle_version = ?"
            params.append(version)
        keys = [k for (k,) in self.db.query(sql, params)]
        # Windows never change once stored: each is parsed once, not on every tick of a long stage.
        found = self._summaries.fetch(self.db, keys)
        lat = np.sum([w.latency for w in found], axis=0).tolist() if found else None
        classes: np.ndarray | None = None
        for w in found:
            if w.classes is not None:
                classes = add_counts(classes, w.classes)
        return {
            "calls": sum(w.calls for w in found),
            "errors": sum(w.errors for w in found),
            "latency": latency_quantile(lat, 0.95) if lat is not None else None,
            "median": latency_quantile(lat, 0.5) if lat is not None else None,
            "classes": classes,
            "windows": len(found),
            "reporting": len({w.device for w in found if w.calls}),
        }

    def _gates(
        self, rid: str, name: str, version: str, selector: str, mine: builtins.list[Any], gates: dict[str, float]
    ) -> dict[str, Any]:
        assigned = [m[0] for m in mine]
        updated = [m[0] for m in mine if m[1] == "updated"]
        failed = [m[0] for m in mine if m[1] == "failed"]
        since = min((m[3] for m in mine), default=time.time())
        control_ids = [d["id"] for d in self._selected(selector) if d["id"] not in assigned and d["version"] != version]
        new = self._cohort(name, updated, version, since)
        ctl = self._cohort(name, control_ids, None, since)
        values: dict[str, Any] = {
            "devices_updated": len(updated),
            "devices_reporting": new["reporting"],
            "update_failure_rate": round(len(failed) / len(assigned), 4) if assigned else 0.0,
            "error_rate": round(new["errors"] / new["calls"], 4) if new["calls"] else None,
            "control_error_rate": round(ctl["errors"] / ctl["calls"], 4) if ctl["calls"] else None,
            "p95_ms": None if new["latency"] is None else round(new["latency"], 4),
            "control_p95_ms": None if ctl["latency"] is None else round(ctl["latency"], 4),
            "prediction_psi": None,
            "prediction_samples": 0,
        }
        failed_gates = []
        if values["update_failure_rate"] > gates["max_update_failure"]:
            failed_gates.append(f"update failure rate {values['update_failure_rate']} > {gates['max_update_failure']}")
        if len(updated) < gates["min_devices"] and not failed_gates:
            failed_gates.append(f"only {len(updated)} device(s) updated (need {int(gates['min_devices'])})")
        if values["error_rate"] is not None:
            base = values["control_error_rate"] or 0.0
            if values["error_rate"] > base + gates["max_error_increase"]:
                failed_gates.append(
                    f"error rate {values['error_rate']} > control {base} + {gates['max_error_increase']}"
                )
        if values["p95_ms"] is not None and values["control_p95_ms"] is not None:
            ctl_p95 = values["control_p95_ms"]
            small = new["calls"] < gates.get("reliable_p95_calls", 0) and ctl["median"] is not None
            slow, limit = latency_regressed(
                values["p95_ms"],
                ctl_p95,
                ratio=gates["max_p95_ratio"],
                slack_ms=gates["p95_slack_ms"],
                median=new["median"] if small else None,
                control_median=ctl["median"] if small else None,
            )
            if small and values["p95_ms"] > limit:
                values["p50_ms"], values["control_p50_ms"] = round(new["median"], 4), round(ctl["median"], 4)
            if slow:
                failed_gates.append(f"p95 {values['p95_ms']:.3f} ms > {limit:.3f} ms (control {ctl_p95:.3f} ms)")
        if new["classes"] is not None and ctl["classes"] is not None and new["classes"].sum() and ctl["classes"].sum():
            n = int(min(new["classes"].sum(), ctl["classes"].sum()))
            values["prediction_psi"] = round(psi(ctl["classes"], new["classes"]), 4)
            values["prediction_p_value"] = chi2_two_sample(ctl["classes"], new["classes"])[1]
            values["prediction_samples"] = n
            if (
                values["prediction_psi"] > gates["max_prediction_psi"]
                and n >= gates["min_prediction_samples"]
                and values["prediction_p_value"] < gates["prediction_p_value"]
            ):
                failed_gates.append(
                    f"prediction PSI {values['prediction_psi']} > {gates['max_prediction_psi']} "
                    f"(chi-square p {values['prediction_p_value']:.2g}, {n} predictions)"
                )
        # With a control cohort to compare against, too few predictions means: watch the stage longer.
        wait = bool(control_ids) and values["prediction_samples"] < gates["min_prediction_samples"]
        silent = bool(updated) and new["reporting"] < min(int(gates["min_devices"]), len(updated))
        return {
            "ok": not failed_gates,
            "failed_gates": failed_gates,
            "values": values,
            "wait_for_predictions": wait,
            "wait_for_telemetry": silent,
            "ts": time.time(),
        }
