"""PyTorch quantization-aware training against post-training int8, on pretrained EfficientNet-Lite0.

Both builds start from the same model, calibration views and held-out views (those of
`benchmarks/int8_peers.py`): edgefleet's post-training int8 (`quantize int8`) and the `qat` pass on the
calibration views alone (no labels) followed by the same quantize step. Agreement is top-1 agreement with
the fp32 model on the held-out views; speed is against the fp32 ONNX export on ONNX Runtime, interleaved.
The QAT training curve (fake-quantized agreement on the calibration views after each epoch) is kept.

Target (issue 13): >= 97% agreement on Lite0's held-out views.

    .venv/bin/python benchmarks/qat.py [--epochs 6] [--lr 1e-5]

Writes benchmarks/results/qat.json and benchmarks/results/qat.md.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from int8_peers import SIZES, load  # noqa: E402

from edgefleet.converters import BuildConfig, Dataset, QuantAwareTraining, Quantize, build  # noqa: E402
from examples.efficientnet_lite0.photos import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, views  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_AGREEMENT = 0.97


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lite0", choices=sorted(SIZES))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    size = SIZES[args.model]
    calib = Dataset(views(CALIBRATION_PHOTOS, 16, seed=0, size=size), name="calibration-photos")
    held = Dataset(views(HELD_OUT_PHOTOS, 40, seed=7, size=size), name="held-out-photos")
    model = load(args.model)
    say = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    qat = QuantAwareTraining(epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="edgefleet-qat-") as d:
        for label, steps in (("post-training int8", []), (f"qat ({args.epochs} epochs) + int8", [qat])):
            t = time.perf_counter()
            res = build(
                model,
                Path(d) / "b.efb",
                BuildConfig(formats=["onnx"], steps=steps, quantize=Quantize(mode="int8")),
                calibration=calib,
                evaluation=held,
                progress=say,
            )
            (art,) = res.report["artifacts"]
            q = res.report["steps"][-1]["result"]["onnx"]
            if steps:
                curve = res.report["steps"][0]["result"]["curve"]
            rows.append(
                {
                    "build": label,
                    "agreement": art["agreement"],
                    "size_ratio": round(art["size_bytes"] / res.report["source"]["size_bytes"], 4),
                    "speedup": art["speed_vs_fp32"],
                    "activations": q.get("activations"),
                    "kept_in_float": len(q.get("kept_in_float", [])),
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
    results = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": args.model,
        "calibration_views": len(calib),
        "held_out_views": len(held),
        "qat": qat.params(),
        "rows": rows,
        "curve": curve,
        "target_agreement": TARGET_AGREEMENT,
        "met": any(r["agreement"] >= TARGET_AGREEMENT for r in rows[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qat.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    md = [
        f"# QAT against post-training int8: EfficientNet-{args.model.capitalize()}",
        "",
        f"Measured {results['measured_at']} on {results['machine']}; {len(calib)} calibration views (the only "
        f"training data, unlabelled), {len(held)} held-out views of other photos. qat {qat.params()}.",
        "",
        "| build | agreement | size x | speed x | activations | kept in float | build s |",
        "|---|---:|---:|---:|---|---:|---:|",
        *(
            f"| {r['build']} | {r['agreement']:.3f} | {r['size_ratio']:.3f} | {r['speedup']:.2f} | "
            f"{r['activations']} | {r['kept_in_float']} | {r['seconds']:.0f} |"
            for r in rows
        ),
        "",
        "Training curve: the distillation loss on augmented views, then the fake-quantized model's top-1 "
        "agreement with the float model and its loss on the calibration views (the epoch kept is the best).",
        "",
        "| epoch | training loss | agreement | loss |",
        "|---:|---:|---:|---:|",
        *(
            f"| {c['epoch']} | {c['loss'] if c['loss'] is not None else '-'} | {c['fake_quant_agreement']:.4f} | "
            f"{c.get('fake_quant_loss', float('nan')):.5f} |"
            for c in curve
        ),
        "",
        f"Target >= {TARGET_AGREEMENT:.0%} held-out agreement: {'met' if results['met'] else '**not met**'}.",
    ]
    (RESULTS / "qat.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
