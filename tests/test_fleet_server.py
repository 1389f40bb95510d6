"""The fleet server as operators and devices meet it: one process with its embedded Mosquitto and
SQLite, API tokens, bundle publishing and Range downloads, provisioning, per-device ACLs, ingest."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet import generate_keypair, sign_bundle
from edgefleet.protocol import topic

from ._servers import free_port
from .conftest import run_cli

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, data: Path, publisher, db_url: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.db_url = db_url
        self.extra = list(extra)
        self.data = data
        self.http, self.mqtt = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        data.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(data.parent / "server.log", "ab")
        self.publisher = publisher
        self.start()
        r = run_cli("fleet", "token", "create", "--data-dir", str(data), *(["--db", db_url] if db_url else []))
        assert r.returncode == 0, r.stderr
        self.token = r.stdout.strip()

    def start(self) -> None:
        exe = Path(sys.executable).parent / "edgefleet"
        self.proc = subprocess.Popen(
            [
                str(exe),
                "fleet",
                "serve",
                "--data-dir",
                str(self.data),
                "--http-port",
                str(self.http),
                "--mqtt-port",
                str(self.mqtt),
                "--trusted-key",
                str(self.publisher[2]),
                *(["--db", self.db_url] if self.db_url else []),
                *("--drift-interval", "2", "--drift-window", "300"),
                *self.extra,
            ],
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise AssertionError((self.data.parent / "server.log").read_text()[-3000:])

    @property
    def data_args(self) -> list[str]:
        """What local commands (provision) need to reach this server's storage."""
        return ["--data-dir", str(self.data), *(["--db", self.db_url] if self.db_url else [])]

    def simulate(self, workdir: Path, *args: str) -> subprocess.Popen[bytes]:
        """`edgefleet fleet simulate ARGS` against this server; its log goes beside WORKDIR."""
        return subprocess.Popen(
            [
                *(str(Path(sys.executable).parent / "edgefleet"), "fleet", "simulate", *args),
                *("--server", self.url, "--token", self.token, "--workdir", str(workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(workdir.parent / f"{workdir.name}.log", "wb"),
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("fleet", *args, "--server", self.url, "--token", self.token)

    def get(self, path: str, token: str | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path: Path, publisher):
    """The server on its default SQLite, and on a real PostgreSQL (a fresh database per test)."""
    db_url = request.getfixturevalue("postgres").fresh_database() if request.param == "postgresql" else None
    s = Server(tmp_path / "fleet", publisher, db_url=db_url)
    yield s
    s.stop()


def test_publish_provision_update_and_registry(tmp_path: Path, server: Server, mlp_bundles: dict, publisher) -> None:
    # the API needs a token
    assert server.get("/api/devices")[0] == 401
    assert server.get("/api/devices", token="eft_wrong")[0] == 401
    r = run_cli("fleet", "devices", "--server", server.url, "--token", "eft_wrong")
    assert r.returncode == 1 and "401" in r.stderr
    # the API describes itself: every operator route, behind the bearer token
    code, body, _ = server.get("/openapi.json")
    assert code == 200
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.")
    for path in ("/api/devices", "/api/bundles", "/api/rollouts", "/api/rollouts/{rid}/{action}", "/api/drift"):
        assert path in doc["paths"], path
    assert doc["paths"]["/api/rollouts"]["post"]["security"] == [{"HTTPBearer": []}]
    # publishing verifies against the trusted key
    r = server.cli("publish", str(mlp_bundles["1.0.0"]), "--json")
    assert r.returncode == 0, r.stderr
    assert {k: json.loads(r.stdout)[k] for k in ("name", "version")} == {"name": "mlp", "version": "1.0.0"}
    assert server.cli("publish", str(mlp_bundles["2.0.0"])).returncode == 0
    generate_keypair(tmp_path / "rogue")
    from edgefleet import load_signing_key

    sign_bundle(mlp_bundles["2.0.0"], load_signing_key(tmp_path / "rogue"), tmp_path / "rogue.efb")
    r = server.cli("publish", str(tmp_path / "rogue.efb"))
    assert r.returncode == 1 and "signature" in r.stderr.lower() and r.stderr.count("\n") == 1
    (tmp_path / "junk.efb").write_bytes(b"not a bundle")
    r = server.cli("publish", str(tmp_path / "junk.efb"))
    assert r.returncode == 1 and "not a readable bundle" in r.stderr
    # downloads need a token and honour Range
    status, body, _ = server.get("/bundles/mlp/1.0.0.efb")
    assert status == 401 and b"http_token" in body
    assert server.get("/bundles/mlp/1.0.0.efb", token="efd_guessed")[0] == 401
    status, whole, _ = server.get("/bundles/mlp/1.0.0.efb", token=server.token)
    assert status == 200 and whole == mlp_bundles["1.0.0"].read_bytes()
    status, part, headers = server.get("/bundles/mlp/1.0.0.efb", token=server.token, headers={"Range": "bytes=100-"})
    assert (
        status == 206 and part == whole[100:] and headers["content-range"] == f"bytes 100-{len(whole) - 1}/{len(whole)}"
    )
    assert server.get("/bundles/mlp/9.9.9.efb", token=server.token)[0] == 404

    # provision a device; its agent connects with its own credentials and gets v1 from the server
    cfg = tmp_path / "dev" / "dev-1.toml"
    r = run_cli(
        "fleet",
        "provision",
        "dev-1",
        "--tags",
        "eu,cam",
        *server.data_args,
        "--out",
        str(cfg),
        "--mqtt-port",
        str(server.mqtt),
        "--self-test-hz",
        "20",
    )
    assert r.returncode == 0, r.stderr
    assert "self_test_hz = 20.0" in cfg.read_text()  # the device sends telemetry without an app of its own
    # the device's own token fetches bundles (its agent does below) and nothing else
    dev_token = next(ln for ln in cfg.read_text().splitlines() if ln.startswith("http_token")).split('"')[1]
    assert server.get("/bundles/mlp/1.0.0.efb", token=dev_token)[0] == 200
    assert server.get("/api/devices", token=dev_token)[0] == 401
    text = cfg.read_text().replace(
        "[mqtt]",
        "window_s = 0.5\n\n[health]\nwindow_s = 1.0\nmin_calls = 5\nprobe_interval_s = 0.05\n\n[mqtt]",
    )
    cfg.write_text(text)
    agent = subprocess.Popen(
        [str(Path(sys.executable).parent / "edgefleet"), "agent", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "agent.log", "wb"),
    )
    try:

        def device() -> dict:
            r = server.cli("devices", "--json")
            assert r.returncode == 0, r.stderr
            return {d["id"]: d for d in json.loads(r.stdout)}["dev-1"]

        _wait(lambda: device()["online"], 30, "dev-1 online")
        assert device()["tags"] == ["cam", "eu"] and device()["bundle_version"] is None
        assert server.cli("desire", "dev-1", "--bundle", "mlp:1.0.0").returncode == 0
        _wait(lambda: device()["bundle_version"] == "1.0.0", 60, "dev-1 on v1")
        assert server.cli("desire", "dev-1", "--bundle", "mlp:2.0.0").returncode == 0
        _wait(lambda: device()["bundle_version"] == "2.0.0" and device()["update_state"] == "idle", 60, "dev-1 on v2")
        assert server.get("/metrics")[0] == 401  # it names bundles, tags and drift: an API token is needed
        _, metrics, _ = server.get("/metrics", token=server.token)
        _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') > 5, 20, "windows stored")
        assert b"edgefleet_devices_online 1" in metrics
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(20)
    _wait(lambda: not device()["online"], 20, "dev-1 offline")


def _metric(server: Server, name: str) -> float:
    _, body, _ = server.get("/metrics", token=server.token)
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _client(port: int, user: str, password: str) -> tuple[mqtt.Client, dict]:
    got: dict = {"puback": {}, "suback": None, "connected": None}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, u, f, rc, p: got.__setitem__("connected", rc)
    c.on_publish = lambda cl, u, mid, rc, p: got["puback"].__setitem__(mid, rc)
    c.on_subscribe = lambda cl, u, mid, rcs, p: got.__setitem__("suback", rcs)
    c.connect("127.0.0.1", port)
    c.loop_start()
    _wait(lambda: got["connected"] is not None, 10, "connack")
    return c, got


def test_acl_keeps_devices_in_their_own_prefix_and_ingest_counts_once(
    tmp_path: Path, server: Server, mlp_bundles: dict
) -> None:
    creds = {dev: _provision(server, tmp_path, dev) for dev in ("dev-a", "dev-b")}
    # no anonymous access, no wrong passwords
    _, got = _client(server.mqtt, "dev-a", "wrong")
    assert got["connected"].is_failure
    c, got = _client(server.mqtt, "dev-a", creds["dev-a"])
    assert not got["connected"].is_failure
    # dev-a may not publish as dev-b, nor read dev-b's orders
    window = _window("dev-b", "k-forged")
    info = c.publish(topic("dev-b", "telemetry"), json.dumps(window), qos=1)
    _wait(lambda: info.mid in got["puback"], 10, "puback")
    assert got["puback"][info.mid].is_failure  # 0x87 not authorised
    # Mosquitto 2.0 grants the subscription but delivers nothing the ACL denies: check delivery itself.
    assert server.cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0
    assert server.cli("desire", "dev-b", "--bundle", "mlp:1.0.0").returncode == 0
    seen: dict[str, list] = {"dev-a": [], "dev-b": []}
    c.on_message = lambda cl, u, m: seen["dev-a"].append(m.topic)
    c.subscribe(topic("dev-b", "desired"), qos=1)
    b, _ = _client(server.mqtt, "dev-b", creds["dev-b"])
    b.on_message = lambda cl, u, m: seen["dev-b"].append(m.topic)
    b.subscribe(topic("dev-b", "desired"), qos=1)
    _wait(lambda: seen["dev-b"], 10, "dev-b receives its own retained desired state")
    time.sleep(0.5)
    assert seen["dev-a"] == []
    b.loop_stop()
    b.disconnect()
    # its own telemetry is ingested once, however often it is sent; junk is counted and dropped
    own = _window("dev-a", "dev-a:1:abc")
    for _ in range(3):
        c.publish(topic("dev-a", "telemetry"), json.dumps(own), qos=1).wait_for_publish(5)
    c.publish(topic("dev-a", "telemetry"), b"{broken", qos=1).wait_for_publish(5)
    c.publish(topic("dev-a", "telemetry"), json.dumps({**own, "schema": "edgefleet.telemetry/9"}), qos=1)
    _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="rejected"}') >= 2, 20, "rejections")
    _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="duplicates"}') >= 2, 20, "dedupe")
    assert _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') == 1
    # an oversized window (over the 256 KiB ingest limit) is rejected, counted, and nothing else breaks
    big = {**own, "key": "dev-a:2:big", "inputs": {"feature_0": [1] * 150_000}}
    assert len(json.dumps(big)) > 256 * 1024
    c.publish(topic("dev-a", "telemetry"), json.dumps(big), qos=1).wait_for_publish(5)
    _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="rejected"}') >= 3, 20, "oversize")
    c.loop_stop()
    c.disconnect()
    # credentials the broker knows but the registry does not (added by hand): flagged, never stored
    mq = server.data / "mosquitto"
    subprocess.run(["mosquitto_passwd", "-b", str(mq / "passwd"), "ghost", "pw"], check=True)
    os.kill(int((mq / "mosquitto.pid").read_text()), signal.SIGHUP)
    time.sleep(0.5)
    g, got = _client(server.mqtt, "ghost", "pw")
    assert not got["connected"].is_failure
    g.publish(topic("ghost", "telemetry"), json.dumps(_window("ghost", "ghost:1")), qos=1).wait_for_publish(5)
    _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="unknown_device"}') >= 1, 20, "unknown")
    g.loop_stop()
    g.disconnect()
    assert "ghost" not in [d["id"] for d in json.loads(server.cli("devices", "--json").stdout)]
    assert _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') == 1
    assert server.proc.poll() is None


