"""Where rollouts live: the `rollouts` and `rollout_devices` tables, and the telemetry their gates read
(from the rollups, so a tick costs the same on a fleet of 100 or 100,000 devices).

All of the rollout engine's SQL is here; rows come back as typed records, never tuples read by position.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet._manifest import semver_key
from edgefleet.protocol import latency_quantile

from ._db import Database
from ._gates import Cohort, Gates
from ._rollups import read, reporting_devices

__all__ = ["AssignedDevice", "RolloutRow", "RolloutStore", "SelectedDevice"]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rollouts (
        id TEXT PRIMARY KEY, bundle_name TEXT NOT NULL, bundle_version TEXT NOT NULL, selector TEXT NOT NULL,
        stages TEXT NOT NULL, gates TEXT NOT NULL, state TEXT NOT NULL, stage INTEGER NOT NULL,
        stage_started FLOAT8 NOT NULL, created FLOAT8 NOT NULL, updated FLOAT8 NOT NULL, detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, stage INTEGER NOT NULL, assigned FLOAT8 NOT NULL,
        previous_version TEXT, status TEXT NOT NULL, PRIMARY KEY (rollout_id, device_id))""",
]

_CHUNK = 500  # ids per IN (...) list


def _marks(values: list[Any]) -> str:
    return ",".join("?" for _ in values)


@dataclass(frozen=True)
class RolloutRow:
    id: str
    name: str
    version: str
    selector: str
    stages: list[float]
    gates: Gates
    state: str
    stage: int
    stage_started: float
    created: float
    updated: float
    detail: dict[str, Any]


@dataclass(frozen=True)
class AssignedDevice:
    device_id: str
    stage: int
    status: str  # pending, updated or failed
    previous_version: str | None
    assigned: float


@dataclass(frozen=True)
class SelectedDevice:
    id: str
    version: str | None
    update_state: str | None
    tags: list[str]


class RolloutStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        with db.transaction() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)

    # -- rollouts ----------------------------------------------------------------------------------
    def bundle_published(self, name: str, version: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM bundles WHERE name = ? AND version = ?", (name, version)))

    def insert(self, rid: str, name: str, version: str, selector: str, stages: list[float], gates: Gates) -> None:
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
                json.dumps(gates.to_dict()),
                now,
                now,
                now,
                '{"history": []}',
            ),
        )

    def row(self, rid: str) -> RolloutRow | None:
        rows = self.db.query(
            "SELECT id, bundle_name, bundle_version, selector, stages, gates, state, stage, stage_started, created, "
            "updated, detail FROM rollouts WHERE id = ?",
            (rid,),
        )
        if not rows:
            return None
        (i, name, version, selector, stages, gates, state, stage, started, created, updated, detail) = rows[0]
        return RolloutRow(
            i,
            name,
            version,
            selector,
            json.loads(stages),
            Gates.parse(json.loads(gates)),
            state,
            int(stage),
            float(started),
            float(created),
            float(updated),
            json.loads(detail),
        )

    def ids(self, state: str | None = None) -> list[str]:
        if state is None:
            return [r for (r,) in self.db.query("SELECT id FROM rollouts ORDER BY created DESC")]
        return [r for (r,) in self.db.query("SELECT id FROM rollouts WHERE state = ? ORDER BY created", (state,))]

    def update(
        self,
        rid: str,
        expect: tuple[str, int],
        note: str | None = None,
        verdict: tuple[int, dict[str, Any]] | None = None,
        **fields: Any,
    ) -> bool:
        """Set FIELDS of rollout RID, adding NOTE to its history and VERDICT (stage, result) to its gates, if
        it is still in EXPECT (state, stage). False: another process (or the operator) moved it first."""
        with self.db.transaction() as cur:
            cur.execute("SELECT detail, state, stage FROM rollouts WHERE id = ?", (rid,))
            row = cur.fetchall()
            if not row or (row[0][1], int(row[0][2])) != expect:
                return False
            detail = json.loads(row[0][0])
            if note:
                detail.setdefault("history", []).append({"ts": time.time(), "note": note})
            if verdict is not None:
                detail.setdefault("gates", {})[str(verdict[0])] = verdict[1]
            sets = ", ".join(f"{k} = ?" for k in fields)
            params = [*fields.values(), time.time(), json.dumps(detail), rid, *expect]
            cur.execute(
                f"UPDATE rollouts SET {sets + ', ' if sets else ''}updated = ?, detail = ? "
                "WHERE id = ? AND state = ? AND stage = ?",
                params,
            )
            return cur.rowcount == 1

    # -- devices -----------------------------------------------------------------------------------
    def selected(self, selector: str) -> list[SelectedDevice]:
        out = []
        for dev, tags, version, state in self.db.query("SELECT id, tags, bundle_version, update_state FROM devices"):
            t = json.loads(tags)
            if selector in t:
                out.append(SelectedDevice(dev, version, state, t))
        return out

    def newer_devices(self, name: str, version: str, selector: str) -> list[tuple[str, str]]:
        """Selected devices whose active bundle NAME is newer than VERSION (semver precedence)."""
        rows = self.db.query("SELECT id, tags, bundle_version FROM devices WHERE bundle_name = ?", (name,))
        out = []
        for dev, tags, active in rows:
            if selector in json.loads(tags) and active:
                try:
                    if semver_key(active) > semver_key(version):
                        out.append((dev, active))
                except ValueError:
                    continue
        return sorted(out)

    def failure_reasons(self, rid: str, since: float) -> dict[str, str]:
        """Per device, the reason of its latest update_failed / rolled_back / update_refused event for RID."""
        out: dict[str, str] = {}
        for dev, kind, body in self.db.query(
            "SELECT device_id, type, body FROM events WHERE type IN ('update_failed', 'rolled_back', "
            "'update_refused') AND ts >= ? ORDER BY ts",
            (since - 60.0,),
        ):
            b = json.loads(body)
            if b.get("rollout") == rid:
                out[dev] = f"{kind}: {b.get('reason') or ''}".rstrip(": ")
        return out

    def assigned(self, rid: str) -> list[AssignedDevice]:
        rows = self.db.query(
            "SELECT device_id, stage, status, previous_version, assigned FROM rollout_devices WHERE rollout_id = ?",
            (rid,),
        )
        return [AssignedDevice(d, int(s), st, p, float(a)) for d, s, st, p, a in rows]

    def assign(self, rid: str, stage: int, devices: list[tuple[str, str | None, str]]) -> list[str]:
        """Add (device, previous version, status) to RID's STAGE; a device already in it keeps its row.
        Returns the devices this call added: only those are to be ordered (another server process may
        have taken the same devices a moment before)."""
        now = time.time()
        added = []
        with self.db.transaction() as cur:
            for dev, previous, status in devices:
                cur.execute(
                    "INSERT INTO rollout_devices (rollout_id, device_id, stage, assigned, previous_version, status) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rollout_id, device_id) DO NOTHING",
                    (rid, dev, stage, now, previous, status),
                )
                if cur.rowcount == 1:
                    added.append(dev)
        return added

    def mark(self, rid: str, device: str, status: str) -> None:
        self.db.execute(
            "UPDATE rollout_devices SET status = ? WHERE rollout_id = ? AND device_id = ?", (status, rid, device)
        )

    def record_device_results(self) -> None:
        """Mark pending devices updated or failed from what they reported: their last outcome event for the
        rollout (`committed`: updated; `update_failed`, `rolled_back`, `update_refused`: failed), or being on
        its version with no update under way (docs/fleet.md, "When a device counts as updated")."""
        pending = self.db.query("SELECT rollout_id, device_id FROM rollout_devices WHERE status = 'pending'")
        if not pending:
            return
        # A few queries per tick for all pending devices, not two per device (a stage of 500 devices).
        rids = sorted({rid for rid, _ in pending})
        target = dict(self.db.query(f"SELECT id, bundle_version FROM rollouts WHERE id IN ({_marks(rids)})", rids))
        results: dict[tuple[str, str], str] = {}
        registry: dict[str, tuple[Any, Any]] = {}
        devices = sorted({dev for _, dev in pending})
        for i in range(0, len(devices), _CHUNK):
            chunk = devices[i : i + _CHUNK]
            for dev, typ, body in self.db.query(
                f"SELECT device_id, type, body FROM events WHERE device_id IN ({_marks(chunk)}) "
                "AND type IN ('rolled_back', 'update_failed', 'update_refused', 'committed') ORDER BY ts",
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

    # -- telemetry ---------------------------------------------------------------------------------
    def cohort(
        self,
        name: str,
        selector: str,
        since: float,
        *,
        version: str | None = None,
        exclude_version: str | None = None,
        reporting_of: list[str] | None = None,
    ) -> Cohort:
        """The telemetry of bundle NAME from devices tagged SELECTOR since SINCE (rounded down to its rollup
        bucket), merged from the rollups: at VERSION, or at every version but EXCLUDE_VERSION. `reporting`
        counts those of REPORTING_OF that made calls on VERSION meanwhile."""
        m = read(self.db, name, version, selector, since, exclude_version=exclude_version)
        lat = None if m["latency"] is None else m["latency"].tolist()
        conf = m["confusion"]
        square = conf is not None and conf.ndim == 2 and conf.shape[0] == conf.shape[1]
        return Cohort(
            calls=m["calls"],
            errors=m["errors"] + m["nan_outputs"],
            p95_ms=latency_quantile(lat, 0.95) if lat is not None else None,
            p50_ms=latency_quantile(lat, 0.5) if lat is not None else None,
            classes=m["outputs"].get("predicted_class"),
            windows=m["windows"],
            reporting=reporting_devices(self.db, name, version, reporting_of, since)
            if version is not None and reporting_of
            else 0,
            labelled=int(conf.sum()) if conf is not None else 0,
            correct=int(np.trace(conf)) if square else 0,
            latency_by_accel={k: v.tolist() for k, v in m["latency_by_accel"].items()},
        )
