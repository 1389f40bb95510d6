"""The embedded broker crashes (SIGKILL) while a hundred devices send telemetry: the server restarts it,
the devices reconnect and resend what the broker had not acknowledged, and no telemetry window is lost
or stored twice."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from .test_fleet_server import Server, _metric, _wait

pytestmark = pytest.mark.slow

DEVICES = 100
WINDOW_S = 5.0  # the simulator's window in --standin mode


def _windows(server: Server) -> dict[str, list[float]]:
    db = sqlite3.connect(server.data / "fleet.db")
    try:
        rows = db.execute("SELECT device_id, start FROM windows ORDER BY device_id, start").fetchall()
    finally:
        db.close()
    out: dict[str, list[float]] = {}
    for dev, start in rows:
        out.setdefault(dev, []).append(float(start))
    return out


def test_broker_crash_under_telemetry_load_loses_nothing(tmp_path: Path, publisher, mlp_bundles: dict) -> None:
    server = Server(tmp_path / "fleet", publisher)
    sim = None
    try:
        assert server.cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0
        sim = server.simulate(
            tmp_path / "sim", "--devices", str(DEVICES), "--standin", "--rate", "20", "--bundle", "mlp:1.0.0"
        )

        def online() -> int:
            return sum(d["online"] for d in json.loads(server.cli("devices", "--json").stdout))

        _wait(lambda: online() == DEVICES, 90, "all devices online")
        # two full windows from every device before the crash
        _wait(lambda: sum(len(v) >= 2 for v in _windows(server).values()) == DEVICES, 60, "windows before the crash")
        pid = int((server.data / "mosquitto" / "mosquitto.pid").read_text())
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: _metric(server, "edgefleet_broker_restarts_total") == 1, 30, "broker restarted")
        _wait(lambda: online() == DEVICES, 90, "all devices back online")
        # every device has delivered a window that started well after the crash: what it held back came first
        after = killed_at + 2 * WINDOW_S
        _wait(
            lambda: sum(any(s > after for s in v) for v in _windows(server).values()) == DEVICES,
            90,
            "windows after the restart from every device",
        )
        assert server.get("/healthz")[0] == 200
        lost = {}
        for dev, starts in _windows(server).items():
            gaps = [(a, b) for a, b in itertools.pairwise(starts) if b - a > WINDOW_S + 1e-6]
            if gaps:
                lost[dev] = gaps
        assert not lost, f"windows missing around the crash: {lost}"
        assert _metric(server, 'edgefleet_ingest_messages_total{outcome="rejected"}') == 0
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(60)
            except subprocess.TimeoutExpired:
                sim.kill()
        server.stop()
