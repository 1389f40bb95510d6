"""Scale-out: ingest workers on a shared subscription, against SQLite and a real PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefleet.fleet._db import Database
from edgefleet.protocol import topic

from .conftest import run_cli
from .test_fleet_server import Server, _client, _wait, _window

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_two_workers_lose_nothing_and_count_nothing_twice(tmp_path: Path, publisher, db_kind: str, request) -> None:
    db_url = None
    if db_kind == "postgresql":
        db_url = request.getfixturevalue("postgres").fresh_database()
    server = Server(tmp_path / "fleet", publisher, db_url=db_url)
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "edgefleet"),
            "fleet",
            "ingest",
            "--data-dir",
            str(server.data),
            "--name",
            "second",
            *(["--db", db_url] if db_url else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "wb"),
    )
    try:
        db = Database(db_url or f"sqlite:///{server.data / 'fleet.db'}")
        devices = [f"scale-{i}" for i in range(4)]
        clients = []
        for dev in devices:
            out = tmp_path / f"{dev}.toml"
            assert (
                run_cli(
                    "fleet",
                    "provision",
                    dev,
                    "--data-dir",
                    str(server.data),
                    "--out",
                    str(out),
                    "--mqtt-port",
                    str(server.mqtt),
                    *(["--db", db_url] if db_url else []),
                ).returncode
                == 0
            )
            pw = json.loads(
                next(ln for ln in out.read_text().splitlines() if ln.startswith("password")).split("=", 1)[1]
            )
            clients.append(_client(server.mqtt, dev, pw)[0])
        time.sleep(1.5)  # both workers subscribed
        per_device = 400
        for dev, c in zip(devices, clients, strict=True):
            infos = []
            for i in range(per_device):
                body = json.dumps(_window(dev, f"{dev}:{i}:k"))
                infos.append(c.publish(topic(dev, "telemetry"), body, qos=1))
                infos.append(c.publish(topic(dev, "telemetry"), body, qos=1))  # a redelivery
            for info in infos:
                info.wait_for_publish(30)
        total = per_device * len(devices)
        _wait(
            lambda: db.counters().get("ingest_stored", 0) + db.counters().get("ingest_duplicates", 0) >= 2 * total,
            120,
            "all messages ingested",
        )
        counters = db.counters()
        assert db.query("SELECT COUNT(*) FROM windows")[0][0] == total
        assert counters["ingest_stored"] == total and counters["ingest_duplicates"] == total
        # the broker spread the work over both workers
        server_id = (server.data / "instance-id").read_text().strip()
        assert counters.get(f"ingest_worker_server-{server_id}_received", 0) > 0, counters
        assert counters.get("ingest_worker_second_received", 0) > 0
        for c in clients:
            c.loop_stop()
            c.disconnect()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
        server.stop()
