"""Quantization-aware training for PyTorch models, toward the fp32 model's own outputs.

The model is taken as its torch.export graph. Batch norms are folded into the convolutions before them
(the ONNX file that gets quantized has them folded too), then every convolution and linear weight is
fake-quantized the way ONNX Runtime's QDQ quantizer rounds it (symmetric int8 per output channel) and
every activation a quantized ONNX operator reads or writes is fake-quantized to uint8 over the min/max
range that calibration gives it. The student learns to reproduce the float teacher's outputs on augmented
unlabelled inputs, so calibration data is enough. What comes out is a float model whose weights survive
that rounding; the quantize step then calibrates and rounds it like any other model, so the file keeps
the uint8 / int8 kernels post-training quantization gets.

Written here rather than on NNCF's PyTorch QAT: NNCF places and exports its own quantizers (int8
activations, measured 0.32x fp32 speed on ONNX Runtime here), while what must be learned is robustness to
the quantizer that will really run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgefleet import InputError

from .._data import Dataset
from . import Progress

__all__ = ["quantization_aware_training"]

_CONV = {"conv1d", "conv2d", "conv3d", "convolution"}
_WEIGHTED = _CONV | {"linear"}
_BATCH_NORM = {"batch_norm", "_native_batch_norm_legit_no_training"}
# Relu / Clip after a quantized op are removed by ONNX Runtime's quantizer: the range of what follows
# them covers it, so only the activation's output is quantized.
_ACTIVATION = {"relu", "relu_", "hardtanh", "hardtanh_", "clamp", "clamp_min", "relu6"}
# Operators whose inputs and outputs ONNX Runtime's QDQ quantizer quantizes (its registry, in aten names).
_QUANTIZED = _WEIGHTED | _ACTIVATION | {
    "add", "add_", "mul", "mul_", "matmul", "mm", "bmm", "sigmoid", "cat", "concat", "mean",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d",
    "upsample_nearest2d", "upsample_bilinear2d", "layer_norm", "softmax", "_softmax", "embedding", "pad",
}  # fmt: skip
# Shape-only operators carry their input's quantization through; a second quantizer after them is a no-op.
_PASS_THROUGH = {
    "view", "reshape", "flatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "contiguous",
    "clone", "dropout", "expand", "slice", "select", "split", "chunk", "unflatten", "alias",
}  # fmt: skip


_SHAPE_ATTRS = ("_edgefleet_input_shape", "_edgefleet_static_batch")


def _op(node: Any) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return str(getattr(packet, "__name__", "")) if node.op == "call_function" else ""


def _torch() -> Any:
    import torch

    return torch


def _fake_quant_weight(w: Any) -> Any:
    """Symmetric int8 per output channel, as `edgefleet.converters._int8.round_per_channel` rounds."""
    torch = _torch()
    flat = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(flat == 0, torch.ones_like(flat), flat / 127.0).float()
    zero = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


def _make_modules() -> tuple[type, type]:
    torch = _torch()
    nn = torch.nn

    class ActQuant(nn.Module):  # type: ignore[name-defined]
        """uint8 asymmetric per-tensor over [min(0, lo), max(0, hi)], ONNX Runtime's min/max rule."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("lo", torch.zeros(()))
            self.register_buffer("hi", torch.zeros(()))
            self.mode = "observe"  # observe: record the range, pass through; quant: fake-quantize; off

        def forward(self, x: Any) -> Any:
            if self.mode == "off" or not x.is_floating_point():
                return x
            if self.mode == "observe":
                with torch.no_grad():
                    self.lo.copy_(torch.minimum(self.lo, x.detach().min()))
                    self.hi.copy_(torch.maximum(self.hi, x.detach().max()))
                return x
            span = (self.hi - self.lo).clamp_min(1e-8)
            scale = (span / 255.0).reshape(1)
            zero = torch.round(-self.lo / scale).clamp(0, 255).to(torch.int32).reshape(1)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    class WeightQuant(nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.mode = "quant"

        def forward(self, w: Any) -> Any:
            return w if self.mode == "off" else _fake_quant_weight(w)

    return ActQuant, WeightQuant


def _graph_module(model: Any, sample: np.ndarray) -> Any:
    """The model as a torch.export graph module (a `.pt2` program already is one)."""
    torch = _torch()
    if isinstance(model, torch.fx.GraphModule):
        return copy.deepcopy(model)
    model = copy.deepcopy(model).eval()
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate([sample[:1], sample[:1]])))
    try:
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    except Exception as exc:  # torch raises many types for code it cannot trace
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"qat needs the model as a torch.export program and export failed: {first[:300]}") from exc
    return ep.module()


