"""The bundle manifest (format v1): typed records, strict parsing, canonical bytes.

The authoritative description is docs/bundle-format.md; keep the two in step.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ._errors import BundleError

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_VERSION",
    "ORT_FOR_OPSET",
    "FileEntry",
    "Manifest",
    "ModelEntry",
    "TensorSpec",
    "canonical_json",
    "semver_key",
    "version_tuple",
]

FORMAT_NAME = "edgefleet.bundle"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

MODEL_FORMATS = ("onnx", "tflite")
PRECISIONS = ("fp32", "fp16", "int8", "mixed")
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
# Lowest onnxruntime release that implements each default-domain opset (from ORT's compatibility table).
ORT_FOR_OPSET = {13: "1.7", 14: "1.10", 15: "1.11", 16: "1.12", 17: "1.14", 18: "1.16", 19: "1.17", 20: "1.17"}
ORT_FOR_OPSET.update({21: "1.20", 22: "1.20", 23: "1.22"})


def version_tuple(v: str) -> tuple[int, ...]:
    """'1.20.1' -> (1, 20, 1); pre-release and local suffixes ('2.3.0rc1', '2.13.0+cpu') are cut off."""
    parts = []
    for p in re.split(r"[.+-]", v):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
        if m.group() != p:
            break
    return tuple(parts)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# semver.org 2.0.0, as written there: no leading zeros, no empty identifiers.
_PRE_ID = r"(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    rf"(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)


def semver_key(v: str) -> tuple[Any, ...]:
    """A sort key with semver.org precedence: 1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-beta < 1.0.0-rc.1 < 1.0.0;
    build metadata (+...) is ignored. Raises ValueError for a string that is not a semantic version."""
    m = _SEMVER.fullmatch(v)
    if not m:
        raise ValueError(f"{v!r} is not a semantic version")
    core = tuple(int(m.group(i)) for i in (1, 2, 3))
    if m.group(4) is None:
        return (*core, 1, ())
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in m.group(4).split("."))
    return (*core, 0, ids)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def canonical_json(obj: Any) -> bytes:
    """The canonical encoding that signatures cover: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class _Fields:
    """Reads fields from a JSON object and names the exact field in every error."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise BundleError(f"manifest field '{where}' must be an object, got {type(obj).__name__}")
        self.obj = obj
        self.where = where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, types: type | tuple[type, ...], *, required: bool = True, default: Any = None) -> Any:
        if key not in self.obj:
            if required:
                raise BundleError(f"manifest field '{self.path(key)}' is missing")
            return default
        value = self.obj[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise BundleError(f"manifest field '{self.path(key)}' has the wrong type (bool)")
        if not isinstance(value, types):
            raise BundleError(
                f"manifest field '{self.path(key)}' has the wrong type: expected {_tn(types)}, "
                f"got {type(value).__name__}"
            )
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in allowed:
            raise BundleError(f"manifest field '{self.path(key)}' is {value!r}; expected one of {', '.join(allowed)}")
        return str(value)

    def pattern(self, key: str, rx: re.Pattern[str], what: str) -> str:
        value = self.get(key, str)
        if not rx.fullmatch(value):
            raise BundleError(f"manifest field '{self.path(key)}' is {value!r}, which is not {what}")
        return str(value)


def _tn(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in ts)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _histogram(f: _Fields, edges: bool) -> None:
    """A baseline feature: `proportions` (non-negative numbers) and, for a binned value, `edges` (one fewer,
    increasing): what devices' windows are counted on."""
    props = f.get("proportions", list)
    if not props or not all(_number(v) and v >= 0 for v in props):
        raise BundleError(f"manifest field '{f.path('proportions')}' must be a non-empty list of non-negative numbers")
    if edges:
        e = f.get("edges", list)
        if len(e) != len(props) - 1 or not all(_number(v) for v in e) or any(a >= b for a, b in itertools.pairwise(e)):
            raise BundleError(
                f"manifest field '{f.path('edges')}' must be {len(props) - 1} increasing numbers (one per inner "
                "bin edge)"
            )


