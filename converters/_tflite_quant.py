"""Quantize a float TFLite file with AI Edge Quantizer (the maintained route for PyTorch sources)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from edgefleet import InputError
from edgefleet._errors import require

from ._data import Dataset


def quantize_tflite(path: Path, mode: str, calib: Dataset | None, io: str) -> str:
    """Quantize the TFLite file at PATH in place; returns the precision."""
    aeq = require("ai_edge_quantizer", "convert", "TFLite quantization of PyTorch models")
    from ai_edge_quantizer import recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    # AI Edge Quantizer's static recipe always gives int8 inputs/outputs (recorded with their scales in
    # the manifest), so `io` cannot ask for float I/O on this route.
    del io
    qt = aeq.Quantizer(str(path))
    if mode == "dynamic":
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        precision = "int8"
    elif mode == "fp16":
        qt.add_weight_only_config(".*", TFLOperationName.ALL_SUPPORTED, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        precision = "fp16"
    elif mode == "int8":
        if calib is None or len(calib) == 0:
            raise InputError("TFLite int8 quantization needs a calibration set (--calibration CALIB.npz)")
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        sig = "serving_default"
        from ai_edge_litert.interpreter import Interpreter

        name = Interpreter(model_path=str(path)).get_signature_list()[sig]["inputs"][0]
        data = {sig: [{name: np.ascontiguousarray(calib.x[i : i + 1], dtype=np.float32)} for i in range(len(calib))]}
        result = qt.calibrate(data)
        out = qt.quantize(result)
        _write(path, out.quantized_model)
        return "int8"
    else:
        raise InputError(f"unknown TFLite quantization mode {mode!r}")
    out = qt.quantize()
    _write(path, out.quantized_model)
    return precision


def _write(path: Path, data: bytes | bytearray | None) -> None:
    if not data:
        raise InputError("AI Edge Quantizer produced no model")
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(bytes(data))
    os.replace(tmp, path)
