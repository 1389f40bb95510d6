"""A device implemented from the docs alone (tests/_indie_device.py: paho and cryptography, no edgefleet)
takes part in a real fleet: provisioned by `fleet provision`, online with status and state, its telemetry in
`fleet drift` (a window sent twice counted once), updated by a canary rollout that completes, a bad window
refused and answered on its refusals topic, a command answered (issue 14)."""

from __future__ import annotations

import ast
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from . import _indie_device
from .conftest import run_cli
from .test_fleet_server import Server, _wait

pytestmark = pytest.mark.slow


def test_the_device_half_imports_nothing_of_edgefleet() -> None:
    tree = ast.parse(Path(_indie_device.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] in ("edgefleet", "tests") or n.startswith(".")]


def test_a_device_written_from_the_docs_alone_is_updated_by_a_rollout(
    tmp_path: Path, publisher, mlp_bundles: dict
) -> None:
    server = Server(tmp_path / "fleet", publisher)
    dev = None
    stop = threading.Event()
    try:
        for v in ("1.0.0", "2.0.0"):
            assert server.cli("publish", str(mlp_bundles[v])).returncode == 0
        cfg = tmp_path / "indie" / "device.toml"
        r = run_cli(
            "fleet", "provision", "indie-1", "--tags", "indie", *server.data_args, "--out", str(cfg),
            "--mqtt-port", str(server.mqtt),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        shutil.copy(mlp_bundles["1.0.0"], cfg.parent / "factory.efb")
        dev = _indie_device.IndieDevice(cfg)
        dev.install(cfg.parent / "factory.efb")
        dev.start()

        def registry() -> dict:
            return next(d for d in json.loads(server.cli("devices", "--json").stdout) if d["id"] == "indie-1")

        _wait(lambda: registry()["online"] and registry()["bundle_version"] == "1.0.0", 30, "online on v1")
        assert registry()["agent_version"] == "indie-0.1" and registry()["update_state"] == "idle"

        # Telemetry: one window sent twice is counted once.
        w = dev.window(40)
        dev.publish("telemetry", w)
        dev.publish("telemetry", w)

        def drift(version: str) -> dict:
            r = server.cli("drift", "--bundle", f"mlp:{version}", "--json")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        _wait(lambda: drift("1.0.0")["windows"] >= 1, 30, "the window stored")
        time.sleep(1.0)
        d1 = drift("1.0.0")
        assert d1["windows"] == 1 and d1["calls"] == 40, d1
        assert not any(f["drifted"] for f in d1["features"].values())  # counts in the baseline's proportions

        # The device's app keeps calling: a window a second for whatever bundle it runs.
        def app() -> None:
            while not stop.wait(1.0):
                dev.publish("telemetry", dev.window(30))

        threading.Thread(target=app, daemon=True).start()
        r = server.cli(
            "rollout", "create", "--bundle", "mlp:2.0.0", "--selector", "indie", "--stages", "100",
            "--gate", "min_stage_s=2", "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        rid = json.loads(r.stdout)["id"]

        def status() -> dict:
            return json.loads(server.cli("rollout", "status", rid, "--json").stdout)

        _wait(lambda: status()["state"] in ("completed", "rolled_back", "halted"), 120, "the rollout ended")
        st = status()
        assert st["state"] == "completed", st
        assert [d["status"] for d in st["devices"]] == ["updated"]
        assert registry()["bundle_version"] == "2.0.0" and dev.active["version"] == "2.0.0"
        moves = [(e["from_state"], e["to_state"]) for e in dev.events if e["type"] == "update_state"]
        assert moves[0] == ("idle", "downloading") and moves[-1] == ("committing", "idle")
        events = json.loads(server.get("/api/devices/indie-1/events", token=server.token)[1])
        types = {e["type"] for e in events}
        assert {"update_state", "committed"} <= types, types  # stored as sent: each one a valid event
        _wait(lambda: drift("2.0.0")["windows"] >= 1, 30, "windows on v2")

        # A window that breaks a rule is acknowledged, refused, and the refusal answered to the device.
        bad = dev.window(10, bins_off=True)
        dev.publish("telemetry", bad)
        _wait(lambda: any(r["key"] == bad["key"] for r in list(dev.refusals)), 30, "the refusal answered")
        refusal = next(r for r in dev.refusals if r["key"] == bad["key"])
        assert refusal["kind"] == "telemetry" and "bins" in refusal["reason"], refusal
        status_code, body, _ = server.get("/api/devices/indie-1/refusals", token=server.token)
        assert status_code == 200 and any("bins" in r["reason"] for r in json.loads(body))

        # A command, answered with the documented event and shown with the command.
        assert server.cli("command", "report", "indie-1").returncode == 0

        def answers() -> list:
            return [c["answer"] for c in json.loads(server.get("/api/devices/indie-1/commands", token=server.token)[1])]

        _wait(lambda: answers() and answers()[0] is not None, 30, "the command answered")
        assert answers()[0]["type"] == "command_done"

        # Device ids are whole-string rules at registration too: a trailing newline is a 400, not a 500.
        for bad_id in ("evil\n", "evil/x", ""):
            req = urllib.request.Request(
                server.url + "/api/devices", json.dumps({"id": bad_id}).encode(), method="POST",
                headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
            )  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=10)
            assert info.value.code == 400 and "device id" in info.value.read().decode(), bad_id
    finally:
        stop.set()
        if dev is not None:
            dev.stop()
        server.stop()
