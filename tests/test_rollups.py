"""Rollups against the raw windows (issue 19): the same windows fed through the ingest's write path give,
from the rollups, exactly the figures merged from the raw windows — PSI, JS, KS, chi-square, latency
quantiles, error rates, per-cohort counts, accuracy — with duplicates, late windows, bucket boundaries,
compaction, retention and a rebuild of an older database; on SQLite and a real PostgreSQL."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

from edgefleet import open_bundle
from edgefleet.fleet._accuracy import accuracy_report
from edgefleet.fleet._db import Database
from edgefleet.fleet._drift import (
    DriftMonitor,
    baseline_of,
    cohort_report,
    compare_cohorts,
    drift_report,
    feature_stats,
)
from edgefleet.fleet._endpoint import BrokerEndpoint
from edgefleet.fleet._ingest import IngestWorker
from edgefleet.fleet._retention import Retention, sweep
from edgefleet.fleet._rollout_store import RolloutStore
from edgefleet.fleet._rollups import ALL, bucket_of, compact, merge_windows, read, rebuild, series
from edgefleet.protocol import LATENCY_EDGES_MS, WINDOW_SCHEMA, baseline_bins, latency_quantile, topic

pytestmark = pytest.mark.slow

TAGS = {f"d{i}": ["site-a" if i < 4 else "site-b", f"cam-{i % 3}"] for i in range(8)}
T0 = 1_699_999_980.0  # a minute boundary (28,333,333 minutes)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Database:
    if request.param == "sqlite":
        return Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    return Database(request.getfixturevalue("postgres").fresh_database())


def _setup(db: Database, bundle_path) -> tuple[Any, IngestWorker]:
    m = open_bundle(bundle_path).manifest
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (m.name, m.version, "x", 1, "x", m.canonical_bytes().decode(), T0),
        )
        for dev, tags in TAGS.items():
            cur.execute("INSERT INTO devices (id, tags, created) VALUES (?, ?, ?)", (dev, json.dumps(tags), T0))
    # The real write path of the ingest (checks, transaction, rollups), without a broker in between.
    return m, IngestWorker(db, BrokerEndpoint("127.0.0.1", 1))


def _window(rng: np.random.Generator, m: Any, dev: str, start: float, shift: int = 0) -> dict:
    bins = baseline_bins(m.drift_baseline)
    refs = {
        "inputs": {f["name"]: f["proportions"] for f in m.drift_baseline["inputs"]},
        "outputs": {k: v["proportions"] for k, v in m.drift_baseline["outputs"].items() if isinstance(v, dict)},
    }
    calls = int(rng.integers(1, 60))
    lat = np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64)
    for b in rng.integers(20 + shift, 26 + shift, calls):
        lat[b] += 1
    classes = bins["outputs"]["predicted_class"]
    labelled = int(rng.integers(0, 5))
    conf = np.zeros((classes, classes), np.int64)
    for _ in range(labelled):
        t = int(rng.integers(0, classes))
        conf[t, t if rng.random() < 0.9 else int(rng.integers(0, classes))] += 1
    w = {
        "schema": WINDOW_SCHEMA,
        "key": f"{dev}:{start}:{rng.integers(1 << 40)}",
        "device_id": dev,
        "bundle": {"name": m.name, "version": m.version},
        "start": start,
        "end": start + 30,
        "calls": calls,
        "samples": calls,
        "errors": {"input": int(rng.integers(0, 2))},
        "nan_outputs": int(rng.integers(0, 2)),
        "latency_ms": {"counts": lat.tolist(), "sum": 1.0, "max": 1.0},
        # the baseline's own proportions, or moved SHIFT bins up (a drifted cohort)
        "inputs": {k: rng.multinomial(calls * 8, _p(p, shift)).tolist() for k, p in refs["inputs"].items()},
        "outputs": {k: rng.multinomial(calls, _p(p, shift)).tolist() for k, p in refs["outputs"].items()},
    }
    if labelled:
        w["feedback"] = {"labelled": labelled, "confusion": conf.tolist()}
    return w


def _p(proportions: list[float], shift: int) -> np.ndarray:
    p = np.roll(np.asarray(proportions, np.float64) + 1e-3, shift)
    return p / p.sum()


def _feed(worker: IngestWorker, windows: list[dict], batch: int = 37) -> None:
    msgs = [(topic(w["device_id"], "telemetry"), json.dumps(w).encode()) for w in windows]
    for i in range(0, len(msgs), batch):
        worker._write(msgs[i : i + batch])


def _raw(sent: list[dict], cohort: str, since: float | None, until: float | None = None) -> dict:
    """What merging the raw windows gives: each key once, the cohort's devices, whole buckets."""
    unique = {w["key"]: w for w in sent}.values()
    return merge_windows(
        w
        for w in unique
        if (cohort == ALL or cohort in TAGS[w["device_id"]])
        and (since is None or w["start"] >= since)
        and (until is None or w["start"] < until)
    )


