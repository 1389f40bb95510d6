"""Digits, end to end: train a teacher CNN, distill a small student, prune it, quantize to int8,
and write a signed bundle holding ONNX and TFLite files.

    python -m examples.digits.build --out build/digits
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgefleet import SigningKey
from edgefleet.converters import (
    BuildConfig,
    BuildResult,
    Dataset,
    Distill,
    PruneMagnitude,
    PruneStructured,
    Quantize,
    build,
)

from .._common import run, signing_key
from .data import load_splits, save_npz
from .models import DebugBranch, Student, Teacher

LABELS = [str(i) for i in range(10)]
PREPROCESSING = {"scale": 1 / 16, "mean": [0.0], "std": [1.0], "input_range": [0.0, 1.0]}


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


def build_digits(
    out: Path,
    key: SigningKey,
    version: str = "1.0.0",
    train_fraction: float = 0.6,
    epochs: int = 15,
    formats: tuple[str, ...] = ("onnx", "tflite"),
    echo_table: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[BuildResult, nn.Module, dict[str, Path]]:
    """Teacher -> distilled student -> pruned (channels, then magnitude) -> int8, signed.

    Returns the build result, the trained teacher and the data splits written as .npz files."""
    splits = load_splits(train_fraction=train_fraction)
    result, teacher, paths = _build(out, key, version, splits, epochs, formats, echo_table, progress)
    return result, teacher, paths


def build_retrained(
    out: Path,
    key: SigningKey,
    captured: tuple[np.ndarray, np.ndarray],
    version: str = "4.0.0",
    epochs: int = 15,
    train_fraction: float = 0.7,
    progress: Callable[[str], None] | None = None,
) -> tuple[BuildResult, dict[str, int]]:
    """The release for a cohort whose inputs changed: retrained on the original training split plus 40% of
    the labelled samples its devices captured after the change (CAPTURED: x, y; repeated so that they weigh
    as much as the original data), calibrated on 20% and evaluated on the other 40% of them. The build's
    accuracy gate, the bundle's reference accuracy and its drift baseline are then the cohort's inputs as
    they are now. Returns the build result and how many captured samples went where."""
    x, y = captured
    if len(x) < 50:
        raise ValueError(f"{len(x)} captured samples are too few to retrain on (at least 50)")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    n_train, n_calib = int(len(x) * 0.4), int(len(x) * 0.2)
    base = load_splits(train_fraction=train_fraction)["train"]
    times = max(1, len(base[0]) // max(n_train, 1))
    splits = {
        "train": (
            np.concatenate([base[0], np.repeat(x[:n_train], times, axis=0)]),
            np.concatenate([base[1], np.repeat(y[:n_train], times)]),
        ),
        "calib": (x[n_train : n_train + n_calib], y[n_train : n_train + n_calib]),
        "eval": (x[n_train + n_calib :], y[n_train + n_calib :]),
    }
    result, _, _ = _build(out, key, version, splits, epochs, ("onnx", "tflite"), False, progress)
    return result, {"train": n_train, "calib": n_calib, "eval": len(x) - n_train - n_calib, "original": len(base[0])}


def _build(
    out: Path,
    key: SigningKey,
    version: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    epochs: int,
    formats: tuple[str, ...],
    echo_table: bool,
    progress: Callable[[str], None] | None,
) -> tuple[BuildResult, nn.Module, dict[str, Path]]:
    paths = save_npz(splits, out / "data")
    teacher = train_teacher(*splits["train"], epochs=epochs)
    # The teacher is also written as a torch.export program, the file a build pipeline would pass on.
    torch.export.save(torch.export.export(teacher, (torch.from_numpy(splits["eval"][0][:1]),)), out / "teacher.pt2")
    torch.manual_seed(1)
    cfg = BuildConfig(
        name="digits",
        version=version,
        formats=list(formats),
        layout="NCHW",
        labels=LABELS,
        preprocessing=PREPROCESSING,
        steps=[
            Distill(student=Student(), temperature=4.0, alpha=0.7, epochs=epochs, learning_rate=2e-3),
            PruneStructured(ratio=0.25, epochs=4),
            PruneMagnitude(sparsity=0.5, epochs=4, steps=4),
        ],
        quantize=Quantize(mode="int8", calibration="minmax"),
        # The whole build's budget: the distilled, pruned, int8 student may lose up to 3 points of the
        # teacher's accuracy on the held-out split (with the full training set it loses none; the demo's v1
        # trains on 40% of it).
        max_accuracy_drop=0.03,
    )
    extra = {} if progress is None else {"progress": progress}
    result = build(
        teacher,
        out / f"digits-{version}.efb",
        cfg,
        calibration=Dataset(*splits["calib"], name="calib.npz"),
        evaluation=Dataset(*splits["eval"], name="eval.npz"),
        train=Dataset(*splits["train"], name="train.npz"),
        signing_key=key,
        report_path=out / f"digits-{version}.report.json",
        echo_table=echo_table,
        **extra,
    )
    return result, teacher, paths


def build_regressed(
    out: Path,
    key: SigningKey,
    teacher: nn.Module,
    data: dict[str, Path],
    version: str = "3.0.0",
    layers: int = 150,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """A deliberately bad release: the teacher exported with a leftover debugging branch (see
    `DebugBranch`). Its predictions are right and it passes every build-time check and the device's
    smoke test; only its latency on the device gives it away."""
    calib, ev = (np.load(data[k]) for k in ("calib", "eval"))
    cfg = BuildConfig(
        name="digits", version=version, formats=["onnx"], layout="NCHW", labels=LABELS, preprocessing=PREPROCESSING
    )
    extra = {} if progress is None else {"progress": progress}
    return build(
        DebugBranch(teacher, layers=layers).eval(),
        out / f"digits-{version}.efb",
        cfg,
        calibration=Dataset(calib["x"], calib["y"], name="calib.npz"),
        evaluation=Dataset(ev["x"], ev["y"], name="eval.npz"),
        signing_key=key,
        report_path=out / f"digits-{version}.report.json",
        **extra,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/digits", type=Path)
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--key", type=Path, help="signing key (created under --out if missing)")
    ap.add_argument("--train-fraction", type=float, default=0.6, help="share of the data used for training")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--formats", default="onnx,tflite")
    args = ap.parse_args(argv)
    key = signing_key(args.key or args.out / "signing.key")
    result, _, paths = build_digits(
        args.out, key, args.version, args.train_fraction, args.epochs, tuple(args.formats.split(","))
    )
    print(json.dumps({"bundle": str(result.path), "data": {k: str(v) for k, v in paths.items()}}))
    return 0


if __name__ == "__main__":
    run(main)