def test_a_device_cannot_join_the_ingest_workers_shared_subscription(tmp_path: Path, server: Server) -> None:
    """A device that subscribes to the ingest filter under the group name the docs once gave (or any other)
    forms a group of its own: the ingest workers' round robin never deals it another device's windows.
    Before, it was dealt half of them, which the broker acknowledged to the sender and then dropped."""
    creds = {dev: _provision(server, tmp_path, dev) for dev in ("dev-spy", "dev-src")}
    spy, got = _client(server.mqtt, "dev-spy", creds["dev-spy"])
    for group in ("edgefleet-ingest", "edgefleet"):
        spy.subscribe(f"$share/{group}/edgefleet/v1/devices/+/+", qos=1)
    _wait(lambda: got["suback"] is not None, 10, "suback")
    time.sleep(0.5)
    src, _ = _client(server.mqtt, "dev-src", creds["dev-src"])
    before = _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}')
    _send_windows(src, "dev-src", [], 40)
    _wait(
        lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') >= before + 40,
        20,
        "all 40 windows stored",
    )
    for c in (spy, src):
        c.loop_stop()
        c.disconnect()


def test_device_credentials_cannot_take_over_another_session(tmp_path: Path, server: Server) -> None:
    """Client ids are bound to usernames on the devices' listener: dev-a's credentials with dev-b's client id,
    or with the server's ingest worker's, disconnect nobody; the server user cannot log in there, and device
    credentials are refused on the server's own (loopback) listener. Before, the real dev-b was disconnected
    and the server's durable ingest session was taken over (half the fleet's windows acknowledged, never
    stored)."""
    creds = {dev: _provision(server, tmp_path, dev) for dev in ("dev-a", "dev-b")}
    b, _ = _client(server.mqtt, "dev-b", creds["dev-b"])
    drops: list = []
    b.on_disconnect = lambda *a: drops.append(a)
    instance = (server.data / "instance-id").read_text().strip()
    impostors = []
    for cid in ("dev-b", f"edgefleet-server-{instance}", f"edgefleet-server-{server.proc.pid}"):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.username_pw_set("dev-a", creds["dev-a"])
        c.connect("127.0.0.1", server.mqtt)
        c.loop_start()
        impostors.append(c)
    time.sleep(1.0)
    assert drops == [] and b.is_connected()
    # the server's ingest still stores everything dev-b sends
    before = _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}')
    _send_windows(b, "dev-b", [], 30)
    _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') >= before + 30, 20, "stored")
    secret = (server.data / "mosquitto" / "server.secret").read_text().strip()
    _, got = _client(server.mqtt, "edgefleet-server", secret)
    assert got["connected"].is_failure  # the server user is not a device
    server_url = json.loads((server.data / "mosquitto" / "embedded.json").read_text())["url"]
    server_port = int(server_url.rsplit(":", 1)[1])
    _, got = _client(server_port, "dev-a", creds["dev-a"])
    assert got["connected"].is_failure  # nor is a device a server client
    ok, got = _client(server_port, "edgefleet-server", secret)
    assert not got["connected"].is_failure
    for c in (*impostors, b, ok):
        c.loop_stop()
        c.disconnect()