def _same(a: dict, b: dict) -> None:
    for k in ("windows", "calls", "samples", "summarised", "errors", "nan_outputs"):
        assert a[k] == b[k], k
    for k in ("latency", "confusion"):
        assert (a[k] is None and b[k] is None) or np.array_equal(a[k], b[k]), k
    for g in ("inputs", "outputs"):
        assert sorted(a[g]) == sorted(b[g])
        for k in a[g]:
            assert np.array_equal(a[g][k], b[g][k]), (g, k)


def test_every_figure_from_rollups_equals_the_raw_windows(db: Database, mlp_bundles: dict) -> None:
    m, worker = _setup(db, mlp_bundles["1.0.0"])
    rng = np.random.default_rng(19)
    baseline = baseline_of(db, m.name, m.version)
    sent: list[dict] = []
    # four minutes of windows, some exactly on a minute boundary and some a hair before one
    for i in range(160):
        dev = f"d{i % 8}"
        start = T0 + float(rng.uniform(0, 240))
        if i % 10 == 0:
            start = T0 + 60 * int(rng.integers(1, 4))
        elif i % 10 == 1:
            start = T0 + 60 * int(rng.integers(1, 4)) - 1e-3
        sent.append(_window(rng, m, dev, start, shift=2 if TAGS[dev][0] == "site-b" else 0))
    # duplicates: in the same batch, and sent again later
    _feed(worker, sent[:80] + sent[:5])
    _feed(worker, sent[80:] + sent[70:90])
    # refused windows (wrong bins, negative counts) count nowhere
    bad = _window(rng, m, "d0", T0 + 10)
    bad["inputs"][next(iter(bad["inputs"]))] = [1, 2]
    neg = _window(rng, m, "d1", T0 + 10)
    neg["nan_outputs"] = -5
    _feed(worker, [bad, neg])
    assert worker.stats["rejected"] == 2 and worker.stats["stored"] == 160

    th = {"psi": 0.25, "p_value": 1e-4, "min_samples": 200}
    for cohort in (ALL, "site-a", "site-b", "cam-1"):
        for since in (None, T0 + 60, T0 + 150):
            lo = None if since is None else bucket_of(since)
            got, want = read(db, m.name, m.version, cohort, since), _raw(sent, cohort, lo)
            _same(got, want)
            rep = drift_report(db, m.name, m.version, cohort=cohort, since=since, thresholds=th)
            assert rep["features"] == feature_stats(baseline, want, th), (cohort, since)
            assert rep["windows"] == want["windows"] and rep["samples"] == want["samples"]
            acc = accuracy_report(db, m.name, m.version, cohort=cohort, since=since)
            assert acc["labelled"] == int(want["confusion"].sum())
    assert drift_report(db, m.name, m.version, cohort="site-b")["drifted"]  # the shifted cohort shows
    vs = cohort_report(db, m.name, m.version, "site-a", "site-b")
    assert vs["features"] == compare_cohorts(_raw(sent, "site-a", None), _raw(sent, "site-b", None))

    # the gates' figures: latency quantiles, error rates, devices reporting
    store = RolloutStore(db)
    c = store.cohort(m.name, "site-b", T0 + 61, version=m.version, reporting_of=["d4", "d5", "d0"])
    want = _raw(sent, "site-b", T0 + 60)
    assert (c.calls, c.windows) == (want["calls"], want["windows"])
    assert c.errors == want["errors"] + want["nan_outputs"]
    lat = want["latency"].tolist()
    assert (c.p95_ms, c.p50_ms) == (latency_quantile(lat, 0.95), latency_quantile(lat, 0.5))
    assert c.windows == want["windows"] and c.labelled == int(want["confusion"].sum())
    assert c.reporting == 3  # of the devices asked about (the rollout's updated ones), all made calls

    # compaction: minutes fold into hours; every window still counted once
    before = read(db, m.name, m.version, ALL)
    assert compact(db, T0 + 10 * 86400, keep_minutes_s=3600, keep_hours_s=5 * 86400) > 0
    assert {r.width for r in series(db, m.name, m.version, None)} == {86400}
    _same(read(db, m.name, m.version, ALL), before)
    for cohort in ("site-a", "cam-2"):
        _same(read(db, m.name, m.version, cohort), _raw(sent, cohort, None))
    # a late window for the compacted hour lands in a minute row beside it, and is counted once
    late = _window(rng, m, "d2", T0 + 30)
    _feed(worker, [late, late])
    sent.append(late)
    _same(read(db, m.name, m.version, "site-a"), _raw(sent, "site-a", None))
    compact(db, T0 + 10 * 86400, keep_minutes_s=3600, keep_hours_s=5 * 86400)
    assert len(series(db, m.name, m.version, "site-a")) == 1
    _same(read(db, m.name, m.version, "site-a"), _raw(sent, "site-a", None))

    # retention: raw windows go, the rollups stay and still answer
    out = sweep(db, T0 + 30 * 86400, Retention(windows_s=86400, rollups_s=400 * 86400))
    assert out["windows"] == 161 and db.query("SELECT COUNT(*) FROM windows")[0][0] == 0
    _same(read(db, m.name, m.version, ALL), _raw(sent, ALL, None))
    assert sweep(db, T0 + 500 * 86400, Retention())["rollups"] > 0
    assert read(db, m.name, m.version, ALL)["windows"] == 0