def _check_sections(m: Manifest) -> None:
    """The documented shape of the optional sections (docs/bundle-format.md), each field named when wrong.
    Fields a newer MINOR adds are left alone."""
    if m.golden:
        g = _Fields(m.golden, "golden")
        g.get("inputs", str)
        if g.get("count", int) < 1:
            raise BundleError("manifest field 'golden.count' must be at least 1")
    src = _Fields(m.source, "source")
    for key, types in (("format", str), ("sha256", (str, type(None))), ("file", (str, type(None)))):
        src.get(key, types, required=False)
    if m.source.get("sha256") is not None and not _HEX64.fullmatch(m.source["sha256"]):
        raise BundleError("manifest field 'source.sha256' must be 64 lowercase hex digits or null")
    if src.get("size_bytes", int, required=False, default=0) < 0:
        raise BundleError("manifest field 'source.size_bytes' must not be negative")
    _Fields(m.preprocessing, "preprocessing").get("layout", str, required=False)
    for i, step in enumerate(m.steps):
        s = _Fields(step, f"steps[{i}]")
        s.get("pass", str)
        s.get("params", dict, required=False)
    met = _Fields(m.metrics, "metrics")
    met.get("samples", int, required=False)
    met.get("evaluated_on", (str, type(None)), required=False)
    lin = _Fields(m.lineage, "lineage")
    lin.get("git_commit", (str, type(None)), required=False)
    datasets = lin.get("dataset_sha256", dict, required=False, default={})
    if not all(isinstance(v, str) for v in datasets.values()):
        raise BundleError("manifest field 'lineage.dataset_sha256' must map data set names to hex digests")
    if not m.drift_baseline:
        return
    b = _Fields(m.drift_baseline, "drift_baseline")
    b.get("version", int)
    b.get("layout", str, required=False)
    names = set()
    for i, feat in enumerate(b.get("inputs", list)):
        ff = _Fields(feat, f"drift_baseline.inputs[{i}]")
        name = ff.get("name", str)
        if name in names:
            raise BundleError(f"manifest field 'drift_baseline.inputs' names feature {name!r} twice")
        names.add(name)
        _histogram(ff, edges=True)
    outs = _Fields(b.get("outputs", dict), "drift_baseline.outputs")
    outs.get("apply_softmax", bool, required=False)
    for key in ("predicted_class", "confidence"):
        if key in outs.obj:
            _histogram(_Fields(outs.obj[key], f"drift_baseline.outputs.{key}"), edges=key != "predicted_class")


