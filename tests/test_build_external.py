"""Models as users bring them, not as this repository's examples make them: a MobileNet-style CNN
(depthwise + pointwise, hard-swish, GELU head) exported with `torch.export` exactly as the README says,
with a fixed batch of 1 or 4 as well as a dynamic one; a build that loses accuracy in a training step;
labels and shapes that do not fit the model. Real PyTorch, ONNX Runtime and LiteRT throughout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]

torch = pytest.importorskip("torch")
nn = torch.nn

from edgefleet import open_bundle  # noqa: E402
from edgefleet.runtime import load  # noqa: E402

from .conftest import ROOT, run_cli  # noqa: E402


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.Hardswish()

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.act(self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))


class MobileNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(_Block(16, 32, 1), _Block(32, 64, 2))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.blocks(self.stem(x)))


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory, digits: dict) -> dict[str, Path]:
    """What a user has: the trained CNN exported three ways, and .npz files of their data."""
    from examples.zoo.models import train_torch

    d = tmp_path_factory.mktemp("user")
    model = train_torch(MobileNetish(), digits, epochs=6)
    ex = torch.from_numpy(digits["eval"][0])
    paths = {}
    for batch in (1, 4):
        paths[f"b{batch}"] = d / f"cnn_b{batch}.pt2"
        torch.export.save(torch.export.export(model, (ex[:batch],)), paths[f"b{batch}"])
    paths["dyn"] = d / "cnn_dyn.pt2"
    dyn = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(model, (ex[:2],), dynamic_shapes=dyn), paths["dyn"])
    for name in ("train", "calib", "eval"):
        paths[name] = d / f"{name}.npz"
        np.savez(paths[name], x=digits[name][0], y=digits[name][1])
    return paths


def _cli_build(user: dict[str, Path], model: str, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_cli(
        "build",
        str(user[model]),
        "--calibration",
        str(user["calib"]),
        "--eval",
        str(user["eval"]),
        "-o",
        str(out),
        "--report",
        str(out.with_suffix(".json")),
        *extra,
    )


@pytest.mark.parametrize("model", ["b1", "b4"])
def test_fixed_batch_export_builds_every_format_and_runs(tmp_path: Path, user: dict, digits: dict, model: str) -> None:
    out = tmp_path / f"{model}.efb"
    r = _cli_build(user, model, out, "--quantize", "int8", "--format", "onnx,tflite", "--max-accuracy-drop", "0.02")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    batch = int(model[1:])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["warnings"] == [] and {a["format"] for a in report["artifacts"]} == {"onnx", "tflite"}
    manifest = open_bundle(out).manifest
    x = digits["eval"][0][:7]  # neither a multiple of 4 nor 1 sample
    for e in manifest.models:
        # The manifest says the batch is fixed, and at what size.
        assert e.inputs[0].shape[0] == batch, e.id
        m = load(out, allow_unsigned=True, model_id=e.id)
        assert m.info.batch == batch
        y = m.predict(x)
        assert y.shape == (7, 10)
        assert m.check_golden().ok
    for a in report["artifacts"]:
        assert a["batch"] == batch
        # Speed is the file against its own fp32 export in the same runtime, not against PyTorch.
        assert a["speed_vs_fp32"] == pytest.approx(a["fp32_latency_ms_p50"] / a["latency_ms_p50"], rel=0.01)
        assert [s["after"] for s in a["scores"]] == [f"export {a['format']}", f"quantize {a['format']} int8"]
        assert a["lost_samples"] <= report["gate"]["allowed_samples"]
    assert report["source"]["latency_runtime"] == "pt2"
    assert "speed x: the file against its own fp32 export" in r.stdout


def test_dynamic_batch_export_keeps_a_dynamic_batch(tmp_path: Path, user: dict) -> None:
    out = tmp_path / "dyn.efb"
    r = _cli_build(user, "dyn", out, "--quantize", "fp16", "--format", "onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    (entry,) = open_bundle(out).manifest.models
    assert entry.inputs[0].shape[0] is None
    assert load(out, allow_unsigned=True).info.batch is None


def test_the_gate_guards_the_whole_build_and_names_the_step(tmp_path: Path, user: dict) -> None:
    """A distilled student that loses accuracy: the old gate looked at the quantize step only and passed."""
    recipe = tmp_path / "lossy.toml"
    recipe.write_text(
        'name = "lossy"\nversion = "1.0.0"\n'
        '[[steps]]\npass = "distill"\nstudent = "examples.digits.models:Student"\nepochs = 1\n'
        '[[steps]]\npass = "prune_magnitude"\nsparsity = 0.9\nepochs = 1\n'
        '[[steps]]\npass = "quantize"\nmode = "int8"\n'
    )
    out = tmp_path / "out" / "lossy.efb"
    args = ("--recipe", str(recipe), "--train", str(user["train"]), "--max-accuracy-drop", "0.01")
    r = run_cli(
        "build", str(user["dyn"]), "--calibration", str(user["calib"]), "--eval", str(user["eval"]),
        "-o", str(out), "--report", str(tmp_path / "out" / "r.json"), *args, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout[-2000:]
    assert "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("edgefleet:")]
    assert "step 'distill' loses more than --max-accuracy-drop 0.01 against the source model" in line
    assert "of 519 samples" in line and "at most 5 allowed" in line
    assert not out.exists() and not (tmp_path / "out" / "r.json").exists()
    # With a budget the student meets, the same recipe builds, and the report has a score after every step.
    r = run_cli(
        "build", str(user["dyn"]), "--calibration", str(user["calib"]), "--eval", str(user["eval"]),
        "-o", str(out), "--report", str(tmp_path / "out" / "r.json"), *args[:-1], "0.9", cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    assert [s["pass"] for s in report["steps"]] == ["distill", "prune_magnitude", "quantize"]
    assert all("lost_samples" in s["result"] for s in report["steps"][:2])


def test_data_that_does_not_fit_the_model_is_refused_in_one_line(tmp_path: Path, user: dict, digits: dict) -> None:
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, x=digits["calib"][0][:, :, :, :7])
    out = tmp_path / "x.efb"
    r = run_cli("build", str(user["b1"]), "--calibration", str(narrow), "--quantize", "int8", "-o", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "narrow.npz: array 'x' has per-sample shape (1, 8, 7), but the model expects (1, 8, 8)" in r.stderr
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=digits["eval"][0], y=digits["eval"][1] + 10)
    r = run_cli("build", str(user["dyn"]), "--eval", str(labels), "-o", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "labels 'y' range from 10 to 19, but the model has 10 output classes" in r.stderr
    assert not out.exists()


def test_same_inputs_give_the_same_files_and_figures(tmp_path: Path, user: dict) -> None:
    """Twice the same gated int8 build: the same bytes and the same scores (the activation type used to be
    chosen by a latency measurement, so runs differed)."""
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}.efb"
        r = _cli_build(user, "b1", out, "--quantize", "int8", "--format", "onnx", "--max-accuracy-drop", "0.01")
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads(out.with_suffix(".json").read_text())
        (a,) = report["artifacts"]
        runs.append((out.read_bytes(), a["accuracy"], a["scores"], report["steps"][-1]["result"]))
    assert runs[0] == runs[1]
