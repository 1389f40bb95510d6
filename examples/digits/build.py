"""Digits, end to end: train a teacher CNN, distill a small student, prune it, quantize to int8,
and write a signed bundle holding ONNX and TFLite files.

    python -m examples.digits.build --out build/digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgefleet.converters import BuildConfig, Dataset, Distill, PruneMagnitude, PruneStructured, Quantize, build

from .._common import run, signing_key
from .data import load_splits, save_npz
from .models import Student, Teacher


def train_teacher(x: np.ndarray, y: np.ndarray, epochs: int = 15, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Teacher()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            loss.backward()
            opt.step()
        print(f"[digits] teacher epoch {epoch + 1}/{epochs} loss {float(loss):.4f}", file=sys.stderr)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/digits", type=Path)
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--key", type=Path, help="signing key (created under --out if missing)")
    ap.add_argument("--train-fraction", type=float, default=0.6, help="share of the data used for training")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--formats", default="onnx,tflite")
    args = ap.parse_args(argv)
    out: Path = args.out
    splits = load_splits(train_fraction=args.train_fraction)
    paths = save_npz(splits, out / "data")
    teacher = train_teacher(*splits["train"], epochs=args.epochs)
    # The teacher is also written as a torch.export program, the file a build pipeline would pass on.
    torch.export.save(torch.export.export(teacher, (torch.from_numpy(splits["eval"][0][:1]),)), out / "teacher.pt2")
    key_path = args.key or out / "signing.key"
    key = signing_key(key_path)
    torch.manual_seed(1)
    cfg = BuildConfig(
        name="digits",
        version=args.version,
        formats=args.formats.split(","),
        layout="NCHW",
        labels=[str(i) for i in range(10)],
        preprocessing={"scale": 1 / 16, "mean": [0.0], "std": [1.0], "input_range": [0.0, 1.0]},
        steps=[
            Distill(student=Student(), temperature=4.0, alpha=0.7, epochs=args.epochs, learning_rate=2e-3),
            PruneStructured(ratio=0.25, epochs=4),
            PruneMagnitude(sparsity=0.5, epochs=4, steps=4),
        ],
        quantize=Quantize(mode="int8", calibration="minmax", max_accuracy_drop=0.01),
    )
    result = build(
        teacher,
        out / f"digits-{args.version}.efb",
        cfg,
        calibration=Dataset(*splits["calib"], name="calib.npz"),
        evaluation=Dataset(*splits["eval"], name="eval.npz"),
        train=Dataset(*splits["train"], name="train.npz"),
        signing_key=key,
        report_path=out / f"digits-{args.version}.report.json",
        echo_table=True,
    )
    print(json.dumps({"bundle": str(result.path), "data": {k: str(v) for k, v in paths.items()}}))
    return 0


if __name__ == "__main__":
    run(main)
