"""The int8 weight rounding every quantizer used here applies, in one place."""

from __future__ import annotations

import numpy as np

__all__ = ["round_per_channel"]


def round_per_channel(w: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric per-channel int8 rounding (scale = max|w| / 127 per channel along AXIS), back in float.

    ONNX Runtime's QDQ quantizer and AI Edge Quantizer round weights this way; bias correction and
    sensitivity ranking must use the same rule to predict their error.
    """
    moved = np.moveaxis(w.astype(np.float32), axis, 0)
    scale = np.abs(moved).reshape(moved.shape[0], -1).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).reshape((-1,) + (1,) * (moved.ndim - 1))
    return np.moveaxis(np.clip(np.round(moved / scale), -127, 127) * scale, 0, axis).astype(np.float32)
