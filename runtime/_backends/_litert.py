"""LiteRT backend (ai-edge-litert): XNNPACK by default, external delegates by library path."""

from __future__ import annotations

import os
import threading
import time
from importlib.metadata import version
from typing import Any

import numpy as np

from edgefleet import BundleError, ModelEntry
from edgefleet._errors import require
from edgefleet._manifest import version_tuple

from . import Session, SessionOptions

XNNPACK = "xnnpack"
CPU = "cpu"  # LiteRT's built-in optimized kernels, no delegate
REFERENCE = "reference"  # the portable reference kernels: slow, identical results on every CPU


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _parse_delegate(spec: str) -> tuple[str, dict[str, str]]:
    """'/path/libvendor_delegate.so?key=value&k2=v2' -> (path, options), the form NPU vendors document."""
    path, _, query = spec.partition("?")
    opts = dict(kv.split("=", 1) for kv in query.split("&") if "=" in kv)
    return path, opts


def is_delegate_path(spec: str) -> bool:
    return "/" in spec or spec.partition("?")[0].endswith(".so")


def _check_delegate_library(path: str) -> None:
    # LiteRT's own loader leaves a half-built object behind (and prints a traceback) for a library
    # that is not a delegate; looking for the entry point first gives a clean reason instead.
    import ctypes

    if not os.path.exists(path):
        raise FileNotFoundError(f"no delegate library at {path}")
    lib = ctypes.CDLL(path)
    if not hasattr(lib, "tflite_plugin_create_delegate"):
        raise ValueError(f"{path} is not a LiteRT external delegate (no tflite_plugin_create_delegate)")


class LiteRtSession(Session):
    backend = "litert"

    def __init__(self, entry: ModelEntry, data: bytes, options: SessionOptions) -> None:
        interp: Any = require("ai_edge_litert.interpreter", "runtime", "running TFLite models")
        self.backend_version = version("ai-edge-litert")
        need = str(entry.requirements.get("min_litert", "0"))
        if version_tuple(self.backend_version) < version_tuple(need):
            raise BundleError(
                f"model '{entry.id}' needs ai-edge-litert >= {need}, but {self.backend_version} is installed; "
                "upgrade ai-edge-litert or use a bundle built for it"
            )
        requested = list(options.accelerators if options.accelerators is not None else entry.accelerators) or [XNNPACK]
        self.fallbacks = []
        self._run_lock = threading.Lock()
        self.threads = options.threads
        self._waits = threading.local()
        self._it: Any = None
        for spec in requested:
            try:
                if spec == XNNPACK:
                    self._it = self._make(interp, data, options, interp.OpResolverType.AUTO, [])
                elif spec == CPU:
                    resolver = interp.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
                    self._it = self._make(interp, data, options, resolver, [])
                elif spec == REFERENCE:
                    self._it = self._make(interp, data, options, interp.OpResolverType.BUILTIN_REF, [])
                elif is_delegate_path(spec):
                    path, opts = _parse_delegate(spec)
                    _check_delegate_library(path)
                    delegate = interp.load_delegate(path, opts)
                    self._it = self._make(interp, data, options, interp.OpResolverType.AUTO, [delegate])
                else:
                    self.fallbacks.append(
                        f"unknown LiteRT accelerator '{spec}' "
                        "(use 'xnnpack', 'cpu', 'reference' or a delegate library path)"
                    )
                    continue
            except BundleError:
                raise
            except Exception as exc:
                self.fallbacks.append(f"{spec} failed to initialise: {_first_line(exc)}")
                continue
            self.accelerator = spec
            break
        if self._it is None:
            self._it = self._make(interp, data, options, interp.OpResolverType.AUTO, [])
            self.accelerator = XNNPACK
        self._details()
        shape = self._inputs[0]["shape_signature"]
        self.fixed_batch = int(shape[0]) if len(shape) and int(shape[0]) > 0 else None

    def _make(self, interp: Any, data: bytes, options: SessionOptions, resolver: Any, delegates: list[Any]) -> Any:
        try:
            it = interp.Interpreter(
                model_content=data,
                experimental_delegates=delegates or None,
                num_threads=options.threads,
                experimental_op_resolver_type=resolver,
            )
            it.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if delegates:
                raise
            raise BundleError(f"LiteRT {self.backend_version} cannot load this model: {_first_line(exc)}") from exc
        return it

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # One call at a time: a LiteRT interpreter must not be used while its invoke (which releases the GIL)
        # runs. The device agent probes the active model from its own thread while the app calls it; without
        # this, concurrent calls raised RuntimeError or returned another call's outputs (measured).
        lock = self._run_lock
        if not lock.acquire(blocking=False):
            # Timed only when taken: the agent's latency probes must not count the app's calls as theirs.
            t = time.perf_counter()
            lock.acquire()
            self._waits.s = getattr(self._waits, "s", 0.0) + time.perf_counter() - t
        try:
            it = self._it
            if self.fixed_batch is None and inputs[0].shape != self._shape:
                for d, x in zip(self._inputs, inputs, strict=True):
                    it.resize_tensor_input(d["index"], x.shape)
                it.allocate_tensors()
                self._details()
            if self._single:
                it.set_tensor(self._in_idx[0], inputs[0])
                it.invoke()
                return [it.get_tensor(self._out_idx[0])]
            for i, x in zip(self._in_idx, inputs, strict=True):
                it.set_tensor(i, x)
            it.invoke()
            return [it.get_tensor(i) for i in self._out_idx]
        finally:
            lock.release()

    def take_wait_s(self) -> float:
        s = float(getattr(self._waits, "s", 0.0))
        self._waits.s = 0.0
        return s

    def _details(self) -> None:
        self._inputs = self._it.get_input_details()
        self._outputs = self._it.get_output_details()
        # Plain tuples and ints: run() compares and indexes these on every call.
        self._shape = tuple(int(d) for d in self._inputs[0]["shape"])
        self._in_idx = [int(d["index"]) for d in self._inputs]
        self._out_idx = [int(d["index"]) for d in self._outputs]
        self._single = len(self._in_idx) == 1 and len(self._out_idx) == 1
