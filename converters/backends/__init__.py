"""Framework backends: one file per framework, imported only when a model of that kind is built."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError

from .._data import Dataset
from .._gate import Budget

__all__ = ["FrameworkBackend", "Gate", "backend_for", "load_model"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Gate:
    """The accuracy gate: SCORE(path) may lose at most what BUDGET allows against the source model."""

    score: Callable[[Path], float]
    budget: Budget
    progress: Progress


class FrameworkBackend(abc.ABC):
    """What the build needs from a training framework. Unsupported steps raise InputError."""

    name: str = "?"

    @abc.abstractmethod
    def predict(self, model: Any, x: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def input_shape(self, model: Any, sample: np.ndarray) -> tuple[int | None, ...]: ...

    def param_bytes(self, model: Any) -> int:
        raise NotImplementedError

    def distill(self, teacher: Any, student: Any, train: Dataset, p: Any, progress: Progress) -> Any:
        raise InputError(f"distillation is not available for {self.name} models")

    def prune_magnitude(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        raise InputError(f"magnitude pruning is not available for {self.name} models")

    def prune_structured(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        raise InputError(f"structured pruning is not available for {self.name} models; it is supported for PyTorch")

    def qat(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        raise InputError(
            f"quantization-aware training is not available for {self.name} models; "
            "it is supported for PyTorch and Keras (tensorflow-model-optimization)"
        )

    @abc.abstractmethod
    def export_onnx(self, model: Any, sample: np.ndarray, path: Path) -> None: ...

    @abc.abstractmethod
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
        """Write a TFLite file (quantized as MODE where the framework does it).

        Returns at least {"precision": ...}. With GATE, an int8 file that loses more than the
        gate allows keeps its most sensitive ops in float where the route supports it.
        """

    def source_format(self) -> str:
        return self.name


def backend_for(model: Any) -> FrameworkBackend:
    """The backend for an in-memory model object (torch.nn.Module or Keras model)."""
    mod = type(model).__module__
    for klass in type(model).__mro__:
        m = klass.__module__
        if m.startswith("torch."):
            from ._torch import TorchBackend

            return TorchBackend()
        if m.startswith("tf_keras"):
            from ._keras import KerasBackend

            return KerasBackend()
        if m.startswith("keras"):
            from ._keras import Keras3Backend

            return Keras3Backend()
    raise InputError(
        f"unsupported model object {type(model).__name__} from {mod}: give a torch.nn.Module, "
        "a Keras 3 or tf_keras model, or a path to .onnx / .pt2 / .keras"
    )


def load_model(path: Path) -> tuple[Any, FrameworkBackend | None, str]:
    """Load a model file: (model, backend or None for ONNX, source format)."""
    if not path.exists():
        raise InputError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin"):
        raise InputError(
            f"{path.name} is a pickled PyTorch file, which can run arbitrary code when loaded and is refused; "
            "give a torch.export program instead: torch.export.save(torch.export.export(model, (x,)), 'model.pt2')"
        )
    if suffix == ".onnx":
        from ._onnx import load_onnx

        return load_onnx(path), None, "onnx"
    if suffix == ".pt2":
        from ._torch import TorchBackend, load_pt2

        return load_pt2(path), TorchBackend(), "pt2"
    if suffix in (".keras", ".h5"):
        from ._keras import load_keras

        model, backend = load_keras(path)
        return model, backend, "keras"
    raise InputError(f"unknown model file type '{suffix}': give .onnx, .pt2 (torch.export) or .keras")
