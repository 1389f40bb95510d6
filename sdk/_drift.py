"""Drift features and baselines: the statistics a bundle carries and devices report against.

Bins are given by their inner edges e_0 < ... < e_{k-2}; bin 0 is (-inf, e_0), bin i is
[e_{i-1}, e_i), the last bin is [e_{k-2}, +inf). Every value lands in exactly one bin,
so devices never drop out-of-range data, and fleet-side merging is a plain sum of counts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._errors import InputError

__all__ = [
    "BASELINE_VERSION",
    "MAX_PIXELS",
    "bin_counts",
    "chi2_goodness",
    "chi2_sf",
    "chi2_two_sample",
    "compute_baseline",
    "input_features",
    "js_distance",
    "ks_binned",
    "output_features",
    "psi",
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


def output_features(y: np.ndarray, logits: bool) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, confidence) per sample of a classifier's output batch."""
    y = np.asarray(y).reshape(len(y), -1)
    if y.dtype not in (np.float32, np.float64):
        y = y.astype(np.float64)
    cls = y.argmax(axis=1)
    top = np.take_along_axis(y, cls[:, None], axis=1)
    if not logits:
        return cls, top[:, 0].astype(np.float64)
    # The largest softmax probability is 1 / sum(exp(z - max z)): no full probability matrix, and in the
    # outputs' own precision. A device counts every call's outputs, right after inference, so this matters.
    e = np.subtract(y, top)
    np.exp(e, out=e)
    return cls, 1.0 / e.sum(axis=1, dtype=np.float64)


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
    x: np.ndarray | None, y: np.ndarray, baseline: dict[str, Any], max_pixels: int | None = MAX_PIXELS
) -> dict[str, Any]:
    """Counts of a batch on BASELINE's bins: what a device adds to its telemetry window.

    Returns `{"inputs": {feature: counts}, "predicted_class": counts, "confidence": counts}`,
    plain int lists that merge across devices and windows by addition. With X None, outputs only.
    """
    inputs = {}
    if x is not None:
        feats = input_features(x, str(baseline.get("layout", "NC")), max_pixels)
        inputs = {
            f["name"]: bin_counts(feats[f["name"]], f["edges"]).tolist()
            for f in baseline["inputs"]
            if f["name"] in feats
        }
    out = baseline["outputs"]
    cls, conf = output_features(y, bool(out["apply_softmax"]))
    k = len(out["predicted_class"]["proportions"])
    return {
        "inputs": inputs,
        "predicted_class": np.bincount(np.minimum(cls, k - 1), minlength=k).tolist(),
        "confidence": bin_counts(conf, out["confidence"]["edges"]).tolist(),
    }


# -- drift statistics on binned data -----------------------------------------------------------------
# All take counts or proportions on the same bins (a baseline's proportions, a window's counts).
# PSI uses a floor of PSI_EPS on every proportion, so empty bins give a finite value.

PSI_EPS = 1e-4


def _props(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or np.any(a < 0) or not np.all(np.isfinite(a)):
        raise InputError("drift statistics need a non-empty 1-D list of non-negative counts or proportions")
    s = a.sum()
    return a / s if s > 0 else a


def _pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _props(p), _props(q)
    if a.shape != b.shape:
        raise InputError(f"drift statistics need the same bins on both sides; got {a.size} and {b.size} bins")
    return a, b


def psi(reference: Any, current: Any, eps: float = PSI_EPS) -> float:
    """Population stability index: sum((c - r) * ln(c / r)), proportions floored at EPS."""
    r, c = _pair(reference, current)
    r, c = np.maximum(r, eps), np.maximum(c, eps)
    return float(np.sum((c - r) * np.log(c / r)))


def js_distance(reference: Any, current: Any) -> float:
    """Jensen-Shannon distance (square root of the divergence, base 2: 0 = same, 1 = disjoint)."""
    p, q = _pair(reference, current)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def ks_binned(reference: Any, current: Any) -> float:
    """Kolmogorov-Smirnov statistic on the binned CDFs: max |F - G| at the bin edges.

    The statistic on the raw values differs from it by at most the largest single-bin proportion
    of either side (inside a bin each CDF moves by at most its bin's mass).
    """
    p, q = _pair(reference, current)
    return float(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))


def _gammaincc(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series / continued fraction, as in Numerical Recipes)."""
    if x <= 0:
        return 1.0
    gln = math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - gln))
    b = x + 1 - a
    c = 1.0 / 1e-300
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - gln) * h)


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= STAT) for a chi-square variable with DOF degrees of freedom."""
    if dof <= 0:
        return 1.0
    return _gammaincc(dof / 2.0, stat / 2.0)


def chi2_goodness(reference: Any, current_counts: Any) -> tuple[float, float]:
    """Pearson chi-square of CURRENT_COUNTS against REFERENCE proportions: (statistic, p-value).

    Bins with zero reference proportion are left out (they cannot be tested against).
    """
    r = _props(reference)
    obs = np.asarray(current_counts, dtype=np.float64)
    if obs.shape != r.shape:
        raise InputError(f"drift statistics need the same bins on both sides; got {r.size} and {obs.size} bins")
    n = obs.sum()
    keep = r > 0
    if n == 0 or keep.sum() < 2:
        return 0.0, 1.0
    exp = r[keep] * n
    stat = float(np.sum((obs[keep] - exp) ** 2 / exp))
    return stat, chi2_sf(stat, int(keep.sum()) - 1)


def chi2_two_sample(a_counts: Any, b_counts: Any) -> tuple[float, float]:
    """Chi-square test of homogeneity of two count vectors on the same bins: (statistic, p-value)."""
    a = np.asarray(a_counts, dtype=np.float64)
    b = np.asarray(b_counts, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"drift statistics need the same bins on both sides; got {a.size} and {b.size} bins")
    cols = a + b
    keep = cols > 0
    na, nb = a.sum(), b.sum()
    if na == 0 or nb == 0 or keep.sum() < 2:
        return 0.0, 1.0
    total = na + nb
    ea, eb = cols[keep] * na / total, cols[keep] * nb / total
    stat = float(np.sum((a[keep] - ea) ** 2 / ea) + np.sum((b[keep] - eb) ** 2 / eb))
    return stat, chi2_sf(stat, int(keep.sum()) - 1)
