"""Quantize a float TFLite file with AI Edge Quantizer (the maintained route for PyTorch sources),
including the accuracy-aware loop that keeps the most sensitive ops in float."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._errors import require
from edgefleet._fs import atomic_write

from ._accuracy_control import keep_sensitive_in_float
from ._data import Dataset, padded_batches
from ._gate import Budget

__all__ = ["quantize_tflite", "quantize_tflite_gated"]

_QUANTIZABLE = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV")


def quantize_tflite(path: Path, mode: str, calib: Dataset | None, io: str) -> str:
    """Quantize the TFLite file at PATH in place; returns the precision."""
    # AI Edge Quantizer's static recipe always gives int8 inputs/outputs (recorded with their scales in
    # the manifest), so `io` cannot ask for float I/O on this route.
    del io
    aeq = require("ai_edge_quantizer", "convert", "TFLite quantization of PyTorch models")
    from ai_edge_quantizer import recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    if mode == "int8":
        if calib is None or len(calib) == 0:
            raise InputError("TFLite int8 quantization needs a calibration set (--calibration CALIB.npz)")
        _write(path, _static(path, _calibrate(path, calib), []))
        return "int8"
    qt = aeq.Quantizer(str(path))
    if mode == "dynamic":
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        precision = "int8"
    elif mode == "fp16":
        qt.add_weight_only_config(".*", TFLOperationName.ALL_SUPPORTED, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        precision = "fp16"
    else:
        raise InputError(f"unknown TFLite quantization mode {mode!r}")
    with contextlib.redirect_stdout(StringIO()), contextlib.redirect_stderr(StringIO()):
        out = qt.quantize()
    _write(path, out.quantized_model)
    return precision


def _calibrate(path: Path, calib: Dataset) -> Any:
    require("ai_edge_quantizer", "convert", "TFLite quantization of PyTorch models")
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, recipe, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    from ._evaluate import TfliteRunner

    sig = "serving_default"
    name = Interpreter(model_path=str(path)).get_signature_list()[sig]["inputs"][0]
    batch = TfliteRunner(path).fixed_batch or 1
    data = {sig: [{name: b} for b, _ in padded_batches(calib.x.astype(np.float32), batch)]}
    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(recipe.static_wi8_ai8())
    # Plain min/max over the whole calibration set. `Quantizer.calibrate` keeps a moving average (0.95) of
    # each sample's min/max, which with one sample per step narrows the ranges to the last few samples:
    # measured on EfficientNet-Lite0, top-1 agreement with fp32 0.41 that way, 0.865 with min/max.
    cal = calibrator.Calibrator(path.read_bytes(), num_threads=2, qsv_update_func=qsv_utils.min_max_update)
    # AI Edge Quantizer draws a progress bar per tensor on stderr; the build reports its own progress.
    with contextlib.redirect_stdout(StringIO()), contextlib.redirect_stderr(StringIO()):
        cal.calibrate(data, rm)
    return cal.get_model_qsvs()


def _static(path: Path, calibration: Any, keep_float: list[str], only: str | None = None) -> bytes:
    """int8 weights and activations everywhere, except the op scopes in KEEP_FLOAT; with ONLY, just that op."""
    aeq = require("ai_edge_quantizer", "convert", "TFLite quantization of PyTorch models")
    from ai_edge_quantizer import recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    qt = aeq.Quantizer(str(path))
    if only is None:
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        for scope in keep_float:
            # Later recipe entries win in AI Edge Quantizer, so these override the global int8 entry.
            qt.update_quantization_recipe(
                f"^{re.escape(scope)}$", TFLOperationName.ALL_SUPPORTED, algorithm_key=AlgorithmName.NO_QUANTIZE
            )
    else:
        qt.add_static_config(f"^{re.escape(only)}$", TFLOperationName.ALL_SUPPORTED, 8, 8)
    with contextlib.redirect_stdout(StringIO()), contextlib.redirect_stderr(StringIO()):
        out = qt.quantize(calibration)
    if not out.quantized_model:
        raise InputError("AI Edge Quantizer produced no model")
    return bytes(out.quantized_model)


def _op_scopes(path: Path) -> list[str]:
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    model = fu.read_model(str(path))
    sg = model.subgraphs[0]
    return [
        fu.get_op_scope(op, sg.tensors)
        for i, op in enumerate(sg.operators)
        if fu.get_op_name_by_index(model, 0, i) in _QUANTIZABLE
    ]


def quantize_tflite_gated(
    path: Path,
    calib: Dataset,
    score: Callable[[Path], float],
    budget: Budget,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Static int8 of the float TFLite file at PATH (in place), keeping the most sensitive ops in float
    until BUDGET is met. Ops are ranked by the output error each causes when it alone is quantized."""
    from ._evaluate import TfliteRunner

    calibration = _calibrate(path, calib)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)

        class Backend:
            fmt, unit = "tflite", "op"

            def quantize(self, kept_float: list[str], only: str | None = None) -> Path:
                cand = work / ("one.tflite" if only else f"q{len(kept_float)}.tflite")
                cand.write_bytes(_static(path, calibration, kept_float, only=only))
                return cand

            def rank(self) -> list[str]:
                # Each op's sensitivity: the output error when it alone is quantized.
                x = calib.x[: min(16, len(calib))]
                ref = TfliteRunner(path).predict(x).astype(np.float64)
                denom = float(np.mean(ref**2)) + 1e-12
                ranked = []
                scopes = _op_scopes(path)
                for i, scope in enumerate(scopes):
                    if i % 10 == 0:
                        progress(f"quantize tflite: sensitivity of op {i + 1}/{len(scopes)}")
                    one = self.quantize([], only=scope)
                    ranked.append((scope, float(np.mean((TfliteRunner(one).predict(x) - ref) ** 2)) / denom))
                ranked.sort(key=lambda kv: -kv[1])
                return [sc for sc, _ in ranked]

        backend = Backend()
        first = backend.quantize([])
        s = score(first)
        res = keep_sensitive_in_float(backend, first, s, score, budget, progress)
        _write(path, res.path.read_bytes())
    tried = [{"kept_in_float": 0, "score": round(s, 5)}, *res.tried]
    return {
        "precision": "mixed" if res.kept_float else "int8",
        "kept_in_float": res.kept_float,
        "tried": tried,
        "score": round(res.score, 5),
    }


def _write(path: Path, data: bytes | bytearray | None) -> None:
    if not data:
        raise InputError("AI Edge Quantizer produced no model")
    atomic_write(path, bytes(data))
