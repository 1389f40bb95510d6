"""Compression benchmark: fp32 against every compressed variant, per example, in one run.

For each example: size ratio, latency ratio on ONNX Runtime and on LiteRT (measured interleaved in
the same process, batch 1, on this machine), and accuracy or top-1 agreement with fp32. For
EfficientNet-Lite0 it also quantizes the same fp32 ONNX file with ONNX Runtime's `quantize_static`
at its default settings, on the same calibration data, as the peer baseline.

    .venv/bin/python benchmarks/compression.py [--quick]

Writes benchmarks/results/compression.json and benchmarks/results/compression.md.
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
from edgefleet.converters import BuildConfig, Dataset, Distill, PruneMagnitude, PruneStructured, Quantize, build  # noqa: E402
from edgefleet.converters._evaluate import runner_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {
    "efficientnet_lite0": "int8 ONNX <= 0.30x fp32 size, >= 1.5x faster on ONNX Runtime, top-1 agreement >= 98%",
    "digits": "distilled, pruned int8 student >= 10x smaller than the teacher, accuracy within 1.5 points",
}


def quiet(_: str) -> None:
    pass


def interleaved_latency(files: dict[str, tuple[str, Path]], sample: np.ndarray, rounds: int, runs: int) -> dict:
    """p50 latency (ms) per file; rounds alternate between files so drift hits all of them alike."""
    runners = {k: runner_for(fmt, p) for k, (fmt, p) in files.items()}
    x = np.ascontiguousarray(sample[:1])
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in runners.values():
        for _ in range(10):
            r._one(x.astype(np.float16) if r.inputs[0].dtype == "float16" else x)
    for _ in range(rounds):
        for k, r in runners.items():
            xi = x.astype(np.float16) if r.inputs[0].dtype == "float16" else x
            for _ in range(runs):
                t = time.perf_counter()
                r._one(xi)
                times[k].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1000, 4) for k, v in times.items()}


def score(fmt: str, path: Path, ev: Dataset, ref_top1: np.ndarray) -> dict[str, float | None]:
    pred = runner_for(fmt, path).predict(ev.x)
    top1 = pred.reshape(len(pred), -1).argmax(1)
    acc = None if ev.y is None else float((top1 == ev.y).mean())
    return {"accuracy": acc, "agreement": float((top1 == ref_top1).mean())}


def bundle_files(bundle: Path, out: Path) -> dict[str, tuple[str, Path]]:
    b = open_bundle(bundle)
    root = b.extract(out / bundle.stem)
    return {m.id: (m.format, root / m.path) for m in b.manifest.models}


def run_example(
    name: str,
    model: Any,
    variants: list[tuple[str, BuildConfig]],
    calib: Dataset,
    ev: Dataset,
    train: Dataset | None,
    work: Path,
    rounds: int,
    runs: int,
    extra: dict[str, tuple[str, Path]],
) -> dict:
    files: dict[str, tuple[str, Path]] = {}
    reports = {}
    for label, cfg in variants:
        t = time.perf_counter()
        res = build(
            model, work / f"{name}-{label}.efb", cfg, calibration=calib, evaluation=ev, train=train, progress=quiet
        )
        reports[label] = {"build_seconds": round(time.perf_counter() - t, 1), "steps": res.report["steps"]}
        for mid, f in bundle_files(res.path, work).items():
            files[f"{label}/{mid}"] = f
        print(f"[bench] {name}: built {label} in {reports[label]['build_seconds']} s", file=sys.stderr)
    files.update(extra)
    fp32 = {fmt: k for k, (fmt, _) in files.items() if k.startswith("fp32/")}
    ref_path = files[fp32["onnx"]][1] if "onnx" in fp32 else files[next(iter(fp32.values()))][1]
    ref_fmt = "onnx" if "onnx" in fp32 else "tflite"
    ref_top1 = runner_for(ref_fmt, ref_path).predict(ev.x).argmax(1)
    lat = interleaved_latency(files, ev.x, rounds, runs)
    rows = []
    for key, (fmt, path) in files.items():
        base_key = fp32.get(fmt)
        base_size = files[base_key][1].stat().st_size if base_key else None
        s = score(fmt, path, ev, ref_top1)
        rows.append(
            {
                "variant": key,
                "format": fmt,
                "size_bytes": path.stat().st_size,
                "size_ratio": round(path.stat().st_size / base_size, 4) if base_size else None,
                "latency_ms_p50": lat[key],
                "speedup": round(lat[base_key] / lat[key], 3) if base_key else None,
                **{k: (round(v, 4) if v is not None else None) for k, v in s.items()},
            }
        )
    return {
        "rows": rows,
        "builds": reports,
        "eval_samples": len(ev),
        "eval_set": ev.name,
        "labels": ev.y is not None,
        "target": TARGETS.get(name),
    }


def ort_default_static(fp32: Path, calib: Dataset, out: Path) -> Path:
    """ONNX Runtime's quantize_static with its defaults (QDQ, int8 activations, per-tensor weights, minmax)."""
    from onnxruntime.quantization import quantize_static

    class Reader:
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(calib):
                return None
            self.i += 1
            return {"input": calib.x[self.i - 1 : self.i]}

    quantize_static(str(fp32), str(out), Reader())
    return out


