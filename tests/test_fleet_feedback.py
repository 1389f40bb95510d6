"""Ground truth fed back from devices (issue 18 part 2): real agents count confusion matrices per window,
the server's accuracy equals the one computed offline on the same calls, and a cohort whose labels changed
while its inputs did not raises a concept-drift alert and no data-drift alert."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefleet import InputError

from .conftest import run_cli
from .test_fleet_server import Server, _metric, _wait

pytestmark = pytest.mark.slow


def test_feedback_gives_accuracy_per_cohort_and_a_concept_drift_alert(
    tmp_path: Path, publisher, mlp_bundles: dict, digits
) -> None:
    import edgefleet.runtime as rt

    server = Server(tmp_path / "fleet", publisher)
    agents: dict[str, rt.Agent] = {}
    try:
        assert server.cli("publish", str(mlp_bundles["1.0.0"])).returncode == 0
        for dev, site in (("fb-ok", "site-ok"), ("fb-flip", "site-flip")):
            cfg = tmp_path / dev / "device.toml"
            r = run_cli(
                "fleet", "provision", dev, "--tags", f"fb,{site}", *server.data_args, "--out", str(cfg),
                "--mqtt-port", str(server.mqtt),
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            shutil.copy(mlp_bundles["1.0.0"], cfg.parent / "v1.efb")
            extra = 'initial_bundle = "v1.efb"\nwindow_s = 1.0\nfeedback_calls = 1000\n\n[mqtt]'
            cfg.write_text(cfg.read_text().replace("[mqtt]", extra))
            agents[dev] = rt.Agent(rt.load_config(cfg))
            agents[dev].start()
        _wait(lambda: all(a.model is not None for a in agents.values()), 30, "v1 installed")

        x, y = digits["eval"]
        n = min(300, len(x))
        preds = {}
        for dev, a in agents.items():
            got = []
            for i in range(n):
                got.append(int(a.predict(x[i : i + 1]).argmax()))
                # The same inputs for both sites; at site-flip the world changed: every label moved by one.
                label = int(y[i]) if dev == "fb-ok" else (int(y[i]) + 1) % 10
                a.feedback(a.last_call_id, label)
            preds[dev] = np.asarray(got)
        # What a device refuses: an unknown id, the same call twice, a label outside the classes.
        a = agents["fb-ok"]
        a.predict(x[:1])
        cid = a.last_call_id
        with pytest.raises(InputError, match="outside the model's 10 classes"):
            a.feedback(cid, 10)
        a.feedback(cid, int(y[0]))
        with pytest.raises(InputError, match="unknown, already given feedback, or expired"):
            a.feedback(cid, int(y[0]))
        with pytest.raises(InputError, match="unknown"):
            a.feedback(10**9, 1)
        for a in agents.values():
            a.model.flush_telemetry()

        def report(tag: str) -> dict:
            r = server.cli("accuracy", "--bundle", "mlp:1.0.0", "--tag", tag, "--json")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        _wait(lambda: report("site-flip")["labelled"] == n and report("site-ok")["labelled"] == n + 1, 60, "labels")
        ok, flip = report("site-ok"), report("site-flip")
        # The extra call was x[0] again, fed back with its true label.
        want_ok = (int((preds["fb-ok"] == y[:n]).sum()) + int(preds["fb-ok"][0] == y[0])) / (n + 1)
        assert ok["accuracy"] == round(want_ok, 6) and ok["reference_accuracy"] > 0.9
        assert flip["accuracy"] == round(float((preds["fb-flip"] == (y[:n] + 1) % 10).mean()), 6)
        assert ok["ci95"][0] <= ok["accuracy"] <= ok["ci95"][1]
        assert len(ok["per_class"]) == 10 and all(c["recall"] is not None for c in ok["per_class"] if c["support"])
        text = server.cli("accuracy", "--bundle", "mlp:1.0.0", "--tag", "site-ok")
        assert "labelled predictions" in text.stdout and "precision" in text.stdout
        for c in (c for c in ok["per_class"] if c["support"]):
            assert c["recall_ci95"][0] <= c["recall"] <= c["recall_ci95"][1]
        # Over time: the spans hold every labelled prediction once, each span's accuracy within its interval.
        code, body, _ = server.get("/api/accuracy?bundle=mlp:1.0.0&tag=site-ok&series=12", token=server.token)
        s = json.loads(body)["series"]
        assert code == 200 and len(s["accuracy"]) == 12 and sum(s["labelled"]) == n + 1
        for a, lo, hi in zip(s["accuracy"], s["ci_low"], s["ci_high"], strict=True):
            assert a is None or lo <= a <= hi

        def alerts() -> list[dict]:
            return json.loads(server.cli("alerts", "--json").stdout)

        _wait(lambda: any(al["cohort"] == "site-flip" and al["kind"] == "concept" for al in alerts()), 60, "alert")
        mine = [al for al in alerts() if al["cohort"] in ("site-flip", "site-ok")]
        concept = [al for al in mine if al["kind"] == "concept"]
        assert [al["cohort"] for al in concept] == ["site-flip"], mine
        assert concept[0]["feature"] == "accuracy" and concept[0]["accuracy"] < 0.2 < 0.9 < concept[0]["reference"]
        assert not [al for al in mine if al["kind"] in ("data", "prediction")], mine  # the inputs did not move
        assert 0 <= _metric(server, 'edgefleet_accuracy{bundle="mlp:1.0.0",cohort="site-flip"}') < 0.2
        assert _metric(server, 'edgefleet_labelled_predictions{bundle="mlp:1.0.0",cohort="site-flip"}') == n
        low = _metric(server, 'edgefleet_accuracy_ci95{bundle="mlp:1.0.0",cohort="site-flip",bound="low"}')
        assert 0 <= low <= _metric(server, 'edgefleet_accuracy{bundle="mlp:1.0.0",cohort="site-flip"}')
        metrics = server.get("/metrics", token=server.token)[1].decode()
        assert 'edgefleet_class_f1{bundle="mlp:1.0.0",cohort="site-ok",class="' in metrics
        # the server's log lines carry their time and where they come from
        log = (tmp_path / "server.log").read_text()
        assert re.search(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING edgefleet\.fleet\.drift: drift alert", log, re.M
        ), log
    finally:
        for ag in agents.values():
            ag.stop()
        server.stop()
