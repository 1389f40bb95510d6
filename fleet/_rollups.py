"""Rollups: the fleet's telemetry summed per bundle version, cohort and time bucket as it is stored.

Every window the ingest stores is added, in the same transaction, to one row per cohort it belongs to
(`*` for all devices, and each tag the device carried then) in the one-minute bucket its start falls in.
A window is therefore counted in the rollups exactly when it is stored, and once: its idempotency key
keeps a redelivered window out of both. Minute rows are compacted into hours, and hours into days, as
they age (`compact`); each window stays counted in exactly one row per cohort.

Drift reports, the drift monitor, rollout gates, the dashboard and `/metrics` read rollups, so what they
cost grows with features x bins x buckets, not with devices or windows. A time range is answered in
whole buckets: `since` rounds down to the start of the bucket that holds it (a minute for recent data, an
hour or a day once compacted).

`window_devices` keeps, per bundle version and device, when it last reported and last made calls: the
gates' count of devices reporting on a version, without reading windows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._db import Database

__all__ = [
    "ALL",
    "WIDTHS",
    "Rollup",
    "accumulate",
    "add_counts",
    "compact",
    "empty_merge",
    "merge_windows",
    "read",
    "record_windows",
    "reporting_devices",
    "series",
]


ALL = "*"  # the cohort of all devices
MINUTE, HOUR, DAY = 60, 3600, 86400
WIDTHS = (MINUTE, HOUR, DAY)

_CHUNK = 500


# -- counts ----------------------------------------------------------------------------------------------
def empty_merge() -> dict[str, Any]:
    """Merged counts of no window."""
    return {
        "windows": 0,
        "calls": 0,
        "samples": 0,
        "summarised": 0,
        "errors": 0,
        "nan_outputs": 0,
        "latency": None,
        "latency_by_accel": {},  # accelerator -> latency histogram: gates compare like with like
        "inputs": {},
        "outputs": {},
        "confusion": None,
    }


def add_counts(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """TOTAL + COUNTS on the same bins. Counts on other bins are left out and the total kept: ingest refuses
    windows that do not fit their bundle's baseline, so these can only be windows stored before it did,
    and one of them must not throw away what every other device reported."""
    if total is None or not total.size:
        return counts
    if not counts.size:
        return total
    return total + counts if total.shape == counts.shape else total


def accumulate(acc: dict[str, Any], w: dict[str, Any]) -> dict[str, Any]:
    """Add a telemetry window W (as devices send it) or merged counts W into ACC, in place; returns ACC."""
    merged = "latency" in w
    acc["windows"] += int(w.get("windows", 0)) if merged else 1
    acc["calls"] += int(w["calls"])
    acc["samples"] += int(w["samples"])
    acc["summarised"] += int(w.get("summarised", w["samples"]))
    errors: Any = w.get("errors") or (0 if merged else {})
    acc["errors"] += int(errors) if merged else sum(int(v) for v in errors.values())
    acc["nan_outputs"] += int(w.get("nan_outputs", 0))
    lat = w["latency"] if merged else (w.get("latency_ms") or {}).get("counts")
    if lat is not None:
        acc["latency"] = add_counts(acc["latency"], np.asarray(lat, dtype=np.int64))
    by = acc["latency_by_accel"]
    if merged:
        for k, v in (w.get("latency_by_accel") or {}).items():
            by[k] = add_counts(by.get(k), np.asarray(v, dtype=np.int64))
    elif lat is not None:
        k = str(w.get("accelerator") or "unknown")
        by[k] = add_counts(by.get(k), np.asarray(lat, dtype=np.int64))
    for group in ("inputs", "outputs"):
        dst = acc[group]
        for k, v in w[group].items():
            dst[k] = add_counts(dst.get(k), np.asarray(v, dtype=np.int64))
    fb = w.get("confusion") if merged else (w.get("feedback") or {}).get("confusion")
    if fb is not None:
        acc["confusion"] = add_counts(acc.get("confusion"), np.asarray(fb, dtype=np.int64))
    return acc


def merge_windows(bodies: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts of telemetry windows (same bundle, so the same bins)."""
    acc = empty_merge()
    for w in bodies:
        accumulate(acc, w)
    return acc


