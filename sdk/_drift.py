"""Drift features and baselines: the statistics a bundle carries and devices report against.

Bins are given by their inner edges e_0 < ... < e_{k-2}; bin 0 is (-inf, e_0), bin i is
[e_{i-1}, e_i), the last bin is [e_{k-2}, +inf). Every value lands in exactly one bin,
so devices never drop out-of-range data, and fleet-side merging is a plain sum of counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import InputError

__all__ = [
    "BASELINE_VERSION",
    "MAX_PIXELS",
    "bin_counts",
    "compute_baseline",
    "input_features",
    "output_features",
    "window_counts",
]

BASELINE_VERSION = 1
DEFAULT_BINS = 10
# Devices summarise at most this many pixels per channel and sample (an even stride over the image):
# the proportions are the same in expectation and the cost stays small beside inference.
MAX_PIXELS = 4096


def bin_counts(values: np.ndarray, edges: list[float] | np.ndarray) -> np.ndarray:
    """Counts of VALUES per bin (len(edges) + 1 bins)."""
    e = np.asarray(edges, dtype=np.float64)
    idx = np.searchsorted(e, np.asarray(values, dtype=np.float64).ravel(), side="right")
    return np.bincount(idx, minlength=len(e) + 1).astype(np.int64)


def _quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [0.0]
    qs = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(np.round(qs, 6))
    if edges.size == 0:
        edges = np.array([float(v[0])])
    return [float(x) for x in edges]


def _image_axes(x: np.ndarray, layout: str) -> tuple[int, int] | None:
    """(channel axis, channel count) for image-like batches, else None."""
    if x.ndim == 4 and layout in ("NCHW", "NHWC"):
        ax = 1 if layout == "NCHW" else 3
        return ax, int(x.shape[ax])
    return None


def input_features(x: np.ndarray, layout: str, max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Named feature values of a batch: pixel-level channel intensities and per-sample summaries.

    Images: `channel_<c>_intensity` (every pixel), `brightness` (per-sample mean) and
    `contrast` (per-sample std). Other inputs: `feature_<i>` per column of the flattened sample
    (first 64 columns, to bound the telemetry size), plus `mean` and `std` per sample.
    With MAX_PIXELS, images are summarised on an even stride of at most that many pixels per channel.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise InputError(f"input batch must have a batch dimension; got shape {x.shape}")
    n = x.shape[0]
    flat = x.reshape(n, -1)
    feats: dict[str, np.ndarray] = {}
    img = _image_axes(x, layout)
    if img is not None:
        ax, c = img
        chans = np.moveaxis(x, ax, 1).reshape(n, c, -1)
        if max_pixels is not None and chans.shape[2] > max_pixels:
            chans = chans[:, :, :: -(-chans.shape[2] // max_pixels)]
            flat = chans.reshape(n, -1)
        for i in range(c):
            feats[f"channel_{i}_intensity"] = chans[:, i, :]
        feats["brightness"] = flat.mean(axis=1)
        feats["contrast"] = flat.std(axis=1)
    else:
        for i in range(min(flat.shape[1], 64)):
            feats[f"feature_{i}"] = flat[:, i]
        feats["mean"] = flat.mean(axis=1)
        feats["std"] = flat.std(axis=1)
    return feats


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def output_features(y: np.ndarray, logits: bool) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, confidence) per sample of a classifier's output batch."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    probs = _softmax(y) if logits else y
    return probs.argmax(axis=1), probs.max(axis=1)


def looks_like_logits(y: np.ndarray) -> bool:
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return not (np.all(y >= -1e-6) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3))


def compute_baseline(x: np.ndarray, y: np.ndarray, layout: str, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """The drift baseline for a manifest, from reference inputs X and the model's outputs Y."""
    features = []
    for name, values in input_features(x, layout).items():
        edges = _quantile_edges(values, bins)
        counts = bin_counts(values, edges)
        features.append(
            {
                "name": name,
                "level": "pixel" if values.ndim > 1 else "sample",
                "edges": edges,
                "proportions": [round(float(c), 8) for c in counts / max(1, counts.sum())],
            }
        )
    logits = looks_like_logits(y)
    cls, conf = output_features(y, logits)
    k = int(np.asarray(y).reshape(len(y), -1).shape[1])
    cls_counts = np.bincount(cls, minlength=k)
    conf_edges = [round(float(e), 2) for e in np.linspace(0.1, 0.9, 9)] + [0.95, 0.99]
    conf_counts = bin_counts(conf, conf_edges)
    return {
        "version": BASELINE_VERSION,
        "n_samples": len(x),
        "layout": layout,
        "inputs": features,
        "outputs": {
            "apply_softmax": logits,
            "predicted_class": {"proportions": [round(float(c), 8) for c in cls_counts / max(1, cls_counts.sum())]},
            "confidence": {
                "edges": conf_edges,
                "proportions": [round(float(c), 8) for c in conf_counts / max(1, conf_counts.sum())],
            },
        },
    }


def window_counts(
    x: np.ndarray, y: np.ndarray, baseline: dict[str, Any], max_pixels: int | None = MAX_PIXELS
) -> dict[str, Any]:
    """Counts of a batch on BASELINE's bins: what a device adds to its telemetry window.

    Returns `{"inputs": {feature: counts}, "predicted_class": counts, "confidence": counts}`,
    plain int lists that merge across devices and windows by addition.
    """
    feats = input_features(x, str(baseline.get("layout", "NC")), max_pixels)
    inputs = {
        f["name"]: bin_counts(feats[f["name"]], f["edges"]).tolist() for f in baseline["inputs"] if f["name"] in feats
    }
    out = baseline["outputs"]
    cls, conf = output_features(y, bool(out["apply_softmax"]))
    k = len(out["predicted_class"]["proportions"])
    return {
        "inputs": inputs,
        "predicted_class": np.bincount(np.minimum(cls, k - 1), minlength=k).tolist(),
        "confidence": bin_counts(conf, out["confidence"]["edges"]).tolist(),
    }
