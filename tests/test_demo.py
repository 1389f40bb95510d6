"""`make demo`'s scenario, shorter: builds v1 / v2 / bad v3, runs a fleet of simulated devices against a
real server, and checks that every step turned out (drift flagged, v2 completed, v3 rolled back)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def test_the_demo_runs_its_whole_story(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["--out", str(out), "--devices", "12", "--epochs", "3", "--stage-s", "5", "--rate", "6"]
    r = subprocess.run(
        [sys.executable, "-m", "examples.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert {b for b in steps[1]["bundles"]} == {"v1", "v2", "v3"}
    assert steps[3]["devices"] == 12
    # only the shifted features drift (a brightness shift leaves contrast alone), only on the shifted cohort
    assert "brightness" in steps[4]["drifted"] and "contrast" not in steps[4]["drifted"]
    assert steps[4]["drifted_control"] == [] and steps[4]["alerts"] >= 1 and steps[4]["alerts_on_dashboard"] >= 1
    assert steps[5]["v2_state"] == "completed"
    assert steps[6]["v3_state"] == "rolled_back" and steps[6]["v3_self_rollbacks"] >= 1
    assert any("update failure" in g or "p95" in g for g in steps[6]["v3_failed_gates"])
    # nothing left running: the demo stopped its server (and with it the broker)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out / "fleet") not in ps
    # a second run reuses the signed bundles, starts from an empty fleet, stays up; Ctrl-C stops it all
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.demo", *args, "--keep-running"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "stays up for browsing" in line:
            break
    text = "".join(lines)
    assert "reusing the bundles" in text and "stays up" in text, text[-3000:]
    url = text.split("stays up for browsing at ")[1].split()[0]
    with urllib.request.urlopen(url + "healthz", timeout=10) as resp:
        assert resp.status == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out / "fleet") not in ps
