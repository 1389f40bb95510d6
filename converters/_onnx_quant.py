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

from ._accuracy_control import keep_sensitive_in_float
from ._data import Dataset, padded_batches, run_batched
from ._evaluate import OnnxRunner, fixed_batch_of
from ._gate import Budget
from ._int8 import bias_shift, round_per_channel

__all__ = ["quantize_onnx"]

Score = Callable[[Path], float]
Progress = Callable[[str], None]
_QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def _int_attr(node: Any, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _ort_quant() -> Any:
    return require("onnxruntime.quantization", "convert", "ONNX quantization")


class _Reader:
    """Feeds calibration samples one at a time (what ORT's calibrators expect), or in batches of the
    file's fixed batch size."""

    def __init__(self, name: str, x: np.ndarray, batch: int | None) -> None:
        self.name, self.batches, self.i = name, [b for b, _ in padded_batches(x.astype(np.float32), batch or 1)], 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

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
    runner = OnnxRunner(pre)
    input_name = runner.in_name
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    method = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }[p.calibration]
    q.quantize_static(
        str(pre),
        str(out),
        _Reader(input_name, calib.x, runner.fixed_batch),
        quant_format=q.QuantFormat.QDQ,
        per_channel=p.per_channel,
        activation_type=q.QuantType.QUInt8 if act == "uint8" else q.QuantType.QInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=method,
        nodes_to_exclude=exclude,
        # Moving-average min/max narrowed ranges and lost agreement in measurements here; plain min/max it is.
        extra_options={"CalibMovingAverage": False, "CalibPercentile": 99.99},
    )


