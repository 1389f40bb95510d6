"""Inference backends behind one small interface; each framework is imported only when used."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edgefleet import ModelEntry

__all__ = ["BACKENDS", "Session", "SessionOptions", "open_session"]

BACKENDS = {"onnx": "onnxruntime", "tflite": "litert"}


@dataclass
class SessionOptions:
    """What the caller asked for: accelerators in priority order (None: the bundle's hints) and CPU threads."""

    accelerators: list[str] | None = None
    threads: int | None = None


class Session(ABC):
    """One loaded model file. `run` takes and returns tensors in the file's own dtypes."""

    backend: str
    backend_version: str
    accelerator: str
    # Why a requested accelerator is not in use; empty when the first choice worked.
    fallbacks: list[str]
    # The file was exported for this batch size (None: any); larger batches are split.
    fixed_batch: int | None
    # CPU threads the session was opened with (None: the backend's default).
    threads: int | None = None

    @abstractmethod
    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def take_wait_s(self) -> float:
        """Seconds this thread's calls to `run` waited for other threads' calls since the last take (0 for
        a backend that runs calls side by side)."""
        return 0.0


def open_session(entry: ModelEntry, data: bytes, options: SessionOptions) -> Session:
    """A session for ENTRY's file bytes DATA, or a BundleError / MissingDependencyError saying why not."""
    if entry.format == "onnx":
        from ._onnxruntime import OrtSession

        return OrtSession(entry, data, options)
    from ._litert import LiteRtSession

    return LiteRtSession(entry, data, options)