def _attr(gm: Any, node: Any) -> Any:
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _fold_batch_norms(gm: Any) -> int:
    """Fold each eval-mode batch norm that follows a convolution into that convolution's weight and bias."""
    torch = _torch()
    folded = 0
    for bn in list(gm.graph.nodes):
        if _op(bn) not in _BATCH_NORM:
            continue
        conv = bn.args[0]
        if _op(conv) not in _CONV or len(conv.users) != 1 or conv.args[1].op != "get_attr":
            continue
        if _op(bn) == "batch_norm" and bn.args[5]:  # training-mode batch norm: statistics move, not foldable
            continue
        eps = bn.args[-1] if _op(bn) == "_native_batch_norm_legit_no_training" else bn.args[7]
        gamma, beta, mean, var = (None if a is None else _attr(gm, a) for a in bn.args[1:5])
        w = _attr(gm, conv.args[1]).detach()
        b = conv.args[2] if len(conv.args) > 2 else None
        bias = _attr(gm, b).detach() if b is not None else torch.zeros(w.shape[0])
        inv = torch.rsqrt(var + eps) * (gamma if gamma is not None else 1.0)
        new_w = w * inv.reshape(-1, *([1] * (w.dim() - 1)))
        new_b = (bias - mean) * inv + (beta if beta is not None else 0.0)
        names = (f"_qat_folded_{folded}_weight", f"_qat_folded_{folded}_bias")
        gm.register_parameter(names[0], torch.nn.Parameter(new_w.detach().clone()))
        gm.register_parameter(names[1], torch.nn.Parameter(new_b.detach().clone()))
        with gm.graph.inserting_before(conv):
            w_node, b_node = gm.graph.get_attr(names[0]), gm.graph.get_attr(names[1])
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[1], args[2] = w_node, b_node
        conv.args = tuple(args)
        if _op(bn) == "batch_norm":
            bn.replace_all_uses_with(conv)
        else:  # returns (out, mean, rstd); the output is its first item
            for u in list(bn.users):
                if u.op == "call_function" and getattr(u.target, "__name__", "") == "getitem" and u.args[1] == 0:
                    u.replace_all_uses_with(conv)
                    gm.graph.erase_node(u)
        if not bn.users:
            gm.graph.erase_node(bn)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _insert_quantizers(gm: Any) -> tuple[list[Any], list[Any]]:
    act_cls, weight_cls = _make_modules()
    graph = gm.graph
    acts: list[Any] = []
    weights: list[Any] = []
    outputs = {a for n in graph.nodes if n.op == "output" for a in _flatten(n.args)}

    def quantized_tensor(n: Any) -> bool:
        if n in outputs or not n.users:
            return False
        users = [u for u in n.users if u.op != "output"]
        if users and all(_op(u) in _ACTIVATION for u in users):
            return False
        if n.op == "placeholder":
            return any(_op(u) in _QUANTIZED or _op(u) in _PASS_THROUGH for u in users)
        op = _op(n)
        if op in _PASS_THROUGH or op in _BATCH_NORM or not op:
            return False
        return op in _QUANTIZED or any(_op(u) in _QUANTIZED for u in users)

    for n in list(graph.nodes):
        if _op(n) in _WEIGHTED and len(n.args) > 1 and n.args[1].op == "get_attr":
            name = f"_qat_w{len(weights)}"
            mod = weight_cls()
            gm.add_submodule(name, mod)
            with graph.inserting_after(n.args[1]):
                q = graph.call_module(name, (n.args[1],))
            n.replace_input_with(n.args[1], q)
            weights.append(mod)
        if n.op in ("placeholder", "call_function") and quantized_tensor(n):
            name = f"_qat_a{len(acts)}"
            mod = act_cls()
            gm.add_submodule(name, mod)
            with graph.inserting_after(n):
                q = graph.call_module(name, (n,))
            n.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q and u.op == "call_function")
            acts.append(mod)
    gm.recompile()
    return acts, weights