def _dump(acc: dict[str, Any]) -> str:
    def lst(a: np.ndarray | None) -> Any:
        return None if a is None else a.tolist()

    out = {k: acc[k] for k in ("windows", "calls", "samples", "summarised", "errors", "nan_outputs")}
    out["latency"] = lst(acc["latency"])
    out["latency_by_accel"] = {k: v.tolist() for k, v in acc["latency_by_accel"].items()}
    out["confusion"] = lst(acc["confusion"])
    for group in ("inputs", "outputs"):
        out[group] = {k: v.tolist() for k, v in acc[group].items()}
    return json.dumps(out, separators=(",", ":"))


def _load(body: str) -> dict[str, Any]:
    return accumulate(empty_merge(), json.loads(body))


# -- writing ---------------------------------------------------------------------------------------------
def bucket_of(start: float, width: int = MINUTE) -> float:
    return float(math.floor(start / width) * width)


def _merge_rows(cur: Any, postgres: bool, deltas: dict[tuple[str, str, str, float, int], dict[str, Any]]) -> None:
    """Add each delta to its row (created when missing). Rows are taken in key order, so two writers on
    PostgreSQL lock them in the same order and cannot deadlock; SQLite has one writer at a time anyway."""
    now = time.time()
    lock = " FOR UPDATE" if postgres else ""
    for key in sorted(deltas):
        cur.execute(
            "INSERT INTO rollups (bundle_name, bundle_version, cohort, bucket, width, windows, body, updated) "
            "VALUES (?, ?, ?, ?, ?, 0, '', ?) ON CONFLICT (bundle_name, bundle_version, cohort, bucket, width) "
            "DO NOTHING",
            (*key, now),
        )
        where = "bundle_name = ? AND bundle_version = ? AND cohort = ? AND bucket = ? AND width = ?"
        cur.execute(f"SELECT body FROM rollups WHERE {where}{lock}", key)
        body = cur.fetchall()[0][0]
        acc = accumulate(_load(body) if body else empty_merge(), deltas[key])
        cur.execute(
            f"UPDATE rollups SET windows = ?, body = ?, updated = ? WHERE {where}",
            (acc["windows"], _dump(acc), now, *key),
        )


@dataclass(frozen=True)
class StoredWindow:
    """A window just stored: the device, the tags it carries now, the window as checked."""

    device: str
    tags: Sequence[str]
    window: dict[str, Any]


def add_windows(cur: Any, postgres: bool, stored: Sequence[StoredWindow]) -> None:
    """Add STORED (windows inserted by this transaction, none twice) to the rollups and `window_devices`."""
    # Windows are summed once per (bundle, bucket, set of tags), then each sum is added to its cohorts:
    # devices mostly share a few tag sets, so a window costs one addition, not one per tag.
    groups: dict[tuple[str, str, float, tuple[str, ...]], dict[str, Any]] = {}
    devices: dict[tuple[str, str, str], list[Any]] = {}
    for s in stored:
        w = s.window
        name, version = w["bundle"]["name"], w["bundle"]["version"]
        b = bucket_of(float(w["start"]))
        cohorts = tuple(dict.fromkeys((ALL, *s.tags)))
        accumulate(groups.setdefault((name, version, b, cohorts), empty_merge()), w)
        start, calls = float(w["start"]), int(w["calls"])
        d = devices.setdefault((name, version, s.device), [start, start, None, 0, 0])
        d[0], d[1] = min(d[0], start), max(d[1], start)
        if calls:
            d[2] = start if d[2] is None else max(d[2], start)
        d[3] += 1
        d[4] += calls
    deltas: dict[tuple[str, str, str, float, int], dict[str, Any]] = {}
    for (name, version, b, cohorts), acc in groups.items():
        for cohort in cohorts:
            accumulate(deltas.setdefault((name, version, cohort, b, MINUTE), empty_merge()), acc)
    _merge_rows(cur, postgres, deltas)
    keys = sorted(devices)
    for i in range(0, len(keys), 200):  # a statement per 200 devices, not one per device
        chunk = keys[i : i + 200]
        params = [v for key in chunk for v in (*key, *devices[key])]
        cur.execute(
            "INSERT INTO window_devices (bundle_name, bundle_version, device_id, first_start, last_start, "
            f"last_called, windows, calls) VALUES {', '.join(['(?, ?, ?, ?, ?, ?, ?, ?)'] * len(chunk))} "
            "ON CONFLICT (bundle_name, bundle_version, device_id) DO UPDATE SET "
            "first_start = CASE WHEN excluded.first_start < window_devices.first_start "
            "THEN excluded.first_start ELSE window_devices.first_start END, "
            "last_start = CASE WHEN excluded.last_start > window_devices.last_start "
            "THEN excluded.last_start ELSE window_devices.last_start END, "
            "last_called = CASE WHEN window_devices.last_called IS NULL OR excluded.last_called > "
            "window_devices.last_called THEN COALESCE(excluded.last_called, window_devices.last_called) "
            "ELSE window_devices.last_called END, "
            "windows = window_devices.windows + excluded.windows, calls = window_devices.calls + excluded.calls",
            params,
        )


