"""The one (de)quantization rule the converters and the runtime share."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet._manifest import TensorSpec
from edgefleet._quant import TensorCodec, dequantize, quantize


@pytest.mark.parametrize(("dtype", "scale", "zp"), [("int8", 0.0627, -3), ("uint8", 0.0039, 128), ("int8", 1e-3, 0)])
def test_quantize_rounds_half_to_even_and_saturates(dtype: str, scale: float, zp: int) -> None:
    spec = TensorSpec(name="x", dtype=dtype, shape=[None, 4], scale=[scale], zero_point=[zp])
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((500, 4)) * 5).astype(np.float32)
    x[0, :2] = [np.float32(scale) * 2.5, -np.float32(scale) * 1.5]  # exact halves: round half to even
    x[1, :2] = [1e9, -1e9]
    info = np.iinfo(dtype)
    expected = np.clip(np.rint(x / np.float32(scale)) + zp, info.min, info.max).astype(dtype)
    q = TensorCodec(spec).quantize(x)
    assert q.dtype == np.dtype(dtype) and np.array_equal(q, expected)
    assert np.array_equal(quantize(x.astype(np.float64), spec), expected)
    assert (q[1, 0], q[1, 1]) == (info.max, info.min)
    back = dequantize(q, spec)
    assert back.dtype == np.float32
    assert np.allclose(back, (expected.astype(np.float32) - zp) * np.float32(scale))
    inside = (expected > info.min) & (expected < info.max)
    assert np.all(np.abs(back - x)[inside] <= scale / 2 + 1e-6)


@pytest.mark.parametrize(("dtype", "scale", "zp"), [("int8", 0.0729, -7), ("uint8", 0.0039, 128), ("int16", 1e-4, 0)])
def test_dequantize_gives_the_float32_arithmetic_bit_for_bit(dtype: str, scale: float, zp: int) -> None:
    spec = TensorSpec(name="y", dtype=dtype, shape=[None, 10], scale=[scale], zero_point=[zp])
    info = np.iinfo(dtype)
    q = np.random.default_rng(1).integers(info.min, info.max + 1, (300, 10)).astype(dtype)
    q[0, :2] = [info.min, info.max]
    expected = (q.astype(np.float32) - np.float32(zp)) * np.float32(scale)
    codec = TensorCodec(spec)
    # contiguous, strided, transposed
    for arr, exp in ((q, expected), (q[:, ::3], expected[:, ::3]), (q.T, expected.T)):
        got = codec.dequantize(arr)
        assert got.dtype == np.float32 and got.shape == arr.shape and np.array_equal(got, exp)
