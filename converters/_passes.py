"""Registered passes with typed parameters, usable from Python and from a TOML recipe."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from edgefleet import InputError

__all__ = [
    "PASSES",
    "Distill",
    "Pass",
    "PruneMagnitude",
    "PruneStructured",
    "QuantAwareTraining",
    "Quantize",
    "pass_from_dict",
    "register_pass",
]

PASSES: dict[str, type[Pass]] = {}


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    def deco(cls: type[Pass]) -> type[Pass]:
        cls.name = name
        PASSES[name] = cls
        return cls

    return deco


@dataclass
class Pass:
    """Base of every pass: a dataclass of typed parameters. `params()` is what the report shows."""

    name: ClassVar[str] = "pass"
    stage: ClassVar[str] = "model"  # "model": changes the framework model; "quantize": makes artifacts

    def params(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v if isinstance(v, (str, int, float, bool, list, type(None))) else type(v).__name__
        return out


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise InputError(f"{where} is {value!r}; expected one of {', '.join(map(repr, typing.get_args(hint)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            if arm is type(None) and value is None:
                return None
            try:
                return _check_type(value, arm, where)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[-1] if errors else f"{where} has the wrong type")
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"{where} must be a list, got {type(value).__name__}")
        (arg,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any or hint is object:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and (not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool)):
        raise InputError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def pass_from_dict(doc: dict[str, Any], where: str = "recipe step") -> Pass:
    """Build a pass from a recipe table such as {pass = "prune_magnitude", sparsity = 0.5}."""
    doc = dict(doc)
    name = doc.pop("pass", None)
    if name not in PASSES:
        raise InputError(f"{where}: unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    cls = PASSES[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in doc.items():
        if key not in fields:
            raise InputError(f"{where} ({name}): unknown parameter '{key}'; parameters are {', '.join(fields)}")
        kwargs[key] = _check_type(value, hints[key], f"{where} ({name}).{key}")
    try:
        p = cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{where} ({name}): {exc}") from exc
    return p


def _positive(v: float, what: str) -> None:
    if v <= 0:
        raise InputError(f"{what} must be > 0, got {v}")


def _fraction(v: float, what: str) -> None:
    if not 0.0 <= v < 1.0:
        raise InputError(f"{what} must be in [0, 1), got {v}")


@register_pass("distill")
@dataclass
class Distill(Pass):
    """Knowledge distillation: train STUDENT on the teacher's softened logits plus hard labels.

    loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)
    `student` is a model object, or in a recipe "package.module:factory" returning one.
    """

    student: Any = None
    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 64

    def __post_init__(self) -> None:
        _positive(self.temperature, "distill.temperature")
        _positive(self.epochs, "distill.epochs")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.student is None:
            raise InputError("distill needs a student: a model object, or 'package.module:factory' in a recipe")


@register_pass("prune_magnitude")
@dataclass
class PruneMagnitude(Pass):
    """Global magnitude (unstructured) pruning to `sparsity`, reached by a polynomial schedule
    over `epochs` of fine-tuning (`steps` pruning steps)."""

    sparsity: float = 0.5
    epochs: int = 4
    steps: int = 4
    learning_rate: float = 5e-4
    batch_size: int = 64

    def __post_init__(self) -> None:
        _fraction(self.sparsity, "prune_magnitude.sparsity")
        _positive(self.steps, "prune_magnitude.steps")


@register_pass("prune_structured")
@dataclass
class PruneStructured(Pass):
    """Remove the lowest-L1 `ratio` of output channels of conv / linear layers (PyTorch),
    rewiring their consumers, then fine-tune for `epochs`."""

    ratio: float = 0.25
    epochs: int = 3
    learning_rate: float = 5e-4
    batch_size: int = 64

    def __post_init__(self) -> None:
        _fraction(self.ratio, "prune_structured.ratio")


@register_pass("qat")
@dataclass
class QuantAwareTraining(Pass):
    """Quantization-aware training for `epochs`.

    Keras: tensorflow-model-optimization's QAT on labelled training data; the model converts to int8 TFLite.
    PyTorch: fine-tunes under fake quantization that rounds as the quantize step will (int8 weights per
    channel, uint8 activations over their calibrated range), toward the float model's own outputs
    (distillation at `temperature`; `augment` mixes, flips, shifts and adds noise to the inputs), so
    unlabelled calibration inputs are enough. The quantize step then quantizes the fine-tuned model.
    """

    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 64
    temperature: float = 2.0
    augment: bool = True

    def __post_init__(self) -> None:
        _positive(self.epochs, "qat.epochs")
        _positive(self.learning_rate, "qat.learning_rate")
        _positive(self.batch_size, "qat.batch_size")
        _positive(self.temperature, "qat.temperature")


@register_pass("quantize")
@dataclass
class Quantize(Pass):
    """Post-training quantization of every exported file.

    mode: none | dynamic | int8 | fp16. For ONNX int8: QDQ, per-channel weights, `calibration`
    method, `activation_type` (auto: uint8 activations, the fast kernels of ONNX Runtime; int8 ones only
    when uint8 fails the gate and int8 passes, chosen by score, never by a timing), `bias_correction` (fold
    the mean shift of int8 weight rounding into biases, as NNCF's fast bias correction does).
    `max_accuracy_drop` keeps the most sensitive nodes in float until the int8 file loses no more than that
    against the source model on the evaluation set. `io` (TFLite int8 from Keras): float or int8
    inputs/outputs.
    """

    stage: ClassVar[str] = "quantize"
    mode: Literal["none", "dynamic", "int8", "fp16"] = "int8"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_type: Literal["auto", "uint8", "int8"] = "auto"
    per_channel: bool = True
    bias_correction: bool = True
    max_accuracy_drop: float | None = None
    calibration_samples: int = 256
    io: Literal["float", "int8"] = "float"
    min_calibration_samples: int = 8

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None:
            _fraction(self.max_accuracy_drop, "quantize.max_accuracy_drop")