def _window(device: str, key: str) -> dict:
    from edgefleet.protocol import LATENCY_EDGES_MS, WINDOW_SCHEMA

    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    counts[20] = 4
    return {
        "schema": WINDOW_SCHEMA,
        "key": key,
        "device_id": device,
        "bundle": {"name": "mlp", "version": "1.0.0"},
        "start": 1.0,
        "end": 2.0,
        "calls": 4,
        "samples": 4,
        "errors": {},
        "nan_outputs": 0,
        "latency_ms": {"counts": counts, "sum": 0.4, "max": 0.2},
        "inputs": {},
        "outputs": {},
    }


def test_fleet_drift_flags_the_shifted_cohort(tmp_path: Path, server: Server, mlp_bundles: dict, digits) -> None:
    import numpy as np

    import edgefleet.runtime as rt

    assert server.cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0
    x = digits["eval"][0]
    cohorts = {"dev-n": ("normal", x), "dev-s": ("shifted", np.clip(x * 0.6 + 0.35, 0, 1).astype(np.float32))}
    for dev, (tag, data) in cohorts.items():
        out = tmp_path / f"{dev}.toml"
        r = run_cli(
            "fleet",
            "provision",
            dev,
            "--tags",
            tag,
            *server.data_args,
            "--out",
            str(out),
            "--mqtt-port",
            str(server.mqtt),
        )
        assert r.returncode == 0, r.stderr
        pw = json.loads(next(ln for ln in out.read_text().splitlines() if ln.startswith("password")).split("=", 1)[1])
        # the real runtime summarises its own predictions into windows, which the device then sends
        buf = rt.TelemetryBuffer(tmp_path / f"{dev}.db")
        m = rt.load(mlp_bundles["1.0.0"], allow_unsigned=True)
        m.attach_telemetry(buf, device_id=dev, window_s=3600)
        for i in range(0, len(data), 16):
            m.predict(data[i : i + 16])
        m.flush_telemetry()
        c, _ = _client(server.mqtt, dev, pw)
        for _, kind, _, body in buf.pending(limit=100):
            c.publish(topic(dev, kind), body, qos=1).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
    _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') >= 2, 20, "windows stored")
    reports = {}
    for tag in ("normal", "shifted"):
        r = server.cli("drift", "--bundle", "mlp:1.0.0", "--tag", tag, "--json")
        assert r.returncode == 0, r.stderr
        reports[tag] = json.loads(r.stdout)
        assert reports[tag]["windows"] >= 1 and reports[tag]["bundle"] == "mlp:1.0.0"  # the API's fields
    normal, shifted = reports["normal"]["features"], reports["shifted"]["features"]
    for f in ("channel_0_intensity", "brightness", "contrast"):
        assert not normal[f]["drifted"] and normal[f]["psi"] < 0.1
        assert shifted[f]["drifted"] and shifted[f]["psi"] > 0.25
        assert set(shifted[f]) >= {"psi", "js", "ks", "chi2", "drifted"}
    r = server.cli("drift", "--bundle", "mlp:9.9.9")
    assert r.returncode == 1 and "not published" in r.stderr


