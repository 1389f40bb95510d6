"""Build-side of edgefleet: distill, prune and quantize a model into a signed bundle with a report.

Heavy frameworks (torch, tensorflow, onnx) are imported only by the backend that needs them.
"""

from __future__ import annotations

from ._build import BuildConfig, BuildResult, build, load_recipe
from ._data import Dataset, load_npz
from ._passes import (
    PASSES,
    Distill,
    Pass,
    PruneMagnitude,
    PruneStructured,
    QuantAwareTraining,
    Quantize,
    pass_from_dict,
    register_pass,
)

__all__ = [
    "PASSES",
    "BuildConfig",
    "BuildResult",
    "Dataset",
    "Distill",
    "Pass",
    "PruneMagnitude",
    "PruneStructured",
    "QuantAwareTraining",
    "Quantize",
    "build",
    "load_npz",
    "load_recipe",
    "pass_from_dict",
    "register_pass",
]
