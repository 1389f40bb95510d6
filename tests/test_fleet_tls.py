"""A fleet server that needs nothing in front (issue 15, server transport): `--tls-cert/--tls-key/--tls-ca`
serve HTTPS and TLS on the embedded broker's devices' listener; devices provisioned offline get the CA for
both, and a real agent connects over mqtts, is ordered onto a bundle and downloads it over HTTPS; plaintext
is refused on both ports, and no plaintext warning is printed."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ._servers import free_port
from ._tls import CA
from .test_fleet_server import _wait

pytestmark = pytest.mark.slow
EXE = str(Path(sys.executable).parent / "edgefleet")


def test_https_and_mqtts_without_a_proxy(tmp_path: Path, publisher, mlp_bundles: dict) -> None:
    import edgefleet.runtime as rt

    ca = CA(tmp_path / "ca")
    crt, key = ca.issue("fleet", server=True)
    http, port = free_port(), free_port()
    data = tmp_path / "fleet"
    # a certificate that is not one: one line naming the files, at once (before: 15 s, then "could not connect")
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    bad = [EXE, "fleet", "serve", "--data-dir", str(tmp_path / "bad"), "--tls-cert", str(junk), "--tls-key", str(key)]
    r = subprocess.run(bad, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not a usable PEM certificate" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [
            *(EXE, "fleet", "serve", "--data-dir", str(data), "--http-port", str(http), "--mqtt-port", str(port)),
            *("--trusted-key", str(publisher[2]), "--tls-cert", str(crt), "--tls-key", str(key)),
            *("--tls-ca", str(ca.crt)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
    )
    ctx = ssl.create_default_context(cafile=str(ca.crt))
    url = f"https://127.0.0.1:{http}"
    agent = None

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1, context=ctx) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        _wait(healthy, 60, "the server answering over HTTPS")
        text = log.read_text()
        assert f"{url}" in text and "mqtts port" in text and "plaintext" not in text, text
        # plaintext HTTP to the HTTPS port gets no API
        with pytest.raises((urllib.error.URLError, OSError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=5).read()

        r = subprocess.run([EXE, "fleet", "token", "create", "--data-dir", str(data)], capture_output=True, text=True)
        token = r.stdout.strip()
        env = {**os.environ, "SSL_CERT_FILE": str(ca.crt)}  # the CLI checks the server against the test CA

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [EXE, "fleet", *args, "--server", url, "--token", token], capture_output=True, text=True, env=env
            )

        assert cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0

        # offline provisioning gives the device the CA for the broker and for downloads
        cfg = tmp_path / "dev" / "device.toml"
        r = subprocess.run(
            [EXE, "fleet", "provision", "dev-tls", "--tags", "t", "--data-dir", str(data), "--out", str(cfg)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        toml = cfg.read_text()
        assert 'http_ca = "broker-ca.pem"' in toml and "tls = true" in toml and f"port = {port}" in toml, toml
        assert (cfg.parent / "broker-ca.pem").read_text() == ca.crt.read_text()
        assert f'token_origins = ["{url}"]' in toml.replace("127.0.0.1", "127.0.0.1")

        # a device speaking plaintext MQTT to the TLS listener does not get in
        password = json.loads(next(x for x in toml.splitlines() if x.startswith("password")).split("=", 1)[1])
        plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-tls", protocol=mqtt.MQTTv5)
        plain.username_pw_set("dev-tls", password)
        got: list = []
        plain.on_connect = lambda c, u, f, rc, p: got.append(rc)
        try:
            plain.connect("127.0.0.1", port, keepalive=5)
            plain.loop_start()
            time.sleep(2)
            plain.loop_stop()
        except OSError:
            pass
        assert not any(not rc.is_failure for rc in got)

        # a real agent: online over mqtts, ordered onto v1, downloads it over HTTPS
        agent = rt.Agent(rt.load_config(cfg))
        agent.start()

        def device() -> dict:
            r = cli("devices", "--json")
            assert r.returncode == 0, r.stderr
            return {d["id"]: d for d in json.loads(r.stdout)}["dev-tls"]

        _wait(lambda: device()["online"], 30, "dev-tls online over mqtts")
        assert cli("desire", "dev-tls", "--bundle", "mlp:1.0.0").returncode == 0
        _wait(lambda: device()["bundle_version"] == "1.0.0", 60, "dev-tls on v1 (downloaded over HTTPS)")
    finally:
        if agent is not None:
            agent.stop()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp_path / "dev", ignore_errors=True)