def insert_windows(cur: Any, items: Sequence[tuple[str, dict[str, Any], str]], received: float) -> set[str]:
    """Insert checked (device, window, body) ITEMS into `windows`, a statement per 200 (a round trip per row
    is what bounds a PostgreSQL writer); returns the keys that were new."""
    new: set[str] = set()
    for i in range(0, len(items), 200):
        chunk = items[i : i + 200]
        params: list[Any] = []
        for device, w, body in chunk:
            params += [
                w["key"],
                device,
                w["bundle"]["name"],
                w["bundle"]["version"],
                float(w["start"]),
                int(w["calls"]),
                int(w["samples"]),
                sum(int(v) for v in w["errors"].values()),
                int(w["nan_outputs"]),
                body,
                received,
            ]
        rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        cur.execute(
            "INSERT INTO windows (key, device_id, bundle_name, bundle_version, start, calls, samples, errors, "
            f"nan_outputs, body, received) VALUES {rows} ON CONFLICT (key) DO NOTHING RETURNING key",
            params,
        )
        new.update(str(k) for (k,) in cur.fetchall())
    return new


def record_windows(db: Database, windows: Sequence[tuple[str, dict[str, Any]]]) -> int:
    """Store (device, window) pairs the way the ingest does (windows, rollups, `window_devices`) in one
    transaction, with each device's current tags; returns how many were new. For tools and tests: the
    ingest checks windows against the bundle's baseline first, this does not."""
    tags = _tags(db, sorted({d for d, _ in windows}))
    now = time.time()
    with db.transaction() as cur:
        new = insert_windows(cur, [(d, w, json.dumps(w)) for d, w in windows], now)
        stored = []
        for d, w in windows:
            if w["key"] in new:
                new.discard(w["key"])  # the same window twice is stored, and counted, once
                stored.append(StoredWindow(d, tags.get(d, []), w))
        add_windows(cur, db.kind == "postgresql", stored)
    return len(stored)


