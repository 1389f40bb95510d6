"""The Prometheus rules shipped in deploy/ pass Prometheus' own checker (the series they use are checked
against a running server's /metrics in test_fleet_server's simulated-fleet test)."""

from __future__ import annotations

import json
import re
import subprocess

from .conftest import ROOT

RULES = ROOT / "deploy" / "prometheus" / "edgefleet-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "edgefleet-fleet.json"


def used_series() -> set[str]:
    """Every edgefleet_* series the rules and the Grafana dashboard query."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return set(re.findall(r"edgefleet_[a-z_]+", RULES.read_text() + "\n".join(exprs)))


def test_the_alerting_rules_pass_promtool() -> None:
    r = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


def test_the_dashboard_is_grafana_json_over_the_servers_series() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["schemaVersion"] >= 36 and d["panels"] and all(p["targets"] for p in d["panels"])
    assert {"edgefleet_devices_online", "edgefleet_accuracy", "edgefleet_drift_psi"} <= used_series()
