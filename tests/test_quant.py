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


def test_accuracy_control_keeps_the_fewest_sensitive_units_that_meet_the_gate(tmp_path) -> None:
    """The neutral search, over a format whose score is the share of 'bad' units kept in float."""
    from edgefleet.converters._accuracy_control import exclusion_steps, keep_sensitive_in_float
    from edgefleet.converters._gate import Budget, GateError

    assert exclusion_steps(1) == [1] and exclusion_steps(5) == [1, 2, 3, 4, 5]
    assert exclusion_steps(200)[-3:] == [96, 128, 200]

    class Format:
        fmt, unit = "test", "unit"

        def __init__(self, bad: int, order: list[str]) -> None:
            self.bad, self.order, self.scores = bad, order, {}

        def rank(self) -> list[str]:
            return self.order

        def quantize(self, kept_float: list[str]):
            path = tmp_path / f"q{len(kept_float)}"
            # 100 samples; every bad unit left quantized loses 3 of them.
            self.scores[path] = 1.0 - 0.03 * sum(1 for u in self.order[: self.bad] if u not in kept_float)
            return path

    units = [f"u{i}" for i in range(20)]
    fmt = Format(5, units)
    first = fmt.quantize([])
    budget = Budget(1.0, 100, 0.02)
    res = keep_sensitive_in_float(fmt, first, fmt.scores[first], fmt.scores.__getitem__, budget, lambda m: None)
    assert res.kept_float == units[:6] and res.score == 1.0  # 5 is not a step: 6 is the first that has them all
    assert [t["kept_in_float"] for t in res.tried] == [1, 2, 3, 4, 6]  # 4 leaves one bad unit: 3 lost > 2

    untouched = keep_sensitive_in_float(fmt, first, 0.99, fmt.scores.__getitem__, budget, lambda m: None)
    assert untouched.path == first and untouched.kept_float == [] and untouched.tried == []

    hopeless = Format(5, units)
    hopeless.quantize = lambda kept_float: tmp_path / "never"  # type: ignore[method-assign]
    hopeless.scores[tmp_path / "never"] = 0.5
    with pytest.raises(GateError, match=r"best with up to 20 unit\(s\) kept in float was 1.0000 -> 0.8500"):
        keep_sensitive_in_float(hopeless, first, 0.85, hopeless.scores.__getitem__, budget, lambda m: None)


@pytest.mark.parametrize(("groups", "kernel"), [(1, 3), (2, 3), (4, 3), (1, 1)])
def test_bias_shift_is_the_mean_output_error_of_int8_weight_rounding(groups: int, kernel: int) -> None:
    """Corrected biases make the rounded layer's mean output equal the float one's (inputs constant over
    positions, so a valid convolution's mean is exact), for dense, grouped and depthwise layers."""
    torch = pytest.importorskip("torch")
    from edgefleet.converters._int8 import bias_shift, round_per_channel

    rng = np.random.default_rng(groups * 10 + kernel)
    cin, cout = 4, 8
    w = rng.normal(size=(cout, cin // groups, kernel, kernel)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    x = np.broadcast_to(rng.normal(1.0, 1.0, size=(32, cin, 1, 1)), (32, cin, 6, 6)).astype(np.float32)
    mean_in = x.mean(axis=(0, 2, 3))

    def mean_out(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        y = torch.nn.functional.conv2d(
            torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), groups=groups
        )
        return y.double().mean(dim=(0, 2, 3)).numpy()

    wq = round_per_channel(w, 0)
    corrected = (b - bias_shift(w, mean_in, groups)).astype(np.float32)
    assert np.abs(mean_out(wq, b) - mean_out(w, b)).max() > 1e-4  # rounding does move the mean
    np.testing.assert_allclose(mean_out(wq, corrected), mean_out(w, b), atol=2e-5)
    dense = rng.normal(size=(cout, cin)).astype(np.float32)
    np.testing.assert_allclose(
        bias_shift(dense, mean_in), (round_per_channel(dense, 0).astype(np.float64) - dense) @ mean_in, rtol=1e-6
    )
