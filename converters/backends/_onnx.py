"""ONNX source models: safe loading (external data stays inside the model's directory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgefleet import InputError
from edgefleet._errors import require

onnx = require("onnx", "convert", "ONNX models")


def _check_external(model: Any, base: Path) -> None:
    base_real = base.resolve()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise InputError(
                f"ONNX tensor '{t.name}' has external data at '{loc}', outside the model's directory; "
                "keep external data files next to the model"
            )
        target = base / loc
        if target.is_symlink() or any(
            p.is_symlink() for p in target.parents if p != p.parent and p.is_relative_to(base)
        ):
            raise InputError(f"ONNX tensor '{t.name}' has external data through a link ('{loc}'); links are refused")
        if not target.resolve().is_relative_to(base_real):
            raise InputError(f"ONNX tensor '{t.name}' external data '{loc}' resolves outside {base}")
        if not target.is_file():
            raise InputError(f"ONNX tensor '{t.name}' needs external data file '{loc}', which is missing")


def load_onnx(path: Path) -> Any:
    """Load and check an ONNX model; refuse corrupt files and unsafe external data."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path.name} is not a readable ONNX model (truncated or corrupt): {exc}") from exc
    _check_external(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InputError(f"{path.name} is not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
    if len(model.graph.input) - len({i.name for i in model.graph.initializer}) < 1 and not model.graph.input:
        raise InputError(f"{path.name} has no graph inputs")
    return model
