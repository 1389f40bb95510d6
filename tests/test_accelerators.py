"""A real execution provider beyond ONNX Runtime's CPU one: the OpenVINO build of ONNX Runtime (installed by
`make test` into .cache/openvino, beside the normal onnxruntime), in a subprocess that imports it first.
Device type CPU runs here; NPU and GPU are absent, so they fall back, in order, with the reason reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

OPENVINO = ROOT / ".cache" / "openvino"
OV = "OpenVINOExecutionProvider"

_PROBE = r"""
import json, sys
import numpy as np
import onnxruntime
import edgefleet.runtime as rt
from edgefleet import open_bundle

bundle, key, chains = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
x = open_bundle(bundle).golden_inputs()
out = {"onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(), "runs": []}
ref = None
for chain in chains:
    with rt.load(bundle, [key], backend="onnx", accelerators=chain) as m:
        y = m.predict(x)
        ref = y if ref is None else ref
        out["runs"].append({
            "chain": chain, "accelerator": m.info.accelerator, "fallbacks": list(m.info.fallbacks),
            "backend_version": m.info.backend_version, "golden_ok": m.check_golden().ok,
            "max_diff_vs_first": float(np.abs(y - ref).max()),
            "top1_agree": float((y.argmax(1) == ref.argmax(1)).mean()),
        })
print(json.dumps(out))
"""


def _probe(bundle: Path, key: Path, chains: list[list[str]]) -> dict:
    assert (OPENVINO / "onnxruntime").is_dir(), "make test installs onnxruntime-openvino into .cache/openvino"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OPENVINO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, str(bundle), str(key), json.dumps(chains)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_openvino_cpu_runs_and_npu_gpu_fall_back_with_reasons(mlp_bundles: dict, publisher) -> None:
    bundle = mlp_bundles["1.0.0"]  # int8
    res = _probe(
        bundle,
        publisher[2],
        [
            ["CPUExecutionProvider"],
            [f"{OV}:device_type=NPU", f"{OV}:device_type=GPU", f"{OV}:device_type=CPU"],
            [f"{OV}:device_type=NPU"],
            [OV],
        ],
    )
    assert res["onnxruntime"] == "1.24.1" and OV in res["providers"]
    cpu, chain, npu_only, plain = res["runs"]
    assert cpu["accelerator"] == "CPUExecutionProvider" and cpu["backend_version"] == "1.24.1"
    # NPU, then GPU, then CPU: the first two did not take the model, and say so; CPU did.
    assert chain["accelerator"] == f"{OV}:device_type=CPU", chain
    assert [f.split(" ")[0] for f in chain["fallbacks"]] == [f"{OV}:device_type=NPU", f"{OV}:device_type=GPU"]
    assert all("did not take the model" in f or "failed to initialise" in f for f in chain["fallbacks"])
    # NPU alone: ONNX Runtime's own CPU provider runs it, and the fallback is reported, not silent.
    assert npu_only["accelerator"] == "CPUExecutionProvider" and npu_only["fallbacks"], npu_only
    assert plain["accelerator"] == OV
    for run in res["runs"]:
        assert run["golden_ok"], run  # every route reproduces the golden sample within the int8 tolerance
        assert run["top1_agree"] == 1.0, run


def test_two_onnxruntime_builds_in_one_directory_are_refused_with_what_to_do(
    tmp_path: Path, mlp_bundles: dict, publisher
) -> None:
    """pip installs onnxruntime and onnxruntime-openvino into the same package directory, each over the
    other's files. A directory holding both (the OpenVINO package beside the normal build's metadata) is
    refused at load with one line naming both and the fix, not a crash somewhere in a session."""
    import shutil
    from importlib.metadata import distribution

    site = tmp_path / "site"
    site.mkdir()
    (site / "onnxruntime").symlink_to(OPENVINO / "onnxruntime", target_is_directory=True)
    for d in OPENVINO.glob("onnxruntime_openvino-*.dist-info"):
        (site / d.name).symlink_to(d, target_is_directory=True)
    plain = distribution("onnxruntime")
    shutil.copytree(Path(str(plain.locate_file(""))) / f"onnxruntime-{plain.version}.dist-info",
                    site / f"onnxruntime-{plain.version}.dist-info")  # fmt: skip
    code = (
        "import sys, edgefleet.runtime as rt\n"
        "try:\n    rt.load(sys.argv[1], [sys.argv[2]], backend='onnx')\n"
        "except rt.BundleError as e:\n    print('REFUSED', e); sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run(
        [sys.executable, "-c", code, str(mlp_bundles["1.0.0"]), str(publisher[2])],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    assert "onnxruntime and onnxruntime-openvino are both installed" in r.stdout
    assert "pip uninstall onnxruntime onnxruntime-openvino" in r.stdout
