"""Who made a build and what its files need: tool versions, the git commit, the source's hash, the
runtime requirements written into the manifest."""

from __future__ import annotations

import contextlib
import hashlib
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import __version__ as ef_version
from edgefleet._manifest import ORT_FOR_OPSET

__all__ = ["git_commit", "model_sha", "requirements", "versions"]


def versions() -> dict[str, str]:
    out = {"edgefleet": ef_version, "python": platform.python_version()}
    for pkg in (
        "numpy",
        "torch",
        "tensorflow",
        "tf_keras",
        "tensorflow-model-optimization",
        "onnx",
        "onnxruntime",
        "ai-edge-litert",
        "litert-torch",
        "ai-edge-quantizer",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def model_sha(model: Any, path: Path | None) -> str:
    if path is not None:
        from edgefleet._bundle import sha256_file

        return sha256_file(path)
    h = hashlib.sha256()
    if hasattr(model, "state_dict"):
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
    elif hasattr(model, "get_weights"):
        for w in model.get_weights():
            h.update(np.asarray(w).tobytes())
    return h.hexdigest()


def requirements(fmt: str, path: Path) -> dict[str, Any]:
    if fmt == "onnx":
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=13)
        ort_min = ORT_FOR_OPSET.get(opset, "1.22" if opset > 23 else "1.7")
        return {"onnx_opset": int(opset), "min_onnxruntime": ort_min, "ir_version": int(m.ir_version)}
    lit = version("ai-edge-litert") if has("ai-edge-litert") else "1.0"
    # LiteRT keeps the schema and op versions compatible within a major release; an op version a runtime
    # lacks still fails at load (before activation) with the op named.
    return {"tflite_schema": 3, "min_litert": lit.split(".")[0] + ".0"}


def has(pkg: str) -> bool:
    try:
        version(pkg)
    except PackageNotFoundError:
        return False
    return True
