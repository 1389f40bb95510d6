"""Run exported files the way a device would, to measure agreement, accuracy and latency."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import TensorSpec
from edgefleet._errors import require
from edgefleet._quant import TensorCodec

from ._data import padded_batches, run_batched

__all__ = ["OnnxRunner", "TfliteRunner", "fixed_batch_of", "interleaved_p50_ms", "p50_ms", "runner_for"]

_NP_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(int16)": "int16",
}


def p50_ms(call: Callable[[], object], runs: int = 50, warmup: int = 10) -> float:
    """Median wall time of CALL in milliseconds, after WARMUP untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1000, 4)


def interleaved_p50_ms(calls: list[Callable[[], object]], runs: int = 60, warmup: int = 10) -> list[float]:
    """Median wall time of each of CALLS in milliseconds, measured in turns (a, b, a, b, ...), so that a
    change in machine speed during the measurement affects every call alike."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for call, ts in zip(calls, times, strict=True):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
    return [round(float(np.median(ts)) * 1000, 4) for ts in times]


def fixed_batch_of(shape: Any) -> int | None:
    """The batch a model input of SHAPE takes when its first dimension is fixed (None: any batch)."""
    d = shape[0] if shape else None
    return d if isinstance(d, int) and d > 0 else None


class Runner:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the file takes, when its batch dimension is fixed."""
        return fixed_batch_of(self.inputs[0].shape)

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _one(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def timing_call(self, sample: np.ndarray) -> Callable[[], object]:
        """One inference call at the smallest batch the file takes (1, or its fixed batch)."""
        x = next(padded_batches(np.ascontiguousarray(sample, dtype=self._dtype()), self.fixed_batch or 1))[0]
        return lambda: self._one(x)

    def _dtype(self) -> Any:
        return np.float32

    def latency_p50_ms(self, sample: np.ndarray, runs: int = 50, warmup: int = 10) -> float:
        return p50_ms(self.timing_call(sample), runs, warmup)


class OnnxRunner(Runner):
    def __init__(self, path: Path, threads: int = 0) -> None:
        ort = require("onnxruntime", "runtime", "running ONNX files")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.in_name = self.sess.get_inputs()[0].name
        self.inputs = [
            TensorSpec(i.name, _NP_DTYPES.get(i.type, "float32"), [d if isinstance(d, int) else None for d in i.shape])
            for i in self.sess.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, _NP_DTYPES.get(o.type, "float32"), [d if isinstance(d, int) else None for d in o.shape])
            for o in self.sess.get_outputs()
        ]

    def _one(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.in_name: x})[0]

    @staticmethod
    def session_from_bytes(data: bytes) -> Any:
        ort = require("onnxruntime", "runtime", "running ONNX files")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    def _dtype(self) -> Any:
        return np.float16 if self.inputs[0].dtype == "float16" else np.float32

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self._dtype())
        if self.fixed_batch is not None:
            return run_batched(self._one, x, self.fixed_batch).astype(np.float32)
        return np.concatenate([self._one(x[i : i + 256]) for i in range(0, len(x), 256)]).astype(np.float32)


class TfliteRunner(Runner):
    def __init__(self, path: Path, threads: int = 2) -> None:
        interp = require("ai_edge_litert.interpreter", "runtime", "running TFLite files")
        self.it = interp.Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.ind = self.it.get_input_details()[0]
        self.outd = self.it.get_output_details()[0]
        self.inputs = [self._spec(d) for d in self.it.get_input_details()]
        self.outputs = [self._spec(d) for d in self.it.get_output_details()]
        # Scales read once, as the runtime's `predict` does: timings then show what a device pays.
        self._in_codec = TensorCodec(self.inputs[0]) if self.inputs[0].scale is not None else None
        self._out_codec = TensorCodec(self.outputs[0]) if self.outputs[0].scale is not None else None
        self._in_dtype = np.dtype(self.ind["dtype"])

    @staticmethod
    def _spec(d: dict[str, Any]) -> TensorSpec:
        dtype = np.dtype(d["dtype"]).name
        qp = d.get("quantization_parameters", {})
        scales = [float(s) for s in qp.get("scales", [])]
        zps = [int(z) for z in qp.get("zero_points", [])]
        quant = dtype in ("int8", "uint8", "int16") and bool(scales)
        # The signature says which dimensions are dynamic (-1); the manifest writes those as null.
        sig = d.get("shape_signature")
        sig = d["shape"] if sig is None or len(sig) != len(d["shape"]) else sig
        shape = [int(s) if int(s) >= 0 else None for s in sig]
        return TensorSpec(d["name"], dtype, shape, scales if quant else None, zps if quant else None)

    def _one(self, x: np.ndarray) -> np.ndarray:
        if self._in_codec is not None:
            x = self._in_codec.quantize(x)
        elif x.dtype != self._in_dtype:
            x = x.astype(self._in_dtype)
        self.it.set_tensor(self.ind["index"], x)
        self.it.invoke()
        y = self.it.get_tensor(self.outd["index"])
        if self._out_codec is not None:
            return self._out_codec.dequantize(y)
        return y if y.dtype == np.float32 else y.astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        # The interpreter was allocated at the file's own input shape: batches of that size.
        return run_batched(self._one, np.ascontiguousarray(x, dtype=np.float32), self.fixed_batch or 1)


def runner_for(fmt: str, path: Path) -> Runner:
    return OnnxRunner(path) if fmt == "onnx" else TfliteRunner(path)
