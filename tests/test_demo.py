"""`make demo`'s scenario, shorter: builds v1 / v2 / bad v3, runs a fleet of simulated devices against a
real server, and checks that every step turned out: v2 completed, v3 rolled back, the shifted cohort's
drift flagged with its accuracy falling, the alert's capture exported, v4 retrained on it and better on
the cohort's inputs in shadow and in its accuracy-gated rollout, the cohort's accuracy back and its
alerts closed."""

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
    args += ["--drift-window", "20", "--shadow-s", "8"]  # shorter looks back and shadow than make demo's
    r = subprocess.run(
        [sys.executable, "-m", "examples.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert {b for b in steps[1]["bundles"]} == {"v1", "v2", "v3"}
    assert steps[3]["devices"] == 12
    assert steps[4]["v2_state"] == "completed"
    assert steps[5]["v3_state"] == "rolled_back" and steps[5]["v3_self_rollbacks"] >= 1
    assert any("update failure" in g or "p95" in g for g in steps[5]["v3_failed_gates"])
    # only the shifted features drift (a brightness shift leaves contrast alone), only on the shifted cohort,
    # and the labels fed back show its accuracy falling while the other cohort's holds
    drift = steps[6]
    assert "brightness" in drift["drifted"] and "contrast" not in drift["drifted"]
    assert drift["drifted_control"] == [] and drift["alerts"] >= 1 and drift["alerts_on_dashboard"] >= 1
    assert drift["accuracy_drifted"] < drift["accuracy_control"] - 0.1
    # the alert fired the armed capture; the dataset is the cohort's labelled samples after the shift
    assert steps[7]["capture_devices"] >= 1 and steps[7]["captured"] >= 240
    # v4 retrained on it beats v2 on held-out captured samples, in shadow on live labelled calls, and in
    # its rollout's accuracy gate against the cohort's control; then the cohort recovers
    assert steps[8]["v4_accuracy"] > steps[8]["v2_accuracy_on_captured"] + 0.05
    assert steps[9]["shadow_labelled"] >= 100
    assert steps[9]["shadow_candidate_accuracy"] > steps[9]["shadow_active_accuracy"] + 0.05
    assert steps[10]["v4_state"] == "completed"
    judged = [g for g in steps[10]["v4_gates"] if g.get("accuracy") is not None]
    assert judged and all(g["accuracy"] > g["control_accuracy"] for g in judged)
    assert steps[11]["accuracy_recovered"] > drift["accuracy_drifted"] + 0.05
    assert steps[11]["open_alerts"] == 0 and steps[11]["alerts_closed"] >= 1
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
