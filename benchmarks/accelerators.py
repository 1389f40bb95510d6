"""Latency per execution provider and device type, side by side in one run, with what actually ran.

EfficientNet-Lite0 (pretrained), built by edgefleet as fp32 and int8 bundles, loaded through the runtime
(`edgefleet.runtime.load`) with each accelerator chain: ONNX Runtime's CPU provider from the normal build,
and from the OpenVINO build (`onnxruntime-openvino` in .cache/openvino, run in its own process): its CPU
provider, OpenVINO device CPU, and OpenVINO NPU / GPU (absent here: they fall back, and the row says to
what). Batch 1, p50 of interleaved runs.

    .venv/bin/python benchmarks/accelerators.py [--quick]

Writes benchmarks/results/accelerators.json and benchmarks/results/accelerators.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
OPENVINO = ROOT / ".cache" / "openvino"
OV = "OpenVINOExecutionProvider"
CHAINS = {
    "ORT CPU (onnxruntime)": (False, ["CPUExecutionProvider"]),
    "ORT CPU (openvino build)": (True, ["CPUExecutionProvider"]),
    "OpenVINO device CPU": (True, [f"{OV}:device_type=CPU"]),
    "OpenVINO NPU -> GPU -> CPU": (True, [f"{OV}:device_type=NPU", f"{OV}:device_type=GPU", f"{OV}:device_type=CPU"]),
    "OpenVINO NPU only": (True, [f"{OV}:device_type=NPU"]),
}

_MEASURE = r"""
import json, sys, time
import numpy as np
import onnxruntime
import edgefleet.runtime as rt
from edgefleet import open_bundle

bundle, key, chain, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
x = open_bundle(bundle).golden_inputs()[:1]
with rt.load(bundle, [key], backend="onnx", accelerators=chain, threads=None) as m:
    for _ in range(10):
        m.predict(x)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter(); m.predict(x); t.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"p50_ms": float(np.median(t)), "accelerator": m.info.accelerator,
                      "fallbacks": list(m.info.fallbacks), "onnxruntime": onnxruntime.__version__,
                      "golden_ok": m.check_golden().ok}))
"""


def _measure(bundle: Path, key: Path, openvino: bool, chain: list[str], runs: int) -> dict[str, Any]:
    env = dict(os.environ)
    if openvino:
        env["PYTHONPATH"] = os.pathsep.join([str(OPENVINO), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(bundle), str(key), json.dumps(chain), str(runs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not (OPENVINO / "onnxruntime").is_dir():
        print("install the OpenVINO build first: make test does, into .cache/openvino", file=sys.stderr)
        return 2
    from benchmarks.int8_peers import load
    from edgefleet import generate_keypair
    from edgefleet.converters import BuildConfig, Dataset, Quantize, build
    from examples.efficientnet_lite0.photos import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, views

    runs = 50 if args.quick else 300
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        key = generate_keypair(work / "k")
        calib = Dataset(views(CALIBRATION_PHOTOS, 8, seed=0, size=224), name="calibration-photos")
        held = Dataset(views(HELD_OUT_PHOTOS, 16, seed=7, size=224), name="held-out-photos")
        model = load("lite0")
        bundles = {
            "fp32": build(
                model, work / "lite0-fp32.efb", BuildConfig(formats=["onnx"]), evaluation=held, signing_key=key
            ),
            "int8": build(
                model,
                work / "lite0-int8.efb",
                BuildConfig(formats=["onnx"], quantize=Quantize(mode="int8")),
                calibration=calib,
                evaluation=held,
                signing_key=key,
            ),
        }
        rows = []
        for precision, res in bundles.items():
            for label, (ov, chain) in CHAINS.items():
                m = _measure(res.path, work / "k.pub", ov, chain, runs)
                rows.append({"file": precision, "route": label, "requested": chain, **m})
                print(f"[bench] {precision} {label}: {m}", file=sys.stderr, flush=True)
    results = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": "EfficientNet-Lite0, batch 1",
        "runs": runs,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accelerators.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "accelerators.md").write_text(table(results))
    print(table(results))
    return 0


def table(results: dict[str, Any]) -> str:
    lines = [
        "# Accelerators: latency per provider and device type, with what actually ran",
        "",
        f"Measured {results['measured_at']} on {results['machine']}: {results['model']}, p50 of "
        f"{results['runs']} calls after 10 warm-up calls, each route in its own process through "
        "`edgefleet.runtime.load` (the OpenVINO build from .cache/openvino).",
        "",
        "| file | route | p50 ms | ran on | fallbacks | golden |",
        "|---|---|---:|---|---|---|",
    ]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['file']} | {r['route']} | - | error: {r['error']} | | |")
            continue
        fb = "; ".join(f.split(" ")[0] + " " + " ".join(f.split(" ")[1:4]) for f in r["fallbacks"]) or "-"
        lines.append(
            f"| {r['file']} | {r['route']} | {r['p50_ms']:.2f} | {r['accelerator']} (ORT {r['onnxruntime']}) | "
            f"{fb} | {'ok' if r['golden_ok'] else 'FAILED'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
