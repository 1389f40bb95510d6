"""Integer tensor (de)quantization as the manifest's tensor specs describe it.

The converters use this to evaluate int8-I/O files and the runtime uses it in `predict`, so the
rounding rule is written once: q = clip(round(x / scale) + zero_point), x = (q - zero_point) * scale.
"""

from __future__ import annotations

import numpy as np

from ._errors import BundleError
from ._manifest import TensorSpec

__all__ = ["TensorCodec", "dequantize", "quantize"]


def _params(spec: TensorSpec) -> tuple[float, int]:
    if spec.scale is None or spec.zero_point is None:
        raise BundleError(f"tensor '{spec.name}' has no quantization parameters")
    if len(spec.scale) != 1:
        # Per-axis quantization is for weights; a model's inputs and outputs are per-tensor.
        raise BundleError(f"tensor '{spec.name}' has per-axis quantization; model I/O must be per-tensor")
    return spec.scale[0], spec.zero_point[0]


class TensorCodec:
    """Quantization of one tensor with its parameters read once: what `predict` runs on every call."""

    __slots__ = ("_table", "dtype", "hi", "lo", "scale", "zero_point")

    def __init__(self, spec: TensorSpec) -> None:
        scale, zp = _params(spec)
        self.dtype = np.dtype(spec.dtype)
        info = np.iinfo(self.dtype)
        self.lo, self.hi = np.float32(info.min), np.float32(info.max)
        self.scale = np.float32(scale)
        self.zero_point = np.float32(zp)
        self._table: np.ndarray | None = None
        if self.dtype.itemsize == 1:
            # Every 8-bit value's float, by the same float32 arithmetic as below, indexed by the value's
            # bits: one numpy call per output instead of three, which counts on a tiny model's call.
            codes = np.arange(256, dtype=np.uint8).view(self.dtype).astype(np.float32)
            self._table = (codes - self.zero_point) * self.scale

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float X to the integer dtype (saturating)."""
        q = np.divide(x, self.scale, dtype=np.float32)
        np.rint(q, out=q)
        q += self.zero_point
        np.clip(q, self.lo, self.hi, out=q)
        return q.astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Integer Q back to float32."""
        if self._table is not None and q.dtype == self.dtype:
            return self._table.take(q.view(np.uint8))
        x = q.astype(np.float32)
        x -= self.zero_point
        x *= self.scale
        return x


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float X to the integer dtype of SPEC with its scale and zero point (saturating)."""
    return TensorCodec(spec).quantize(np.asarray(x))


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Integer Q of SPEC back to float32."""
    return TensorCodec(spec).dequantize(np.asarray(q))
