"""`fleet serve --broker mqtts://HOST:PORT`: the server on a Mosquitto it does not run, over TLS.

The operator runs their own broker (here a real Mosquitto with a TLS listener and a test CA) reading the
password and ACL files the fleet server keeps; the server signals it with --broker-reload. Devices
provisioned offline and through the API connect to that broker over TLS with their own credentials.
"""

from __future__ import annotations

import getpass
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefleet.fleet._db import Database

from ._servers import free_port, wait_port
from ._tls import CA
from .conftest import run_cli
from .test_fleet_server import Server, _metric, _wait

pytestmark = pytest.mark.slow


class OwnBroker:
    """The operator's Mosquitto: TLS only, no anonymous access, auth from the fleet server's files."""

    def __init__(self, d: Path, auth_lines: str, ca: CA, port: int, server_port: int) -> None:
        crt, key = ca.issue("broker", server=True)
        self.port, self.server_port = port, server_port
        self.pidfile = d / "mosquitto.pid"
        conf = d / "mosquitto.conf"
        # The lines `fleet broker-auth` printed, with TLS on both listeners, as its comment says.
        tls = f"cafile {ca.crt}\ncertfile {crt}\nkeyfile {key}\n"
        for p in (port, server_port):
            auth_lines = auth_lines.replace(f"listener {p}\n", f"listener {p} 127.0.0.1\n{tls}")
        conf.write_text(f"user {getpass.getuser()}\npid_file {self.pidfile}\npersistence false\n{auth_lines}\n")
        self.proc = subprocess.Popen(
            ["/usr/sbin/mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=open(d / "broker.log", "wb")
        )
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def own_broker(tmp_path: Path):
    data = tmp_path / "fleet"
    port, server_port = free_port(), free_port()
    r = run_cli("fleet", "broker-auth", "--data-dir", str(data), "--port", str(port), "--server-port", str(server_port))
    assert r.returncode == 0, r.stderr
    assert "use_username_as_clientid true" in r.stdout and r.stdout.count("password_file") == 2
    ca = CA(tmp_path / "ca")
    b = OwnBroker(tmp_path, r.stdout, ca, port, server_port)
    yield data, b, ca
    b.stop()


def test_server_devices_and_rollouts_over_an_external_tls_broker(
    tmp_path: Path, own_broker, publisher, mlp_bundles: dict
) -> None:
    data, broker, ca = own_broker
    url = f"mqtts://127.0.0.1:{broker.server_port}"
    reload = f"kill -HUP $(cat {broker.pidfile})"
    extra = ("--broker", url, "--broker-device-url", f"mqtts://127.0.0.1:{broker.port}", "--broker-ca", str(ca.crt))
    server = Server(data, publisher, extra=(*extra, "--broker-reload", reload))
    agent = None
    try:
        assert server.cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0
        assert server.cli("publish", str(mlp_bundles["2.0.0"])).returncode == 0
        # Offline provisioning writes a config for the external broker: its host and port, TLS, its CA.
        cfg = tmp_path / "dev" / "ext-1.toml"
        r = run_cli("fleet", "provision", "ext-1", "--tags", "ext", *server.data_args, "--out", str(cfg))
        assert r.returncode == 0, r.stderr
        text = cfg.read_text()
        assert f"port = {broker.port}" in text and "tls = true" in text and 'ca = "broker-ca.pem"' in text
        assert (cfg.parent / "broker-ca.pem").read_text() == ca.crt.read_text()
        cfg.write_text(
            text.replace(
                "[mqtt]", "self_test_hz = 20\nwindow_s = 0.5\n\n[health]\nwindow_s = 1.0\nmin_calls = 5\n\n[mqtt]"
            )
        )
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / "edgefleet"), "agent", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "agent.log", "wb"),
        )

        def devices() -> dict:
            r = server.cli("devices", "--json")
            assert r.returncode == 0, r.stderr
            return {d["id"]: d for d in json.loads(r.stdout)}

        _wait(lambda: devices()["ext-1"]["online"], 30, "ext-1 online through the external broker")
        # desired state goes out through the external broker, telemetry comes back through it
        assert server.cli("desire", "ext-1", "--bundle", "mlp:1.0.0").returncode == 0
        _wait(lambda: devices()["ext-1"]["bundle_version"] == "1.0.0", 60, "ext-1 on v1")
        _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') > 3, 30, "windows stored")

        # Devices registered through the API (the simulator) get TLS settings and the CA from the server.
        sim = server.simulate(
            tmp_path / "sim",
            *("--devices", "4", "--standin", "--bundle", "mlp:1.0.0", "--tags", "sim", "--duration", "60"),
        )
        try:
            _wait(lambda: sum(d["online"] for d in devices().values()) == 5, 60, "4 simulated devices online")
            r = server.cli(
                "rollout",
                "create",
                "--bundle",
                "mlp:2.0.0",
                "--selector",
                "ext",
                "--stages",
                "100",
                "--gate",
                "min_stage_s=2",
                "--json",
            )
            assert r.returncode == 0, r.stderr
            rid = json.loads(r.stdout)["id"]
            _wait(lambda: devices()["ext-1"]["bundle_version"] == "2.0.0", 60, "ext-1 updated by the rollout")
            status: dict = {}

            def done() -> bool:
                status.update(json.loads(server.cli("rollout", "status", rid, "--json").stdout))
                return status["state"] not in ("running", "paused")

            _wait(done, 60, "rollout finished")
            assert status["state"] == "completed", json.dumps(status)
        finally:
            sim.send_signal(signal.SIGTERM)
            sim.wait(30)
        assert "ext-1:" in (data / "mosquitto" / "passwd").read_text()

        # The broker outlives a server restart: what ext-1 sends meanwhile is queued for the server's
        # durable ingest session and stored when it is back, not dropped after the broker's PUBACK.
        db = Database(f"sqlite:///{data / 'fleet.db'}")
        server.stop()
        down_from = time.time()
        time.sleep(3.0)
        down_to = time.time()
        server.start()

        def stored_while_down() -> int:
            return db.query(
                "SELECT COUNT(*) FROM windows WHERE device_id = 'ext-1' AND start >= ? AND start < ?",
                (down_from, down_to - 0.5),
            )[0][0]

        _wait(lambda: stored_while_down() >= 3, 30, "windows sent while the server was down stored")
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(20)
        server.stop()


def test_bad_external_broker_settings_fail_with_one_line(tmp_path: Path, own_broker, publisher) -> None:
    data, broker, ca = own_broker
    exe = str(Path(sys.executable).parent / "edgefleet")
    base = [exe, "fleet", "serve", "--data-dir", str(data), "--http-port", str(free_port())]
    for args, expected in [
        (["--broker", "http://127.0.0.1:1"], "is not valid"),
        (["--broker", "mqtt://127.0.0.1:1", "--broker-ca", str(ca.crt)], "mqtts://"),
        (["--broker", "mqtts://127.0.0.1:x"], "invalid port"),
        (
            ["--broker", f"mqtts://127.0.0.1:{broker.server_port}", "--broker-ca", str(tmp_path / "none.pem")],
            "does not exist",
        ),
    ]:
        r = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and expected in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    # The system's CAs do not trust the test CA: the TLS handshake fails, and the server says where it tried.
    t0 = time.monotonic()
    r = subprocess.run(
        [*base, "--broker", f"mqtts://127.0.0.1:{broker.server_port}"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert f"mqtts://127.0.0.1:{broker.server_port}" in r.stderr and "TLS" in r.stderr
    assert time.monotonic() - t0 < 60