def _finish_qdq(path: Path, kept_float: list[str]) -> None:
    """Two fixes to ORT's QDQ output, so the file runs what the report says.

    - A node kept in float reads its input through a DequantizeLinear with one scale per channel (all
      equal). ONNX Runtime's `WeightBiasQuantization` optimizer (1.2x) otherwise quantizes the float
      weights of any Conv/Gemm fed by a per-tensor DequantizeLinear, per tensor and symmetric, at load:
      measured on EfficientNet-Lite0, that made "kept in float" depthwise convolutions far worse than int8.
    - The model's outputs stay float: ORT quantizes them to uint8 like any activation, which puts logits
      on a grid of ~0.1 where close classes tie.
    """
    onnx = require("onnx", "convert")
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    nodes = list(m.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    users: dict[str, int] = {}
    for n in m.graph.node:
        for t in n.input:
            users[t] = users.get(t, 0) + 1
    outputs = {o.name for o in m.graph.output}
    added, dropped = [], set()
    for n in nodes:
        if n.name not in kept_float or n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2:
            continue
        dq_at = producer.get(n.input[0])
        dq = None if dq_at is None else nodes[dq_at]
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits or n.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.size != 1:
            continue
        w = inits[n.input[1]].dims
        group = _int_attr(n, "group", 1)
        trans_b = _int_attr(n, "transB", 0) == 1
        channels = {"Conv": w[1] * group, "ConvTranspose": w[0]}.get(n.op_type, w[1] if trans_b else w[0])
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
        names = [f"{n.name}__float_in_{k}" for k in ("scale", "zero_point", "dq")]
        m.graph.initializer.append(numpy_helper.from_array(np.full(channels, scale.item(), scale.dtype), names[0]))
        ins = [dq.input[0], names[0]]
        if zp is not None:
            m.graph.initializer.append(numpy_helper.from_array(np.full(channels, zp.item(), zp.dtype), names[1]))
            ins.append(names[1])
        added.append(helper.make_node("DequantizeLinear", ins, [names[2]], name=names[2], axis=1))
        users[n.input[0]] -= 1
        if users[n.input[0]] == 0 and dq.output[0] not in outputs:
            dropped.add(dq_at)
        n.input[0] = names[2]
    for out in outputs:
        dq_at = producer.get(out)
        q_at = producer.get(nodes[dq_at].input[0]) if dq_at is not None else None
        if (
            dq_at is None
            or q_at is None
            or nodes[dq_at].op_type != "DequantizeLinear"
            or nodes[q_at].op_type != "QuantizeLinear"
        ):
            continue
        q = nodes[q_at]
        src_at = producer.get(q.input[0])
        if src_at is None or users.get(q.output[0], 0) != 1 or users.get(q.input[0], 0) != 1:
            continue
        source = nodes[src_at]
        source.output[list(source.output).index(q.input[0])] = out
        dropped.update((q_at, dq_at))
    if not added and not dropped:
        return
    kept = [n for i, n in enumerate(nodes) if i not in dropped] + added
    del m.graph.node[:]
    m.graph.node.extend(kept)
    _topo_sort(m)
    live = {t for n in m.graph.node for t in n.input}
    keep = [t for t in m.graph.initializer if t.name in live]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.save(m, str(path))


def _sensitivity(pre: Path, quant: Path, x: np.ndarray, progress: Progress | None = None) -> list[tuple[str, float]]:
    """Rank quantizable nodes by the error each causes at the model output when it alone is quantized.

    For every Conv / Gemm / MatMul, a copy of the float model gets that node's weights rounded to
    int8 and its input passed through the Q/DQ pair the calibrated model uses; the score is the
    normalised MSE of the outputs against the float model. Early depthwise convolutions, whose
    error is small locally but amplified downstream, rank where they belong.
    """
    onnx = require("onnx", "convert")
    from onnx import helper, numpy_helper

    base, qm = onnx.load(str(pre)), onnx.load(str(quant))
    inits = {t.name: t for t in qm.graph.initializer}
    act_qparams: dict[str, tuple[Any, Any]] = {}
    for n in qm.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[1] in inits and len(n.input) > 2 and n.input[2] in inits:
            act_qparams.setdefault(n.input[0], (inits[n.input[1]], inits[n.input[2]]))
    weights = {t.name: t for t in base.graph.initializer}
    in_name = base.graph.input[0].name

    def outputs(model: Any) -> np.ndarray:
        sess = OnnxRunner.session_from_bytes(model.SerializeToString())
        return run_batched(
            lambda b: sess.run(None, {in_name: b})[0], x, fixed_batch_of(sess.get_inputs()[0].shape) or 16
        )

    ref = outputs(base).astype(np.float64)
    denom = float(np.mean(ref**2)) + 1e-12
    ranked = []
    for idx, node in enumerate(base.graph.node):
        if node.op_type not in _QUANTIZABLE or len(node.input) < 2 or node.input[1] not in weights:
            continue
        m = onnx.ModelProto()
        m.CopyFrom(base)
        target = m.graph.node[idx]
        w = numpy_helper.to_array(weights[node.input[1]])
        trans_b = _int_attr(node, "transB", 0) == 1
        axis = 0 if node.op_type in ("Conv", "ConvTranspose") or (node.op_type == "Gemm" and trans_b) else w.ndim - 1
        wq_name = f"{node.input[1]}__fq"
        m.graph.initializer.append(numpy_helper.from_array(round_per_channel(w, axis), wq_name))
        target.input[1] = wq_name
        if node.input[0] in act_qparams:
            scale, zp = act_qparams[node.input[0]]
            sn, zn, qn, dn = (f"{node.name}__{k}" for k in ("s", "z", "q", "dq"))
            m.graph.initializer.extend(
                [
                    numpy_helper.from_array(numpy_helper.to_array(scale), sn),
                    numpy_helper.from_array(numpy_helper.to_array(zp), zn),
                ]
            )
            m.graph.node.extend(
                [
                    helper.make_node("QuantizeLinear", [node.input[0], sn, zn], [qn]),
                    helper.make_node("DequantizeLinear", [qn, sn, zn], [dn]),
                ]
            )
            target.input[0] = dn
        _topo_sort(m)
        err = float(np.mean((outputs(m) - ref) ** 2)) / denom
        ranked.append((node.name, err))
        if progress is not None and len(ranked) % 10 == 0:
            progress(f"quantize onnx: sensitivity of {len(ranked)} nodes measured")
    return sorted(ranked, key=lambda kv: -kv[1])


def _bias_correct(src: Path, dst: Path, x: np.ndarray, skip: frozenset[str] = frozenset()) -> int:
    """Fold the mean output shift that int8 weight rounding causes into each layer's bias.

    For a Conv/Gemm with weights W and bias b, rounding gives W + dW; on inputs with per-channel
    mean m the outputs move by dW * m on average. Subtracting that from b (computed on float
    activations of the calibration set) removes the systematic part of the error, which is what
    hurts early depthwise convolutions most. Returns the number of layers corrected.
    """
    onnx = require("onnx", "convert")
    from onnx import numpy_helper

    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    targets = [
        n
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm")
        and n.name not in skip
        and len(n.input) > 2
        and n.input[1] in weights
        and n.input[2] in weights
    ]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    wanted = sorted({n.input[0] for n in targets} - have)
    for t in wanted:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = OnnxRunner.session_from_bytes(probe.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    in_name = model.graph.input[0].name
    needed = {n.input[0] for n in targets}
    sums: dict[str, np.ndarray] = {}
    for b, n in padded_batches(x, fixed_batch_of(sess.get_inputs()[0].shape) or 1):
        for nm, out in zip(names, sess.run(None, {in_name: b}), strict=True):
            if nm in needed:
                a = np.asarray(out, dtype=np.float64)[:n]
                # Per sample: the channel means over positions (Conv inputs are NC...; Gemm inputs are N x C).
                ch = a.reshape(n, a.shape[1], -1).mean(axis=2).sum(0) if a.ndim > 2 else a.sum(axis=0)
                sums[nm] = sums.get(nm, 0) + ch
    done = 0
    for n in targets:
        if n.input[0] not in sums:
            continue
        mean_in = sums[n.input[0]] / len(x)
        w = numpy_helper.to_array(weights[n.input[1]])
        b = numpy_helper.to_array(weights[n.input[2]]).astype(np.float64)
        if n.op_type == "Conv":
            shift = bias_shift(w, mean_in, _int_attr(n, "group", 1))
        else:
            shift = bias_shift(w if _int_attr(n, "transB", 0) == 1 else w.T, mean_in)  # Gemm: B as (out, in)
        weights[n.input[2]].CopyFrom(numpy_helper.from_array((b - shift).astype(np.float32), n.input[2]))
        done += 1
    onnx.save(model, str(dst))
    return done


def _topo_sort(model: Any) -> None:
    """Reorder nodes so every input is produced before use (ONNX requires it)."""
    nodes = list(model.graph.node)
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered: list[Any] = []
    pending = nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise InputError("ONNX graph has a cycle or an undefined input; cannot rank node sensitivity")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def quantize_onnx(
    src: Path, out: Path, p: Any, calib: Dataset | None, score: Score, budget: Budget, progress: Progress
) -> dict[str, Any]:
    """Quantize SRC into OUT as `p.mode` says; returns the precision and what was tried.

    Static int8 with `activation_type = "auto"` takes uint8 activations (with int8 per-channel weights:
    the kernels ONNX Runtime runs fastest on x86-64, measured 2x faster than int8 activations here) and
    int8 activations only when uint8 fails the gate and int8 passes it. The choice depends on scores
    alone, never on timings, so the same inputs give the same file.
    """
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
        bias_layers: dict[int, int] = {}

        def quantize(act: str, exclude: list[str], name: str) -> Path:
            src = pre
            if p.bias_correction:
                src = work / f"bc_{name}.onnx"
                bias_layers[len(exclude)] = _bias_correct(pre, src, calib.x[: min(64, len(calib))], frozenset(exclude))
            out_path = work / f"q_{name}.onnx"
            _static(src, out_path, calib, p, act, exclude)
            _finish_qdq(out_path, exclude)
            return out_path

        acts = ["uint8", "int8"] if p.activation_type == "auto" else [p.activation_type]
        tried: list[dict[str, Any]] = []
        candidates: list[tuple[str, Path, float]] = []
        for act in acts:
            progress(
                f"quantize onnx: calibrating ({p.calibration}, {act} activations, {len(calib)} samples"
                f"{', bias correction' if p.bias_correction else ''})"
            )
            cand = quantize(act, [], act)
            s = score(cand)
            tried.append({"activations": act, "kept_in_float": 0, "score": round(s, 5)})
            candidates.append((act, cand, s))
            if not budget.exceeded(s):
                break
        passing = [c for c in candidates if not budget.exceeded(c[2])]
        # The first passing variant in preference order, else the best scoring one (uint8 on a tie) is the
        # one whose most sensitive nodes are kept in float.
        act, first, s = passing[0] if passing else max(candidates, key=lambda c: (c[2], c[0] == "uint8"))
        probe = calib.x[: min(32, len(calib))]

        class Backend:
            fmt, unit = "onnx", "node"

            def rank(self) -> list[str]:
                base = work / f"bc_{act}.onnx" if p.bias_correction else pre
                return [n for n, _ in _sensitivity(base, first, probe, progress)]

            def quantize(self, kept_float: list[str]) -> Path:
                return quantize(act, kept_float, f"{act}_x{len(kept_float)}")

        res = keep_sensitive_in_float(Backend(), first, s, score, budget, progress, {"activations": act})
        shutil.copy(res.path, out)
    return {
        "precision": "mixed" if res.kept_float else "int8",
        "activations": act,
        "calibration": p.calibration,
        "per_channel": p.per_channel,
        "kept_in_float": res.kept_float,
        "tried": tried + res.tried,
        "score": round(res.score, 5),
    }