@dataclass(frozen=True)
class FileEntry:
    """One archive member other than the manifest and its signature."""

    path: str
    sha256: str
    size: int

    @classmethod
    def parse(cls, obj: Any, where: str) -> FileEntry:
        f = _Fields(obj, where)
        size = f.get("size", int)
        if size < 0:
            raise BundleError(f"manifest field '{f.path('size')}' must be >= 0")
        return cls(path=f.get("path", str), sha256=f.pattern("sha256", _HEX64, "a sha256 hex digest"), size=size)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, dtype, shape (None for a dynamic dimension), int8 quantization."""

    name: str
    dtype: str
    shape: list[int | None]
    scale: list[float] | None = None
    zero_point: list[int] | None = None

    @classmethod
    def parse(cls, obj: Any, where: str) -> TensorSpec:
        f = _Fields(obj, where)
        shape = f.get("shape", list)
        for i, d in enumerate(shape):
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
                raise BundleError(f"manifest field '{f.path('shape')}[{i}]' must be a non-negative int or null")
        q = f.get("quantization", (dict, type(None)), required=False)
        scale = zp = None
        if q is not None:
            qf = _Fields(q, f.path("quantization"))
            scale = [float(s) for s in qf.get("scale", list)]
            zp = [int(z) for z in qf.get("zero_point", list)]
            if not scale or len(scale) != len(zp):
                raise BundleError(
                    f"manifest field '{f.path('quantization')}' needs equal, non-empty scale and zero_point"
                )
        return cls(
            name=f.get("name", str), dtype=f.choice("dtype", DTYPES), shape=list(shape), scale=scale, zero_point=zp
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        d["quantization"] = None if self.scale is None else {"scale": self.scale, "zero_point": self.zero_point}
        return d


@dataclass(frozen=True)
class ModelEntry:
    """One model file in the bundle and everything a runtime needs to run it."""

    id: str
    format: str
    path: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    requirements: dict[str, Any]
    accelerators: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    golden_outputs: str | None = None
    golden_tolerance: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, where: str) -> ModelEntry:
        f = _Fields(obj, where)
        fmt = f.choice("format", MODEL_FORMATS)
        req = f.get("requirements", dict)
        rf = _Fields(req, f.path("requirements"))
        if fmt == "onnx":
            rf.get("onnx_opset", int)
            rf.get("min_onnxruntime", str)
        else:
            rf.get("min_litert", str)
        inputs = [TensorSpec.parse(t, f"{f.path('inputs')}[{i}]") for i, t in enumerate(f.get("inputs", list))]
        outputs = [TensorSpec.parse(t, f"{f.path('outputs')}[{i}]") for i, t in enumerate(f.get("outputs", list))]
        if not inputs or not outputs:
            raise BundleError(f"manifest field '{where}' needs at least one input and one output")
        accel = f.get("accelerators", list, required=False, default=[])
        if not all(isinstance(a, str) for a in accel):
            raise BundleError(f"manifest field '{f.path('accelerators')}' must be a list of strings")
        tol = f.get("golden_tolerance", dict, required=False, default={})
        if not all(_number(v) and v >= 0 for v in tol.values()):
            raise BundleError(
                f"manifest field '{f.path('golden_tolerance')}' must map atol / rtol to non-negative numbers"
            )
        return cls(
            id=f.pattern("id", _NAME, "a simple name (letters, digits, . _ -)"),
            format=fmt,
            path=f.get("path", str),
            precision=f.choice("precision", PRECISIONS),
            inputs=inputs,
            outputs=outputs,
            requirements=dict(req),
            accelerators=list(accel),
            metrics=dict(f.get("metrics", dict, required=False, default={})),
            golden_outputs=f.get("golden_outputs", (str, type(None)), required=False),
            golden_tolerance={str(k): float(v) for k, v in tol.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        # Spelled out, not dataclasses.asdict: every bundle load serialises the manifest to check its form.
        return {
            "id": self.id,
            "format": self.format,
            "path": self.path,
            "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "requirements": copy.deepcopy(self.requirements),
            "accelerators": list(self.accelerators),
            "metrics": copy.deepcopy(self.metrics),
            "golden_outputs": self.golden_outputs,
            "golden_tolerance": dict(self.golden_tolerance),
        }


@dataclass
class Manifest:
    """The parsed `manifest.json` of a bundle."""

    name: str
    version: str
    models: list[ModelEntry]
    files: list[FileEntry]
    format_version: str = FORMAT_VERSION
    created_by: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    drift_baseline: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    def model(self, model_id: str) -> ModelEntry:
        for m in self.models:
            if m.id == model_id:
                return m
        raise BundleError(f"bundle has no model '{model_id}'; it has {', '.join(m.id for m in self.models)}")

    def file(self, path: str) -> FileEntry:
        for fe in self.files:
            if fe.path == path:
                return fe
        raise BundleError(f"manifest lists no file '{path}'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created_by": dict(self.created_by),
            "source": self.source,
            "models": [m.to_dict() for m in self.models],
            "files": [
                {"path": fe.path, "sha256": fe.sha256, "size": fe.size}
                for fe in sorted(self.files, key=lambda e: e.path)
            ],
            "preprocessing": self.preprocessing,
            "labels": list(self.labels),
            "steps": self.steps,
            "metrics": self.metrics,
            "drift_baseline": self.drift_baseline,
            "golden": self.golden,
            "lineage": self.lineage,
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"manifest.json is not valid UTF-8 JSON: {exc}") from exc
        return cls.parse(obj)

    @classmethod
    def parse(cls, obj: Any) -> Manifest:
        f = _Fields(obj, "")
        if f.get("format", str) != FORMAT_NAME:
            raise BundleError(
                f"manifest field 'format' is {obj.get('format')!r}, not {FORMAT_NAME!r}: not an edgefleet bundle"
            )
        fv = f.get("format_version", str)
        m = re.fullmatch(r"([0-9]+)\.([0-9]+)", fv)
        if not m:
            raise BundleError(f"manifest field 'format_version' is {fv!r}; expected MAJOR.MINOR")
        if int(m.group(1)) != FORMAT_MAJOR:
            raise BundleError(
                f"bundle format version {fv} is not supported (this edgefleet reads {FORMAT_MAJOR}.x); "
                "upgrade edgefleet or rebuild the bundle"
            )
        files = [FileEntry.parse(e, f"files[{i}]") for i, e in enumerate(f.get("files", list))]
        models = [ModelEntry.parse(e, f"models[{i}]") for i, e in enumerate(f.get("models", list))]
        if not models:
            raise BundleError("manifest field 'models' is empty: a bundle needs at least one model")
        manifest = cls(
            name=f.pattern("name", _NAME, "a simple name (letters, digits, . _ -)"),
            version=f.pattern("version", _SEMVER, "a semantic version such as 1.2.0"),
            models=models,
            files=files,
            format_version=fv,
            created_by={str(k): str(v) for k, v in f.get("created_by", dict, required=False, default={}).items()},
            source=f.get("source", dict, required=False, default={}),
            preprocessing=f.get("preprocessing", dict, required=False, default={}),
            labels=[str(x) for x in f.get("labels", list, required=False, default=[])],
            steps=f.get("steps", list, required=False, default=[]),
            metrics=f.get("metrics", dict, required=False, default={}),
            drift_baseline=f.get("drift_baseline", dict, required=False, default={}),
            golden=f.get("golden", dict, required=False, default={}),
            lineage=f.get("lineage", dict, required=False, default={}),
        )
        _check_sections(manifest)
        manifest.check_references()
        return manifest

    def check_references(self) -> None:
        """Every path the manifest mentions must be a listed file; names must be unique."""
        paths = [fe.path for fe in self.files]
        if len(set(paths)) != len(paths):
            raise BundleError("manifest field 'files' lists the same path twice")
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise BundleError("manifest field 'models' uses the same id twice")
        known = set(paths)
        refs = [(f"models[{i}].path", m.path) for i, m in enumerate(self.models)]
        refs += [
            (f"models[{i}].golden_outputs", m.golden_outputs) for i, m in enumerate(self.models) if m.golden_outputs
        ]
        if self.golden.get("inputs"):
            refs.append(("golden.inputs", str(self.golden["inputs"])))
        for where, p in refs:
            if p not in known:
                raise BundleError(f"manifest field '{where}' names '{p}', which is not in 'files'")
