"""`edgefleet fleet simulate` at a size one process cannot hold: split over processes of 100 real
agents with the stand-in predictor, provisioned in bulk, all online, and an update goes through."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_fleet_server import Server

pytestmark = pytest.mark.slow


def test_a_large_simulated_fleet_splits_over_processes_and_updates(tmp_path: Path, publisher, mlp_bundles) -> None:
    server = Server(tmp_path / "fleet", publisher)
    sim = None
    try:
        for v in ("1.0.0", "2.0.0"):
            assert server.cli("publish", str(mlp_bundles[v])).returncode == 0
        sim = subprocess.Popen(
            [
                *(sys.executable, "-m", "edgefleet", "fleet", "simulate", "--devices", "150", "--standin"),
                *("--bundle", "mlp:1.0.0", "--tags", "big", "--rate", "1", "--prefix", "s", "--json"),
                *("--workdir", str(tmp_path / "sim"), "--server", server.url, "--token", server.token),
            ],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "sim.log", "wb"),
            text=True,
            # as a shell without job control starts a background job: SIGINT ignored, SIGTERM stops it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )

        def devices() -> list[dict]:
            return json.loads(server.cli("devices", "--json").stdout)

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            devs = devices()
            if sum(d["online"] and d["bundle_version"] == "1.0.0" for d in devs) == 150:
                break
            time.sleep(2)
        else:
            raise AssertionError(f"online: {sum(d['online'] for d in devs)} of 150")
        assert {d["id"].split("-")[0] for d in devs} == {"s0", "s1"}  # two processes of 75
        # the stand-in answers the golden inputs as the model does: the smoke test passes, telemetry flows
        assert all(d["accelerator"] == "standin" for d in devs)
        one = devs[0]["id"]
        r = server.cli("desire", one, "--bundle", "mlp:2.0.0")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and next(d for d in devices() if d["id"] == one)["bundle_version"] != "2.0.0":
            time.sleep(1)
        assert next(d for d in devices() if d["id"] == one)["bundle_version"] == "2.0.0"
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGTERM)
            try:
                assert sim.wait(120) == 0
                assert sim.stdout is not None
                lines = [json.loads(ln) for ln in sim.stdout.read().splitlines() if ln.strip()]
                started = [ln for ln in lines if ln["event"] == "started"]
                stopped = [ln for ln in lines if ln["event"] == "stopped"]
                # one process of 75 each; the one updated device says so
                assert sorted(len(ln["devices"]) for ln in started) == [75, 75], lines
                versions = {d: v for ln in stopped for d, v in ln["versions"].items()}
                assert len(versions) == 150 and list(versions.values()).count("2.0.0") == 1, versions
            finally:
                if sim.poll() is None:
                    subprocess.run(["pkill", "-KILL", "-f", "--", f"--workdir {tmp_path / 'sim'}"], check=False)
                    sim.kill()
        server.stop()
