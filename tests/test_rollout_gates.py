"""The rollout engine's latency gate on recorded telemetry: a few slow calls in a small canary are a
scheduling hiccup, a canary that is slow throughout is a slow bundle (on a real SQLite database)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet._telemetry import LATENCY_EDGES_MS
from edgefleet.fleet._db import Database
from edgefleet.fleet._rollout import DEFAULT_GATES, RolloutEngine


def _bin(ms: float) -> int:
    return sum(1 for e in LATENCY_EDGES_MS if e <= ms)


def _window(device: str, version: str, latencies: dict[float, int], start: float) -> dict:
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    for ms, n in latencies.items():
        counts[_bin(ms)] += n
    calls = sum(latencies.values())
    return {
        "key": f"{device}:{version}:{start}",
        "device_id": device,
        "bundle": {"name": "m", "version": version},
        "start": start,
        "calls": calls,
        "samples": calls,
        "errors": {},
        "nan_outputs": 0,
        "latency_ms": {"counts": counts},
        "inputs": {},
        "outputs": {},
    }


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'fleet.db'}")


def _gates(db: Database, canary: dict[float, int], canary_windows: bool = True) -> dict:
    now = time.time()
    with db.transaction() as cur:
        for i in range(6):
            dev, version = f"d{i}", "2.0.0" if i < 2 else "1.0.0"
            cur.execute(
                "INSERT INTO devices (id, tags, created, bundle_version) VALUES (?, ?, ?, ?)",
                (dev, json.dumps(["g"]), now, version),
            )
            w = _window(dev, version, canary if i < 2 else {0.4: 195, 0.5: 5}, now)
            if i < 2 and not canary_windows:
                continue
            cur.execute(
                "INSERT INTO windows (key, device_id, bundle_name, bundle_version, start, calls, samples, errors, "
                "nan_outputs, body, received) VALUES (?, ?, 'm', ?, ?, ?, ?, 0, 0, ?, ?)",
                (w["key"], dev, version, now, w["calls"], w["samples"], json.dumps(w), now),
            )
    engine = RolloutEngine(db, lambda *a, **k: None)
    mine = [(f"d{i}", "updated", "1.0.0", now - 1) for i in range(2)]
    return engine._gates("r-1", "m", "2.0.0", "g", mine, dict(DEFAULT_GATES))


def test_a_few_slow_calls_in_a_small_canary_do_not_fail_the_latency_gate(db: Database) -> None:
    res = _gates(db, {0.4: 90, 2.5: 10})  # p95 in the 2.5 ms bin, median as fast as the control
    assert res["values"]["p95_ms"] > 2 and res["ok"], res


def test_a_slow_canary_fails_the_latency_gate(db: Database) -> None:
    res = _gates(db, {2.5: 90, 3.0: 10})  # slower throughout
    assert not res["ok"] and any(g.startswith("p95") for g in res["failed_gates"]), res


def test_with_enough_calls_the_p95_alone_decides(db: Database) -> None:
    res = _gates(db, {0.4: 900, 2.5: 100})  # 1,000 calls per device: a reliable p95
    assert not res["ok"] and any(g.startswith("p95") for g in res["failed_gates"]), res


def test_updated_devices_without_telemetry_hold_the_stage(db: Database) -> None:
    # Committed, but nothing reported on the new version yet: every telemetry gate would pass on nothing.
    res = _gates(db, {0.4: 100}, canary_windows=False)
    assert res["wait_for_telemetry"] and res["values"]["devices_reporting"] == 0, res
    res = _gates(Database(db.url.replace("fleet.db", "fleet2.db")), {0.4: 100})
    assert not res["wait_for_telemetry"] and res["values"]["devices_reporting"] == 2 and res["ok"], res


def test_stages_take_every_group_of_devices_in_proportion() -> None:
    """Canary and control drawn evenly from differently tagged groups, in a stable order."""
    from edgefleet.fleet._rollout import stratified_order

    devices = [{"id": f"a-{i:02d}", "tags": ["fleet", "site-a"]} for i in range(10)]
    devices += [{"id": f"b-{i:02d}", "tags": ["fleet", "site-b"]} for i in range(90)]
    devices += [{"id": f"c-{i:02d}", "tags": ["fleet", "site-c", "new-hw"]} for i in range(20)]
    order = stratified_order("r1", list(reversed(devices)))
    assert sorted(d["id"] for d in order) == sorted(d["id"] for d in devices)
    for k in (12, 30, 60, 120):
        first = order[:k]
        for prefix, size in (("a-", 10), ("b-", 90), ("c-", 20)):
            share = sum(d["id"].startswith(prefix) for d in first)
            assert abs(share - k * size / 120) <= 1, (k, prefix, share)
    assert [d["id"] for d in stratified_order("r1", devices)] == [d["id"] for d in order]  # stable
    assert [d["id"] for d in stratified_order("r2", devices)] != [d["id"] for d in order]  # per rollout
