"""PyTorch backend: distillation, magnitude and structured pruning, ONNX and TFLite export."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
import re
import zipfile
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._errors import require

from .._data import Dataset, padded_batches, run_batched
from .._int8 import bias_shift
from . import FrameworkBackend, Gate, Progress

torch = require("torch", "convert", "PyTorch models")
nn = torch.nn
F = torch.nn.functional


def load_pt2(path: Path) -> Any:
    """Load a torch.export program (`.pt2`) as a runnable module."""
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{path.name} is not a torch.export program (.pt2): not a zip archive; write one with "
            "torch.export.save(torch.export.export(model, (x,)), 'model.pt2')"
        )
    # torch.export.load logs the traceback of a failed deserialisation as a warning and raises an error that
    # points at it; keep the log's last line for our one-line error instead of letting it reach the user.
    caught = _LastRecord()
    log = logging.getLogger("torch.export")
    handlers, propagate = log.handlers[:], log.propagate
    log.handlers, log.propagate = [caught], False
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a corrupt archive
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if caught.last:
            why = caught.last
        raise InputError(f"{path.name} is not a readable torch.export program (.pt2): {why[:300]}") from exc
    finally:
        log.handlers, log.propagate = handlers, propagate
    module = ep.module()
    user_inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
    if len(user_inputs) != 1:
        raise InputError(
            f"{path.name} takes {len(user_inputs)} inputs; edgefleet builds models with one input tensor "
            "(export a wrapper module that takes one)"
        )
    val = user_inputs[0].meta.get("val")
    if val is not None and hasattr(val, "shape"):
        # torch.export specialises every dimension it saw as a plain int (a batch of 1 or 4 included) and
        # checks it on every call; the build feeds such a program batches of exactly that size.
        shape = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
        module._edgefleet_input_shape = shape
        if shape and shape[0] is not None:
            module._edgefleet_static_batch = shape[0]
    return module


class _LastRecord(logging.Handler):
    """Keeps the last line of the last record logged (its exception's message, if it carries one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.last = (str(record.exc_info[1]).strip().splitlines() or [""])[0]
        else:
            self.last = (record.getMessage().strip().splitlines() or [""])[-1]


def _static_batch(model: Any) -> int | None:
    return getattr(model, "_edgefleet_static_batch", None)


def _forward(model: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _batches(ds: Dataset, batch_size: int, rng: np.random.Generator) -> Any:
    order = rng.permutation(len(ds))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        xb = torch.from_numpy(np.ascontiguousarray(ds.x[idx]))
        yb = None if ds.y is None else torch.from_numpy(ds.y[idx].astype(np.int64))
        yield idx, xb, yb


def _accuracy(backend: TorchBackend, model: Any, ds: Dataset) -> float | None:
    if ds.y is None:
        return None
    return float((backend.predict(model, ds.x).argmax(axis=1) == ds.y).mean())


def _prunable(model: Any) -> list[tuple[str, Any]]:
    """Weights of conv / linear layers: every parameter with two or more dimensions."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]


def _sparsity(model: Any) -> float:
    ps = _prunable(model)
    total = sum(p.numel() for _, p in ps)
    zeros = sum(int((p == 0).sum()) for _, p in ps)
    return zeros / max(1, total)


def _set_train(model: Any, mode: bool) -> None:
    # Graph modules from torch.export cannot switch modes; they train as exported.
    try:
        model.train(mode)
    except NotImplementedError:
        pass


def _export_error(target: str, exc: BaseException) -> str:
    """One line naming the operator(s) the exporter could not express, when its message says which."""
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and len(parts) < 6:
        parts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    text = "\n".join(parts)
    ops = sorted(set(re.findall(r"(?:aten|prims)\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", text)))
    ops = [o for o in ops if not any(other.startswith(o + ".") for other in ops)]
    if ops:
        return f"PyTorch -> {target} export failed: operator(s) {', '.join(ops)} cannot be expressed in this format"
    first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return f"PyTorch -> {target} export failed: {first}"


def _ce(model: Any, idx: np.ndarray, xb: Any, yb: Any) -> Any:
    return F.cross_entropy(model(xb), yb)


class TorchBackend(FrameworkBackend):
    name = "torch"

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        _set_train(model, False)
        static = _static_batch(model)
        if static is not None:
            return run_batched(lambda b: _forward(model, b), x, static).astype(np.float32)
        return np.concatenate([_forward(model, x[i : i + 256]) for i in range(0, len(x), 256)]).astype(np.float32)

    def input_shape(self, model: Any, sample: np.ndarray) -> tuple[int | None, ...]:
        # A .pt2 program knows its input shape; a module from Python only tells by running.
        shape = getattr(model, "_edgefleet_input_shape", None)
        return (None, *shape[1:]) if shape else (None, *sample.shape[1:])

    def param_bytes(self, model: Any) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def _fit(
        self,
        model: Any,
        train: Dataset,
        epochs: int,
        lr: float,
        bs: int,
        loss_fn: Any,
        progress: Progress,
        label: str,
        after_step: Any = None,
        on_epoch: Any = None,
    ) -> None:
        if train.y is None:
            raise InputError(f"{label} needs labelled training data (an .npz with 'x' and 'y')")
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        rng = np.random.default_rng(0)
        torch.manual_seed(0)
        for epoch in range(epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            _set_train(model, True)
            total, n = 0.0, 0
            for idx, xb, yb in _batches(train, bs, rng):
                opt.zero_grad()
                loss = loss_fn(model, idx, xb, yb)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
                total += float(loss.detach()) * len(xb)
                n += len(xb)
            acc = _accuracy(self, model, train)
            progress(f"{label}: epoch {epoch + 1}/{epochs} loss {total / max(1, n):.4f} train acc {acc:.4f}")

    def distill(self, teacher: Any, student: Any, train: Dataset, p: Any, progress: Progress) -> Any:
        if not isinstance(student, nn.Module):
            raise InputError(
                f"distill.student must be a torch.nn.Module for a PyTorch teacher, got {type(student).__name__}"
            )
        student = copy.deepcopy(student)  # trained from the same start on every build
        # Teacher logits are computed once; each batch looks its rows up by index.
        t_logits = torch.from_numpy(self.predict(teacher, train.x))
        temp, alpha = p.temperature, p.alpha

        def loss_fn(model: Any, idx: np.ndarray, xb: Any, yb: Any) -> Any:
            s = model(xb)
            t = t_logits[idx]
            soft = F.kl_div(F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction="batchmean")
            return alpha * temp * temp * soft + (1 - alpha) * F.cross_entropy(s, yb)

        self._fit(student, train, p.epochs, p.learning_rate, p.batch_size, loss_fn, progress, "distill")
        student.eval()
        return student

    def prune_magnitude(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        model = copy.deepcopy(model)  # the caller's model stays as it was: a second build starts from it again
        params = _prunable(model)
        if not params:
            raise InputError("prune_magnitude found no conv / linear weights to prune")
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in params}
        total_steps = max(1, p.steps)
        # Pruning steps are spread evenly over the fine-tuning epochs (polynomial decay, power 3).
        per_epoch = max(1, math.ceil(total_steps / max(1, p.epochs)))
        step = {"k": 0}

        def target(k: int) -> float:
            return float(p.sparsity * (1 - (1 - k / total_steps) ** 3))

        def prune_to(s: float) -> None:
            with torch.no_grad():
                allw = torch.cat([w.detach().abs().flatten() for _, w in params])
                k = int(s * allw.numel())
                if k == 0:
                    return
                thr = torch.kthvalue(allw, k).values
                for n, w in params:
                    masks[n] = w.detach().abs() > thr
                    w.mul_(masks[n])

        def apply_masks() -> None:
            with torch.no_grad():
                for n, w in params:
                    w.mul_(masks[n])

        def on_epoch(epoch: int) -> None:
            for _ in range(per_epoch):
                if step["k"] < total_steps:
                    step["k"] += 1
                    prune_to(target(step["k"]))
            progress(f"prune_magnitude: sparsity target {target(step['k']):.3f} (step {step['k']}/{total_steps})")

        self._fit(
            model,
            train,
            max(1, p.epochs),
            p.learning_rate,
            p.batch_size,
            _ce,
            progress,
            "prune_magnitude",
            after_step=apply_masks,
            on_epoch=on_epoch,
        )
        if step["k"] < total_steps:
            prune_to(p.sparsity)
        apply_masks()
        _set_train(model, False)
        return model, {"sparsity": round(_sparsity(model), 4), "train_accuracy": _accuracy(self, model, train)}

    def prune_structured(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        if not isinstance(model, nn.Module) or type(model).__name__ in ("GraphModule",):
            raise InputError("prune_structured needs the model as a torch.nn.Module from Python (not a .pt2 program)")
        before = sum(q.numel() for q in model.parameters())
        model = copy.deepcopy(model).eval()
        pairs = _find_prunable_pairs(model, train.x[:2])
        if not pairs:
            raise InputError(
                "prune_structured found no conv/linear layer whose channels can be removed "
                "(each must feed exactly one conv/linear through BN, activations, pooling or flatten)"
            )
        removed = {}
        for pair in pairs:
            removed[pair.producer] = _prune_pair(model, pair, p.ratio)
        after_prune = sum(q.numel() for q in model.parameters())
        progress(f"prune_structured: removed channels {removed}; parameters {before} -> {after_prune}")
        self._fit(model, train, p.epochs, p.learning_rate, p.batch_size, _ce, progress, "prune_structured")
        model.eval()
        return model, {
            "channels_removed": removed,
            "params_before": before,
            "params_after": after_prune,
            "train_accuracy": _accuracy(self, model, train),
        }

    def qat(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        from ._torch_qat import quantization_aware_training

        _set_train(model, False)
        return quantization_aware_training(model, train, train.x[:2], p, _static_batch(model), progress)

    def export_onnx(self, model: Any, sample: np.ndarray, path: Path) -> None:
        _set_train(model, False)
        static = _static_batch(model)
        if static is not None:
            x, dyn = torch.from_numpy(next(padded_batches(sample, static))[0]), None
        else:
            # A batch of two: torch.export specialises a size-1 dimension to a constant.
            x = torch.from_numpy(np.ascontiguousarray(np.concatenate([sample[:1], sample[:1]])))
            dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        try:
            prog = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=dyn,
                verbose=False,
            )
            prog.save(str(path))
        except Exception as exc:
            raise InputError(_export_error("ONNX (torch.onnx)", exc)) from exc

    def export_tflite(
        self,
        model: Any,
        sample: np.ndarray,
        path: Path,
        mode: str,
        calib: Dataset | None,
        io: str,
        bias_correction: bool = True,
        gate: Gate | None = None,
    ) -> dict[str, Any]:
        litert_torch = require("litert_torch", "convert", "PyTorch -> TFLite export")
        _set_train(model, False)
        x = torch.from_numpy(next(padded_batches(sample, _static_batch(model) or 1))[0])
        if mode == "int8" and bias_correction and calib is not None and len(calib):
            # Convert a bias-corrected copy: the quantizer rounds these weights the same way (per output channel).
            model = copy.deepcopy(model)
            _bias_correct(model, calib.x[:64])
        try:
            # litert-torch reports its progress on stdout; keep stdout for the build report.
            with contextlib.redirect_stdout(StringIO()):
                litert_torch.convert(model, (x,)).export(str(path))
        except Exception as exc:
            raise InputError(_export_error("TFLite (litert-torch)", exc)) from exc
        if mode == "none":
            return {"precision": "fp32"}
        from .._tflite_quant import quantize_tflite, quantize_tflite_gated

        if mode == "int8" and gate is not None and calib is not None and len(calib):
            return quantize_tflite_gated(path, calib, gate.score, gate.budget, gate.progress)
        return {"precision": quantize_tflite(path, mode, calib, io)}


def _bias_correct(model: Any, x: np.ndarray) -> int:
    """Fold the mean output shift of int8 per-channel weight rounding into conv / linear biases.

    BN folding scales each output channel by a constant, which leaves per-channel rounding unchanged,
    so correcting here carries over to the folded weights the TFLite quantizer rounds.
    """
    if not isinstance(model, nn.Module):
        return 0
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    # Only modules from Python have these layers (a .pt2 program's graph has none), so batches need no padding.
    if not layers:
        return 0
    # Per layer: the sum over rows of the input's channel values and the number of rows, where a row is one
    # position of one sample (convolutions: batch first, channels second; linear: channels last, any layout).
    sums: dict[int, Any] = {}
    rows: dict[int, int] = {}

    def hook(mod: Any, inputs: tuple[Any, ...], _: Any) -> None:
        a = inputs[0].detach().double()
        flat = a.reshape(-1, a.shape[-1]) if isinstance(mod, nn.Linear) else a.transpose(0, 1).reshape(a.shape[1], -1).T
        sums[id(mod)] = sums.get(id(mod), 0) + flat.sum(dim=0)
        rows[id(mod)] = rows.get(id(mod), 0) + len(flat)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        _set_train(model, False)
        with torch.no_grad():
            for i in range(0, len(x), 16):
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + 16])))
    finally:
        for h in handles:
            h.remove()
    done = 0
    with torch.no_grad():
        for m in layers:
            if id(m) not in sums:
                continue
            mean_in = (sums[id(m)] / rows[id(m)]).numpy()
            w = m.weight.detach().numpy()
            groups = m.groups if isinstance(m, (nn.Conv1d, nn.Conv2d)) else 1
            shift = torch.from_numpy(bias_shift(w, mean_in, groups))
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=m.weight.dtype))
            m.bias.sub_(shift.to(m.bias.dtype))
            done += 1
    return done


# --- structured pruning -------------------------------------------------------------------

_PASS_THROUGH = (
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
)
_PASS_FUNCS = {
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.dropout,
}


class _Pair:
    def __init__(self, producer: str, bns: list[str], consumer: str, flatten_spatial: int) -> None:
        self.producer, self.bns, self.consumer, self.flatten_spatial = producer, bns, consumer, flatten_spatial


def _find_prunable_pairs(model: Any, sample: np.ndarray) -> list[_Pair]:
    """Conv/linear producers whose output reaches exactly one conv/linear through channel-wise ops."""
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = symbolic_trace(model)
        ShapeProp(gm).propagate(torch.from_numpy(np.ascontiguousarray(sample)))
    except Exception as exc:
        raise InputError(f"prune_structured could not trace the model with torch.fx: {exc}") from exc
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(mods[node.target], nn.Conv2d) and mods[node.target].groups != 1:
            continue
        bns, cur, spatial = [], node, 1
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            nxt = users[0]
            if nxt.op == "call_module":
                m = mods[nxt.target]
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                    bns.append(nxt.target)
                elif isinstance(m, nn.Flatten):
                    shape = cur.meta["tensor_meta"].shape
                    spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
                elif isinstance(m, (nn.Conv2d, nn.Linear)):
                    ok = isinstance(m, nn.Linear) or m.groups == 1
                    if ok and nxt.args[0] is cur:
                        pairs.append(_Pair(node.target, bns, nxt.target, spatial))
                    break
                elif not isinstance(m, _PASS_THROUGH):
                    break
            elif (nxt.op == "call_function" and (nxt.target in _PASS_FUNCS or nxt.target is torch.flatten)) or (
                nxt.op == "call_method" and nxt.target in ("relu", "flatten")
            ):
                if nxt.target in (torch.flatten, "flatten"):
                    shape = cur.meta["tensor_meta"].shape
                    spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            else:
                break
            if nxt.args and nxt.args[0] is not cur:
                break
            cur = nxt
    return pairs


def _set_module(model: Any, name: str, new: Any) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = operator.attrgetter(parent_name)(model) if parent_name else model
    setattr(parent, attr, new)


def _prune_pair(model: Any, pair: _Pair, ratio: float) -> int:
    mods = dict(model.named_modules())
    prod, cons = mods[pair.producer], mods[pair.consumer]
    w = prod.weight.detach()
    n_out = w.shape[0]
    keep_n = max(1, n_out - round(n_out * ratio))
    if keep_n == n_out:
        return 0
    importance = w.abs().reshape(n_out, -1).sum(dim=1)
    keep = torch.sort(torch.topk(importance, keep_n).indices).values
    with torch.no_grad():
        if isinstance(prod, nn.Conv2d):
            new_p = nn.Conv2d(
                prod.in_channels,
                keep_n,
                prod.kernel_size,
                prod.stride,
                prod.padding,
                prod.dilation,
                1,
                prod.bias is not None,
                prod.padding_mode,
            )
        else:
            new_p = nn.Linear(prod.in_features, keep_n, prod.bias is not None)
        new_p.weight.copy_(w[keep])
        if prod.bias is not None:
            new_p.bias.copy_(prod.bias.detach()[keep])
        _set_module(model, pair.producer, new_p)
        for bn_name in pair.bns:
            bn = mods[bn_name]
            new_bn = type(bn)(keep_n, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            if bn.affine:
                new_bn.weight.copy_(bn.weight.detach()[keep])
                new_bn.bias.copy_(bn.bias.detach()[keep])
            if bn.track_running_stats:
                new_bn.running_mean.copy_(bn.running_mean[keep])
                new_bn.running_var.copy_(bn.running_var[keep])
            _set_module(model, bn_name, new_bn)
        cw = cons.weight.detach()
        if isinstance(cons, nn.Conv2d):
            new_c = nn.Conv2d(
                keep_n,
                cons.out_channels,
                cons.kernel_size,
                cons.stride,
                cons.padding,
                cons.dilation,
                1,
                cons.bias is not None,
                cons.padding_mode,
            )
            new_c.weight.copy_(cw[:, keep])
        else:
            s = pair.flatten_spatial
            cols = (keep[:, None] * s + torch.arange(s)[None, :]).reshape(-1)
            new_c = nn.Linear(len(cols), cons.out_features, cons.bias is not None)
            new_c.weight.copy_(cw[:, cols])
        if cons.bias is not None:
            new_c.bias.copy_(cons.bias.detach())
        _set_module(model, pair.consumer, new_c)
    return n_out - keep_n
