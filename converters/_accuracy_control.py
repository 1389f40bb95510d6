"""Accuracy control for int8: keep the most sensitive parts of a model in float until the gate is met.

Written once for every format, in the manner of NNCF's accuracy-aware quantization: a backend says
how to rank a model's quantizable units (ONNX nodes, TFLite ops) by sensitivity and how to quantize
with a given set kept in float (`_onnx_quant`, `_tflite_quant`); this module decides which sets to
try and when to stop. The search depends on scores alone, never on timings, so the same inputs give
the same file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ._gate import Budget, GateError

__all__ = ["MixedPrecision", "Outcome", "exclusion_steps", "keep_sensitive_in_float"]

_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def exclusion_steps(n: int) -> list[int]:
    """How many of the most sensitive units to keep in float, tried in this order: fine steps first,
    because one or two are often the whole story, then growing ones up to all N."""
    return sorted({k for k in _STEPS if k < n} | {n})


class MixedPrecision(Protocol):
    """One format's side of accuracy control."""

    fmt: str  # "onnx", "tflite": for messages
    unit: str  # what it keeps in float: "node", "op"

    def rank(self) -> list[str]:
        """The quantizable units, most sensitive first."""
        ...

    def quantize(self, kept_float: list[str]) -> Path:
        """A fully quantized candidate except for KEPT_FLOAT."""
        ...


@dataclass
class Outcome:
    path: Path  # the chosen candidate
    score: float
    kept_float: list[str]
    tried: list[dict[str, Any]] = field(default_factory=list)


def keep_sensitive_in_float(
    backend: MixedPrecision,
    first: Path,
    first_score: float,
    score: Callable[[Path], float],
    budget: Budget,
    progress: Callable[[str], None],
    label: dict[str, Any] | None = None,
) -> Outcome:
    """From FIRST (fully quantized, scoring FIRST_SCORE): when it exceeds BUDGET, keep growing sets of
    the most sensitive units in float until a candidate meets it. Every attempt after FIRST is recorded
    in `tried` (with LABEL's fields). Refused (GateError) when even all of them in float do not meet it."""
    label = label or {}
    out = Outcome(first, first_score, [])
    if not budget.exceeded(first_score):
        return out
    progress(
        f"quantize {backend.fmt}: {budget.describe(first_score)} lost > {budget.allowed}; "
        f"ranking {backend.unit}s by sensitivity"
    )
    ranked = backend.rank()
    for k in exclusion_steps(len(ranked)):
        kept = ranked[:k]
        cand = backend.quantize(kept)
        s = score(cand)
        out.tried.append({**label, "kept_in_float": k, "score": round(s, 5)})
        progress(f"quantize {backend.fmt}: {k} {backend.unit}(s) kept in float -> score {s:.4f} ({budget.describe(s)})")
        if not budget.exceeded(s):
            out.path, out.score, out.kept_float = cand, s, kept
            return out
    top = max([first_score, *(t["score"] for t in out.tried)])
    raise GateError(
        f"{backend.fmt} int8 quantization cannot meet --max-accuracy-drop {budget.max_drop}: best with up to "
        f"{len(ranked)} {backend.unit}(s) kept in float was {budget.describe(top)} (tried {len(out.tried) + 1} "
        "variants); give more calibration data, another calibration method, or allow a larger drop"
    )
