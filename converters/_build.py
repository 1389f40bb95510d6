"""The build: source model -> model passes -> export -> quantize -> check -> signed bundle + report."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import json
import os
import platform
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError, Manifest, ModelEntry, SigningKey, compute_baseline, write_bundle
from edgefleet._fs import atomic_write
from edgefleet._manifest import _NAME, _SEMVER

from ._checks import check_labels, check_writable, source_runs
from ._data import Dataset
from ._evaluate import interleaved_p50_ms, p50_ms, runner_for
from ._gate import Budget, GateError, gate_message
from ._onnx_quant import quantize_onnx
from ._passes import Distill, Pass, Quantize, pass_from_dict
from ._provenance import git_commit, model_sha, requirements, versions
from ._report import format_table
from .backends import FrameworkBackend, Gate, backend_for, load_model

__all__ = ["BuildConfig", "BuildResult", "build", "load_recipe"]

Progress = Callable[[str], None]

_DEFAULT_ACCEL = {"onnx": ["CPUExecutionProvider"], "tflite": ["xnnpack"]}
_EXPORT_AGREEMENT_MIN = 0.99


def _stderr(msg: str) -> None:
    print(f"[edgefleet] {msg}", file=sys.stderr, flush=True)


@dataclass
class BuildConfig:
    """What to build. `steps` are model passes (distill, prune_*, qat) in order; `quantize` is applied
    to every exported file."""

    name: str = "model"
    version: str = "0.1.0"
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    steps: list[Pass] = field(default_factory=list)
    quantize: Quantize = field(default_factory=lambda: Quantize(mode="none"))
    layout: str = "NCHW"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    accelerators: dict[str, list[str]] = field(default_factory=lambda: dict(_DEFAULT_ACCEL))
    golden_count: int = 4
    # What every bundled file may lose against the source model, after all steps; None: no gate. Without
    # it, the quantize step's own `max_accuracy_drop` (the CLI's --max-accuracy-drop) is the gate.
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        # Checked here, before any work, with the rules the manifest enforces when the bundle is written.
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InputError(f"bundle name {self.name!r} is not a simple name (letters, digits, . _ -; up to 128)")
        if not isinstance(self.version, str) or not _SEMVER.fullmatch(self.version):
            raise InputError(f"bundle version {self.version!r} is not a semantic version such as 1.2.0")
        bad = [f for f in self.formats if f not in ("onnx", "tflite")]
        if bad or not self.formats:
            raise InputError(f"unknown format(s) {bad or self.formats}: use onnx, tflite or onnx,tflite")
        if self.layout not in ("NCHW", "NHWC", "NC"):
            raise InputError(f"layout {self.layout!r} is not one of NCHW, NHWC, NC")
        try:
            json.dumps(self.preprocessing, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(f"preprocessing must hold plain JSON values (use .tolist() for arrays): {exc}") from exc
        drop = self.max_accuracy_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1):
            raise InputError(f"max_accuracy_drop must be a number in [0, 1), got {drop!r}")

    @property
    def gate(self) -> float | None:
        """The accuracy budget of the whole build."""
        return self.max_accuracy_drop if self.max_accuracy_drop is not None else self.quantize.max_accuracy_drop


@dataclass
class BuildResult:
    manifest: Manifest
    report: dict[str, Any]
    path: Path


def _resolve_object(spec: str, base: Path | None = None) -> Any:
    """`package.module:factory` (importable from BASE, the recipe's directory, or the current one) or
    `path/to/file.py:factory` (relative to BASE)."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise InputError(f"'{spec}' must look like package.module:factory or file.py:factory")
    try:
        if mod_name.endswith(".py"):
            file = (base or Path.cwd()) / mod_name
            if not file.is_file():
                raise InputError(f"cannot import '{spec}': {file} does not exist")
            name = f"_edgefleet_recipe_{file.stem}"
            loaded = importlib.util.spec_from_file_location(name, file)
            if loaded is None or loaded.loader is None:
                raise InputError(f"cannot import '{spec}': {file} is not a Python module")
            module = importlib.util.module_from_spec(loaded)
            # registered before it runs, as an import would (dataclasses look their module up), and with its
            # directory importable, so the file may import its neighbours
            sys.modules[name] = module
            if str(file.parent) not in sys.path:
                sys.path.insert(0, str(file.parent))
            try:
                loaded.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            for d in (os.getcwd(), *([str(base)] if base is not None else [])):
                if d not in sys.path:
                    sys.path.insert(0, d)
            module = importlib.import_module(mod_name)
        obj = getattr(module, attr)
    except InputError:
        raise
    except Exception as exc:  # the user's module may raise anything while it runs
        hint = " (run the build where that package is importable, or name a file: file.py:factory)"
        what = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise InputError(f"cannot import '{spec}': {what}{hint}") from exc
    # A factory function or a class is called to make the model; an instance is used as it is.
    return obj() if inspect.isfunction(obj) or inspect.isclass(obj) else obj


def load_recipe(path: str | os.PathLike[str]) -> BuildConfig:
    """Read a TOML recipe: top-level name/version/formats/layout/labels/preprocessing and [[steps]]."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise InputError(f"recipe {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"recipe {path} is not valid TOML: {exc}") from exc
    known = {
        "name",
        "version",
        "formats",
        "layout",
        "labels",
        "preprocessing",
        "steps",
        "golden_count",
        "accelerators",
        "max_accuracy_drop",
    }
    unknown = set(doc) - known
    if unknown:
        raise InputError(
            f"recipe {path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    steps: list[Pass] = []
    quant = Quantize(mode="none")
    for i, st in enumerate(doc.get("steps", [])):
        st = dict(st)
        if st.get("pass") == "distill" and isinstance(st.get("student"), str):
            st["student"] = _resolve_object(st["student"], Path(path).resolve().parent)
        p = pass_from_dict(st, f"recipe {Path(path).name} steps[{i}]")
        if isinstance(p, Quantize):
            quant = p
        else:
            steps.append(p)
    kw = {k: doc[k] for k in known - {"steps"} if k in doc}
    return BuildConfig(steps=steps, quantize=quant, **kw)


def _top1(y: np.ndarray) -> np.ndarray:
    return np.asarray(y).reshape(len(y), -1).argmax(axis=1)


def _score(pred: np.ndarray, ds: Dataset, ref_pred: np.ndarray) -> tuple[float | None, float]:
    acc = None if ds.y is None else float((_top1(pred) == ds.y).mean())
    return acc, float((_top1(pred) == _top1(ref_pred)).mean())


class _OnnxSource:
    """An ONNX source model treated like a framework model for prediction and 'export'."""

    def __init__(self, model: Any, work: Path) -> None:
        import onnx

        self.path = work / "source.onnx"
        onnx.save(model, str(self.path))
        self.runner = runner_for("onnx", self.path)


def build(
    model: Any,
    out: str | os.PathLike[str],
    config: BuildConfig,
    *,
    calibration: Dataset | None = None,
    evaluation: Dataset | None = None,
    train: Dataset | None = None,
    signing_key: SigningKey | None = None,
    report_path: str | os.PathLike[str] | None = None,
    progress: Progress = _stderr,
    echo_table: bool = False,
) -> BuildResult:
    """Build a bundle from MODEL (a path to .onnx / .pt2 / .keras, a torch.nn.Module or a Keras model).

    Every bundled file is checked against the source model on the evaluation set after all steps; with a
    gate (`config.gate`) a build that loses more fails, naming the step, and writes nothing.
    """
    out = Path(out)
    if evaluation is None and calibration is None:
        raise InputError("a build needs evaluation (--eval) or calibration (--calibration) data to check exports")
    check = evaluation if evaluation is not None else calibration
    assert check is not None
    check_writable(out, "bundle")
    if report_path is not None:
        check_writable(Path(report_path), "report")
    src_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    datasets = [d for d in (calibration, evaluation, train) if d is not None]
    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        work = Path(tmp)
        if src_path is not None:
            model, backend, src_format = load_model(src_path)
        else:
            backend = backend_for(model)
            src_format = backend.source_format()
        onnx_src = _OnnxSource(model, work) if backend is None else None
        source_sha = model_sha(model if onnx_src is None else None, src_path)

        def predict(m: Any, x: np.ndarray) -> np.ndarray:
            if onnx_src is not None:
                return onnx_src.runner.predict(x)
            assert backend is not None
            return backend.predict(m, x)

        in_shape = onnx_src.runner.inputs[0].shape if onnx_src else backend.input_shape(model, check.x)  # type: ignore[union-attr]
        for ds in datasets:
            ds.check_input(tuple(in_shape))
            source_runs(predict, model, ds, src_format)
        src_pred = predict(model, check.x)
        for ds in datasets:
            check_labels(ds, src_pred)
        src_acc, _ = _score(src_pred, check, src_pred)
        budget = Budget(src_acc if src_acc is not None else 1.0, len(check), config.gate)
        if onnx_src is not None:
            src_size, src_lat = onnx_src.path.stat().st_size, onnx_src.runner.latency_p50_ms(check.x)
        else:
            src_size = src_path.stat().st_size if src_path else backend.param_bytes(model)  # type: ignore[union-attr]
            src_lat = _framework_latency(backend, model, check.x)  # type: ignore[arg-type]
        progress(f"source {src_format}: {src_size} bytes, {_fmt_score(src_acc, 1.0)}, p50 {src_lat:.3f} ms")
        steps: list[dict[str, Any]] = []
        # What each step cost against the source model, in order; the gate's error names the step.
        losses: list[tuple[str, float]] = []

        # 1. model passes
        current = model
        for p in config.steps:
            if onnx_src is not None:
                raise InputError(f"pass '{p.name}' needs a PyTorch or Keras model; ONNX sources can only be quantized")
            assert backend is not None
            # PyTorch QAT learns from the float model's outputs, so unlabelled calibration inputs will do.
            data = calibration if train is None and p.name == "qat" and backend.name == "torch" else train
            if data is None:
                raise InputError(f"pass '{p.name}' trains the model and needs training data (--train TRAIN.npz)")
            progress(f"pass {p.name} {p.params()}")
            result: dict[str, Any]
            if isinstance(p, Distill):
                current = backend.distill(current, p.student, data, p, progress)
                result = {"student_param_bytes": backend.param_bytes(current)}
            elif p.name == "prune_magnitude":
                current, result = backend.prune_magnitude(current, data, p, progress)
            elif p.name == "prune_structured":
                current, result = backend.prune_structured(current, data, p, progress)
            elif p.name == "qat":
                current, result = backend.qat(current, data, p, progress)
            else:
                raise InputError(f"pass '{p.name}' cannot run as a model step")
            acc, agree = _score(predict(current, check.x), check, src_pred)
            s = acc if acc is not None else agree
            result.update({"accuracy": acc, "agreement": round(agree, 5), "lost_samples": budget.lost(s)})
            progress(f"pass {p.name}: {_fmt_score(acc, agree)} ({budget.describe(s)} lost against the source)")
            steps.append({"pass": p.name, "params": p.params(), "result": result})
            losses.append((p.name, s))
            if budget.exceeded(s):
                raise GateError(gate_message(f"step '{p.name}'", budget, s, losses))
        model_pred = predict(current, check.x)
        # A Keras QAT model converts to an int8 TFLite file by itself; a PyTorch one is a float model whose
        # weights were trained to survive the quantize step, which runs on it as on any model.
        qat_done = backend is not None and backend.name == "keras" and any(s["pass"] == "qat" for s in steps)

        # 2. export + 3. quantize, per format
        q = config.quantize
        artifacts: list[dict[str, Any]] = []
        warnings: list[str] = []
        for fmt in config.formats:
            try:
                artifacts.append(
                    _make_artifact(
                        fmt,
                        current,
                        backend,
                        onnx_src,
                        check,
                        calibration,
                        q,
                        qat_done,
                        model_pred,
                        src_pred,
                        budget,
                        losses,
                        work,
                        progress,
                    )
                )
            except GateError:
                raise
            except InputError as exc:
                if len(config.formats) == 1:
                    raise
                warnings.append(f"{fmt} not built: {exc}")
                progress(f"WARNING: {fmt} not built: {exc}")
        if not artifacts:
            raise InputError("no format could be built: " + "; ".join(warnings))
        if q.mode != "none":
            steps.append(
                {
                    "pass": "quantize",
                    "params": q.params(),
                    "result": {a["format"]: a.pop("quantization") for a in artifacts},
                }
            )
        else:
            for a in artifacts:
                a.pop("quantization")

        # 4. golden sample, drift baseline, manifest
        golden_x = np.ascontiguousarray(check.x[: config.golden_count], dtype=np.float32)
        members: dict[str, bytes] = {"golden/inputs.npy": _npy(golden_x)}
        entries: list[ModelEntry] = []
        for a in artifacts:
            path = a.pop("_path")
            runner = a.pop("_runner")
            g_out = runner.predict(golden_x)
            mid = f"{a['format']}-{a['precision']}"
            members[f"models/{mid}.{a['format']}"] = path.read_bytes()
            members[f"golden/{mid}.outputs.npy"] = _npy(g_out)
            entries.append(
                ModelEntry(
                    id=mid,
                    format=a["format"],
                    path=f"models/{mid}.{a['format']}",
                    precision=a["precision"],
                    inputs=runner.inputs,
                    outputs=runner.outputs,
                    requirements=a.pop("requirements"),
                    accelerators=config.accelerators.get(a["format"], []),
                    # Timings stay in the report: in the manifest they would make rebuilds differ byte for byte.
                    metrics={k: a[k] for k in ("accuracy", "agreement", "max_abs_diff", "size_bytes")},
                    golden_outputs=f"golden/{mid}.outputs.npy",
                    golden_tolerance=_tolerance(a["precision"], g_out),
                )
            )
            a["file"] = f"models/{mid}.{a['format']}"
        base_pred = model_pred if onnx_src is None else src_pred
        lineage = {
            "dataset_sha256": {d.name: d.sha256() for d in (train, calibration, evaluation) if d is not None},
            "git_commit": git_commit(),
        }
        source = {
            "format": src_format,
            "sha256": source_sha,
            "size_bytes": src_size,
            "file": src_path.name if src_path else None,
        }
        manifest = Manifest(
            name=config.name,
            version=config.version,
            models=entries,
            files=[],
            created_by=versions(),
            source=source,
            preprocessing={"layout": config.layout, **config.preprocessing},
            labels=list(config.labels),
            steps=_without_timings(steps),
            metrics={"source_accuracy": src_acc, "evaluated_on": check.name, "samples": len(check)},
            drift_baseline=compute_baseline(check.x, base_pred, config.layout),
            golden={"inputs": "golden/inputs.npy", "count": len(golden_x)},
            lineage=lineage,
        )
        report: dict[str, Any] = {
            "bundle": {
                "path": str(out),
                "name": config.name,
                "version": config.version,
                "signed": signing_key is not None,
            },
            "source": {
                "format": src_format,
                "precision": "fp32",
                "size_bytes": src_size,
                "accuracy": src_acc,
                "agreement": 1.0,
                # In the source's own framework: not comparable with the files' runtimes.
                "latency_ms_p50": src_lat,
                "latency_runtime": src_format if onnx_src is None else "onnxruntime",
                "sha256": source_sha,
            },
            "artifacts": artifacts,
            "steps": steps,
            "gate": {"max_accuracy_drop": budget.max_drop, "allowed_samples": budget.allowed, "samples": budget.n},
            "warnings": warnings,
            "evaluated_on": {"name": check.name, "samples": len(check), "labels": check.y is not None},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
        manifest = write_bundle(out, manifest, members, signing_key)
        report["bundle"]["size_bytes"] = out.stat().st_size
        if report_path is not None:
            try:
                atomic_write(report_path, json.dumps(report, indent=2, sort_keys=True, default=str).encode())
            except OSError as exc:
                out.unlink(missing_ok=True)  # nothing half-written: no bundle without its report
                raise InputError(f"cannot write the report {report_path}: {exc.strerror or exc}") from exc
        if echo_table:
            print(format_table(report))
        return BuildResult(manifest, report, out)


def _fmt_score(acc: float | None, agree: float) -> str:
    return f"accuracy {acc:.4f}" if acc is not None else f"top-1 agreement {agree:.4f}"


def _framework_latency(backend: FrameworkBackend, model: Any, x: np.ndarray) -> float:
    one = np.ascontiguousarray(x[:1])
    return p50_ms(lambda: backend.predict(model, one), runs=30, warmup=5)


def _without_timings(obj: Any) -> Any:
    """The manifest copy of a value: timings vary run to run and would break reproducible bundles."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not k.startswith("latency")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _tolerance(precision: str, ref: np.ndarray) -> dict[str, float]:
    # Other CPUs and kernels may round differently; quantized files may move by a quantization step.
    span = float(np.max(np.abs(ref))) if ref.size else 1.0
    if precision == "fp32":
        return {"atol": max(1e-4, 1e-5 * span), "rtol": 1e-4}
    if precision == "fp16":
        return {"atol": max(1e-2, 1e-3 * span), "rtol": 1e-2}
    return {"atol": max(1e-2, 0.05 * span), "rtol": 0.05}


def _make_artifact(
    fmt: str,
    model: Any,
    backend: FrameworkBackend | None,
    onnx_src: _OnnxSource | None,
    check: Dataset,
    calib: Dataset | None,
    q: Quantize,
    qat_done: bool,
    model_pred: np.ndarray,
    src_pred: np.ndarray,
    budget: Budget,
    losses: list[tuple[str, float]],
    work: Path,
    progress: Progress,
) -> dict[str, Any]:
    fp32 = work / f"model.fp32.{fmt}"
    # Export fp32 and check it against the model it came from before anything else.
    if fmt == "onnx":
        if onnx_src is not None:
            fp32 = onnx_src.path
        else:
            assert backend is not None
            progress("export onnx")
            backend.export_onnx(model, check.x, fp32)
    else:
        if onnx_src is not None:
            raise InputError(
                "ONNX -> TFLite conversion is not supported (no maintained converter works with this "
                "stack); export TFLite from the PyTorch or Keras model instead"
            )
        assert backend is not None
        progress("export tflite")
        mode = "int8" if qat_done else "none"
        backend.export_tflite(model, check.x, fp32, mode, calib, q.io if qat_done else "float")
    runner = runner_for(fmt, fp32)
    pred = runner.predict(check.x)
    diff = float(np.max(np.abs(pred - model_pred)))
    export_agree = float((_top1(pred) == _top1(model_pred)).mean())
    progress(f"check {fmt} export: top-1 agreement {export_agree:.4f}, max abs diff {diff:.2e}")
    if export_agree < _EXPORT_AGREEMENT_MIN and not qat_done:
        raise InputError(
            f"{fmt} export disagrees with its source model (top-1 agreement {export_agree:.3f} < "
            f"{_EXPORT_AGREEMENT_MIN}, max abs diff {diff:.3g}); not bundled"
        )
    precision = "int8" if qat_done and fmt == "tflite" else "fp32"
    final, quant_info = fp32, {"precision": precision}
    exp_acc, exp_agree = _score(pred, check, src_pred)
    trail = [*losses, (f"export {fmt}", exp_acc if exp_acc is not None else exp_agree)]
    if budget.exceeded(trail[-1][1]):
        raise GateError(gate_message(f"the {fmt} export", budget, trail[-1][1], trail))

    def score(path: Path) -> float:
        acc, agr = _score(runner_for(fmt, path).predict(check.x), check, src_pred)
        return acc if acc is not None else agr

    if q.mode != "none" and not (qat_done and fmt == "tflite"):
        final = work / f"model.q.{fmt}"
        if fmt == "onnx":
            quant_info = quantize_onnx(fp32, final, q, calib, score, budget, progress)
        else:
            assert backend is not None
            progress(f"quantize tflite ({q.mode})")
            gate = None if budget.max_drop is None else Gate(score, budget, progress)
            quant_info = backend.export_tflite(model, check.x, final, q.mode, calib, q.io, q.bias_correction, gate)
            quant_info["io"] = runner_for(fmt, final).inputs[0].dtype
    frunner = runner_for(fmt, final)
    fpred = frunner.predict(check.x)
    acc, agree = _score(fpred, check, src_pred)
    s = acc if acc is not None else agree
    if final is not fp32:
        trail.append((f"quantize {fmt} {q.mode}", s))
    if budget.exceeded(s):
        hint = ""
        if fmt == "tflite" and q.mode == "int8" and backend is not None and backend.name == "keras":
            hint = " (TFLiteConverter keeps no op in float on request: build --format onnx for the per-node fallback)"
        raise GateError(gate_message(f"{fmt} {quant_info['precision']}{hint}", budget, s, trail))
    # Speed within one runtime: the bundled file against the fp32 export, calls interleaved so both see
    # the same machine state. The source's own latency (its framework) is reported apart.
    if final is fp32:
        lat_fp32 = lat = frunner.latency_p50_ms(check.x)
    else:
        lat_fp32, lat = interleaved_p50_ms([runner.timing_call(check.x), frunner.timing_call(check.x)])
    return {
        "format": fmt,
        "precision": quant_info["precision"],
        "size_bytes": final.stat().st_size,
        "accuracy": acc,
        "agreement": round(agree, 5),
        "lost_samples": budget.lost(s),
        "max_abs_diff": round(float(np.max(np.abs(fpred - model_pred))), 6),
        "batch": frunner.fixed_batch,
        "latency_ms_p50": lat,
        "fp32_latency_ms_p50": lat_fp32,
        "speed_vs_fp32": round(lat_fp32 / lat, 3) if lat else None,
        "export_check": {"agreement": round(export_agree, 5), "max_abs_diff": diff},
        "scores": [{"after": name, "score": round(v, 5)} for name, v in trail],
        "quantization": quant_info,
        "requirements": requirements(fmt, final),
        "_path": final,
        "_runner": frunner,
    }
