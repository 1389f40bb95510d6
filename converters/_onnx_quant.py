"""ONNX post-training quantization: dynamic, static QDQ (measured variants), fp16, and the
accuracy-aware loop that keeps the most sensitive nodes in float until the gate passes."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet import InputError
from edgefleet._errors import require

from ._data import Dataset
from ._evaluate import OnnxRunner

__all__ = ["quantize_onnx"]

Score = Callable[[Path], float]
Progress = Callable[[str], None]
_QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def _ort_quant() -> Any:
    return require("onnxruntime.quantization", "convert", "ONNX quantization")


class _Reader:
    """Feeds calibration samples one at a time (what ORT's calibrators expect)."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self.name, self.x, self.i = name, x, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: np.ascontiguousarray(self.x[self.i - 1 : self.i], dtype=np.float32)}

    def rewind(self) -> None:
        self.i = 0


def _name_nodes(path: Path) -> None:
    onnx = require("onnx", "convert")
    m = onnx.load(str(path))
    seen: set[str] = set()
    for i, n in enumerate(m.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    onnx.save(m, str(path))


def _static(pre: Path, out: Path, calib: Dataset, p: Any, act: str, exclude: list[str]) -> None:
    q = _ort_quant()
    input_name = OnnxRunner(pre).in_name
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    method = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }[p.calibration]
    q.quantize_static(
        str(pre),
        str(out),
        _Reader(input_name, calib.x),
        quant_format=q.QuantFormat.QDQ,
        per_channel=p.per_channel,
        activation_type=q.QuantType.QUInt8 if act == "uint8" else q.QuantType.QInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=method,
        nodes_to_exclude=exclude,
        extra_options={"CalibMovingAverage": p.calibration == "minmax", "CalibPercentile": 99.99},
    )


def _sensitivity(pre: Path, quant: Path, x: np.ndarray) -> list[tuple[str, float]]:
    """Rank quantizable nodes by the error they add: NMSE at their output minus NMSE at their input."""
    onnx = require("onnx", "convert")
    fm = onnx.load(str(pre))
    nodes = [n for n in fm.graph.node if n.op_type in _QUANTIZABLE]
    tensors = sorted({t for n in nodes for t in (n.input[0], n.output[0])})
    graph_inputs = {i.name for i in fm.graph.input}

    def run(path: Path) -> dict[str, np.ndarray]:
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        # Quantization may fuse nodes (e.g. Gemm + Relu), so a tensor can exist in one model only.
        produced = {o for n in m.graph.node for o in n.output}
        for t in tensors:
            if t not in have and t in produced:
                m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "aug.onnx"
            onnx.save(m, str(tmp))
            r = OnnxRunner(tmp)
            names = [o.name for o in r.sess.get_outputs()]
            acc: dict[str, list[np.ndarray]] = {}
            for i in range(len(x)):
                outs = r.sess.run(None, {r.in_name: x[i : i + 1]})
                for nm, o in zip(names, outs, strict=True):
                    acc.setdefault(nm, []).append(np.asarray(o, dtype=np.float32))
        return {k: np.concatenate(v) for k, v in acc.items()}

    f, q = run(pre), run(quant)

    def nmse(t: str) -> float:
        if t in graph_inputs or t not in f or t not in q:
            return 0.0
        ref = f[t].astype(np.float64)
        return float(np.mean((q[t] - ref) ** 2) / (np.mean(ref**2) + 1e-12))

    ranked = [(n.name, max(0.0, nmse(n.output[0]) - nmse(n.input[0]))) for n in nodes]
    return sorted(ranked, key=lambda kv: -kv[1])


def quantize_onnx(
    src: Path, out: Path, p: Any, calib: Dataset | None, score: Score, ref_score: float, progress: Progress
) -> dict[str, Any]:
    """Quantize SRC into OUT as `p.mode` says; returns the precision and what was tried."""
    q = _ort_quant()
    if p.mode == "dynamic":
        q.quantize_dynamic(str(src), str(out), weight_type=q.QuantType.QInt8, per_channel=p.per_channel)
        return {"precision": "int8", "activations": "dynamic"}
    if p.mode == "fp16":
        onnx = require("onnx", "convert")
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(out))
        return {"precision": "fp16"}
    if calib is None or len(calib) < p.min_calibration_samples:
        have = 0 if calib is None else len(calib)
        raise InputError(
            f"static int8 quantization needs a calibration set of at least {p.min_calibration_samples} "
            f"samples (--calibration CALIB.npz); got {have}"
        )
    calib = calib.take(p.calibration_samples)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        pre = work / "pre.onnx"
        try:
            q.shape_inference.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantize the plain model if it fails
            shutil.copy(src, pre)
        _name_nodes(pre)
        acts = ["uint8", "int8"] if p.activation_type == "auto" else [p.activation_type]
        tried: list[dict[str, Any]] = []
        candidates = []
        for act in acts:
            progress(f"quantize onnx: calibrating ({p.calibration}, {act} activations, {len(calib)} samples)")
            cand = work / f"q_{act}.onnx"
            _static(pre, cand, calib, p, act, [])
            s = score(cand)
            lat = OnnxRunner(cand).latency_p50_ms(calib.x)
            tried.append({"activations": act, "excluded": 0, "score": round(s, 5), "latency_ms_p50": lat})
            candidates.append((act, cand, s, lat))
        # The fastest variant is the one to make pass the gate; precision loss is fixed below.
        act, best, s, _ = min(candidates, key=lambda c: c[3])
        excluded: list[str] = []
        gate = p.max_accuracy_drop
        if gate is not None and ref_score - s > gate:
            passing = [c for c in candidates if ref_score - c[2] <= gate]
            if passing:
                act, best, s, _ = min(passing, key=lambda c: c[3])
            else:
                progress(f"quantize onnx: drop {ref_score - s:.4f} > {gate}; ranking nodes by sensitivity")
                ranked = _sensitivity(pre, best, calib.x[: min(32, len(calib))])
                k = 1
                while True:
                    k = min(k, len(ranked))
                    excluded = [n for n, _ in ranked[:k]]
                    cand = work / f"q_{act}_x{k}.onnx"
                    _static(pre, cand, calib, p, act, excluded)
                    s = score(cand)
                    tried.append({"activations": act, "excluded": k, "score": round(s, 5)})
                    progress(f"quantize onnx: {k} node(s) kept in float -> score {s:.4f} (drop {ref_score - s:.4f})")
                    if ref_score - s <= gate:
                        best = cand
                        break
                    if k == len(ranked):
                        raise InputError(
                            f"int8 quantization cannot meet --max-accuracy-drop {gate}: tried {tried}; "
                            "give more calibration data, another calibration method, or a larger allowed drop"
                        )
                    k *= 2
        shutil.copy(best, out)
    return {
        "precision": "mixed" if excluded else "int8",
        "activations": act,
        "calibration": p.calibration,
        "per_channel": p.per_channel,
        "kept_in_float": excluded,
        "tried": tried,
        "score": round(s, 5),
    }
