"""The accuracy gate's arithmetic: what a build may lose against its source model, in samples."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgefleet import InputError

__all__ = ["Budget", "GateError", "gate_message"]


class GateError(InputError):
    """The build lost more than its accuracy budget; nothing was written. Unlike a format that cannot be
    built at all, this fails the whole build, whichever formats were asked for."""


@dataclass(frozen=True)
class Budget:
    """How much of the source model's score (accuracy, or top-1 agreement without labels) a build may
    lose on the evaluation set.

    Scores are fractions k / N of N evaluation samples; losses are counted as whole samples, so a drop of
    exactly MAX_DROP passes however the fractions round in binary (1.0 - 0.98 is just over 0.02).
    """

    ref: float
    n: int
    max_drop: float | None = None

    @property
    def allowed(self) -> int | None:
        """Samples that may be lost, or None without a gate."""
        return None if self.max_drop is None else math.floor(self.max_drop * self.n + 1e-9)

    def lost(self, score: float) -> int:
        return round((self.ref - score) * self.n)

    def exceeded(self, score: float) -> bool:
        allowed = self.allowed
        return allowed is not None and self.lost(score) > allowed

    def describe(self, score: float) -> str:
        return f"{self.ref:.4f} -> {score:.4f}, {self.lost(score)} of {self.n} samples"


def gate_message(what: str, budget: Budget, score: float, losses: list[tuple[str, float]]) -> str:
    trail = ", ".join(f"after {name} {s:.4f}" for name, s in losses)
    return (
        f"{what} loses more than --max-accuracy-drop {budget.max_drop} against the source model "
        f"({budget.describe(score)}; at most {budget.allowed} allowed; source {budget.ref:.4f}, {trail}); "
        "nothing was written. Make that step gentler (less sparsity or pruning, more epochs or calibration "
        "data) or allow a larger drop"
    )
