"""Loading a verified bundle and running it: `load()` and `Model`."""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from edgefleet import Bundle, BundleError, InputError, ModelEntry, PublicKey, open_bundle
from edgefleet._bundle import sha256_file
from edgefleet._quant import TensorCodec

from ._aggregate import SUMMARY_BUDGET, WindowAggregator
from ._backends import BACKENDS, Session, SessionOptions, open_session
from ._telemetry import TelemetryBuffer

__all__ = ["GoldenResult", "Model", "ModelInfo", "SessionFactory", "load"]

_BACKEND_MODULE = {"onnx": "onnxruntime", "tflite": "ai_edge_litert"}
_BACKEND_EXTRA = {"onnx": "runtime-onnx", "tflite": "runtime-tflite"}  # the extra that installs each
Key: TypeAlias = PublicKey | str | os.PathLike[str] | bytes
# Makes the inference session for one model of a verified bundle, instead of the installed backend.
SessionFactory: TypeAlias = Callable[[Bundle, ModelEntry, SessionOptions], Session]


# Up to this many values, finiteness is checked by summing them in Python: measured between two runs of a
# tiny model, any numpy call costs ~5 us (its dispatch code is cold after the inference call) against
# ~1 us alone, while summing 64 floats through a memoryview costs ~1.5 us either way. A NaN or an
# infinity makes the sum non-finite; a non-finite sum is confirmed with numpy.
_PY_FINITE_MAX = 1024
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_ADD = np.add.reduce


def _all_finite(x: np.ndarray) -> bool:
    if x.size <= _PY_FINITE_MAX and x.flags.c_contiguous:
        total: float | None = None
        if x.dtype == _F32:
            total = sum(x.data.cast("B").cast("f"))
        elif x.dtype == _F64:
            total = sum(x.data.cast("B").cast("d"))
        if total is not None and math.isfinite(total):
            return True
    elif x.dtype.itemsize >= 4 and math.isfinite(_ADD(x.reshape(-1))):
        # Larger inputs: one summing pass, no temporary. Measured on EfficientNet-Lite0's 600 KB input between
        # two ONNX Runtime runs, isfinite().all() cost ~200 us there (17 us alone) and this ~60 us.
        return True
    return bool(np.isfinite(x).all())  # exact (huge values can overflow the sum)


@dataclass(frozen=True)
class ModelInfo:
    """What is running: bundle, model file, backend and the accelerator actually in use."""

    bundle: str
    version: str
    model_id: str
    format: str
    precision: str
    backend: str
    backend_version: str
    accelerator: str
    fallbacks: tuple[str, ...]
    signed_by: str | None
    path: str
    sha256: str
    skipped: tuple[str, ...] = field(default_factory=tuple)
    # CPU threads the backend runs with (None: its own default); `load(threads=None)` picks them.
    threads: int | None = None
    # The batch the file takes when its batch dimension is fixed (None: any). `predict` runs a larger or
    # smaller batch through it in pieces of this size, the last one padded.
    batch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class GoldenResult:
    ok: bool
    count: int
    max_abs_diff: float
    atol: float
    rtol: float
    agreement: float


