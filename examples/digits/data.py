"""scikit-learn's digits (real labelled 8x8 images), split into train / calibration / held-out eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_splits(seed: int = 0, train_fraction: float = 0.6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train = int(len(x) * train_fraction)
    n_calib = 200
    return {
        "train": (x[:n_train], y[:n_train]),
        "calib": (x[n_train : n_train + n_calib], y[n_train : n_train + n_calib]),
        "eval": (x[n_train + n_calib :], y[n_train + n_calib :]),
    }


def save_npz(splits: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (x, y) in splits.items():
        paths[name] = out / f"{name}.npz"
        np.savez(paths[name], x=x, y=y)
    return paths
