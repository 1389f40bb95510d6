"""Opt-in data capture (issue 18 part 3): real agents on a real server and Mosquitto. An operator asks a
cohort for samples; the device that opted in uploads its captured inputs with the labels fed back for them,
the one that did not refuses; the export is an .npz that `edgefleet build` takes as it is; an armed capture
fires when a drift alert opens on its cohort; bad uploads are refused with a reason and store nothing."""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .conftest import run_cli
from .test_fleet_server import Server, _wait

pytestmark = pytest.mark.slow


def _post(url: str, token: str | None, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _token(cfg: Path) -> str:
    line = next(x for x in cfg.read_text().splitlines() if x.startswith("http_token"))
    return str(json.loads(line.split("=", 1)[1].strip()))


def test_capture_upload_export_and_build(tmp_path: Path, publisher, mlp_bundles: dict, mlp_onnx, digits) -> None:
    import edgefleet.runtime as rt

    server = Server(tmp_path / "fleet", publisher, extra=("--drift-interval", "1"))
    agents: dict[str, rt.Agent] = {}
    cfgs: dict[str, Path] = {}
    try:
        assert server.cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0
        for dev, opt_in in (("cap-in", True), ("cap-out", False)):
            cfg = tmp_path / dev / "device.toml"
            r = run_cli(
                "fleet", "provision", dev, "--tags", f"cap,{dev}-site", *server.data_args, "--out", str(cfg),
                "--mqtt-port", str(server.mqtt),
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            shutil.copy(mlp_bundles["1.0.0"], cfg.parent / "v1.efb")
            extra = (
                'initial_bundle = "v1.efb"\nwindow_s = 1.0\nfeedback_calls = 1000\ncapture_per_hour = 1e10\n'
                f"capture_upload = {'true' if opt_in else 'false'}\n\n[mqtt]"
            )
            cfg.write_text(cfg.read_text().replace("[mqtt]", extra))
            cfgs[dev] = cfg
            agents[dev] = rt.Agent(rt.load_config(cfg))
            agents[dev].start()
        _wait(lambda: all(a.model is not None for a in agents.values()), 30, "v1 installed")

        x, y = digits["eval"]
        for a in agents.values():
            for i in range(60):
                a.predict(x[i : i + 1])
                if i < 40:
                    a.feedback(a.last_call_id, int(y[i]))  # the app learnt the truth for 40 of them

        r = server.cli("capture", "create", "--selector", "cap", "--samples", "50", "--json")
        assert r.returncode == 0, r.stderr
        cid = json.loads(r.stdout)["id"]

        def status() -> dict:
            r = server.cli("capture", "status", cid, "--json")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        _wait(lambda: status()["uploads"] and status()["refused"], 60, "an upload and a refusal")
        s = status()
        # the newest 50 of its 60 samples (calls 10-59), 30 of them labelled (calls 10-39)
        assert [(u["device"], u["samples"], u["labelled"], u["bundle"]) for u in s["uploads"]] == [
            ("cap-in", 50, 30, "mlp:1.0.0")
        ]
        assert s["refused"] == [{"device": "cap-out", "reason": "capture_upload is off"}]
        assert "50 sample(s), 30 labelled" in server.cli("capture", "status", cid).stdout
        # the uploaded samples left the device's buffer; the 10 oldest, not asked for, stay
        assert agents["cap-in"].buffer.stats().samples == 10

        # the export: the inputs exactly as the device saw them, the labels its app fed back
        out = tmp_path / "captured.npz"
        r = server.cli("dataset", "export", cid, "-o", str(out), "--labelled-only")
        assert r.returncode == 0 and "30 sample(s), 30 labelled" in r.stdout, r.stderr
        with np.load(out) as z:
            assert np.array_equal(z["x"], x[10:40]) and np.array_equal(z["y"], y[10:40])
            assert set(z["device"]) == {"cap-in"} and set(z["bundle"]) == {"mlp:1.0.0"}
        everything = tmp_path / "all.npz"
        assert server.cli("dataset", "export", cid, "-o", str(everything)).returncode == 0
        with np.load(everything) as z:
            assert len(z["x"]) == 50 and (z["y"] == -1).sum() == 20 and np.array_equal(z["x"], x[10:60])
        # ...which `edgefleet build` takes as it is
        r = run_cli(
            "build", str(mlp_onnx), "--calibration", str(out), "--eval", str(out), "--quantize", "int8",
            "--format", "onnx", "--name", "mlp", "--version", "4.0.0", "-o", str(tmp_path / "v4.efb"),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "v4.efb").exists()

        # bad uploads: no token, an operator's token, a device not asked, a second answer, not an npz
        url = f"{server.url}/api/captures/{cid}/upload"
        tok = {d: _token(c) for d, c in cfgs.items()}
        buf = io.BytesIO()
        np.savez(buf, x=x[:2], label=np.asarray([1, 2]), ts=np.zeros(2), bundle=np.asarray(["mlp:1.0.0"] * 2))
        good = buf.getvalue()
        assert _post(url, None, good)[0] == 401
        assert _post(url, server.token, good)[0] == 401
        code, body = _post(url, tok["cap-in"], good)
        assert code == 400 and "answered capture" in body
        code, body = _post(url, tok["cap-in"], b"not a zip")
        assert code == 400 and "not a readable .npz" in body
        # over 64 MiB by its declared length: refused before a byte of it is read
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)
        conn.putrequest("POST", f"/api/captures/{cid}/upload")
        conn.putheader("Authorization", f"Bearer {tok['cap-in']}")
        conn.putheader("Content-Length", str(65 << 20))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and "larger than" in resp.read().decode()
        conn.close()
        metrics = server.get("/metrics", token=server.token)[1].decode()
        # a device's uploads refused: the two 400s and the 413 (requests without a device token are not its)
        assert "edgefleet_capture_uploads_refused_total 3" in metrics, metrics
        r = server.cli("capture", "create", "--selector", "cap-in-site", "--samples", "5", "--json")
        cid2 = json.loads(r.stdout)["id"]
        code, body = _post(f"{server.url}/api/captures/{cid2}/upload", tok["cap-out"], good)
        assert code == 400 and "was not asked" in body
        _wait(lambda: json.loads(server.cli("capture", "status", cid2, "--json").stdout)["uploads"], 30, "cid2")
        assert server.cli("capture", "create", "--selector", "cap", "--samples", "0").returncode != 0

        # an armed capture fires when a drift alert opens on its cohort
        r = server.cli("capture", "create", "--selector", "cap-in-site", "--samples", "20", "--when-alert", "--json")
        armed = json.loads(r.stdout)["id"]
        assert json.loads(r.stdout)["state"] == "armed"
        a = agents["cap-in"]
        for i in range(300):
            a.predict(np.clip(x[i % len(x) : i % len(x) + 1] + 0.4, 0, 1))  # a brighter camera
        a.model.flush_telemetry()

        def fired() -> dict:
            r = server.cli("capture", "status", armed, "--json")
            return json.loads(r.stdout)

        _wait(lambda: fired()["uploads"], 90, "the armed capture asked and answered")
        f = fired()
        assert f["state"] == "asked" and f["alert_id"] and f["uploads"][0]["samples"] == 20

        # a device's captured data is deleted on request
        r = server.cli("capture", "forget", "cap-in", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["uploads_deleted"] == 3
        r = server.cli("dataset", "export", cid, "-o", str(tmp_path / "gone.npz"))
        assert r.returncode != 0 and "no uploads" in r.stderr and "Traceback" not in r.stderr
    finally:
        for ag in agents.values():
            ag.stop()
        server.stop()
