"""Integer tensor (de)quantization as the manifest's tensor specs describe it.

The converters use this to evaluate int8-I/O files and the runtime uses it in `predict`, so the
rounding rule is written once: q = clip(round(x / scale) + zero_point), x = (q - zero_point) * scale.
"""

from __future__ import annotations

import numpy as np

from ._errors import BundleError
from ._manifest import TensorSpec

__all__ = ["dequantize", "quantize"]


def _params(spec: TensorSpec) -> tuple[float, int]:
    if spec.scale is None or spec.zero_point is None:
        raise BundleError(f"tensor '{spec.name}' has no quantization parameters")
    if len(spec.scale) != 1:
        # Per-axis quantization is for weights; a model's inputs and outputs are per-tensor.
        raise BundleError(f"tensor '{spec.name}' has per-axis quantization; model I/O must be per-tensor")
    return spec.scale[0], spec.zero_point[0]


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float X to the integer dtype of SPEC with its scale and zero point (saturating)."""
    scale, zp = _params(spec)
    dt = np.dtype(spec.dtype)
    info = np.iinfo(dt)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zp
    return np.clip(q, info.min, info.max).astype(dt)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Integer Q of SPEC back to float32."""
    scale, zp = _params(spec)
    return (q.astype(np.float32) - np.float32(zp)) * np.float32(scale)