def _shape_text(shape: Sequence[int | None]) -> str:
    dims = ["N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(shape)]
    return "(" + ", ".join(dims) + ")"


class Model:
    """A loaded, verified bundle model. `predict` is thread-safe."""

    def __init__(self, bundle: Bundle, entry: ModelEntry, session: Session, sha256: str, skipped: list[str]) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.entry = entry
        self._session = session
        self._in = entry.inputs[0]
        self._out = entry.outputs
        self._rest = tuple(self._in.shape[1:])
        self._float_in = self._in.scale is not None or self._in.dtype.startswith("float")
        self._in_dtype = np.dtype("float32" if self._in.scale is not None else self._in.dtype)
        # Read once here, not on every call: predict of a tiny model costs a few microseconds.
        self._ndim = len(self._in.shape)
        self._exact_rest = self._rest if all(isinstance(d, int) for d in self._rest) else None
        self._codec_in = TensorCodec(self._in) if self._in.scale is not None else None
        self._codecs_out = [TensorCodec(o) if o.scale is not None else None for o in self._out]
        self._plain_out = all(
            c is None and o.dtype != "float16" for c, o in zip(self._codecs_out, self._out, strict=True)
        )
        self._telemetry: WindowAggregator | None = None
        self._last = threading.local()  # each app thread's last call id
        self.info = ModelInfo(
            bundle=self.manifest.name,
            version=self.manifest.version,
            model_id=entry.id,
            format=entry.format,
            precision=entry.precision,
            backend=session.backend,
            backend_version=session.backend_version,
            accelerator=session.accelerator,
            fallbacks=tuple(session.fallbacks),
            signed_by=bundle.signed_by,
            path=str(bundle.path),
            sha256=sha256,
            skipped=tuple(skipped),
            threads=session.threads,
            batch=session.fixed_batch,
        )
        if len(entry.inputs) != 1:
            raise BundleError(f"model '{entry.id}' has {len(entry.inputs)} inputs; this runtime runs one-input models")

    # -- telemetry -----------------------------------------------------------------------------
    def attach_telemetry(
        self,
        buffer: TelemetryBuffer,
        *,
        device_id: str = "local",
        window_s: float = 60.0,
        capture_per_hour: float = 0.0,
        summary_budget: float | None = SUMMARY_BUDGET,
        feedback_calls: int = 0,
        feedback_ttl_s: float = 86400.0,
    ) -> WindowAggregator:
        """Record every `predict` into windows stored in BUFFER (see `TelemetryBuffer`); input histograms
        take at most SUMMARY_BUDGET of the inference time (None: every input). FEEDBACK_CALLS > 0 keeps
        the predicted classes of that many recent calls, for at most FEEDBACK_TTL_S, so `feedback` can count
        them against true labels."""
        bundle = {"name": self.info.bundle, "version": self.info.version, "model_id": self.info.model_id}
        agg = WindowAggregator(
            buffer.add,
            device_id=device_id,
            bundle=bundle,
            baseline=self.manifest.drift_baseline,
            backend=self.info.backend,
            accelerator=self.info.accelerator,
            fallbacks=list(self.info.fallbacks),
            window_s=window_s,
            capture_per_hour=capture_per_hour,
            capture_sink=lambda ts, x, y, call: buffer.add_sample(
                ts, f"{self.info.bundle}:{self.info.version}", x, y, call
            ),
            label_sink=buffer.label_sample,
            summary_budget=summary_budget,
            feedback_calls=feedback_calls,
            feedback_ttl_s=feedback_ttl_s,
        )
        self._telemetry = agg
        return agg

    def detach_telemetry(self) -> None:
        """Hand the last window to the buffer and stop recording."""
        self.flush_telemetry()
        self._telemetry = None

    @property
    def last_call_id(self) -> int | None:
        """The id of this thread's last `predict` (with telemetry and feedback on), for `feedback`."""
        return getattr(self._last, "call_id", None)

    def feedback(self, call_id: int, labels: Any) -> None:
        """The true class (or one per row) of call CALL_ID, learnt later: counted into the telemetry window's
        confusion matrix, so the fleet can compute accuracy. Unknown, expired or repeated ids and labels
        outside the model's classes are refused (InputError)."""
        tel = self._telemetry
        if tel is None:
            raise InputError("feedback needs telemetry: attach_telemetry(..., feedback_calls=N) first")
        tel.feedback(call_id, labels)

    def telemetry_due_s(self) -> float | None:
        """Seconds until the telemetry window closes (None without telemetry)."""
        tel = self._telemetry
        return None if tel is None else tel.seconds_left()

    def flush_telemetry(self, force: bool = True) -> None:
        if self._telemetry is not None:
            self._telemetry.flush(force=force)

    # -- inference -----------------------------------------------------------------------------
    def _prepare(self, x: Any) -> np.ndarray:
        if (
            type(x) is np.ndarray
            and x.ndim == self._ndim
            and x.shape[1:] == self._exact_rest
            and x.shape[0]
            and x.dtype == self._in_dtype
        ):
            # The common case: the right array already; only the values need a look.
            if self._float_in and not _all_finite(x):
                raise InputError(f"input '{self._in.name}' contains NaN or infinite values; clean the input first")
            return x
        return self._prepare_slow(x)

    def _prepare_slow(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as exc:
                raise InputError(f"input must be a numpy array; got {type(x).__name__}") from exc
        if x.ndim != len(self._in.shape) or any(
            d is not None and d != s for d, s in zip(self._rest, x.shape[1:], strict=False)
        ):
            raise InputError(
                f"input '{self._in.name}' has shape {tuple(x.shape)}; expected {_shape_text(self._in.shape)} "
                f"({self._in.dtype if not self._float_in else 'float32'}, N samples)"
            )
        if x.shape[0] == 0:
            raise InputError(f"input '{self._in.name}' is an empty batch; give at least one sample")
        if self._float_in:
            if x.dtype.kind not in "fiu":
                raise InputError(f"input '{self._in.name}' has dtype {x.dtype}; expected float32")
            if x.dtype != self._in_dtype:
                x = x.astype(self._in_dtype)
            if not np.isfinite(x).all():
                raise InputError(f"input '{self._in.name}' contains NaN or infinite values; clean the input first")
        elif x.dtype != self._in_dtype:
            if x.dtype.kind not in "iub":
                raise InputError(f"input '{self._in.name}' has dtype {x.dtype}; expected {self._in.dtype}")
            x = x.astype(self._in_dtype)
        return x

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        feed = self._codec_in.quantize(x) if self._codec_in is not None else x
        fb = self._session.fixed_batch
        if fb is None or len(feed) == fb:
            outs = self._session.run([feed if feed.flags.c_contiguous else np.ascontiguousarray(feed)])
        else:
            parts: list[list[np.ndarray]] = []
            n = len(feed)
            for i in range(0, n, fb):
                chunk = feed[i : i + fb]
                if len(chunk) < fb:
                    chunk = np.concatenate([chunk, np.zeros((fb - len(chunk), *chunk.shape[1:]), chunk.dtype)])
                parts.append(self._session.run([np.ascontiguousarray(chunk)]))
            outs = [np.concatenate([p[j] for p in parts])[:n] for j in range(len(parts[0]))]
        if self._plain_out:
            return outs
        res = []
        for codec, y in zip(self._codecs_out, outs, strict=False):
            if codec is not None:
                y = codec.dequantize(y)
            elif y.dtype == np.float16:
                y = y.astype(np.float32)
            res.append(y)
        return res

    def predict(self, x: Any) -> np.ndarray:
        """Run a batch (N, ...) and return the first output as float32 (dequantized if the file is int8)."""
        return self._predict(x)[0]

    def predict_all(self, x: Any) -> dict[str, np.ndarray]:
        """Run a batch and return every output by name."""
        return {spec.name: y for spec, y in zip(self._out, self._predict(x), strict=False)}

    def _predict(self, x: Any) -> list[np.ndarray]:
        t0 = time.perf_counter()
        tel = self._telemetry
        try:
            arr = self._prepare(x)
            outs = self._run(arr)
        except InputError:
            if tel is not None:
                tel.record(None, None, time.perf_counter() - t0, "input")
            raise
        except Exception:
            if tel is not None:
                tel.record(None, None, time.perf_counter() - t0, "runtime")
            raise
        if tel is not None:
            latency = time.perf_counter() - t0
            cid = tel.remember(outs[0]) if tel.feedback_calls else None
            tel.record(arr, outs[0], latency, call_id=cid)
            if cid is not None:
                self._last.call_id = cid
        return outs

    def timed_run(self, x: Any) -> tuple[list[np.ndarray], float]:
        """Run X without telemetry: the outputs and the seconds taken, less any wait for another thread's
        call on this model (the agent's latency probes run beside the app's calls)."""
        session = self._session
        session.take_wait_s()
        t0 = time.perf_counter()
        outs = self._run(self._prepare(x))
        return outs, time.perf_counter() - t0 - session.take_wait_s()

    def check_golden(self) -> GoldenResult:
        """Run the bundle's golden sample (without telemetry) and compare with its expected outputs."""
        xs = self.bundle.golden_inputs()
        if xs is None or not self.entry.golden_outputs:
            raise BundleError(f"bundle {self.info.bundle} {self.info.version} has no golden sample for this model")
        expected = self.bundle.load_array(self.entry.golden_outputs).astype(np.float32)
        got = self._run(self._prepare(xs))[0].astype(np.float32)
        atol = float(self.entry.golden_tolerance.get("atol", 1e-4))
        rtol = float(self.entry.golden_tolerance.get("rtol", 1e-4))
        if got.shape != expected.shape:
            return GoldenResult(False, len(xs), float("inf"), atol, rtol, 0.0)
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        ok = bool(np.isfinite(got).all() and np.allclose(got, expected, atol=atol, rtol=rtol))
        agree = float(np.mean(got.reshape(len(got), -1).argmax(1) == expected.reshape(len(got), -1).argmax(1)))
        return GoldenResult(ok, len(xs), diff, atol, rtol, agree)

    def close(self) -> None:
        self.flush_telemetry()
        self._session.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The plain CPU kernels each backend falls back to when an accelerator computes wrong results.
_REFERENCE = {"onnx": "CPUExecutionProvider", "tflite": "cpu"}
# Accelerators whose speed depends on the CPU thread count `load(threads=None)` chooses.
_CPU_KERNELS = {"CPUExecutionProvider", "xnnpack", "cpu"}
# Below this time per batch-1 call, one thread is tried beside all cores: handing a tiny model's work to a
# thread pool can cost more than it saves. Measured here on the digits CNN (2 cores): ONNX Runtime 16 us on
# one thread against 20 us on two; LiteRT 16 against 21 us.
_SMALL_CALL_S = 0.002


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _call_s(model: Model, x: np.ndarray, runs: int = 9) -> float:
    model.timed_run(x)  # the first call sets up buffers
    first = model.timed_run(x)[1]
    if first >= 4 * _SMALL_CALL_S:  # clearly not small: no need for a careful figure
        return first
    return sorted(model.timed_run(x)[1] for _ in range(runs))[runs // 2]


def _sample(bundle: Bundle, entry: ModelEntry) -> np.ndarray | None:
    """One input for timing: the golden sample's first, else zeros when the shape is known."""
    xs = bundle.golden_inputs()
    if xs is not None and len(xs):
        return np.ascontiguousarray(xs[:1], dtype=np.float32 if entry.inputs[0].scale is not None else None)
    rest = entry.inputs[0].shape[1:]
    if not all(isinstance(d, int) for d in rest):
        return None
    dtype = "float32" if entry.inputs[0].scale is not None else entry.inputs[0].dtype
    return np.zeros((1, *rest), dtype=dtype)


def _open_fastest(
    bundle: Bundle, entry: ModelEntry, data: bytes, wanted: list[str] | None, sha: str, skipped: list[str]
) -> Model:
    """Open with all cores; for a small model on CPU kernels, also with one thread, and keep the faster."""
    cores = _cpu_count()
    model = Model(bundle, entry, open_session(entry, data, SessionOptions(wanted, cores)), sha, skipped)
    x = _sample(bundle, entry)
    if cores == 1 or x is None or model._session.accelerator not in _CPU_KERNELS:
        return model
    many = _call_s(model, x)
    if many >= _SMALL_CALL_S:
        return model
    one = Model(bundle, entry, open_session(entry, data, SessionOptions(wanted, 1)), sha, skipped)
    if one._session.accelerator != model._session.accelerator or _call_s(one, x) > many:
        one.close()
        return model
    model.close()
    return one


def _open_checked(
    bundle: Bundle,
    entry: ModelEntry,
    accelerators: Sequence[str] | None,
    threads: int | None,
    sha: str,
    skipped: list[str],
    verify: bool,
    factory: SessionFactory | None = None,
) -> Model:
    wanted = list(accelerators) if accelerators is not None else None
    if factory is not None:
        session = factory(bundle, entry, SessionOptions(wanted, threads))
        return Model(bundle, entry, session, sha, skipped)
    data = bundle.read(entry.path)
    if threads is None:
        model = _open_fastest(bundle, entry, data, wanted, sha, skipped)
        session, threads = model._session, model._session.threads
    else:
        session = open_session(entry, data, SessionOptions(wanted, threads))
        model = Model(bundle, entry, session, sha, skipped)
    if not verify or bundle.golden_inputs() is None or not entry.golden_outputs:
        return model
    ref = _REFERENCE[entry.format]
    res = model.check_golden()
    if not res.ok and session.accelerator != ref:
        # An accelerator that computes wrong answers is worse than a slow one.
        note = f"{session.accelerator} failed the golden sample check (max |diff| {res.max_abs_diff:.3g})"
        session.close()
        fallback = open_session(entry, data, SessionOptions([ref], threads))
        fallback.fallbacks = [*session.fallbacks, f"{note}; using {ref} kernels", *fallback.fallbacks]
        model = Model(bundle, entry, fallback, sha, skipped)
        res = model.check_golden()
    if not res.ok:
        raise BundleError(
            f"model '{entry.id}' fails its golden sample on this device (max |diff| {res.max_abs_diff:.3g}, "
            f"atol {res.atol:.3g}); it is not activated"
        )
    return model


def _candidates(bundle: Bundle, backend: str, model_id: str | None) -> list[ModelEntry]:
    models = bundle.manifest.models
    if model_id is not None:
        return [bundle.manifest.model(model_id)]
    if backend == "auto":
        return list(models)
    if backend not in BACKENDS:
        raise InputError(f"backend '{backend}' is unknown; use auto, onnx or tflite")
    found = [m for m in models if m.format == backend]
    if not found:
        have = ", ".join(sorted({m.format for m in models}))
        raise BundleError(f"bundle {bundle.manifest.name} has no {backend} model (it has: {have})")
    return found


def load(
    path: str | os.PathLike[str],
    trusted_keys: Sequence[Key] | None = None,
    backend: str = "auto",
    accelerators: Sequence[str] | None = None,
    *,
    model_id: str | None = None,
    threads: int | None = None,
    allow_unsigned: bool = False,
    telemetry: TelemetryBuffer | None = None,
    device_id: str = "local",
    window_s: float = 60.0,
    verify: bool = True,
    session_factory: SessionFactory | None = None,
) -> Model:
    """Verify the bundle at PATH and load one of its models.

    Nothing runs before the signature (by one of TRUSTED_KEYS), every hash, the format version and
    the model's runtime requirements are checked. BACKEND `auto` takes the first model in the
    bundle the installed backends can run; ACCELERATORS (ONNX Runtime providers, or LiteRT
    `xnnpack` / `cpu` / a delegate library path) override the bundle's hints, and a missing or
    failing one falls back to CPU, as `model.info.fallbacks` says. With VERIFY (the default) the
    bundle's golden sample is run once on the chosen accelerator: one that computes wrong results
    is dropped for the plain CPU kernels, and a model that fails on those is refused.
    THREADS sets the backend's CPU threads; None runs on all cores, or on one when the model is small
    enough to run faster so (timed at load; `model.info.threads` says which).
    SESSION_FACTORY replaces the inference backend (simulators use a stand-in predictor to run
    thousands of devices in one process); verification of the bundle stays the same.
    """
    if trusted_keys is None and not allow_unsigned:
        raise InputError(
            "no trusted_keys given: pass the publisher's public key(s) to verify the bundle, "
            "or allow_unsigned=True for a bundle you built yourself"
        )
    bundle = open_bundle(path, trusted_keys)
    reasons: list[str] = []
    for entry in _candidates(bundle, backend, model_id):
        mod = _BACKEND_MODULE[entry.format]
        if session_factory is None and importlib.util.find_spec(mod) is None:
            extra = _BACKEND_EXTRA[entry.format]
            reasons.append(f"{entry.id}: {mod} is not installed (pip install 'edgefleet[{extra}]')")
            continue
        try:
            model = _open_checked(
                bundle, entry, accelerators, threads, sha256_file(Path(path)), reasons, verify, session_factory
            )
        except BundleError as exc:
            if model_id is not None or backend != "auto":
                raise
            reasons.append(f"{entry.id}: {exc}")
            continue
        if telemetry is not None:
            model.attach_telemetry(telemetry, device_id=device_id, window_s=window_s)
        return model
    raise BundleError(f"no model in bundle {bundle.manifest.name} can run here: " + "; ".join(reasons))
