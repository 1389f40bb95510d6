"""The rollout engine's latency gate on recorded telemetry: a few slow calls in a small canary are a
scheduling hiccup, a canary that is slow throughout is a slow bundle; operators pause, resume and abort (on
a real SQLite database)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet.fleet._db import Database
from edgefleet.fleet._gates import Cohort, Gates, StageDevices, evaluate
from edgefleet.fleet._rollout import MOVES, STATES, RolloutEngine
from edgefleet.fleet._rollout_store import AssignedDevice
from edgefleet.fleet._rollups import record_windows
from edgefleet.protocol import LATENCY_EDGES_MS


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
    windows = []
    with db.transaction() as cur:
        for i in range(6):
            dev, version = f"d{i}", "2.0.0" if i < 2 else "1.0.0"
            cur.execute(
                "INSERT INTO devices (id, tags, created, bundle_version) VALUES (?, ?, ?, ?)",
                (dev, json.dumps(["g"]), now, version),
            )
            if i >= 2 or canary_windows:
                windows.append((dev, _window(dev, version, canary if i < 2 else {0.4: 195, 0.5: 5}, now)))
    record_windows(db, windows)
    engine = RolloutEngine(db, lambda *a, **k: None)
    mine = [AssignedDevice(f"d{i}", 0, "updated", "1.0.0", now - 1) for i in range(2)]
    new = engine.store.cohort("m", "g", now - 1, version="2.0.0", reporting_of=[m.device_id for m in mine])
    ctl = engine.store.cohort("m", "g", now - 1, exclude_version="2.0.0")
    return evaluate(new, ctl, StageDevices(2, 2, 0, True), Gates()).to_dict()


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


def test_cohort_figures_from_rollups_match_merging_every_window(db: Database) -> None:
    """The gates read rollups; their figures equal merging every stored window body (in the same whole
    minutes) on every tick, as windows keep arriving, duplicates included."""
    import numpy as np

    from edgefleet.fleet._rollups import bucket_of, merge_windows, record_windows
    from edgefleet.protocol import latency_quantile

    rng = np.random.default_rng(5)
    engine = RolloutEngine(db, lambda *a, **k: None)
    devices = [f"d{i}" for i in range(12)]
    with db.transaction() as cur:
        for i, dev in enumerate(devices):
            tags = ["g", "a" if i < 5 else "b"]
            cur.execute("INSERT INTO devices (id, tags, created) VALUES (?, ?, ?)", (dev, json.dumps(tags), 0.0))
    t0 = time.time() - 100
    sent: list[tuple[str, dict]] = []

    def add(n: int) -> None:
        batch = []
        for _ in range(n):
            dev = str(rng.choice(devices))
            version = str(rng.choice(["1.0.0", "2.0.0", "3.0.0"]))
            start = t0 + float(rng.uniform(-90, 90))
            w = _window(dev, version, {0.4: int(rng.integers(0, 50)), 3.0: int(rng.integers(0, 5))}, start)
            w["key"] += f":{rng.integers(1 << 40)}"
            w["errors"] = {"input": int(rng.integers(0, 3))}
            w["nan_outputs"] = int(rng.integers(0, 2))
            if rng.random() < 0.8:
                w["outputs"] = {"predicted_class": rng.integers(0, 9, 10).tolist()}
            batch.append((dev, w))
        if batch:
            batch.append(batch[0])  # a duplicate in the same batch, and one sent again later
        sent.extend(batch)
        record_windows(db, batch)
        record_windows(db, batch[:1])

    def reference(devs: list[str], version: str | None, exclude: str | None) -> dict:
        unique = {w["key"]: (d, w) for d, w in sent}.values()
        bodies = [
            w
            for d, w in unique
            if d in devs
            and w["start"] >= bucket_of(t0)
            and (w["bundle"]["version"] == version if version else w["bundle"]["version"] != exclude)
        ]
        lat = np.sum([w["latency_ms"]["counts"] for w in bodies], axis=0).tolist() if bodies else None
        merged = merge_windows(bodies)
        return {
            "calls": merged["calls"],
            "errors": sum(sum(w["errors"].values()) + w["nan_outputs"] for w in bodies),
            "latency": latency_quantile(lat, 0.95) if lat else None,
            "median": latency_quantile(lat, 0.5) if lat else None,
            "classes": merged["outputs"].get("predicted_class"),
            "windows": len(bodies),
            "reporting": len({d for d, w in unique if d in devs[:3] and w in bodies and w["calls"]}),
        }

    for n in (0, 40, 1, 200):
        add(n)
        for tag, devs, version, exclude in (
            ("a", devices[:5], "2.0.0", None),
            ("b", devices[5:], None, "2.0.0"),
            ("g", devices, "1.0.0", None),
        ):
            c = engine.store.cohort("m", tag, t0, version=version, exclude_version=exclude, reporting_of=devs[:3])
            want = reference(devs, version, exclude)
            got = {"calls": c.calls, "errors": c.errors, "latency": c.p95_ms, "median": c.p50_ms}
            got |= {"windows": c.windows, "reporting": c.reporting if version else want["reporting"]}
            wanted_classes = want.pop("classes")
            assert got == want, (n, tag, version)
            assert (c.classes is None and wanted_classes is None) or np.array_equal(c.classes, wanted_classes)


def _four_devices_on_v1(db: Database) -> None:
    """Devices d0-d3 tagged g, idle on m 1.0.0, and m 2.0.0 published."""
    now = time.time()
    with db.transaction() as cur:
        for i in range(4):
            cur.execute(
                "INSERT INTO devices (id, tags, created, bundle_version, update_state) "
                "VALUES (?, ?, ?, '1.0.0', 'idle')",
                (f"d{i}", json.dumps(["g"]), now),
            )
        cur.execute(
            "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) "
            "VALUES ('m', '2.0.0', '00', 1, 'm.efb', '{}', ?)",
            (now,),
        )


def test_operator_pause_resume_and_abort(db: Database) -> None:
    """Paused: no new orders and no judgement; resumed: the stage is judged and the next one ordered;
    aborted: nothing more is ordered, and an ended rollout cannot be resumed."""
    from edgefleet import InputError

    _four_devices_on_v1(db)
    orders: list[tuple[str, str, str]] = []
    engine = RolloutEngine(
        db, lambda dev, name, version, rid, action, wait=False: orders.append((dev, version, action))
    )
    rid = engine.create("m:2.0.0", "g", [50, 100], {"min_stage_s": 0})
    engine.tick()
    first = [dev for dev, _, _ in orders]
    assert len(first) == 2 and engine.get(rid)["state"] == "running"

    assert engine.set_state(rid, "pause")["state"] == "paused"
    # the stage's devices update and report, on the same predictions as the control
    windows = []
    with db.transaction() as cur:
        for i in range(4):
            dev = f"d{i}"
            version = "2.0.0" if dev in first else "1.0.0"
            if dev in first:
                cur.execute(
                    "INSERT INTO events (key, device_id, type, ts, body) VALUES (?, ?, 'committed', ?, ?)",
                    (f"{dev}:c", dev, time.time(), json.dumps({"rollout": rid, "version": version})),
                )
                cur.execute("UPDATE devices SET bundle_version = ? WHERE id = ?", (version, dev))
            w = _window(dev, version, {0.4: 200}, time.time())
            w["outputs"] = {"predicted_class": [120, 80]}
            windows.append((dev, w))
    record_windows(db, windows)
    for _ in range(3):
        engine.tick()
    r = engine.get(rid)
    assert r["state"] == "paused" and r["stage"] == 0 and len(orders) == 2  # nothing judged, nothing ordered
    assert r["stages"][0]["updated"] == 2  # devices' own results are still recorded
    with pytest.raises(InputError, match="cannot be paused"):
        engine.set_state(rid, "pause")

    assert engine.set_state(rid, "resume")["state"] == "running"
    engine.tick()
    r = engine.get(rid)
    assert r["stage"] == 1 and r["stages"][0]["gates"]["ok"], r["stages"][0]["gates"]
    assert sorted(dev for dev, _, _ in orders[2:]) == sorted({"d0", "d1", "d2", "d3"} - set(first))

    assert engine.set_state(rid, "abort")["state"] == "aborted"
    engine.tick()
    assert len(orders) == 4 and engine.get(rid)["state"] == "aborted"
    for action in ("resume", "pause", "abort"):
        with pytest.raises(InputError, match="aborted"):
            engine.set_state(rid, action)
    notes = [h["note"] for h in engine.get(rid)["history"]]
    assert notes[-3:] == ["operator: resume", "stage 0 passed its gates", "operator: abort"], notes


def test_a_prediction_shift_waits_for_labels_and_ground_truth_passes_the_stage(db: Database) -> None:
    """Through the engine: a canary whose predicted classes moved, with labels arriving on both sides but
    too few on its side, is watched, not failed; once its labels show it right where the control is
    wrong, the stage passes with the shift judged by accuracy."""
    _four_devices_on_v1(db)
    orders: list[str] = []
    engine = RolloutEngine(db, lambda dev, name, version, rid, action, wait=False: orders.append(dev))
    rid = engine.create("m:2.0.0", "g", [50, 100], {"min_stage_s": 0})
    engine.tick()
    first = list(orders)
    assert len(first) == 2

    def report(step: int, canary_labels: int) -> None:
        windows = []
        with db.transaction() as cur:
            for i in range(4):
                dev = f"d{i}"
                canary = dev in first
                version = "2.0.0" if canary else "1.0.0"
                if canary and step == 0:
                    cur.execute(
                        "INSERT INTO events (key, device_id, type, ts, body) VALUES (?, ?, 'committed', ?, ?)",
                        (f"{dev}:c", dev, time.time(), json.dumps({"rollout": rid, "version": version})),
                    )
                    cur.execute("UPDATE devices SET bundle_version = ? WHERE id = ?", (version, dev))
                w = _window(dev, version, {0.4: 200}, time.time() + step)
                w["key"] += f":{step}"
                # the canary answers class 0 far more often; its labels say it is right, the control's 70%
                w["outputs"] = {"predicted_class": [180, 20] if canary else [100, 100]}
                n = canary_labels if canary else 100
                right = n if canary else 70
                w["feedback"] = {"confusion": [[right, 0], [n - right, 0]] if canary else [[35, 15], [15, 35]]}
                windows.append((dev, w))
        record_windows(db, windows)

    report(0, canary_labels=20)  # 40 labelled canary calls, 200 on the control: too few to judge by
    for _ in range(2):
        engine.tick()
    r = engine.get(rid)
    assert r["state"] == "running" and r["stage"] == 0 and len(orders) == 2, r  # watched, not failed
    report(1, canary_labels=40)  # now 120 labelled on the canary, all right
    engine.tick()
    r = engine.get(rid)
    assert r["stage"] == 1 and r["state"] == "running", r["history"]
    values = r["stages"][0]["gates"]["values"]
    assert values["prediction_shift_judged_by_accuracy"] and values["accuracy"] == 1.0, values
    assert values["control_accuracy"] == 0.7


def test_a_rollout_that_would_downgrade_devices_is_refused_at_creation(db: Database) -> None:
    """Devices refuse downgrades, so a rollout to an older version sat at '0/2 updated' until it timed out
    (issue 16); it is refused when created, naming the devices and the explicit rollback order."""
    from edgefleet import InputError

    now = time.time()
    with db.transaction() as cur:
        for dev, version in (("d0", "2.0.0"), ("d1", "1.0.0-rc.1"), ("d2", "1.0.0")):
            cur.execute(
                "INSERT INTO devices (id, tags, created, bundle_name, bundle_version) VALUES (?, ?, ?, 'm', ?)",
                (dev, json.dumps(["g"]), now, version),
            )
        for version in ("1.0.0", "1.5.0", "2.0.0"):
            cur.execute(
                "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) "
                "VALUES ('m', ?, '00', 1, 'm.efb', '{}', ?)",
                (version, now),
            )
    engine = RolloutEngine(db, lambda *a, **k: None)
    with pytest.raises(InputError, match=r"would downgrade 1 device\(s\) running a newer m \(d0 on 2\.0\.0\)"):
        engine.create("m:1.5.0", "g", [100])
    # the release after a release candidate is an upgrade; the same version is no downgrade
    assert engine.create("m:2.0.0", "g", [50, 100]).startswith("r-")


# -- the gates as a pure function of typed figures ------------------------------------------------------
_CTL = Cohort(calls=2000, errors=10, p95_ms=2.0, p50_ms=1.0, windows=20, reporting=4)


_ALL_UPDATED = StageDevices(4, 4, 0, True)


def _verdict(new: Cohort, stage: StageDevices = _ALL_UPDATED, **gates: float):
    return evaluate(new, _CTL, stage, Gates.parse({"min_prediction_samples": 0, **gates}))


def test_each_gate_fails_on_its_own_figure_and_names_it() -> None:
    good = Cohort(calls=2000, errors=10, p95_ms=2.1, p50_ms=1.0, windows=20, reporting=4)
    v = _verdict(good)
    assert v.ok and v.failed_gates == [] and v.values["error_rate"] == 0.005, v
    v = _verdict(good, StageDevices(4, 3, 1, True))
    assert not v.ok and v.failed_gates == ["update failure rate 0.25 > 0.2"]
    v = _verdict(good, StageDevices(4, 0, 0, True), min_devices=2)
    assert v.failed_gates == ["only 0 device(s) updated (need 2)"]
    v = _verdict(Cohort(calls=2000, errors=100, p95_ms=2.0, p50_ms=1.0, reporting=4))
    assert v.failed_gates == ["error rate 0.05 > control 0.005 + 0.02"]
    v = _verdict(Cohort(calls=2000, errors=10, p95_ms=3.5, p50_ms=1.0, reporting=4))
    assert v.failed_gates == ["p95 3.500 ms > 3.000 ms (control 2.000 ms)"]


def test_the_latency_gate_on_a_small_canary_needs_the_median_slower_too() -> None:
    hiccup = Cohort(calls=200, errors=1, p95_ms=3.5, p50_ms=1.0, reporting=4)
    v = _verdict(hiccup)
    assert v.ok and v.values["p50_ms"] == 1.0 and v.values["control_p50_ms"] == 1.0
    slow = Cohort(calls=200, errors=1, p95_ms=3.5, p50_ms=2.0, reporting=4)
    assert not _verdict(slow).ok
    assert not _verdict(hiccup, reliable_p95_calls=100).ok  # 200 calls count as reliable here


def test_prediction_drift_needs_samples_and_significance() -> None:
    import numpy as np

    ctl = Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, classes=np.array([500, 500]), reporting=4)
    moved = Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, classes=np.array([900, 100]), reporting=4)
    stage = StageDevices(4, 4, 0, True)
    v = evaluate(moved, ctl, stage, Gates())
    assert not v.ok and v.failed_gates[0].startswith("prediction PSI") and v.values["prediction_samples"] == 1000
    few = Cohort(calls=20, p95_ms=2.0, p50_ms=1.0, classes=np.array([18, 2]), reporting=4)
    v = evaluate(few, ctl, stage, Gates())
    assert v.ok and v.wait_for_predictions  # 20 predictions: watch longer, judge nothing yet
    assert not evaluate(few, ctl, StageDevices(4, 4, 0, False), Gates()).wait_for_predictions  # no control


def test_silent_updated_devices_hold_the_stage() -> None:
    v = _verdict(Cohort(reporting=0), StageDevices(3, 3, 0, True))
    assert v.ok and v.wait_for_telemetry and v.values["devices_reporting"] == 0


def test_gate_values_are_checked() -> None:
    from edgefleet import InputError

    with pytest.raises(InputError, match=r"unknown gate\(s\) \['max_p99'\]"):
        Gates.parse({"max_p99": 1})
    with pytest.raises(InputError, match="gate max_p95_ratio must be a number >= 0, got -1"):
        Gates.parse({"max_p95_ratio": -1})
    with pytest.raises(InputError, match=r"gate min_devices must be a whole number >= 0, got 1\.5"):
        Gates.parse({"min_devices": 1.5})
    with pytest.raises(InputError, match="must be a number"):
        Gates.parse({"stage_timeout_s": float("nan")})
    assert Gates.parse({"min_devices": 2.0}).min_devices == 2


def test_every_rollout_state_change_is_a_move_of_the_table() -> None:
    assert {s for s, _ in MOVES} | set(MOVES.values()) <= set(STATES)
    ended = {"rolled_back", "completed", "aborted"}
    assert not any(s in ended for s, _ in MOVES), "an ended rollout has no way out"
    assert {n for n in MOVES.values()} >= ended | {"paused", "halted", "running"}


def test_the_accuracy_gate_needs_labels_on_both_sides_a_real_drop_and_significance() -> None:
    ctl = Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, reporting=4, labelled=500, correct=475)  # 0.95
    stage = StageDevices(4, 4, 0, True)
    worse = Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, reporting=4, labelled=200, correct=160)  # 0.80
    v = evaluate(worse, ctl, stage, Gates.parse({"min_prediction_samples": 0}))
    assert not v.ok and v.failed_gates[0].startswith("accuracy 0.8000 < control 0.9500 - 0.02"), v.failed_gates
    assert v.values["accuracy"] == 0.8 and v.values["control_accuracy"] == 0.95 and v.values["labelled"] == 200
    few = Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, reporting=4, labelled=40, correct=32)  # 0.80 on 40 labels
    assert evaluate(few, ctl, stage, Gates.parse({"min_prediction_samples": 0})).ok  # too few labels to judge
    close = Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, reporting=4, labelled=200, correct=187)  # 0.935
    assert evaluate(close, ctl, stage, Gates.parse({"min_prediction_samples": 0})).ok  # within the allowed drop
    noisy = Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, reporting=4, labelled=100, correct=91)  # 0.91: p ~ 0.07
    v = evaluate(noisy, ctl, stage, Gates.parse({"min_prediction_samples": 0}))
    assert v.ok and v.values["accuracy_p_value"] > 0.01, v.values


def test_a_prediction_shift_is_judged_by_ground_truth_where_labels_come_back() -> None:
    """A model retrained for inputs the control gets wrong changes exactly those answers: the predicted
    classes move. Without labels that fails the stage; with enough labels on both sides, accuracy decides;
    with labels arriving but too few, the stage waits for them."""
    import numpy as np

    stage = StageDevices(4, 4, 0, True)

    def side(classes: list[int], labelled: int = 0, correct: int = 0) -> Cohort:
        return Cohort(calls=2000, p95_ms=2.0, p50_ms=1.0, reporting=4, classes=np.array(classes),
                      labelled=labelled, correct=correct)  # fmt: skip

    ctl, moved = [500, 500], [800, 200]
    v = evaluate(side(moved), side(ctl), stage, Gates())  # no labels: the proxy decides
    assert not v.ok and v.failed_gates[0].startswith("prediction PSI") and not v.wait_for_labels
    v = evaluate(side(moved, 300, 297), side(ctl, 300, 240), stage, Gates())  # right where the control is wrong
    assert v.ok and v.values["prediction_shift_judged_by_accuracy"], v
    v = evaluate(side(moved, 300, 230), side(ctl, 300, 285), stage, Gates())  # shifted and worse: both fail
    assert not v.ok and len(v.failed_gates) == 2 and not v.wait_for_labels, v.failed_gates
    v = evaluate(side(moved, 300, 285), side(ctl, 300, 285), stage, Gates.parse({"max_accuracy_drop": 0.0}))
    assert v.ok  # equally often right: no regression
    # worse by more than the allowed drop, but on too few labels to be significant: the shift still fails it
    v = evaluate(side(moved, 100, 80), side(ctl, 100, 88), stage, Gates())
    assert not v.ok and v.failed_gates[0].startswith("prediction PSI") and len(v.failed_gates) == 1, v
    v = evaluate(side(moved, 40, 40), side(ctl, 300, 240), stage, Gates())  # labels coming, 40 < 100
    assert not v.ok and v.wait_for_labels and v.failed_gates[0].startswith("prediction PSI")


def _hist(ms: float, n: int) -> list[int]:
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    counts[_bin(ms)] = n
    return counts


def test_latency_is_compared_like_with_like_across_accelerators() -> None:
    """A canary whose calls ran on the CPU (an NPU fallback) is not judged against a control on the NPU: each
    accelerator both used is compared on its own, and a canary slower on the same accelerator still fails."""
    import numpy as np

    from edgefleet.protocol import latency_quantile

    def cohort(by: dict[str, list[int]]) -> Cohort:
        total = np.sum(list(by.values()), axis=0).tolist()
        return Cohort(
            calls=sum(total),
            p95_ms=latency_quantile(total, 0.95),
            p50_ms=latency_quantile(total, 0.5),
            reporting=4,
            latency_by_accel=by,
        )

    control = cohort({"NPU": _hist(0.5, 1950), "CPU": _hist(4.0, 50)})
    gates = Gates.parse({"min_prediction_samples": 0})
    canary_cpu = cohort({"CPU": _hist(4.0, 2000)})  # all on the CPU, as fast there as the control's CPU calls
    v = _verdict_with(canary_cpu, control, gates)
    cpu = v.values["latency_by_accelerator"]["CPU"]
    assert v.ok and cpu["control_p95_ms"] == cpu["p95_ms"], v
    # the same figures without the split fail: 4 ms against a control whose p95 is an NPU call's
    merged = [Cohort(calls=c.calls, p95_ms=c.p95_ms, p50_ms=c.p50_ms, reporting=4) for c in (canary_cpu, control)]
    assert not evaluate(merged[0], merged[1], _ALL_UPDATED, gates).ok
    slower = cohort({"NPU": _hist(2.0, 1950), "CPU": _hist(4.0, 50)})
    v = _verdict_with(slower, control, gates)
    assert not v.ok and any(g.startswith("p95 on NPU") for g in v.failed_gates), v.failed_gates
    # nothing in common: the whole canary against the whole control, as before
    apart = _verdict_with(cohort({"GPU": _hist(9.0, 2000)}), cohort({"NPU": _hist(0.5, 2000)}), gates)
    assert not apart.ok and apart.values["latency_compared"] == "overall: canary on ['GPU'], control on ['NPU']"


def _verdict_with(new: Cohort, control: Cohort, gates: Gates):
    return evaluate(new, control, _ALL_UPDATED, gates)


def test_rollups_keep_latency_per_accelerator(db: Database) -> None:
    now = time.time()
    with db.transaction() as cur:
        for i in range(4):
            cur.execute("INSERT INTO devices (id, tags, created) VALUES (?, ?, ?)", (f"d{i}", json.dumps(["g"]), now))
    windows = []
    for i in range(4):
        w = _window(f"d{i}", "2.0.0" if i < 2 else "1.0.0", {4.0 if i == 0 else 0.5: 100}, now)
        w["accelerator"] = "CPU" if i == 0 else "NPU"
        windows.append((f"d{i}", w))
    record_windows(db, windows)
    engine = RolloutEngine(db, lambda *a, **k: None)
    new = engine.store.cohort("m", "g", now - 1, version="2.0.0", reporting_of=["d0", "d1"])
    ctl = engine.store.cohort("m", "g", now - 1, exclude_version="2.0.0")
    assert set(new.latency_by_accel) == {"CPU", "NPU"} and set(ctl.latency_by_accel) == {"NPU"}
    assert sum(new.latency_by_accel["CPU"]) == 100 and sum(ctl.latency_by_accel["NPU"]) == 200
    v = evaluate(new, ctl, StageDevices(2, 2, 0, True), Gates.parse({"min_prediction_samples": 0}))
    assert v.ok and list(v.values["latency_by_accelerator"]) == ["NPU"], v.values


def test_a_device_counts_by_its_latest_outcome_event_for_the_rollout(db: Database) -> None:
    """docs/fleet.md 'When a device counts as updated': committed -> updated; update_failed, rolled_back and
    update_refused -> failed (with the event's reason); an outcome for another rollout does not count."""
    _four_devices_on_v1(db)
    engine = RolloutEngine(db, lambda *a, **k: None)
    rid = engine.create("m:2.0.0", "g", [100], {"min_stage_s": 0})
    engine.tick()
    t = time.time()
    outcomes = {
        "d0": [("committed", rid)],
        "d1": [("update_refused", rid)],
        "d2": [("committed", rid), ("rolled_back", rid)],  # the latest counts
        "d3": [("update_failed", "r-other")],  # another rollout's: still pending
    }
    with db.transaction() as cur:
        for dev, evs in outcomes.items():
            for i, (typ, r) in enumerate(evs):
                body = {"type": typ, "rollout": r, "bundle": {"name": "m", "version": "2.0.0"}, "reason": f"{typ} why"}
                cur.execute(
                    "INSERT INTO events (key, device_id, type, ts, body) VALUES (?, ?, ?, ?, ?)",
                    (f"{dev}:ev:{i}", dev, typ, t + i, json.dumps(body)),
                )
    engine.store.record_device_results()
    devices = {d["id"]: d for d in engine.get(rid)["devices"]}
    assert {d: x["status"] for d, x in devices.items()} == {
        "d0": "updated",
        "d1": "failed",
        "d2": "failed",
        "d3": "pending",
    }
    assert devices["d1"]["reason"] == "update_refused: update_refused why", devices["d1"]


def test_one_failing_rollout_does_not_hold_up_the_others(db: Database, monkeypatch) -> None:
    """A rollout whose judgement fails (bad data, a bug) is logged and tried again next tick; the other
    rollouts in the same tick go on (issue 15: a failure inside the tick stopped every rollout)."""
    _four_devices_on_v1(db)
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) "
            "VALUES ('n', '2.0.0', '01', 1, 'n.efb', '{}', ?)",
            (time.time(),),
        )
        for i in range(4):
            cur.execute(
                "INSERT INTO devices (id, tags, created, bundle_name, bundle_version, update_state) "
                "VALUES (?, ?, ?, 'n', '1.0.0', 'idle')",
                (f"e{i}", json.dumps(["h"]), time.time()),
            )
    orders: list[tuple[str, str]] = []
    engine = RolloutEngine(db, lambda dev, name, version, rid, action, wait=False: orders.append((dev, name)))
    bad = engine.create("m:2.0.0", "g", [50, 100], {"min_stage_s": 0})
    good = engine.create("n:2.0.0", "h", [50, 100], {"min_stage_s": 0})
    real = engine._run_stage

    def run_stage(r):  # the first rollout's every tick fails
        if r.id == bad:
            raise ValueError("a bug in judging this rollout")
        return real(r)

    monkeypatch.setattr(engine, "_run_stage", run_stage)
    engine.tick()
    assert {name for _, name in orders} == {"n"} and len(orders) == 2  # the good one's first stage ordered
    assert engine.get(good)["state"] == "running" and engine.get(bad)["state"] == "running"
    monkeypatch.setattr(engine, "_run_stage", real)
    engine.tick()  # the failed one is tried again next tick, and orders its stage
    assert {name for _, name in orders} == {"m", "n"}