def test_rebuild_rolls_up_a_database_written_before_rollups(db: Database, mlp_bundles: dict) -> None:
    m, worker = _setup(db, mlp_bundles["1.0.0"])
    rng = np.random.default_rng(3)
    sent = [_window(rng, m, f"d{i % 8}", T0 + i * 7.0) for i in range(60)]
    _feed(worker, sent)
    want = {c: read(db, m.name, m.version, c) for c in (ALL, "site-a", "cam-0")}
    # as an older server left it: windows, no rollups, no marker
    db.execute("DELETE FROM rollups")
    db.execute("DELETE FROM window_devices")
    db.execute("DELETE FROM counters WHERE name = 'rollups_built'")
    assert rebuild(db) == 60
    assert rebuild(db) == 0  # once
    for c, w in want.items():
        _same(read(db, m.name, m.version, c), w)
    assert db.query("SELECT COUNT(*) FROM window_devices")[0][0] == 8


def test_the_drift_monitor_reads_rollups_and_a_check_costs_buckets_not_windows(db: Database, mlp_bundles: dict) -> None:
    m, worker = _setup(db, mlp_bundles["1.0.0"])
    rng = np.random.default_rng(7)
    now = time.time()
    sent = [
        _window(rng, m, dev, now - 120 + float(rng.uniform(0, 60)), shift=3 if TAGS[dev][0] == "site-b" else 0)
        for dev in TAGS
        for _ in range(40)
    ]
    _feed(worker, sent, batch=200)
    mon = DriftMonitor(db, interval_s=10, window_s=600)
    mon.check(now)
    cohorts = {c for _, c, _ in mon.last}
    assert cohorts == {ALL, "site-a", "site-b", "cam-0", "cam-1", "cam-2"}
    # 320 windows, at most 2 minute buckets x 6 cohorts rows read
    assert len(series(db, cohort=None, since=now - 600)) <= 12
    th = mon.th
    want = feature_stats(baseline_of(db, m.name, m.version), _raw(sent, "site-b", None), th)
    for f, st in want.items():
        if st["psi"] is not None:
            assert mon.last[(f"{m.name}:{m.version}", "site-b", f)] == st["psi"]
