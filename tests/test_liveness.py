"""A stuck agent shows (issue 15): its loop's heartbeat stops while the process and its MQTT connection live
on; `edgefleet agent status` says so with exit 1, and the fleet marks a device online by its retained status
but silent beyond three heartbeats."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from .conftest import run_cli
from .test_agent import Device, _idle_on


def test_agent_status_tells_a_running_agent_from_a_stuck_and_a_gone_one(
    tmp_path: Path, broker, observer, mlp_bundles: dict, publisher, monkeypatch
) -> None:
    from edgefleet.runtime import Agent, load_config

    dev = Device(tmp_path / "d", "dev-live", broker, publisher, mlp_bundles["1.0.0"], self_test_hz=0)
    r = run_cli("agent", "status", "--config", str(dev.config))
    assert r.returncode == 1 and "never ran there" in r.stderr  # before the first start
    agent = Agent(load_config(dev.config))
    agent.start()
    release = threading.Event()
    try:
        observer.wait(lambda: _idle_on(observer, "dev-live", "1.0.0"), 30, "v1 installed")
        r = run_cli("agent", "status", "--config", str(dev.config))
        assert r.returncode == 0 and "running (pid" in r.stdout and "update state idle" in r.stdout, r.stderr
        # The loop gets stuck in a step (a hung driver, a deadlock): the process and its MQTT session live on.
        real = agent._self_test
        monkeypatch.setattr(agent, "_self_test", lambda: release.wait(60) and real())
        time.sleep(8.0)
        assert observer.status("dev-live").get("online") is True  # the broker still says online
        r = run_cli("agent", "status", "--config", str(dev.config), "--max-age", "2", "--json")
        st = json.loads(r.stdout)
        assert r.returncode == 1 and st["running"] and not st["healthy"] and st["age_s"] > 2, st
        r = run_cli("agent", "status", "--config", str(dev.config), "--max-age", "2")
        assert r.returncode == 1 and "stuck: process" in r.stderr and "Traceback" not in r.stderr
        release.set()
        time.sleep(1.0)
        r = run_cli("agent", "status", "--config", str(dev.config), "--max-age", "2")
        assert r.returncode == 0, r.stderr  # beating again
    finally:
        release.set()
        agent.stop()
    # A heartbeat whose process is gone.
    gone = subprocess.Popen(["true"])
    gone.wait()
    hb = dev.data / "heartbeat.json"
    hb.write_text(json.dumps({**json.loads(hb.read_text()), "pid": gone.pid}))
    r = run_cli("agent", "status", "--config", str(dev.config))
    assert r.returncode == 1 and "not running" in r.stderr


def test_the_fleet_marks_an_online_device_that_went_silent(tmp_path: Path) -> None:
    from edgefleet.fleet import FleetServer, ServerConfig

    server = FleetServer(ServerConfig(data_dir=tmp_path / "fleet"))
    now = time.time()
    with server.db.transaction() as cur:
        for dev, online, seen in (("fresh", 1, now - 10), ("silent", 1, now - 200), ("off", 0, now - 200)):
            cur.execute(
                "INSERT INTO devices (id, tags, created, online, last_seen) VALUES (?, '[]', ?, ?, ?)",
                (dev, now, online, seen),
            )
    stale = {d["id"]: d["stale"] for d in server.devices()}
    assert stale == {"fresh": False, "off": False, "silent": True}
