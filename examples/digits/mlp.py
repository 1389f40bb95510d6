"""A small real classifier as an ONNX file: a scikit-learn MLP trained on digits (seconds to build).
Tests and the fleet benchmarks use it where the torch pipeline would only cost time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def make_mlp_onnx(path: Path, digits: dict, seed: int = 0, hidden: int = 64, slow_layers: int = 0) -> Path:
    """A real classifier: scikit-learn MLP trained on digits, as an ONNX graph (N, 1, 8, 8) -> (N, 10).

    SLOW_LAYERS > 0 adds a heavy branch (that many 512x512 MatMul + Tanh) whose result is multiplied by
    zero: same predictions, much slower, the kind of bundle a device's health window must catch.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.neural_network import MLPClassifier

    x, y = digits["train"]
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed).fit(x.reshape(len(x), -1), y)
    w1, w2 = (c.astype(np.float32) for c in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    out = "logits"
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits0" if slow_layers else "logits"], name="fc2"),
    ]
    if slow_layers:
        rng = np.random.default_rng(seed)
        inits.append(numpy_helper.from_array((rng.standard_normal((64, 512)) * 0.1).astype(np.float32), "s0"))
        inits.append(numpy_helper.from_array((rng.standard_normal((512, 512)) * 0.04).astype(np.float32), "sw"))
        inits.append(numpy_helper.from_array(np.zeros((1,), np.float32), "zero"))
        nodes.append(helper.make_node("MatMul", ["flat", "s0"], ["t0"], name="slow0"))
        for i in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [f"t{i}", "sw"], [f"m{i}"], name=f"slow_mm{i}"))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i + 1}"], name=f"slow_tanh{i}"))
        nodes.append(helper.make_node("ReduceMean", [f"t{slow_layers}"], ["r"], keepdims=1, name="slow_mean"))
        nodes.append(helper.make_node("Mul", ["r", "zero"], ["rz"], name="slow_zero"))
        nodes.append(helper.make_node("Add", ["logits0", "rz"], [out], name="slow_add"))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_mlp_bundle(
    out: Path,
    digits: dict,
    version: str,
    signing_key: Any,
    seed: int = 0,
    hidden: int = 64,
    slow_layers: int = 0,
    mode: str = "int8",
) -> Path:
    """The MLP above as a signed ONNX bundle `mlp` VERSION at OUT (quantized by MODE), via the converters."""
    from edgefleet.converters import BuildConfig, Dataset, Quantize, build

    src = make_mlp_onnx(out.with_suffix(".onnx"), digits, seed=seed, hidden=hidden, slow_layers=slow_layers)
    cfg = BuildConfig(
        name="mlp",
        version=version,
        formats=["onnx"],
        layout="NCHW",
        labels=[str(i) for i in range(10)],
        quantize=Quantize(mode=mode),
    )
    build(
        src,
        out,
        cfg,
        calibration=Dataset(*digits["calib"], name="calib"),
        evaluation=Dataset(*digits["eval"], name="eval"),
        signing_key=signing_key,
        progress=lambda msg: None,
    )
    return out
