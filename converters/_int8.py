"""The int8 weight rounding every quantizer used here applies, and the bias correction built on it, in
one place (each framework backend only gathers the layer inputs' channel means)."""

from __future__ import annotations

import numpy as np

__all__ = ["bias_shift", "round_per_channel"]


def round_per_channel(w: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric per-channel int8 rounding (scale = max|w| / 127 per channel along AXIS), back in float.

    ONNX Runtime's QDQ quantizer and AI Edge Quantizer round weights this way; bias correction and
    sensitivity ranking must use the same rule to predict their error.
    """
    moved = np.moveaxis(w.astype(np.float32), axis, 0)
    scale = np.abs(moved).reshape(moved.shape[0], -1).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).reshape((-1,) + (1,) * (moved.ndim - 1))
    return np.moveaxis(np.clip(np.round(moved / scale), -127, 127) * scale, 0, axis).astype(np.float32)


def bias_shift(w: np.ndarray, mean_in: np.ndarray, groups: int = 1) -> np.ndarray:
    """The mean output shift per output channel that int8 rounding of W causes, to subtract from the bias.

    W is output channel first: (out, in) for a dense layer, (out, in / GROUPS, *kernel) for a convolution.
    MEAN_IN: each input channel's mean over the calibration set (over positions too, for a convolution).
    Rounding gives W + dW; on such inputs the outputs move by dW · mean on average, and removing that
    systematic part of the error is what helps early depthwise convolutions most.
    """
    w64 = w.astype(np.float64)
    dw = round_per_channel(w.astype(np.float32), 0).astype(np.float64) - w64
    m = np.asarray(mean_in, dtype=np.float64)
    if w.ndim == 2:
        return dw @ m
    per_in = dw.sum(axis=tuple(range(2, dw.ndim)))  # (out, in / groups), for 1-, 2- and 3-d convolutions
    cin = w.shape[1]
    group_of = np.arange(w.shape[0]) // (w.shape[0] // groups)
    idx = group_of[:, None] * cin + np.arange(cin)[None, :]
    return (per_in * m[idx]).sum(axis=1)