def digits(work: Path, quick: bool) -> dict:
    import torch

    from examples.digits.build import train_teacher
    from examples.digits.data import load_splits
    from examples.digits.models import Student

    s = load_splits()
    teacher = train_teacher(*s["train"], epochs=8 if quick else 15)
    torch.manual_seed(1)
    student_steps = [
        Distill(student=Student(), epochs=8 if quick else 15, learning_rate=2e-3),
        PruneStructured(ratio=0.25, epochs=3),
        PruneMagnitude(sparsity=0.5, epochs=3),
    ]
    variants = [
        ("fp32", BuildConfig(formats=["onnx", "tflite"])),
        ("teacher-int8", BuildConfig(formats=["onnx", "tflite"], quantize=Quantize(mode="int8"))),
        (
            "student-int8",
            BuildConfig(
                formats=["onnx", "tflite"], steps=student_steps, quantize=Quantize(mode="int8", max_accuracy_drop=0.015)
            ),
        ),
    ]
    return run_example(
        "digits",
        teacher,
        variants,
        Dataset(*s["calib"], name="calib"),
        Dataset(*s["eval"], name="held-out split"),
        Dataset(*s["train"], name="train"),
        work,
        rounds=5,
        runs=100,
        extra={},
    )


def efficientnet(work: Path, quick: bool) -> dict:
    from examples.efficientnet_lite0.build import datasets
    from examples.efficientnet_lite0.photos import load_model

    calib, held = datasets(calib_per_photo=8 if quick else 16, eval_per_photo=16 if quick else 40)
    model = load_model()
    variants = [
        ("fp32", BuildConfig(formats=["onnx", "tflite"])),
        ("int8", BuildConfig(formats=["onnx", "tflite"], quantize=Quantize(mode="int8"))),
        # The example's setting: the accuracy gate may keep sensitive ops in float (ids say int8 or mixed).
        ("int8-gated", BuildConfig(formats=["onnx", "tflite"], quantize=Quantize(mode="int8", max_accuracy_drop=0.08))),
        ("dynamic", BuildConfig(formats=["onnx", "tflite"], quantize=Quantize(mode="dynamic"))),
        ("fp16", BuildConfig(formats=["onnx", "tflite"], quantize=Quantize(mode="fp16"))),
    ]
    # The peer baseline needs the same fp32 file our int8 started from: build it first.
    fp32 = build(model, work / "effnet-fp32-only.efb", BuildConfig(formats=["onnx"]), evaluation=held, progress=quiet)
    fp32_onnx = bundle_files(fp32.path, work)["onnx-fp32"][1]
    ort_q = ort_default_static(fp32_onnx, calib, work / "ort-quantize-static-defaults.onnx")
    return run_example(
        "efficientnet_lite0",
        model,
        variants,
        calib,
        held,
        None,
        work,
        rounds=5 if quick else 8,
        runs=20 if quick else 40,
        extra={"onnxruntime-quantize_static-defaults": ("onnx", ort_q)},
    )


def table(results: dict) -> str:
    lines = [
        f"# Compression benchmark\n\nMeasured {results['measured_at']} on {results['machine']}.\n"
        "Latency: batch 1, p50 over interleaved rounds in one process; ratios against the fp32 file of "
        "the same format.\n"
    ]
    for name, ex in results["examples"].items():
        lines.append(f"## {name}\n")
        lines.append(
            f"Evaluated on {ex['eval_samples']} samples ({ex['eval_set']}); "
            f"{'accuracy against labels' if ex['labels'] else 'agreement = top-1 agreement with fp32'}."
        )
        if ex.get("target"):
            lines.append(f"Target: {ex['target']}.\n")
        lines.append("| variant | format | bytes | size x | p50 ms | speed x | accuracy | agreement |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in ex["rows"]:
            lines.append(
                f"| {r['variant']} | {r['format']} | {r['size_bytes']} | {r['size_ratio'] or '-'} | "
                f"{r['latency_ms_p50']} | {r['speedup'] or '-'} | {r['accuracy'] if r['accuracy'] is not None else '-'}"
                f" | {r['agreement']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, views and timing rounds")
    ap.add_argument("--only", choices=["digits", "efficientnet_lite0"])
    args = ap.parse_args(argv)
    results: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "examples": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as d:
        work = Path(d)
        if args.only in (None, "digits"):
            results["examples"]["digits"] = digits(work, args.quick)
        if args.only in (None, "efficientnet_lite0"):
            results["examples"]["efficientnet_lite0"] = efficientnet(work, args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    md = table(results)
    (RESULTS / "compression.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
