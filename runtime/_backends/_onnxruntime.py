"""ONNX Runtime backend: execution providers in priority order, CPU as the last resort.

An accelerator is a provider's name, or its name with options: `OpenVINOExecutionProvider:device_type=NPU`
(`NAME:KEY=VALUE[,KEY=VALUE]`). The same provider may come more than once with other options (NPU, then
GPU, then CPU): ONNX Runtime takes each provider once per session and, when one cannot start (a device
type the machine lacks), silently leaves it out, so each is tried in turn and the one that took the model
is reported with its options, the others in `fallbacks` with the reason.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import BundleError, ModelEntry
from edgefleet._errors import require
from edgefleet._manifest import version_tuple

from . import Session, SessionOptions

CPU = "CPUExecutionProvider"


def parse_accelerator(spec: str) -> tuple[str, dict[str, str]]:
    """`NAME[:KEY=VALUE[,KEY=VALUE...]]` -> (NAME, options); BundleError for a malformed one."""
    name, _, rest = spec.partition(":")
    opts: dict[str, str] = {}
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise BundleError(f"accelerator {spec!r}: options are KEY=VALUE pairs separated by ',' after ':'")
        opts[k.strip()] = v.strip()
    if not name.strip():
        raise BundleError(f"accelerator {spec!r} has no provider name")
    return name.strip(), opts


def _spec(name: str, opts: dict[str, str]) -> str:
    return name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


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


_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn")


@functools.cache
def _check_one_build(module_file: str) -> None:
    """Refuse a directory holding two builds of ONNX Runtime: each installs the same `onnxruntime` package,
    so the second overwrote part of the first and neither is whole (the session may crash or lack ops)."""
    from importlib.metadata import distributions

    site = str(Path(module_file).absolute().parent.parent)
    found = sorted({(d.metadata["Name"] or "").lower() for d in distributions(path=[site])} & set(_BUILDS))
    if len(found) > 1:
        raise BundleError(
            f"{' and '.join(found)} are both installed in {site}: they overwrite each other's onnxruntime "
            f"package. Uninstall all of them (pip uninstall {' '.join(found)}) and install one"
        )


class OrtSession(Session):
    backend = "onnxruntime"

    def __init__(self, entry: ModelEntry, data: bytes, options: SessionOptions) -> None:
        ort: Any = require("onnxruntime", "runtime", "running ONNX models")
        _check_one_build(str(getattr(ort, "__file__", "") or "."))
        # The module's own version: onnxruntime-openvino (or -gpu) installs the same module under another
        # distribution name, and the metadata of 'onnxruntime' would describe a different install.
        self.backend_version = str(getattr(ort, "__version__", "") or version("onnxruntime"))
        check_requirements(entry, self.backend_version)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
        self.threads = options.threads
        available = set(ort.get_available_providers())
        requested = list(options.accelerators if options.accelerators is not None else entry.accelerators) or [CPU]
        self.fallbacks = []
        wanted: list[tuple[str, dict[str, str]]] = []
        for spec in requested:
            name, opts = parse_accelerator(spec)
            if name in available:
                wanted.append((name, opts))
            else:
                self.fallbacks.append(f"{spec} is not available in onnxruntime {self.backend_version}")
        # Each try: the first untried entry, the later providers of other names after it, CPU last.
        sess: Any = None
        while wanted:
            first = wanted[0]
            providers: list[Any] = [first]
            seen = {first[0]}
            for name, opts in wanted[1:]:
                if name not in seen and name != CPU:
                    providers.append((name, opts))
                    seen.add(name)
            if CPU not in seen:
                providers.append((CPU, {}))
            try:
                s = ort.InferenceSession(data, so, providers=providers)
            except Exception as exc:
                self.fallbacks.append(f"{_spec(*first)} failed to initialise: {_first_line(exc)}")
                wanted.pop(0)
                continue
            if s.get_providers()[0] == first[0]:
                sess, self.accelerator = s, _spec(*first)
                break
            self.fallbacks.append(f"{_spec(*first)} did not take the model; onnxruntime left it out")
            wanted.pop(0)
        if sess is None:
            try:
                sess = ort.InferenceSession(data, so, providers=[CPU])
            except Exception as exc2:
                raise BundleError(
                    f"onnxruntime {self.backend_version} cannot load model '{entry.id}': {_first_line(exc2)}"
                ) from exc2
            self.accelerator = CPU
        self._s = sess
        active = sess.get_providers()[0]
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
