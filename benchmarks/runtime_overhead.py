"""Runtime overhead: `model.predict` (with and without telemetry) against the bare backend call, side by
side in one process, plus import time and resident memory of `edgefleet.runtime`.

Models: the digits example (tiny int8 CNN; ONNX Runtime and LiteRT files) and EfficientNet-Lite0
(int8 ONNX). Batch 1, rounds interleaved so machine noise hits every variant alike; the figure per
variant is the median over rounds of the mean per-call time in a round, and the overhead is taken in
each round against that round's bare call (median over rounds), so drift in the VM's speed cancels.

    .venv/bin/python benchmarks/runtime_overhead.py [--rounds 30]

Writes benchmarks/results/runtime_overhead.json and benchmarks/results/runtime_overhead.md.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgefleet.runtime as rt  # noqa: E402
from edgefleet._quant import TensorCodec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
GAP_US = 12.0
TARGETS = {"tiny": "telemetry on adds <= 15 us per call", "efficientnet": "telemetry on adds <= 5%"}


def _bundles() -> dict[str, Path]:
    """Build (once, cached) the bundles the benchmark runs."""
    CACHE.mkdir(parents=True, exist_ok=True)
    digits = CACHE / "digits" / "digits-1.0.0.efb"
    if not digits.exists():
        subprocess.run(
            [sys.executable, "-m", "examples.digits.build", "--out", str(digits.parent)],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    eff = CACHE / "efficientnet" / "efficientnet_lite0.efb"
    if not eff.exists():
        from edgefleet.converters import BuildConfig, Quantize, build
        from examples.efficientnet_lite0.build import datasets
        from examples.efficientnet_lite0.photos import MEAN, STD, load_model

        calib, held = datasets(calib_per_photo=8, eval_per_photo=8)
        cfg = BuildConfig(
            name="efficientnet_lite0",
            version="1.0.0",
            formats=["onnx"],
            layout="NCHW",
            preprocessing={"resize": [224, 224], "mean": MEAN.tolist(), "std": STD.tolist()},
            quantize=Quantize(mode="int8", max_accuracy_drop=0.99),
        )
        build(load_model(), eff, cfg, calibration=calib, evaluation=held, progress=lambda m: None)
    return {"digits": digits, "efficientnet": eff}


def _bare(model: rt.Model) -> Any:
    """The plain backend call on the very session the model holds: what an app would write without edgefleet,
    float in and float out like `predict` (an int8-I/O file's scales read once, as an app would).

    Sharing the session keeps one thread pool in the process, so variants do not slow each other down.
    """
    session: Any = model._session
    if model.entry.format == "onnx":
        s = session._s
        name = s.get_inputs()[0].name
        return lambda x: s.run(None, {name: x})[0]
    it = session._it
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    spec_in, spec_out = model.entry.inputs[0], model.entry.outputs[0]
    q_in = TensorCodec(spec_in).quantize if spec_in.scale is not None else (lambda x: x)
    dq_out = TensorCodec(spec_out).dequantize if spec_out.scale is not None else (lambda y: y)

    def call(x: np.ndarray) -> np.ndarray:
        it.set_tensor(i, q_in(x))
        it.invoke()
        return dq_out(it.get_tensor(o))

    return call


def _with_gap(fn: Any, us: float) -> Any:
    """FN followed by US microseconds of busy work: an app doing anything between two calls."""
    s, clock = us / 1e6, time.perf_counter

    def call(x: np.ndarray) -> np.ndarray:
        y = fn(x)
        t = clock()
        while clock() - t < s:
            pass
        return y

    return call


def _time_calls(fn: Any, x: np.ndarray, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - t0) / n * 1e6


def measure(path: Path, backend: str, rounds: int, calls: int, tmp: Path, threads: int | None) -> dict[str, Any]:
    model = rt.load(path, allow_unsigned=True, backend=backend, threads=threads)
    buf = rt.TelemetryBuffer(tmp / f"{path.stem}-{backend}-{threads}.db")
    agg = model.attach_telemetry(buf, device_id="bench", window_s=60)
    bare = _bare(model)
    x = model.bundle.golden_inputs()[:1].astype(np.float32)

    def plain(x: np.ndarray) -> np.ndarray:
        return model.predict(x)

    variants = {
        "bare": (bare, None),
        f"bare+{GAP_US:g}us": (_with_gap(bare, GAP_US), None),
        "predict": (plain, None),
        "predict+telemetry": (plain, agg),
    }
    per: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants.items())
    for r in range(rounds + 1):
        # Every other round runs the variants in reverse, so no variant always follows the same one.
        for k, (fn, tel) in order if r % 2 else order[::-1]:
            model._telemetry = tel
            t = _time_calls(fn, x, calls)
            if r:  # round 0 warms up
                per[k].append(t)
    med = {k: float(np.median(v)) for k, v in per.items()}
    # Overhead is taken per round against the bare call of the same round, then the median: the VM's speed
    # drifts from round to round, and a difference of two separate medians picks up that drift.
    diffs = np.asarray(per["predict+telemetry"]) - np.asarray(per["bare"])
    ratios = np.asarray(per["predict+telemetry"]) / np.asarray(per["bare"])
    plain_diffs = np.asarray(per["predict"]) - np.asarray(per["bare"])
    gap = np.asarray(per[f"bare+{GAP_US:g}us"]) - np.asarray(per["bare"]) - GAP_US
    model._telemetry = agg
    model.flush_telemetry()
    windows = list(buf.windows())
    buf.close()
    return {
        "model": f"{model.info.bundle} {model.info.model_id}",
        "backend": f"{model.info.backend} {model.info.backend_version} ({model.info.accelerator})",
        # None: the runtime's own choice (`load(threads=None)`), shown with what it chose.
        "threads": threads if threads is not None else f"auto: {model.info.threads}",
        "us_per_call": {k: round(v, 2) for k, v in med.items()},
        "overhead_us": round(float(np.median(diffs)), 2),
        "overhead_pct": round(float(np.median(ratios) - 1) * 100, 2),
        "overhead_no_telemetry_us": round(float(np.median(plain_diffs)), 2),
        # What GAP_US of the app's own work between two bare calls costs beyond itself (thread pool wake-ups).
        "gap_cost_us": round(float(np.median(gap)), 2),
        "calls_recorded": sum(w["calls"] for w in windows),
    }


def _subprocess_figure(code: str, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        best = min(best, float(out.stdout.strip().splitlines()[-1]))
    return best


def footprint(digits: Path) -> dict[str, Any]:
    imp = "import time; t=time.perf_counter(); import {m}; print(time.perf_counter()-t)"
    rss = (
        "import numpy as np\n{setup}\n"
        "x = np.zeros((1, 1, 8, 8), np.float32)\nfor _ in range(200): f(x)\n"
        # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
        "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024)"
    )
    ef = (
        f"import tempfile, edgefleet.runtime as rt\nm = rt.load({str(digits)!r}, allow_unsigned=True, backend='onnx')\n"
        "m.attach_telemetry(rt.TelemetryBuffer(tempfile.mkdtemp() + '/t.db'), device_id='b')\nf = m.predict"
    )
    bare = (
        f"import zipfile, onnxruntime as ort\nd = zipfile.ZipFile({str(digits)!r}).read('models/onnx-int8.onnx')\n"
        "s = ort.InferenceSession(d, providers=['CPUExecutionProvider'])\nf = lambda x: s.run(None, {'input': x})"
    )
    return {
        "import_s": {
            "edgefleet.runtime": round(_subprocess_figure(imp.format(m="edgefleet.runtime")), 4),
            "onnxruntime": round(_subprocess_figure(imp.format(m="onnxruntime")), 4),
            "ai_edge_litert.interpreter": round(_subprocess_figure(imp.format(m="ai_edge_litert.interpreter")), 4),
        },
        "max_rss_mb": {
            "edgefleet (load + 200 predicts, telemetry on)": round(_subprocess_figure(rss.format(setup=ef), 3), 1),
            "bare onnxruntime (same model, 200 runs)": round(_subprocess_figure(rss.format(setup=bare), 3), 1),
        },
        "edgefleet.runtime imports torch or tensorflow": subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, edgefleet.runtime; print(any(m in sys.modules for m in ('torch', 'tensorflow')))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        == "True",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    bundles = _bundles()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            {"case": "tiny", **measure(bundles["digits"], backend, args.rounds, 2000, Path(tmp), threads)}
            for backend in ("onnx", "tflite")
            for threads in (None, 1, 2)
        ]
        eff = measure(bundles["efficientnet"], "onnx", args.rounds, 40, Path(tmp), None)
        rows.append({"case": "efficientnet", **eff})
    for r in rows:
        r["target"] = TARGETS[r["case"]]
        r["met"] = r["overhead_us"] <= 15 if r["case"] == "tiny" else r["overhead_pct"] <= 5
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "rounds": args.rounds,
        "rows": rows,
        "footprint": footprint(bundles["digits"]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Runtime overhead",
        "",
        f"Machine: {result['machine']}; Python {result['python']}; batch 1; median of {args.rounds} interleaved "
        "rounds. Overhead = `predict` with telemetry on minus the bare backend call on the same file, per round, "
        "median over rounds.",
        "",
        "| model | backend | threads | bare µs | predict µs | predict+telemetry µs | overhead | target | met "
        f"| cost of {GAP_US:g} µs app work between bare calls |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        u = r["us_per_call"]
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['threads']} | {u['bare']:.1f} | {u['predict']:.1f} | "
            f"{u['predict+telemetry']:.1f} | {r['overhead_us']:+.1f} µs ({r['overhead_pct']:+.1f}%) | "
            f"{r['target']} | {'yes' if r['met'] else 'NO'} | {r['gap_cost_us']:+.1f} µs |"
        )
    lines += [
        "",
        "The bare call is float in, float out like `predict` (an int8-I/O file quantized and dequantized "
        "with scales read once). The last column is what the app's own work between two bare calls costs "
        f"beyond itself: {GAP_US:g} µs of busy work. With two threads, LiteRT's XNNPACK workers spin a few "
        "µs after an invoke and then sleep; a call after a longer gap pays for waking them, with or without "
        "edgefleet. Tiny models run faster on one thread (see the bare column); `auto` is what `load` picks "
        "when the app does not set threads: it times the model on all cores and, when it is small, on one.",
    ]
    fp = result["footprint"]
    lines += ["", "| import | seconds (best of 5) |", "|---|---:|"]
    lines += [f"| `{k}` | {v:.3f} |" for k, v in fp["import_s"].items()]
    lines += ["", "| process | max RSS (MB) |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in fp["max_rss_mb"].items()]
    lines += [
        "",
        f"`edgefleet.runtime` pulls in torch or tensorflow: {fp['edgefleet.runtime imports torch or tensorflow']}",
    ]
    (RESULTS / "runtime_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
