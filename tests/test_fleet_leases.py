"""Several server processes on one database: one rollout engine acts at a time, another takes over when it
dies, and no stage is judged or ordered twice, even while two believe they hold the engine (real SQLite
and PostgreSQL)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from edgefleet.fleet._db import Database
from edgefleet.fleet._lease import Lease
from edgefleet.fleet._rollout import RolloutEngine
from edgefleet.fleet._rollups import record_windows

from .test_rollout_gates import _window

DEVICES = [f"d{i:02d}" for i in range(10)]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Database:
    if request.param == "postgresql":
        return Database(request.getfixturevalue("postgres").fresh_database())
    return Database(f"sqlite:///{tmp_path / 'fleet.db'}")


def test_a_lease_has_one_holder_and_passes_on_when_it_lapses_or_is_released(db: Database) -> None:
    a, b = Lease(db, "engine", ttl_s=1.0), Lease(db, "engine", ttl_s=1.0)
    assert a.acquire() and a.held()
    assert not b.acquire() and not b.held()
    assert a.acquire()  # renewed
    assert a.current_holder() == a.holder
    time.sleep(1.1)  # a died: it renews no more
    assert not a.held()
    assert b.acquire() and b.held() and not a.acquire()
    b.release()
    assert a.acquire()  # at once, without waiting for b's lease to expire


def _fleet(db: Database) -> None:
    now = time.time()
    with db.transaction() as cur:
        for d in DEVICES:
            cur.execute(
                "INSERT INTO devices (id, tags, created, bundle_name, bundle_version, update_state) "
                "VALUES (?, ?, ?, 'm', '1.0.0', 'idle')",
                (d, json.dumps(["g"]), now),
            )
        cur.execute(
            "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) "
            "VALUES ('m', '2.0.0', '00', 1, 'm.efb', '{}', ?)",
            (now,),
        )


def _devices_obey(db: Database, orders: list[tuple[str, str, str]], lock: threading.Lock, later: list | None = None):
    """A SET_DESIRED that records each order and has the device carry it out: it commits, and reports a
    window on the new version (as fast as the control's, so the gates pass). LATER: orders wait there
    until the test calls the returned function's `carry_out`."""

    def set_desired(dev: str, name: str, version: str, rid: str, action: str, wait: bool = False) -> None:
        with lock:
            orders.append((dev, version, action))
        if later is not None:
            later.append((dev, version, rid))
        else:
            obey(dev, version, rid)

    def obey(dev: str, version: str, rid: str) -> None:
        now = time.time()
        with db.transaction() as cur:
            cur.execute(
                "INSERT INTO events (key, device_id, type, ts, body) VALUES (?, ?, 'committed', ?, ?)",
                (f"{dev}:{rid}:{len(orders)}", dev, now, json.dumps({"rollout": rid})),
            )
            cur.execute("UPDATE devices SET bundle_version = ? WHERE id = ?", (version, dev))
        for d in DEVICES:  # every device reports, canary and control alike
            v = version if d == dev else "1.0.0"
            w = _window(d, v, {0.4: 200}, now)
            w["key"] += f":{dev}:{len(orders)}"
            record_windows(db, [(d, w)])

    def carry_out() -> None:
        while later:
            obey(*later.pop(0))

    set_desired.carry_out = carry_out  # type: ignore[attr-defined]
    return set_desired


_GATES = {"min_stage_s": 0, "min_prediction_samples": 0}


def test_a_standby_engine_carries_a_rollout_on_when_the_acting_one_dies(db: Database) -> None:
    orders: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    _fleet(db)
    obey = _devices_obey(db, orders, lock, later=[])
    a = RolloutEngine(db, obey, lease_ttl_s=1.0)
    b = RolloutEngine(db, obey, lease_ttl_s=1.0)
    rid = a.create("m:2.0.0", "g", [30, 60, 100], _GATES)
    a.tick()  # a holds the engine: stage 0 ordered
    b.tick()  # b stands by
    assert len(orders) == 3 and a.get(rid)["stage"] == 0
    obey.carry_out()  # the stage's devices update
    # a dies (kill -9: no release). Until its lease lapses b does nothing; then b takes over.
    b.tick()
    assert len(orders) == 3 and a.get(rid)["stage"] == 0 and a.lease.current_holder() == a.lease.holder
    t0 = time.monotonic()
    while a.get(rid)["state"] == "running":
        assert time.monotonic() - t0 < 10, a.get(rid)
        b.tick()
        obey.carry_out()
        time.sleep(0.05)
    assert time.monotonic() - t0 >= 0.5  # not before a's lease had lapsed
    r = b.get(rid)
    assert r["state"] == "completed", r
    assert b.lease.current_holder() == b.lease.holder
    assert Counter(d for d, _, _ in orders) == Counter(DEVICES)  # every device ordered exactly once
    notes = [h["note"] for h in r["history"]]
    assert notes == ["stage 0 passed its gates", "stage 1 passed its gates", "last stage passed: completed"]


def test_two_engines_acting_at_once_never_judge_or_order_a_stage_twice(db: Database) -> None:
    """The worst case: both believe they hold the engine (a holder paused past its lease, clocks apart).
    Each move is conditional on the rollout's (state, stage) and each order on recording the device first."""
    orders: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    _fleet(db)
    obey = _devices_obey(db, orders, lock)
    a = RolloutEngine(db, obey, lease_ttl_s=30.0)
    b = RolloutEngine(db, obey, lease_ttl_s=30.0)
    b.lease.holder = a.lease.holder  # both renew the same lease: both act
    rid = a.create("m:2.0.0", "g", [20, 40, 60, 80, 100], _GATES)
    errors: list[BaseException] = []

    def run(engine: RolloutEngine) -> None:
        try:
            for _ in range(40):
                engine.tick()
                if engine.get(rid)["state"] != "running":
                    return
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    r = a.get(rid)
    assert r["state"] == "completed", r
    assert Counter(d for d, _, _ in orders) == Counter(DEVICES)
    notes = [h["note"] for h in r["history"]]
    assert notes == [f"stage {i} passed its gates" for i in range(4)] + ["last stage passed: completed"], notes