def _tags(db: Database, devices: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in range(0, len(devices), _CHUNK):
        chunk = devices[i : i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        for dev, tags in db.query(f"SELECT id, tags FROM devices WHERE id IN ({marks})", chunk):
            out[dev] = list(json.loads(tags))
    return out


# -- reading ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollup:
    """One bucket's merged counts."""

    bundle: tuple[str, str]
    cohort: str
    bucket: float
    width: int
    counts: dict[str, Any]


def _range(since: float | None, until: float | None) -> tuple[str, list[Any]]:
    sql, params = "", []
    if since is not None:
        # The bucket overlaps [since, ...): the first condition lets the index narrow it down.
        sql += " AND bucket > ? AND bucket + width > ?"
        params += [since - DAY, since]
    if until is not None:
        sql += " AND bucket < ?"
        params.append(until)
    return sql, params


def series(
    db: Database,
    name: str | None = None,
    version: str | None = None,
    cohort: str | None = ALL,
    since: float | None = None,
    until: float | None = None,
) -> list[Rollup]:
    """The rollup rows of bundle NAME:VERSION (None: any) and COHORT (None: every cohort) overlapping
    [SINCE, UNTIL), oldest first."""
    sql = "SELECT bundle_name, bundle_version, cohort, bucket, width, body FROM rollups WHERE windows > 0"
    params: list[Any] = []
    for col, val in (("bundle_name", name), ("bundle_version", version), ("cohort", cohort)):
        if val is not None:
            sql += f" AND {col} = ?"
            params.append(val)
    rng, more = _range(since, until)
    rows = db.query(sql + rng + " ORDER BY bucket", params + more)
    return [Rollup((n, v), c, float(b), int(wd), _load(body)) for n, v, c, b, wd, body in rows]


def read(
    db: Database,
    name: str,
    version: str | None,
    cohort: str = ALL,
    since: float | None = None,
    until: float | None = None,
    *,
    exclude_version: str | None = None,
) -> dict[str, Any]:
    """Merged counts of bundle NAME at VERSION (None: every version but EXCLUDE_VERSION) for COHORT over
    [SINCE, UNTIL) in whole buckets."""
    acc = empty_merge()
    for r in series(db, name, version, cohort, since, until):
        if version is None and r.bundle[1] == exclude_version:
            continue
        accumulate(acc, r.counts)
    return acc


def reporting_devices(db: Database, name: str, version: str, devices: Sequence[str], since: float) -> int:
    """How many of DEVICES sent a window with calls on NAME:VERSION starting in or after SINCE's minute."""
    n = 0
    since = bucket_of(since)
    for i in range(0, len(devices), _CHUNK):
        chunk = list(devices[i : i + _CHUNK])
        marks = ", ".join("?" * len(chunk))
        n += int(
            db.query(
                "SELECT COUNT(*) FROM window_devices WHERE bundle_name = ? AND bundle_version = ? "
                f"AND last_called >= ? AND device_id IN ({marks})",
                [name, version, since, *chunk],
            )[0][0]
        )
    return n


# -- compaction ------------------------------------------------------------------------------------------
def compact(db: Database, now: float, keep_minutes_s: float = 6 * HOUR, keep_hours_s: float = 14 * DAY) -> int:
    """Merge minute rows older than KEEP_MINUTES_S into hour rows, and hour rows older than KEEP_HOURS_S
    into day rows, a batch per transaction; returns how many rows were folded in."""
    folded = 0
    postgres = db.kind == "postgresql"
    for width, to, keep in ((MINUTE, HOUR, keep_minutes_s), (HOUR, DAY, keep_hours_s)):
        # Only buckets whose whole target bucket has aged out: a target is written by one pass, not by two.
        limit = bucket_of(now - keep, to)
        while True:
            with db.transaction() as cur:
                cur.execute(
                    "SELECT bundle_name, bundle_version, cohort, bucket FROM rollups WHERE width = ? AND bucket < ? "
                    f"ORDER BY bucket LIMIT {_CHUNK}",
                    (width, limit),
                )
                keys = [tuple(r) for r in cur.fetchall()]
                if not keys:
                    break
                deltas: dict[tuple[str, str, str, float, int], dict[str, Any]] = {}
                lock = " FOR UPDATE" if postgres else ""
                for n, v, c, b in keys:
                    where = "bundle_name = ? AND bundle_version = ? AND cohort = ? AND bucket = ? AND width = ?"
                    cur.execute(f"SELECT body FROM rollups WHERE {where}{lock}", (n, v, c, b, width))
                    got = cur.fetchall()
                    if not got:
                        continue  # folded by another process meanwhile
                    cur.execute(f"DELETE FROM rollups WHERE {where}", (n, v, c, b, width))
                    if got[0][0]:
                        accumulate(deltas.setdefault((n, v, c, bucket_of(b, to), to), empty_merge()), _load(got[0][0]))
                    folded += 1
                _merge_rows(cur, postgres, deltas)
    return folded


def rebuild(db: Database) -> int:
    """Build the rollups of every stored window once, for a database written before rollups existed (a
    marker row in `counters` says it was done); returns the windows added."""
    postgres = db.kind == "postgresql"
    with db.transaction() as cur:
        if postgres:
            cur.execute("SELECT pg_advisory_xact_lock(7414217)")  # one process rebuilds; the rest wait and see
        cur.execute("SELECT value FROM counters WHERE name = 'rollups_built'")
        if cur.fetchall():
            return 0
        cur.execute("SELECT COUNT(*) FROM rollups")
        empty = cur.fetchall()[0][0] == 0
        added = 0
        if empty:
            cur.execute("SELECT id, tags FROM devices")
            tags = {d: list(json.loads(t)) for d, t in cur.fetchall()}
            cur.execute("SELECT device_id, body FROM windows ORDER BY start")
            batch: list[StoredWindow] = []
            for dev, body in cur.fetchall():
                batch.append(StoredWindow(dev, tags.get(dev, []), json.loads(body)))
                if len(batch) >= 5000:
                    add_windows(cur, postgres, batch)
                    added, batch = added + len(batch), []
            add_windows(cur, postgres, batch)
            added += len(batch)
        cur.execute("INSERT INTO counters (name, value) VALUES ('rollups_built', 1) ON CONFLICT (name) DO NOTHING")
    return added