def test_canary_rollouts_complete_and_roll_back_by_themselves(
    tmp_path: Path, server: Server, mlp_bundles: dict
) -> None:
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        assert server.cli("publish", str(mlp_bundles[v])).returncode == 0
    agents = []
    shutil_copy = __import__("shutil").copy
    for i in range(4):
        dev = f"edge-{i}"
        cfg = tmp_path / dev / "device.toml"
        r = run_cli(
            "fleet",
            "provision",
            dev,
            "--tags",
            "canary",
            *server.data_args,
            "--out",
            str(cfg),
            "--mqtt-port",
            str(server.mqtt),
        )
        assert r.returncode == 0, r.stderr
        shutil_copy(mlp_bundles["1.0.0"], cfg.parent / "v1.efb")
        cfg.write_text(
            cfg.read_text().replace(
                "[mqtt]",
                'initial_bundle = "v1.efb"\nself_test_hz = 30\nwindow_s = 0.5\n\n'
                "[health]\nwindow_s = 1.0\nmin_calls = 5\nprobe_interval_s = 0.05\n\n[mqtt]",
            )
        )
        agents.append(
            subprocess.Popen(
                [str(Path(sys.executable).parent / "edgefleet"), "agent", "--config", str(cfg)],
                stdout=subprocess.DEVNULL,
                stderr=open(cfg.parent / "agent.log", "wb"),
            )
        )
    try:

        def versions() -> dict[str, str | None]:
            r = server.cli("devices", "--json")
            return {d["id"]: d["bundle_version"] for d in json.loads(r.stdout)}

        _wait(lambda: set(versions().values()) == {"1.0.0"}, 60, "all on v1")
        assert (
            run_cli(
                "fleet",
                "rollout",
                "create",
                "--bundle",
                "mlp:2.0.0",
                "--selector",
                "nobody",
                "--server",
                server.url,
                "--token",
                server.token,
            ).returncode
            == 1
        )  # matches nothing
        r = server.cli(
            "rollout",
            "create",
            "--bundle",
            "mlp:2.0.0",
            "--selector",
            "canary",
            "--stages",
            "50,100",
            "--gate",
            "min_stage_s=2",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        rid = json.loads(r.stdout)["id"]

        def status(rid: str) -> dict:
            r = server.cli("rollout", "status", rid, "--json")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        _wait(lambda: status(rid)["state"] == "completed", 120, "v2 rollout completed")
        assert set(versions().values()) == {"2.0.0"}
        st = status(rid)
        assert [s["assigned"] for s in st["stages"]] == [2, 2] and st["stages"][0]["gates"]["ok"]

        # v3 is far slower: the first stage's devices roll back by themselves, the gate sees it, the rollout
        # rolls back, and the other half never gets v3
        r = server.cli(
            "rollout",
            "create",
            "--bundle",
            "mlp:3.0.0",
            "--selector",
            "canary",
            "--stages",
            "50,100",
            "--gate",
            "min_stage_s=2",
            "--json",
        )
        rid3 = json.loads(r.stdout)["id"]
        _wait(lambda: status(rid3)["state"] == "rolled_back", 120, "v3 rollout rolled back")
        st3 = status(rid3)
        assert st3["stages"][0]["failed"] == 2 and st3["stages"][1]["assigned"] == 0
        assert "update failure rate" in " ".join(st3["stages"][0]["gates"]["failed_gates"])
        # the human-readable status names the failed gate and how the rollout ended
        text = server.cli("rollout", "status", rid3).stdout
        assert "failed gate: update failure rate" in text and "last: gates failed" in text, text
        # ...and each device that did not update, with its own reason
        failed = [d for d in st3["devices"] if d["status"] == "failed"]
        assert len(failed) == 2 and all(d["reason"].startswith("rolled_back: ") for d in failed), st3["devices"]
        assert all(f"{d['id']} (stage 0, from 2.0.0) failed: rolled_back: " in text for d in failed), text
        _wait(lambda: set(versions().values()) == {"2.0.0"}, 60, "everyone back on v2")
        r = server.cli("rollout", "pause", rid3)
        assert r.returncode == 1 and "cannot be paused" in r.stderr
    finally:
        for a in agents:
            a.send_signal(signal.SIGTERM)
        for a in agents:
            a.wait(20)


def test_simulated_fleet_drift_and_rollout(tmp_path: Path, server: Server, mlp_bundles: dict, digits_npz) -> None:
    for v in ("1.0.0", "2.0.0"):
        assert server.cli("publish", str(mlp_bundles[v])).returncode == 0
    sim = server.simulate(
        tmp_path / "sim",
        *("--devices", "6", "--bundle", "mlp:1.0.0", "--tags", "sim", "--drift", "cohort-1:0.4", "--rate", "10"),
        *("--inputs", str(digits_npz["eval"])),
    )
    try:

        def devices() -> list[dict]:
            return json.loads(server.cli("devices", "--json").stdout)

        _wait(
            lambda: len([d for d in devices() if d["online"] and d["bundle_version"] == "1.0.0"]) == 6,
            90,
            "six simulated devices online on v1",
        )
        # A second simulator with the same (default) prefix would re-register them and cut this one off.
        r = server.cli("simulate", "--devices", "2", "--bundle", "mlp:1.0.0", "--duration", "5", "--golden-inputs")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "--prefix" in r.stderr and "--replace" in r.stderr
        assert len([d for d in devices() if d["online"]]) == 6

        def drift(tag: str) -> dict:
            r = server.cli("drift", "--bundle", "mlp:1.0.0", "--tag", tag, "--json")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)["features"]

        _wait(lambda: drift("cohort-1")["brightness"]["samples"] >= 100, 60, "telemetry from the shifted cohort")
        assert drift("cohort-1")["brightness"]["drifted"] and not drift("cohort-0")["brightness"]["drifted"]
        r = server.cli("drift", "--bundle", "mlp:1.0.0", "--tag", "cohort-1", "--against", "cohort-0", "--json")
        assert r.returncode == 0, r.stderr
        vs = json.loads(r.stdout)["cohorts"]
        assert vs["a"] == "cohort-1" and vs["features"]["brightness"]["drifted"]
        assert vs["features"]["output:predicted_class"]["psi"] is not None
        # the drift monitor turns it into alerts (stored, listed, exported as metrics)
        _wait(
            lambda: any(a["cohort"] == "cohort-1" for a in json.loads(server.cli("alerts", "--json").stdout)),
            60,
            "alert",
        )
        alerts = json.loads(server.cli("alerts", "--json").stdout)
        assert not any(a["cohort"] == "cohort-0" and a["feature"] == "brightness" for a in alerts)
        assert _metric(server, "edgefleet_drift_alerts_open") >= 1
        # What a Prometheus scraper reads: Prometheus' own linter passes it (help, types, names, labels).
        _, text, _ = server.get("/metrics", token=server.token)
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, check=False)
        assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
        from .test_monitoring import used_series

        exported = set(re.findall(r"^# TYPE (edgefleet_[a-z_]+) ", text.decode(), re.M))
        assert used_series() <= exported, used_series() - exported  # deploy/ queries only what is served
        r = server.cli(
            "rollout",
            "create",
            "--bundle",
            "mlp:2.0.0",
            "--selector",
            "sim",
            "--stages",
            "50,100",
            "--gate",
            "min_stage_s=3",
            "--gate",
            "max_prediction_psi=5",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        rid = json.loads(r.stdout)["id"]
        _wait(
            lambda: json.loads(server.cli("rollout", "status", rid, "--json").stdout)["state"] != "running",
            180,
            "rollout over the simulated fleet to end",
        )
        st = json.loads(server.cli("rollout", "status", rid, "--json").stdout)
        assert st["state"] == "completed", json.dumps([st["history"], [x["gates"] for x in st["stages"]]])
        # A device may roll back by itself when its health window judges the new bundle slower: timing on
        # a loaded shared-core machine. The rollout tolerates that (max_update_failure) and records it; any
        # other reason for a device left behind, or none recorded, is a failure.
        for d in [d["id"] for d in devices() if d["bundle_version"] != "2.0.0"]:
            evs = json.loads(server.get(f"/api/devices/{d}/events", token=server.token)[1])
            own = [e["body"] for e in evs if e["type"] == "rolled_back" and e["body"].get("rollout") == rid]
            why = json.dumps([e for e in evs if e["type"] != "update_state"], default=str)[-4000:]
            assert own and own[0]["reason"].startswith(("p95 latency", "too little evidence")), why
            print(f"{d} rolled back by itself: {own[0]['reason']}", file=sys.stderr)
        assert st["stages"][-1]["gates"]["values"]["update_failure_rate"] <= 0.2
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(60)


def test_a_restarted_server_carries_on_with_its_rollout(tmp_path: Path, server: Server, mlp_bundles: dict) -> None:
    for v in ("1.0.0", "2.0.0"):
        assert server.cli("publish", str(mlp_bundles[v])).returncode == 0
    agents = []
    for i in range(4):
        dev = f"rs-{i}"
        cfg = tmp_path / dev / "device.toml"
        assert (
            run_cli(
                "fleet",
                "provision",
                dev,
                "--tags",
                "rs",
                *server.data_args,
                "--out",
                str(cfg),
                "--mqtt-port",
                str(server.mqtt),
            ).returncode
            == 0
        )
        __import__("shutil").copy(mlp_bundles["1.0.0"], cfg.parent / "v1.efb")
        cfg.write_text(
            cfg.read_text().replace(
                "[mqtt]",
                'initial_bundle = "v1.efb"\nself_test_hz = 30\nwindow_s = 0.5\n\n'
                "[health]\nwindow_s = 1.0\nmin_calls = 5\nprobe_interval_s = 0.05\n\n[mqtt]",
            )
        )
        agents.append(
            subprocess.Popen(
                [str(Path(sys.executable).parent / "edgefleet"), "agent", "--config", str(cfg)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:

        def versions() -> set:
            return {d["bundle_version"] for d in json.loads(server.cli("devices", "--json").stdout)}

        def status(rid: str) -> dict:
            return json.loads(server.cli("rollout", "status", rid, "--json").stdout)

        _wait(lambda: versions() == {"1.0.0"}, 60, "all on v1")
        r = server.cli(
            "rollout",
            "create",
            "--bundle",
            "mlp:2.0.0",
            "--selector",
            "rs",
            "--stages",
            "25,50,100",
            "--gate",
            "min_stage_s=3",
            "--json",
        )
        rid = json.loads(r.stdout)["id"]
        _wait(lambda: status(rid)["stage"] >= 1, 60, "first stage passed")
        server.stop()  # mid-rollout
        time.sleep(1.0)
        server.start()
        _wait(lambda: status(rid)["state"] == "completed", 120, "rollout completed after the restart")
        st = status(rid)
        assert [s["assigned"] for s in st["stages"]] == [1, 1, 2]  # no stage redone, nobody assigned twice
        assert versions() == {"2.0.0"}
    finally:
        for a in agents:
            a.send_signal(signal.SIGTERM)
        for a in agents:
            a.wait(20)


def _provision(server: Server, tmp_path: Path, dev: str) -> str:
    out = tmp_path / f"{dev}.toml"
    r = run_cli("fleet", "provision", dev, *server.data_args, "--out", str(out), "--mqtt-port", str(server.mqtt))
    assert r.returncode == 0, r.stderr
    pw = next(line for line in out.read_text().splitlines() if line.startswith("password"))
    return str(json.loads(pw.split("=", 1)[1].strip()))


def _send_windows(c: mqtt.Client, dev: str, sent: list[str], n: int) -> None:
    """Publish N more telemetry windows from DEV (QoS 1, each acknowledged by the broker); keys go to SENT."""
    for _ in range(n):
        key = f"{dev}:{len(sent)}:k"
        c.publish(topic(dev, "telemetry"), json.dumps(_window(dev, key)), qos=1).wait_for_publish(5)
        sent.append(key)


def test_worker_killed_with_windows_not_yet_written_loses_none(tmp_path: Path, publisher) -> None:
    """A worker acknowledges a message to the broker only once it is in the database: one killed (-9)
    while it holds windows it could not write yet gets them again from the broker when it is back."""
    import fcntl
    import sqlite3

    server = Server(tmp_path / "fleet", publisher)
    log = open(tmp_path / "worker.log", "ab")

    def worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *(str(Path(sys.executable).parent / "edgefleet"), "fleet", "ingest"),
                # no --mqtt-port: the server's clients have a listener of their own, recorded in the data dir
                *("--data-dir", str(server.data), "--name", "w2", "--durable"),
            ],
            stdout=log,
            stderr=log,
        )

    def stored() -> dict[str, int]:
        db = sqlite3.connect(server.data / "fleet.db")
        try:
            keys = {k for (k,) in db.execute("SELECT key FROM windows")}
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        finally:
            db.close()
        return {"windows": len(keys), "w2": counters.get("ingest_worker_w2_received", 0), **dict.fromkeys(keys, 1)}

    w2 = worker()
    c = None
    try:
        c, _ = _client(server.mqtt, "dev-a", _provision(server, tmp_path, "dev-a"))
        sent: list[str] = []

        def send(n: int) -> None:
            _send_windows(c, "dev-a", sent, n)

        # both workers are on the shared subscription once each has stored some of the first windows
        deadline = time.monotonic() + 30
        while stored()["w2"] == 0 and time.monotonic() < deadline:
            send(2)
            time.sleep(0.3)
        _wait(lambda: stored()["windows"] == len(sent), 20, "the first windows stored")
        assert stored()["w2"] > 0, (tmp_path / "worker.log").read_text()[-2000:]
        before = stored()["w2"]
        with open(server.data / "fleet.db-writer.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # no worker can write now
            send(20)
            time.sleep(1.5)  # dealt to both workers, which hold them unwritten
            w2.kill()
            w2.wait(10)
        w2 = worker()
        _wait(lambda: stored()["windows"] == len(sent), 30, "every window stored after the restart")
        got = stored()
        assert all(k in got for k in sent)
        assert got["w2"] > before, "the restarted worker was given its share again"
    finally:
        if c is not None:
            c.loop_stop()
            c.disconnect()
        w2.kill()
        w2.wait(10)
        server.stop()


def test_database_outage_under_telemetry_loses_nothing(tmp_path: Path, publisher, postgres) -> None:
    """PostgreSQL stops while a device sends windows: the worker keeps them unacknowledged and tries again,
    its connections reconnect when the database is back, and every window is stored once."""
    import psycopg

    url = postgres.fresh_database()
    server = Server(tmp_path / "fleet", publisher, db_url=url)
    c = None

    def stored() -> set[str]:
        with psycopg.connect(url, autocommit=True) as conn:
            return {k for (k,) in conn.execute("SELECT key FROM windows")}

    try:
        c, _ = _client(server.mqtt, "dev-a", _provision(server, tmp_path, "dev-a"))
        sent: list[str] = []

        def send(n: int) -> None:
            _send_windows(c, "dev-a", sent, n)

        send(5)
        _wait(lambda: stored() == set(sent), 20, "windows stored before the outage")
        postgres.stop()
        try:
            send(15)
            time.sleep(2.0)  # the worker tries, fails, and waits to try again
        finally:
            postgres.start()
        _wait(lambda: stored() == set(sent), 40, "every window stored after the outage")
        assert server.proc.poll() is None
        _wait(lambda: server.get("/healthz")[0] == 200, 20, "the server healthy again")
        assert _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') == len(sent)
    finally:
        if c is not None:
            c.loop_stop()
            c.disconnect()
        server.stop()


def test_poisoned_windows_are_refused_and_never_reach_the_fleet_statistics(
    tmp_path: Path, server: Server, mlp_bundles: dict
) -> None:
    """A canary device sending windows that do not fit its bundle's baseline (too few bins, a feature the
    baseline lacks, a negative class count, negative errors or NaN outputs to hide from the rollout gates,
    fractional latency counts): each is refused and counted, the device's valid window is stored, and the
    bundle's drift report still answers. Before, such windows were stored and broke /api/drift for the
    bundle and the drift monitor's every check."""
    from edgefleet import open_bundle

    assert server.cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0
    base = open_bundle(mlp_bundles["1.0.0"]).manifest.drift_baseline
    feature = base["inputs"][0]["name"]
    n_in, n_cls = len(base["inputs"][0]["proportions"]), len(base["outputs"]["predicted_class"]["proportions"])
    pw = _provision(server, tmp_path, "dev-p")
    c, _ = _client(server.mqtt, "dev-p", pw)
    answers: list[dict] = []
    c.on_message = lambda cl, u, msg: answers.append(json.loads(msg.payload))
    c.subscribe(topic("dev-p", "refusals"), qos=1)
    good = {**_window("dev-p", "dev-p:good"), "start": time.time() - 60, "end": time.time()}
    good["inputs"] = {feature: [0] * (n_in - 1) + [4]}
    good["outputs"] = {"predicted_class": [4] + [0] * (n_cls - 1)}
    lat = good["latency_ms"]["counts"]
    poisoned = {
        "two bins": {"inputs": {feature: [2, 2]}},
        "unknown feature": {"inputs": {"not_a_feature": [1] * n_in}},
        "negative class count": {"outputs": {"predicted_class": [-1] + [1] * (n_cls - 1)}},
        "negative errors": {"errors": {"runtime": -43}},
        "negative nan outputs": {"nan_outputs": -1000},
        "fractional latency": {"latency_ms": {**good["latency_ms"], "counts": [c / 2 for c in lat]}},
        "non-numeric count": {"outputs": {"predicted_class": ["4"] + [0] * (n_cls - 1)}},
        "summarised out of range": {"summarised": 99},
    }
    before = _metric(server, 'edgefleet_ingest_messages_total{outcome="rejected"}')
    for i, (_, change) in enumerate(poisoned.items()):
        bad = {**good, "key": f"dev-p:bad:{i}", **change}
        c.publish(topic("dev-p", "telemetry"), json.dumps(bad), qos=1).wait_for_publish(5)
    c.publish(topic("dev-p", "telemetry"), json.dumps(good), qos=1).wait_for_publish(5)
    _wait(
        lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="rejected"}') >= before + len(poisoned),
        20,
        "every poisoned window refused",
    )
    _wait(lambda: _metric(server, 'edgefleet_ingest_messages_total{outcome="stored"}') >= 1, 20, "good one stored")
    # Each refused window is answered to its device, with its key and the reason (it was acknowledged, so
    # the device would otherwise delete it believing it delivered); the good one is not.
    _wait(lambda: len(answers) >= len(poisoned), 20, "refusals answered")
    assert sorted(a["key"] for a in answers) == sorted(f"dev-p:bad:{i}" for i in range(len(poisoned)))
    assert all(a["schema"] == "edgefleet.refusal/1" and a["kind"] == "telemetry" and a["reason"] for a in answers)
    two_bins = next(a for a in answers if a["key"] == "dev-p:bad:0")
    assert "bins" in two_bins["reason"] or "counts" in two_bins["reason"], two_bins
    assert _metric(server, 'edgefleet_ingest_refused_total{kind="telemetry"}') >= len(poisoned)
    assert _metric(server, 'edgefleet_ingest_refusing_devices{kind="telemetry"}') == 1  # dev-p alone
    assert _metric(server, 'edgefleet_ingest_refusing_devices{kind="events"}') == 0
    status, body, _ = server.get("/api/devices/dev-p/refusals", token=server.token)
    assert status == 200 and sum(r["count"] for r in json.loads(body)) == len(poisoned)
    c.loop_stop()
    c.disconnect()
    r = server.cli("drift", "--bundle", "mlp:1.0.0", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["windows"] == 1 and report["calls"] == 4


def test_pages_check_the_token_before_doing_any_work(server: Server) -> None:
    """Without a token every page answers the same redirect to the login, whether or not the device or
    rollout exists (a 404 told which ids do), and before computing anything (the drift page read every
    window first)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(NoRedirect)
    for path in ("/", "/devices", "/devices/no-such-device", "/rollouts", "/rollouts/r-nonexistent", "/drift"):
        try:
            opener.open(server.url + path, timeout=10)
            raise AssertionError(f"{path} answered without a token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 303, (path, exc.code)
            assert exc.headers["Location"].startswith("/login"), (path, exc.headers["Location"])

    # State-changing requests: answered before their body is read. FastAPI parses a JSON body before a route's
    # dependencies run, so an unauthenticated 100 MB POST was read whole before its 401.
    import http.client

    def send(method: str, path: str, declared: int, body: bytes = b"", token: str | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=10)
        conn.putrequest(method, path)
        conn.putheader("Content-Length", str(declared))
        conn.putheader("Content-Type", "application/json")
        if token:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        if body:
            conn.send(body)
        r = conn.getresponse()
        out = (r.status, r.getheader("Location") or r.read().decode(errors="replace"))
        conn.close()
        return out

    for method, path in (("POST", "/api/devices"), ("POST", "/api/rollouts"), ("PUT", "/api/bundles"),
                         ("POST", "/api/captures/cap-x/upload"), ("DELETE", "/api/devices/x/captures")):  # fmt: skip
        status, detail = send(method, path, 100 << 20)  # the body never sent: the answer comes anyway
        assert status == 401 and "token" in detail, (path, status, detail)
    assert send("POST", "/rollouts", 100 << 20) == (303, "/login")  # a dashboard form without the cookie
    status, detail = send("POST", "/api/devices", 100 << 20, token=server.token)
    assert status == 413 and "1048576-byte limit" in detail
    status, detail = send("PUT", "/api/bundles", 3 << 30, token=server.token)  # a bundle over 2 GiB
    assert status == 413 and f"{2 << 30}-byte limit" in detail
    assert not list((server.data / "bundles").iterdir())  # nothing stored, not even half
    ok = b'{"id": "ok-device-1"}'
    status, detail = send("POST", "/api/devices", len(ok), ok, token=server.token)
    assert status == 200, detail


def test_bundles_whose_file_names_would_collide_are_stored_apart(tmp_path: Path, server: Server, publisher) -> None:
    """`coll-1.0.0` version 2.0.0 and `coll` version 1.0.0-2.0.0 were both stored as coll-1.0.0-2.0.0.efb,
    and downloading one served the other's bytes. Bundles are stored by their sha256 now. An upload that
    is not a signed bundle is refused without naming a temporary file."""
    from edgefleet import write_bundle

    from .test_bundle_format import make_manifest, make_members

    paths = {}
    for name, version in (("coll-1.0.0", "2.0.0"), ("coll", "1.0.0-2.0.0")):
        m = make_manifest(version)
        m.name = name
        paths[(name, version)] = write_bundle(tmp_path / f"{name}_{version}.efb", m, make_members(name.encode()),
                                              publisher[0]) and tmp_path / f"{name}_{version}.efb"  # fmt: skip
        r = server.cli("publish", str(paths[(name, version)]))
        assert r.returncode == 0, r.stderr
    for (name, version), path in paths.items():
        status, body, _ = server.get(f"/bundles/{name}/{version}.efb", token=server.token)
        assert status == 200 and body == path.read_bytes(), (name, version)
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"not a bundle at all")
    r = server.cli("publish", str(junk))
    assert r.returncode == 1 and "upload.efb is not a readable bundle" in r.stderr, r.stderr
    assert list((server.data / "bundles").glob("*.efb")) and not list((server.data / "bundles").glob("coll*"))


def test_offline_provision_writes_the_running_servers_broker_port(tmp_path: Path, server: Server) -> None:
    """`fleet provision --data-dir` of a server whose embedded broker is on a non-default port wrote
    port = 1883 (issue 14 item 9); it now writes the port and public host the server runs with."""
    out = tmp_path / "dev-q.toml"
    r = run_cli("fleet", "provision", "dev-q", *server.data_args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert server.mqtt != 1883 and f"port = {server.mqtt}\n" in text and 'host = "127.0.0.1"' in text
    # and the download token is pinned to the server's own origin
    assert f'token_origins = ["{server.url}"]' in text


def test_listen_addresses_plaintext_warning_and_open_metrics(tmp_path: Path, server: Server, publisher) -> None:
    """On all interfaces (the default) the server warns that HTTP and its embedded broker are plaintext; bound
    to loopback it does not, and `--metrics-open` serves /metrics to a scraper without a token."""
    log = (server.data.parent / "server.log").read_text()
    assert "WARNING: HTTP on 0.0.0.0" in log and "WARNING: the embedded broker on 0.0.0.0" in log
    local = Server(
        tmp_path / "local" / "fleet",
        publisher,
        extra=("--host", "127.0.0.1", "--mqtt-bind", "127.0.0.1", "--metrics-open"),
    )
    try:
        assert local.get("/metrics")[0] == 200
        assert local.get("/api/devices")[0] == 401  # only /metrics was opened
        assert "WARNING" not in (local.data.parent / "server.log").read_text()
        conf = (local.data / "mosquitto" / "mosquitto.conf").read_text()
        assert f"listener {local.mqtt} 127.0.0.1" in conf
    finally:
        local.stop()


def test_embedded_broker_can_hold_more_devices_than_the_default_descriptor_limit(tmp_path: Path) -> None:
    """Each connected device holds one descriptor in Mosquitto: started under the usual soft limit of 1024,
    the embedded broker raises its own to the hard limit (before, the 1,021st device was refused)."""
    import resource

    from edgefleet.fleet._broker import Broker

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        b = Broker(tmp_path / "mq", free_port(), host="127.0.0.1", embedded=True, server_port=free_port())
        b.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert b.proc is not None
        limits = Path(f"/proc/{b.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files")).split()
        assert int(line[3]) == (hard if hard != resource.RLIM_INFINITY else 1 << 20) > 1024, line
    finally:
        b.stop()
