"""ONNX Runtime backend: execution providers by name in priority order, CPU as the last resort."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import numpy as np

from edgefleet import BundleError, ModelEntry
from edgefleet._errors import require
from edgefleet._manifest import version_tuple

from . import Session, SessionOptions

CPU = "CPUExecutionProvider"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_requirements(entry: ModelEntry, ort_version: str) -> None:
    # min_onnxruntime already encodes the opset (the converters derive it from ORT's opset table);
    # an op the installed release lacks still fails at session creation, with the op named.
    need = str(entry.requirements.get("min_onnxruntime", "0"))
    if version_tuple(ort_version) < version_tuple(need):
        raise BundleError(
            f"model '{entry.id}' needs onnxruntime >= {need}, but {ort_version} is installed; "
            "upgrade onnxruntime or use a bundle built for it"
        )


class OrtSession(Session):
    backend = "onnxruntime"

    def __init__(self, entry: ModelEntry, data: bytes, options: SessionOptions) -> None:
        ort: Any = require("onnxruntime", "runtime", "running ONNX models")
        self.backend_version = version("onnxruntime")
        check_requirements(entry, self.backend_version)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
        self.threads = options.threads
        available = set(ort.get_available_providers())
        requested = list(options.accelerators if options.accelerators is not None else entry.accelerators) or [CPU]
        self.fallbacks = []
        providers = []
        for name in requested:
            if name in available:
                providers.append(name)
            else:
                self.fallbacks.append(f"{name} is not available in onnxruntime {self.backend_version}")
        if CPU not in providers:
            providers.append(CPU)
        try:
            self._s = ort.InferenceSession(data, so, providers=providers)
        except Exception as exc:
            if providers == [CPU]:
                raise BundleError(
                    f"onnxruntime {self.backend_version} cannot load model '{entry.id}': {_first_line(exc)}"
                ) from exc
            self.fallbacks.append(f"{providers[0]} failed to initialise: {_first_line(exc)}")
            try:
                self._s = ort.InferenceSession(data, so, providers=[CPU])
            except Exception as exc2:
                raise BundleError(
                    f"onnxruntime {self.backend_version} cannot load model '{entry.id}': {_first_line(exc2)}"
                ) from exc2
        active = self._s.get_providers()[0]
        if providers[0] != active and not any(providers[0] in f for f in self.fallbacks):
            self.fallbacks.append(f"{providers[0]} did not take the model; onnxruntime chose {active}")
        self.accelerator = active
        self._in = [i.name for i in self._s.get_inputs()]
        self._out = [o.name for o in self._s.get_outputs()]
        shape = self._s.get_inputs()[0].shape
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) else None
        # On the CPU provider, call the C++ session directly: InferenceSession.run's Python checks (input
        # names, provider fallback on EP failure) cost ~3 us a call and guard nothing here, since the
        # feed is built from the session's own input names and there is no provider to fall back from.
        raw = getattr(self._s, "_sess", None)
        self._raw = raw if active == CPU and callable(getattr(raw, "run", None)) else None

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = {self._in[0]: inputs[0]} if len(self._in) == 1 else dict(zip(self._in, inputs, strict=True))
        if self._raw is not None:
            try:
                return self._raw.run(self._out, feed, None)
            except TypeError:
                self._raw = None  # a release whose internals differ: the public call from now on
        return list(self._s.run(None, feed))
