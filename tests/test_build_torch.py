"""PyTorch sources end to end: a real teacher trained on digits, distilled, pruned (both kinds),
int8 ONNX + TFLite in one signed bundle, every file checked with real sessions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]

torch = pytest.importorskip("torch")

from edgefleet import InputError, open_bundle  # noqa: E402
from edgefleet.converters import BuildConfig, Dataset, PruneMagnitude, PruneStructured, Quantize, build  # noqa: E402
from edgefleet.converters.backends._torch import TorchBackend  # noqa: E402

from .conftest import ROOT, run_cli  # noqa: E402


def _run_golden(bundle) -> None:
    """Every model file reproduces its golden outputs with a fresh real session."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    gx = bundle.golden_inputs()
    for e in bundle.manifest.models:
        want = bundle.load_array(e.golden_outputs)
        if e.format == "onnx":
            s = ort.InferenceSession(bundle.read(e.path), providers=["CPUExecutionProvider"])
            got = s.run(None, {s.get_inputs()[0].name: gx})[0]
        else:
            it = Interpreter(model_content=bundle.read(e.path))
            it.allocate_tensors()
            ind, outd = it.get_input_details()[0], it.get_output_details()[0]
            rows = []
            for i in range(len(gx)):
                x = gx[i : i + 1]
                if e.inputs[0].scale:
                    x = np.clip(np.round(x / e.inputs[0].scale[0]) + e.inputs[0].zero_point[0], -128, 127)
                it.set_tensor(ind["index"], x.astype(ind["dtype"]))
                it.invoke()
                y = it.get_tensor(outd["index"]).astype(np.float32)
                if e.outputs[0].scale:
                    y = (y - e.outputs[0].zero_point[0]) * e.outputs[0].scale[0]
                rows.append(y)
            got = np.concatenate(rows)
        np.testing.assert_allclose(got, want, atol=e.golden_tolerance["atol"], err_msg=e.id)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_cli_recipe_distill_prune_int8_both_formats(
    tmp_path: Path, teacher_pt2: Path, digits_npz: dict, keypair
) -> None:
    _, key, pub = keypair
    recipe = tmp_path / "digits.toml"
    recipe.write_text(
        'name = "digits"\nversion = "1.0.0"\nformats = ["onnx", "tflite"]\nlayout = "NCHW"\n'
        'labels = ["0","1","2","3","4","5","6","7","8","9"]\n'
        '[[steps]]\npass = "distill"\nstudent = "examples.digits.models:Student"\nepochs = 8\nlearning_rate = 0.002\n'
        '[[steps]]\npass = "prune_structured"\nratio = 0.25\nepochs = 3\n'
        '[[steps]]\npass = "prune_magnitude"\nsparsity = 0.5\nepochs = 3\nsteps = 3\n'
        '[[steps]]\npass = "quantize"\nmode = "int8"\n'
    )
    out, rep = tmp_path / "digits.efb", tmp_path / "report.json"
    r = run_cli(
        "build",
        str(teacher_pt2),
        "--recipe",
        str(recipe),
        "--train",
        str(digits_npz["train"]),
        "--calibration",
        str(digits_npz["calib"]),
        "--eval",
        str(digits_npz["eval"]),
        "--max-accuracy-drop",
        "0.02",
        "--sign-key",
        str(key),
        "-o",
        str(out),
        "--report",
        str(rep),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "distill: epoch 8/8" in r.stderr  # progress is shown
    report = json.loads(rep.read_text())
    assert report["source"]["format"] == "pt2"
    fmts = {a["format"]: a for a in report["artifacts"]}
    assert set(fmts) == {"onnx", "tflite"}
    teacher_acc = report["source"]["accuracy"]
    for a in fmts.values():
        assert a["precision"] in ("int8", "mixed")
        assert a["accuracy"] >= teacher_acc - 0.03
        assert a["size_bytes"] * 10 <= report["source"]["size_bytes"]
        assert a["latency_ms_p50"] > 0
    steps = {s["pass"]: s for s in report["steps"]}
    assert list(steps) == ["distill", "prune_structured", "prune_magnitude", "quantize"]
    assert steps["prune_structured"]["result"]["params_after"] < steps["prune_structured"]["result"]["params_before"]
    assert 0.45 <= steps["prune_magnitude"]["result"]["sparsity"] <= 0.55
    assert run_cli("verify", str(out), "--key", str(pub)).returncode == 0
    b = open_bundle(out, trusted_keys=[pub])
    assert b.manifest.labels[3] == "3"
    tfl = next(m for m in b.manifest.models if m.format == "tflite")
    assert tfl.inputs[0].dtype == "int8" and tfl.inputs[0].scale  # int8 I/O carries its scale in the manifest
    _run_golden(b)


def test_structured_pruning_really_shrinks_the_exported_file(tmp_path: Path, teacher, digits: dict) -> None:
    kw = dict(evaluation=Dataset(*digits["eval"]), train=Dataset(*digits["train"]), progress=lambda _: None)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain = build(teacher, tmp_path / "a.efb", BuildConfig(), **kw)
    pruned = build(teacher, tmp_path / "b.efb", BuildConfig(steps=[PruneStructured(ratio=0.5, epochs=2)]), **kw)
    a, b = plain.report["artifacts"][0], pruned.report["artifacts"][0]
    assert b["size_bytes"] < 0.6 * a["size_bytes"]
    assert b["accuracy"] > 0.9
    # Magnitude pruning keeps shapes (zeros are still stored), and the report says so honestly.
    mag = build(teacher, tmp_path / "c.efb", BuildConfig(steps=[PruneMagnitude(sparsity=0.7, epochs=2)]), **kw)
    assert mag.report["steps"][0]["result"]["sparsity"] >= 0.69
    assert abs(mag.report["artifacts"][0]["size_bytes"] - a["size_bytes"]) < 0.05 * a["size_bytes"]
    # The caller's model is left as it was: pruning worked on a copy (it used to zero the teacher in place).
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tflite_dynamic_and_fp16_from_pytorch(tmp_path: Path, teacher, digits: dict) -> None:
    for mode, prec in (("dynamic", "int8"), ("fp16", "fp16")):
        res = build(
            teacher,
            tmp_path / f"{mode}.efb",
            BuildConfig(formats=["tflite"], quantize=Quantize(mode=mode)),
            evaluation=Dataset(*digits["eval"]),
            progress=lambda _: None,
        )
        (art,) = res.report["artifacts"]
        assert art["precision"] == prec and art["agreement"] > 0.97
        assert art["size_bytes"] < 0.6 * res.report["source"]["size_bytes"]


class _Det(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 8)

    def forward(self, x):
        return torch.linalg.det(self.fc(x.flatten(1)).reshape(-1, 2, 2, 2)).reshape(x.shape[0], -1)


def test_operator_a_format_cannot_express(tmp_path: Path, digits: dict) -> None:
    ev = Dataset(digits["eval"][0][:64])
    res = build(
        _Det(), tmp_path / "d.efb", BuildConfig(formats=["onnx", "tflite"]), evaluation=ev, progress=lambda _: None
    )
    assert [a["format"] for a in res.report["artifacts"]] == ["onnx"]
    (w,) = res.report["warnings"]
    assert "aten._linalg_det" in w and "tflite not built" in w
    with pytest.raises(InputError, match=r"aten\._linalg_det"):
        build(_Det(), tmp_path / "e.efb", BuildConfig(formats=["tflite"]), evaluation=ev, progress=lambda _: None)
    assert not (tmp_path / "e.efb").exists()


def test_pickled_pth_is_refused_by_the_cli(tmp_path: Path, teacher, digits_npz: dict) -> None:
    pth = tmp_path / "model.pth"
    torch.save(teacher, pth)
    r = run_cli("build", str(pth), "--eval", str(digits_npz["eval"]), "-o", str(tmp_path / "x.efb"))
    assert r.returncode == 1 and "torch.export" in r.stderr and "pickled" in r.stderr
    assert not (tmp_path / "x.efb").exists()
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"PK\x03\x04garbage")
    r = run_cli("build", str(bad), "--eval", str(digits_npz["eval"]), "-o", str(tmp_path / "x.efb"))
    assert r.returncode == 1 and "is not a torch.export program (.pt2): not a zip archive" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _with_activation_outlier(teacher):
    """The same function, but channel 0 between the two convs is 1000x larger (compensated in the next
    conv): per-tensor int8 activations there lose the other channels' resolution, as outlier channels do."""
    import copy

    m = copy.deepcopy(teacher).eval()
    with torch.no_grad():
        m.features[1].weight[0] *= 1000
        m.features[1].bias[0] *= 1000
        m.features[3].weight[:, 0] /= 1000
    return m


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_accuracy_gate_fixes_an_outlier_channel(tmp_path: Path, teacher, digits: dict, fmt: str) -> None:
    model = _with_activation_outlier(teacher)
    ev, cal = Dataset(*digits["eval"]), Dataset(*digits["calib"])
    np.testing.assert_allclose(TorchBackend().predict(model, ev.x), TorchBackend().predict(teacher, ev.x), atol=1e-3)
    plain = build(
        model,
        tmp_path / "p.efb",
        BuildConfig(formats=[fmt], quantize=Quantize(mode="int8")),
        calibration=cal,
        evaluation=ev,
        progress=lambda _: None,
    )
    src = plain.report["source"]["accuracy"]
    assert src - plain.report["artifacts"][0]["accuracy"] > 0.02, "the outlier must hurt plain int8"
    gated = build(
        model,
        tmp_path / "g.efb",
        BuildConfig(formats=[fmt], quantize=Quantize(mode="int8", max_accuracy_drop=0.01)),
        calibration=cal,
        evaluation=ev,
        progress=lambda _: None,
    )
    (art,) = gated.report["artifacts"]
    info = gated.report["steps"][-1]["result"][fmt]
    assert art["precision"] == "mixed" and info["kept_in_float"], info
    assert src - art["accuracy"] <= 0.01
    assert open_bundle(tmp_path / "g.efb").manifest.models[0].precision == "mixed"


def test_tflite_calibration_keeps_the_range_of_every_sample(tmp_path: Path) -> None:
    # One sample with a wide range among many narrow ones: the activation range must cover it (a moving
    # average of per-sample ranges, AI Edge Quantizer's default, all but forgets it and clips).
    import contextlib
    import io

    import litert_torch

    from edgefleet.converters._tflite_quant import _calibrate

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(8))
        net[0].bias.zero_()
    path = tmp_path / "m.tflite"
    with contextlib.redirect_stdout(io.StringIO()):
        litert_torch.convert(net, (torch.zeros(1, 8),)).export(str(path))
    x = np.full((40, 8), 0.5, np.float32)
    x[0] = 20.0
    qsvs = _calibrate(path, Dataset(x))
    highest = max(float(np.max(q["max"])) for q in qsvs.values() if q and "max" in q)
    assert highest >= 19.9, qsvs
