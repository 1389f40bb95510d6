"""Drift alerts as the fleet server keeps them: opened per bundle x cohort x feature when a cohort's
telemetry drifts from the bundle's baseline, updated while it lasts, closed when it no longer shows,
stored in the database (SQLite and a real PostgreSQL), and cohort against cohort."""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet import open_bundle
from edgefleet._drift import window_counts
from edgefleet.fleet._db import Database
from edgefleet.fleet._drift import DriftMonitor, cohort_report, drift_report, list_alerts
from edgefleet.fleet._rollups import record_windows

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Database:
    if request.param == "sqlite":
        return Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    return Database(request.getfixturevalue("postgres").fresh_database())


def _windows(bundle, x: np.ndarray, device: str, start: float, n: int = 4) -> list[dict]:
    entry = bundle.manifest.models[0]
    sess = ort.InferenceSession(bundle.read(entry.path))
    out = []
    for i, part in enumerate(np.array_split(x, n)):
        feed = part.astype(np.float32)
        inp = sess.get_inputs()[0]
        if "int8" in inp.type:
            continue
        y = sess.run(None, {inp.name: feed})[0]
        c = window_counts(feed, y, bundle.manifest.drift_baseline)
        out.append(
            {
                "key": f"{device}:{start}:{i}",
                "device_id": device,
                "start": start + i,
                "calls": len(part),
                "samples": len(part),
                "summarised": len(part),
                "inputs": c["inputs"],
                "outputs": {"predicted_class": c["predicted_class"], "confidence": c["confidence"]},
            }
        )
    return out


def _store(db: Database, bundle, windows: list[dict]) -> None:
    m = bundle.manifest
    for w in windows:
        w |= {"bundle": {"name": m.name, "version": m.version}, "errors": {}, "nan_outputs": 0}
    record_windows(db, [(w["device_id"], w) for w in windows])


def test_alerts_open_for_the_drifting_cohort_and_close_when_it_ends(db: Database, mlp_bundles: dict, digits) -> None:
    bundle = open_bundle(mlp_bundles["3.0.0"])  # fp32 I/O: windows computed with a real session
    m = bundle.manifest
    db.execute(
        "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (m.name, m.version, "x", 1, "x", m.canonical_bytes().decode(), time.time()),
    )
    for dev, tags in (("d0", ["site-a", "cam-0"]), ("d1", ["site-a", "cam-1"]), ("d2", ["site-b"]), ("d3", ["site-b"])):
        db.execute("INSERT INTO devices (id, tags, created) VALUES (?, ?, ?)", (dev, json.dumps(tags), time.time()))
    x = digits["eval"][0]
    now = time.time()
    windows = []
    for dev in ("d0", "d1"):
        windows += _windows(bundle, x, dev, now - 60)  # as the baseline saw it
    for dev in ("d2", "d3"):
        windows += _windows(bundle, x + np.float32(0.3), dev, now - 60)  # a brighter camera
    _store(db, bundle, windows)

    mon = DriftMonitor(db, interval_s=10, window_s=300)
    mon.check(now)
    alerts = list_alerts(db, "open")
    by_cohort = {(a["cohort"], a["feature"]) for a in alerts}
    assert ("site-b", "brightness") in by_cohort
    assert not any(c == "site-a" and f == "brightness" for c, f in by_cohort)
    assert all(a["samples"] >= 200 for a in alerts)
    first = {a["id"] for a in alerts}
    # a second check sees the same drift: the same alerts, updated, not new ones
    mon.check(now + 1)
    assert {a["id"] for a in list_alerts(db, "open")} == first
    assert mon.last[(f"{m.name}:{m.version}", "site-b", "brightness")] > 0.25
    # the report agrees, per cohort and cohort against cohort
    rep = drift_report(db, m.name, m.version, cohort="site-b")
    assert "brightness" in rep["drifted"]
    vs = cohort_report(db, m.name, m.version, "site-b", "site-a")
    assert vs["features"]["brightness"]["drifted"] and vs["features"]["brightness"]["psi"] > 0.25
    same = cohort_report(db, m.name, m.version, "cam-0", "cam-1")
    assert not same["features"]["brightness"]["drifted"]
    # the look-back window passes with nothing new: every alert closes
    mon.check(now + 400)
    assert list_alerts(db, "open") == []
    closed = list_alerts(db, "closed")
    assert {a["id"] for a in closed} == first and all(a["closed"] for a in closed)
    # a restarted server's monitor starts from the stored windows and alerts: nothing reopens
    assert DriftMonitor(db, interval_s=10, window_s=300).check(now + 400) == []
    assert len(list_alerts(db, "all")) == len(first)


def test_an_operator_acknowledges_and_mutes_alerts(tmp_path, db: Database) -> None:
    """Acknowledged alerts say who and when; muted ones leave the dashboard's open list until then, and stay
    open (the drift monitor still owns opening and closing them). API, CLI-shaped body and the page's form,
    through the real app."""
    from fastapi.testclient import TestClient

    from edgefleet import InputError
    from edgefleet.fleet._auth import create_token
    from edgefleet.fleet._drift import acknowledge
    from edgefleet.fleet._http import create_app
    from edgefleet.fleet._server import FleetServer, ServerConfig

    server = FleetServer(ServerConfig(data_dir=tmp_path / "fleet", db_url=db.url))
    now = time.time()
    with db.transaction() as cur:
        for i, cohort in enumerate(("site-a", "site-a", "site-b")):
            cur.execute(
                "INSERT INTO alerts (id, bundle_name, bundle_version, cohort, feature, state, opened, updated, psi, "
                "p_value, samples, detail) VALUES (?, 'm', '1.0.0', ?, ?, 'open', ?, ?, 0.5, 0.0, 300, '{}')",
                (f"a-{i}", cohort, f"feature_{i}", now, now),
            )
    with pytest.raises(InputError, match="no alert a-9"):
        acknowledge(db, ["a-0", "a-9"], "operator")
    token = create_token(tmp_path / "fleet", "test", db.url)
    client = TestClient(create_app(server))
    r = client.post("/api/alerts/ack", json={"ids": ["a-0"], "mute_hours": 0},
                    headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert r.status_code == 200 and r.json() == {"acknowledged": 1}
    listed = {a["id"]: a for a in list_alerts(db)}
    assert listed["a-0"]["acknowledged"]["by"] == "operator" and not listed["a-0"]["muted"]
    assert listed["a-1"]["acknowledged"] is None
    # the page's form: site-a's group muted for an hour; it leaves the open list, site-b's stays
    client.cookies.set("edgefleet_token", token)
    assert "site-a" in client.get("/").text
    r = client.post("/alerts/ack", data={"ids": "a-0,a-1", "mute_hours": "1"}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/").text
    assert "2 muted" in page and "feature_2" in page and "feature_0" not in page
    assert {a["id"] for a in list_alerts(db) if a["state"] == "open"} == {"a-0", "a-1", "a-2"}  # still open
    # without a cookie the form does nothing
    client.cookies.clear()
    assert client.post("/alerts/ack", data={"ids": "a-2"}, follow_redirects=False).headers["location"] == "/login"
    assert next(a for a in list_alerts(db) if a["id"] == "a-2")["acknowledged"] is None
