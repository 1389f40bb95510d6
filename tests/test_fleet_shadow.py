"""Shadow deployments ordered from the fleet (issue 18 part 1): real agents on the server's Mosquitto run a
candidate beside their active bundle on the app's own calls; the server's merged report equals the
agreement computed offline on the same inputs; a rollout can require the shadow to have passed; bad
orders and lying devices are refused or contained."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefleet.protocol import EVENT_SCHEMA, topic

from .conftest import run_cli
from .test_fleet_server import Server, _wait

pytestmark = pytest.mark.slow


def _device(server: Server, tmp_path: Path, dev: str, tags: str, initial: Path) -> Path:
    cfg = tmp_path / dev / "device.toml"
    r = run_cli(
        "fleet", "provision", dev, "--tags", tags, *server.data_args, "--out", str(cfg), "--mqtt-port", str(server.mqtt)
    )
    assert r.returncode == 0, r.stderr
    shutil.copy(initial, cfg.parent / "v1.efb")
    cfg.write_text(
        cfg.read_text().replace("[mqtt]", 'initial_bundle = "v1.efb"\nwindow_s = 1.0\nfeedback_calls = 1000\n\n[mqtt]')
    )
    return cfg


def _top1(path: Path, x: np.ndarray, publisher) -> np.ndarray:
    import edgefleet.runtime as rt

    with rt.load(path, [str(publisher[2])]) as m:
        return np.concatenate([m.predict(x[i : i + 1]) for i in range(len(x))]).argmax(1)


def test_a_shadow_deployment_reports_the_agreement_of_the_same_inputs_offline(
    tmp_path: Path, publisher, mlp_bundles: dict, digits
) -> None:
    import edgefleet.runtime as rt

    server = Server(tmp_path / "fleet", publisher)
    agents: list[rt.Agent] = []
    liar = None
    try:
        for v in ("1.0.0", "2.0.0", "3.0.0"):
            assert server.cli("publish", str(mlp_bundles[v])).returncode == 0
        for dev, site in (("sh-a", "site-a"), ("sh-b", "site-b")):
            cfg = _device(server, tmp_path, dev, f"sh,{site}", mlp_bundles["1.0.0"])
            agents.append(rt.Agent(rt.load_config(cfg)))
            agents[-1].start()
        # A third device in the selector, online, that sends a fabricated report instead of running anything.
        cfg = _device(server, tmp_path, "sh-liar", "sh,site-b", mlp_bundles["1.0.0"])
        pw = next(json.loads(ln.split("=", 1)[1]) for ln in cfg.read_text().splitlines() if ln.startswith("password"))
        liar = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sh-liar", protocol=mqtt.MQTTv5)
        liar.username_pw_set("sh-liar", pw)
        liar.connect("127.0.0.1", server.mqtt)
        liar.loop_start()
        status = {"schema": "edgefleet.status/1", "device_id": "sh-liar", "online": True, "ts": time.time()}
        liar.publish(topic("sh-liar", "status"), json.dumps(status), 1, True)

        def online() -> set:
            return {d["id"] for d in json.loads(server.cli("devices", "--json").stdout) if d["online"]}

        _wait(lambda: online() >= {"sh-a", "sh-b", "sh-liar"}, 60, "devices online")
        _wait(lambda: all(a.model is not None for a in agents), 30, "v1 installed")

        # Bad orders: one clear line each, nothing created.
        for args, why in (
            (("--bundle", "mlp:9.9.9", "--selector", "sh"), "is not published"),
            (("--bundle", "mlp:2.0.0", "--selector", "nobody"), "matches no device"),
            (("--bundle", "mlp:2.0.0", "--selector", "sh", "--sample-rate", "0"), "--sample-rate must be in (0, 1]"),
        ):
            r = server.cli("shadow", "create", *args)
            assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert json.loads(server.cli("shadow", "list", "--json").stdout) == []

        r = server.cli(
            "shadow", "create", "--bundle", "mlp:2.0.0", "--selector", "sh", "--sample-rate", "1", "--duration",
            "120", "--min-samples", "150", "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        sid = json.loads(r.stdout)["id"]
        assert json.loads(r.stdout)["devices"]["ordered"] == 3
        st = lambda: json.loads(server.cli("shadow", "status", sid, "--json").stdout)  # noqa: E731
        _wait(lambda: st()["devices"]["started"] == 2, 60, "both agents started the candidate")
        liar.publish(
            topic("sh-liar", "events"),
            json.dumps(
                {
                    "schema": EVENT_SCHEMA, "key": "sh-liar:ev:1", "device_id": "sh-liar", "type": "shadow_report",
                    "ts": time.time(), "command_id": sid, "candidate": {"name": "mlp", "version": "2.0.0"},
                    "samples": 10**9, "agreement": 0.0,
                }
            ),
            1,
        ).wait_for_publish(5)  # fmt: skip

        # The apps' own calls: 150 different inputs per device, slowly enough that none is dropped. sh-a's
        # app learns the true class of its first 60 calls and feeds it back (some before the candidate has
        # run the call, some after).
        x, y = digits["eval"]
        rows = {"sh-a": x[:150], "sh-b": x[150:300]}
        for a in agents:
            for i in range(150):
                a.predict(rows[a.device_id][i : i + 1])
                if a.device_id == "sh-a" and i < 60:
                    call = a.last_call_id
                    assert call is not None
                    if i % 2:
                        time.sleep(0.02)
                    a.feedback(call, int(y[i]))
                time.sleep(0.004)
        _wait(lambda: st()["state"] == "completed", 60, "all three reported")
        s = st()
        v1 = {d: _top1(mlp_bundles["1.0.0"], r, publisher) for d, r in rows.items()}
        v2 = {d: _top1(mlp_bundles["2.0.0"], r, publisher) for d, r in rows.items()}
        for d in rows:
            rep = s["per_device"][d]
            assert rep["samples"] == 150 and rep["dropped"] == 0
            assert rep["agreement"] == round(float((v1[d] == v2[d]).mean()), 6), (d, rep)
            assert rep["active_p95_ms"] > 0 and rep["candidate_p95_ms"] > 0
        assert s["cohorts"]["site-a"]["agreement"] == s["per_device"]["sh-a"]["agreement"]
        # Both bundles scored on the 60 labelled calls, as offline on the same inputs.
        la = s["per_device"]["sh-a"]
        assert la["labelled"] == 60 and s["per_device"]["sh-b"]["labelled"] == 0
        assert la["active_correct"] == int((v1["sh-a"][:60] == y[:60]).sum())
        assert la["candidate_correct"] == int((v2["sh-a"][:60] == y[:60]).sum())
        assert s["overall"]["labelled"] == 60
        assert s["overall"]["candidate_accuracy"] == round(la["candidate_correct"] / 60, 6)
        # The liar's 10^9 samples weigh as much as 4x the median device's (150): 600, not a billion.
        honest = sum(int((v1[d] == v2[d]).sum()) for d in rows)
        assert s["overall"]["agreement"] == round(honest / (150 + 150 + 600), 6)
        assert s["overall"]["min_device_agreement"] == 0.0  # and the outlier shows
        # The two bundles' answer distributions, as offline on the same calls (the liar sent none).
        from edgefleet._drift import psi

        k = int(max(max(v.max() for v in v1.values()), max(v.max() for v in v2.values()))) + 1
        act = sum(np.bincount(v1[d], minlength=k) for d in rows)
        cand = sum(np.bincount(v2[d], minlength=k) for d in rows)
        for d in rows:
            assert s["per_device"][d]["classes"] == [
                np.bincount(v1[d], minlength=len(s["per_device"][d]["classes"][0])).tolist(),
                np.bincount(v2[d], minlength=len(s["per_device"][d]["classes"][0])).tolist(),
            ]
        assert s["overall"]["output_psi"] == pytest.approx(psi(act, cand), abs=1e-5)
        # Over time, from the devices' shadow_progress events: the spans hold every honest sample once.
        status_code, body, _ = server.get(f"/api/shadows/{sid}/series", token=server.token)
        series = json.loads(body)
        assert status_code == 200 and len(series["agreement"]) == 48
        minutes = (series["until"] - series["since"]) / 48 / 60
        assert round(sum(v or 0 for v in series["samples_per_min"]) * minutes) == 300
        spans = [a for a in series["agreement"] if a is not None]
        assert spans and all(0.0 <= a <= 1.0 for a in spans)
        assert any(v is not None for v in series["candidate_p95_ms"])

        # A rollout after the shadow: refused below the agreement it needs, started (and noted) above it.
        base = ("rollout", "create", "--bundle", "mlp:2.0.0", "--selector", "sh", "--after-shadow", sid)
        r = server.cli(*base, "--min-agreement", "0.99")
        assert r.returncode != 0 and "agreement" in r.stderr and "< 0.99" in r.stderr, r.stderr
        r = server.cli(*base, "--bundle", "mlp:3.0.0")
        assert r.returncode != 0 and "ran mlp:2.0.0, not mlp:3.0.0" in r.stderr, r.stderr
        r = server.cli(*base, "--min-agreement", "0.1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["history"][0]["note"] == f"after shadow {sid}: passed"

        # Devices say what they can run; an order for a bundle none of whose files a device's runtimes load
        # is refused (the lying device claims only LiteRT; the mlp bundles are ONNX only).
        caps = agents[0].state_doc()["capabilities"]
        assert (
            caps["runtimes"]["onnx"]["version"] and "CPUExecutionProvider" in caps["runtimes"]["onnx"]["accelerators"]
        )
        liar_state = {"schema": "edgefleet.state/1", "device_id": "sh-liar",
                      "capabilities": {"machine": "aarch64", "runtimes": {"tflite": {"version": "2.1.0"}}}}  # fmt: skip
        liar.publish(topic("sh-liar", "state"), json.dumps(liar_state), 1, True).wait_for_publish(5)

        def caps_of(dev: str) -> dict | None:
            return next(d for d in json.loads(server.cli("devices", "--json").stdout) if d["id"] == dev)["capabilities"]

        _wait(lambda: (caps_of("sh-liar") or {}).get("machine") == "aarch64", 20, "capabilities stored")
        assert caps_of("sh-a")["runtimes"]["onnx"]["accelerators"]
        r = server.cli("desire", "sh-liar", "--bundle", "mlp:2.0.0")
        assert r.returncode != 0 and "cannot run mlp:2.0.0: its models are onnx" in r.stderr, r.stderr

        # One-off commands, audited: to one device, to a tag; refused for unknown devices and for shadows.
        r = server.cli("command", "flush", "sh-a", "--json")
        assert r.returncode == 0, r.stderr
        assert list(json.loads(r.stdout)["ids"]) == ["sh-a"]
        r = server.cli("command", "report", "--selector", "sh", "--json")
        assert r.returncode == 0 and sorted(json.loads(r.stdout)["ids"]) == ["sh-a", "sh-b", "sh-liar"], r.stderr
        status, body, _ = server.get("/api/devices/sh-a/commands", token=server.token)
        assert status == 200 and [c["command"] for c in json.loads(body)] == ["report", "flush"]

        def answers() -> list:
            return [c["answer"] for c in json.loads(server.get("/api/devices/sh-a/commands", token=server.token)[1])]

        # The real agent answers both (the liar, which runs no agent, never does).
        _wait(lambda: all(a is not None for a in answers()), 30, "the agent's answers to both commands")
        assert [a["type"] for a in answers()] == ["command_done", "command_done"]
        liar_cmds = json.loads(server.get("/api/devices/sh-liar/commands", token=server.token)[1])
        assert [c["answer"] for c in liar_cmds if c["command"] == "report"] == [None]
        r = server.cli("command", "flush", "nobody")
        assert r.returncode != 0 and "no device nobody" in r.stderr and "Traceback" not in r.stderr
        r = server.cli("command", "flush")
        assert r.returncode != 0 and "give one DEVICE or --selector TAG" in r.stderr

        # A refusal from the fleet reaches the agent, which logs it and says so in its state document.
        srv = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-server-side", protocol=mqtt.MQTTv5)
        srv.username_pw_set(
            "edgefleet-server", (tmp_path / "fleet" / "mosquitto" / "server.secret").read_text().strip()
        )
        server_url = json.loads((tmp_path / "fleet" / "mosquitto" / "embedded.json").read_text())["url"]
        srv.connect("127.0.0.1", int(server_url.rsplit(":", 1)[1]))  # the server clients' own listener
        srv.loop_start()
        refusal = {"schema": "edgefleet.refusal/1", "device_id": "sh-a", "kind": "telemetry", "key": "k-1",
                   "reason": "telemetry window lacks field 'calls'", "ts": time.time()}  # fmt: skip
        srv.publish(topic("sh-a", "refusals"), json.dumps(refusal), 1).wait_for_publish(5)
        _wait(lambda: agents[0].link.refused == 1, 20, "refusal received")
        doc = agents[0].state_doc()["refused_by_fleet"]
        assert doc["count"] == 1 and doc["last"]["key"] == "k-1" and "lacks field" in doc["last"]["reason"]
        srv.loop_stop()
    finally:
        if liar is not None:
            liar.loop_stop()
        for a in agents:
            a.stop()
        server.stop()