def _arg_param(gm: Any, node: Any) -> Any:
    return _attr(gm, node) if node is not None and getattr(node, "op", "") == "get_attr" else None


def _flatten(args: Any) -> Iterator[Any]:
    if isinstance(args, (list, tuple)):
        for a in args:
            yield from _flatten(a)
    else:
        yield args


def _strip_quantizers(gm: Any) -> None:
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_qat_"):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _augment(x: Any, rng: np.random.Generator) -> Any:
    """Views near the data: mixes of two inputs, small noise, and for images flips and shifts."""
    torch = _torch()
    n = x.shape[0]
    lam = torch.from_numpy(rng.uniform(0.7, 1.0, size=(n,) + (1,) * (x.dim() - 1)).astype(np.float32))
    x = lam * x + (1 - lam) * x[torch.from_numpy(rng.permutation(n))]
    if x.dim() == 4 and x.shape[-1] > 4:
        flip = torch.from_numpy(rng.random(n) < 0.5)
        x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
        dy, dx = (int(v) for v in rng.integers(-(x.shape[-2] // 10), x.shape[-2] // 10 + 1, size=2))
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    noise = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    return x + 0.02 * x.std() * noise


def _set(mods: list[Any], mode: str) -> None:
    for m in mods:
        m.mode = mode


def _run(m: Any, x: np.ndarray) -> Any:
    """M's outputs on X as the build predicts them (a fixed-batch program in whole batches), as a tensor."""
    from ._torch import TorchBackend

    return _torch().from_numpy(TorchBackend().predict(m, x))


class FakeQuantized:
    """MODEL's graph with batch norms folded and the quantize step's rounding simulated in it."""

    def __init__(self, model: Any, sample: np.ndarray, static_batch: int | None) -> None:
        self.gm = _graph_module(model, sample)
        self.folded = _fold_batch_norms(self.gm)
        self.acts, self.weights = _insert_quantizers(self.gm)
        self.static_batch = static_batch
        # What the build knows about a .pt2 program's input shape carries over to the trained graph.
        self._shape_attrs = {a: getattr(model, a) for a in _SHAPE_ATTRS if hasattr(model, a)}
        if static_batch is not None:
            self._shape_attrs["_edgefleet_static_batch"] = static_batch
        for attr, value in self._shape_attrs.items():
            setattr(self.gm, attr, value)
        if not self.weights:
            raise InputError("qat found no convolution or linear layer to quantize in this model")

    def observe(self, x: np.ndarray) -> None:
        """Activation ranges as min/max calibration on X measures them: the float model, current weights."""
        _set(self.weights, "off")
        for a in self.acts:
            a.lo.zero_(), a.hi.zero_()
        _set(self.acts, "observe")
        _run(self.gm, x)
        _set(self.weights, "quant")
        _set(self.acts, "quant")

    def __call__(self, x: np.ndarray) -> Any:
        return _run(self.gm, x)

    def float_model(self) -> Any:
        """The trained graph without its quantizers: what the quantize step gets."""
        gm = copy.deepcopy(self.gm)
        _strip_quantizers(gm)
        for attr, value in self._shape_attrs.items():
            setattr(gm, attr, value)
        return gm


def quantization_aware_training(
    model: Any, data: Dataset, sample: np.ndarray, p: Any, static_batch: int | None, progress: Progress
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune MODEL under int8 fake quantization toward its own float outputs on DATA's inputs."""
    torch = _torch()
    F = torch.nn.functional
    teacher = model  # only read, under no_grad: the student is a separate copy of its graph
    fq = FakeQuantized(model, sample, static_batch)
    gm, acts, weights, folded = fq.gm, fq.acts, fq.weights, fq.folded
    xs = np.ascontiguousarray(data.x.astype(np.float32))
    calib = xs[:256]  # what the quantize step calibrates on by default
    # A fixed-batch program trains on whole multiples of its batch.
    bs = p.batch_size if static_batch is None else max(static_batch, p.batch_size // static_batch * static_batch)
    teacher_logits = _run(teacher, xs)
    two_d = teacher_logits.dim() == 2 and teacher_logits.shape[1] > 1
    temp = p.temperature

    def loss_of(s: Any, t: Any) -> Any:
        if two_d:
            return F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean") * temp**2
        return F.mse_loss(s, t)

    def evaluate() -> tuple[float, float]:
        """Fake-quantized agreement with the float model on the calibration inputs, and the loss there."""
        fq.observe(calib)
        s = fq(calib)
        t = teacher_logits[: len(s)]
        agree = float((s.argmax(1) == t.argmax(1)).float().mean()) if two_d else 0.0
        return agree, float(loss_of(s, t))

    agree, clean = evaluate()
    curve = [{"epoch": 0, "loss": None, "fake_quant_agreement": round(agree, 5), "fake_quant_loss": round(clean, 6)}]
    progress(f"qat: {folded} batch norm(s) folded, {len(weights)} weights and {len(acts)} activations fake-quantized")
    progress(f"qat: before training, fake-quantized agreement with the float model {agree:.4f}, loss {clean:.5f}")
    # Biases learn 100x faster: rounding shifts each channel's mean output (what bias correction repairs
    # after the fact), and a bias must move by a good part of an activation step to undo that in a few
    # hundred steps, where a weight need only cross half of its much finer rounding step.
    biases = {
        id(b) for n in gm.graph.nodes if _op(n) in _WEIGHTED and len(n.args) > 2
        for b in [_arg_param(gm, n.args[2])] if b is not None
    }  # fmt: skip
    params = [q for q in gm.parameters() if q.requires_grad]
    opt = torch.optim.Adam(
        [
            {"params": [q for q in params if id(q) not in biases], "lr": p.learning_rate},
            {"params": [q for q in params if id(q) in biases], "lr": p.learning_rate * 100},
        ]
    )
    batches = max(1, len(xs) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, p.epochs * batches))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    # The epoch kept is the best on the calibration inputs: agreement first, then loss.
    best_state, best, kept = copy.deepcopy(gm.state_dict()), (agree, -clean), 0
    for epoch in range(p.epochs):
        order = rng.permutation(len(xs))
        total, started = 0.0, time.perf_counter()
        for b in range(batches):
            idx = order[b * bs : (b + 1) * bs]
            x = torch.from_numpy(xs[idx])
            if p.augment:
                x = _augment(x, rng)
            chunks = x.split(static_batch) if static_batch else [x]
            if static_batch is not None and len(chunks[-1]) != static_batch:
                chunks = chunks[:-1]  # a fixed-batch program takes whole batches only
            opt.zero_grad()
            for c in chunks:
                with torch.no_grad():
                    tc = teacher(c)
                loss = loss_of(gm(c), tc) / len(chunks)
                loss.backward()
                total += float(loss.detach())
            opt.step()
            sched.step()
        agree, clean = evaluate()
        curve.append(
            {
                "epoch": epoch + 1,
                "loss": round(total / batches, 6),
                "fake_quant_agreement": round(agree, 5),
                "fake_quant_loss": round(clean, 6),
            }
        )
        progress(
            f"qat: epoch {epoch + 1}/{p.epochs} loss {total / batches:.5f}; fake-quantized agreement {agree:.4f}, "
            f"loss {clean:.5f} ({time.perf_counter() - started:.1f} s)"
        )
        if (agree, -clean) > best:
            best_state, best, kept = copy.deepcopy(gm.state_dict()), (agree, -clean), epoch + 1
    gm.load_state_dict(best_state)
    out = fq.float_model()
    return out, {
        "library": "edgefleet (torch.export graph, torch fake-quantize ops)",
        "batch_norms_folded": folded,
        "weights_fake_quantized": len(weights),
        "activations_fake_quantized": len(acts),
        "epoch_kept": kept,
        "fake_quant_agreement": best[0],
        "curve": curve,
    }
