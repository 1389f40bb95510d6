"""PyTorch quantization-aware training: the rounding it trains against is the rounding ONNX Runtime runs,
and the `qat` pass builds from calibration data alone, on a fixed-batch `.pt2` program, in both formats.
The EfficientNet-Lite0 run is in benchmarks/qat.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]

torch = pytest.importorskip("torch")

from edgefleet import open_bundle  # noqa: E402
from edgefleet.converters import BuildConfig, Dataset, Quantize, build  # noqa: E402
from edgefleet.converters._evaluate import OnnxRunner  # noqa: E402
from edgefleet.converters.backends._torch import load_pt2  # noqa: E402
from edgefleet.converters.backends._torch_qat import FakeQuantized  # noqa: E402

from .conftest import ROOT, run_cli  # noqa: E402


@pytest.mark.parametrize("source", ["module", "pt2_batch1"])
def test_fake_quantization_is_the_rounding_onnx_runtime_runs(
    tmp_path: Path, teacher, teacher_pt2: Path, digits: dict, source: str
) -> None:
    """The simulated int8 model and the int8 file the quantize step writes from the same weights give the
    same outputs, far closer to each other than either is to the float model: QAT learns against the
    quantizer that will really run (batch norms folded, per-channel weights, uint8 activation ranges)."""
    model = teacher if source == "module" else load_pt2(teacher_pt2)
    static = None if source == "module" else 1
    cal, ev = Dataset(*digits["calib"]), Dataset(*digits["eval"])
    fq = FakeQuantized(model, cal.x[:2], static)
    assert fq.folded == 2 and len(fq.weights) == 4
    fq.observe(cal.x)
    simulated = fq(ev.x).numpy()
    res = build(
        fq.float_model(),
        tmp_path / "q.efb",
        BuildConfig(formats=["onnx"], quantize=Quantize(mode="int8", activation_type="uint8", bias_correction=False)),
        calibration=cal,
        evaluation=ev,
        progress=lambda _: None,
    )
    b = open_bundle(res.path)
    ort_int8 = OnnxRunner(b.extract(tmp_path / "x") / b.manifest.models[0].path).predict(ev.x)
    with torch.no_grad():
        fp32 = torch.cat([model(torch.from_numpy(ev.x[i : i + 1])) for i in range(len(ev.x))]).numpy()
    gap_sim = float(np.abs(ort_int8 - simulated).mean())
    gap_float = float(np.abs(ort_int8 - fp32).mean())
    assert gap_float > 0.002, "int8 rounding must be visible for this comparison to mean anything"
    assert gap_sim < 0.25 * gap_float, (gap_sim, gap_float)
    assert (ort_int8.argmax(1) == simulated.argmax(1)).mean() >= 0.995


def test_cli_qat_from_calibration_alone_on_a_fixed_batch_program(
    tmp_path: Path, teacher_pt2: Path, digits_npz: dict
) -> None:
    """No --train: the qat pass learns from the float model's outputs on the calibration inputs. Both
    formats are built from the trained program, the ONNX file on uint8 activations, within the gate."""
    recipe = tmp_path / "qat.toml"
    recipe.write_text(
        'name = "digits"\nversion = "1.0.0"\nformats = ["onnx", "tflite"]\n'
        '[[steps]]\npass = "qat"\nepochs = 2\nbatch_size = 16\nlearning_rate = 0.00005\n'
        '[[steps]]\npass = "quantize"\nmode = "int8"\n'
    )
    out, rep = tmp_path / "q.efb", tmp_path / "report.json"
    r = run_cli(
        "build",
        str(teacher_pt2),
        "--recipe",
        str(recipe),
        "--calibration",
        str(digits_npz["calib"]),
        "--eval",
        str(digits_npz["eval"]),
        "--max-accuracy-drop",
        "0.02",
        "-o",
        str(out),
        "--report",
        str(rep),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "qat: epoch 2/2" in r.stderr
    report = json.loads(rep.read_text())
    qat = report["steps"][0]
    assert qat["pass"] == "qat"
    assert qat["result"]["batch_norms_folded"] == 2 and qat["result"]["weights_fake_quantized"] == 4
    assert [c["epoch"] for c in qat["result"]["curve"]] == [0, 1, 2]
    fmts = {a["format"]: a for a in report["artifacts"]}
    assert set(fmts) == {"onnx", "tflite"}
    assert report["steps"][-1]["result"]["onnx"]["activations"] == "uint8"
    for a in fmts.values():
        assert a["precision"] in ("int8", "mixed") and a["batch"] == 1
        assert a["accuracy"] >= report["source"]["accuracy"] - 0.02
    b = open_bundle(out)
    assert [m.format for m in b.manifest.models] == ["onnx", "tflite"]


def test_qat_parameters_are_checked_before_any_work(tmp_path: Path, teacher_pt2: Path, digits_npz: dict) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[steps]]\npass = "qat"\nepochs = 0\n')
    r = run_cli(
        "build", str(teacher_pt2), "--recipe", str(recipe), "--calibration", str(digits_npz["calib"]),
        "-o", str(tmp_path / "b.efb"), cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "qat.epochs must be > 0" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b.efb").exists()
