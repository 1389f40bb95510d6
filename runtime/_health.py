"""The health window after a switch: evidence from live calls and golden probes, and the verdict on it.

The previous bundle, still loaded, is probed alongside the new one, so both latencies are measured
under the same load at the same time: a busy device does not fail a good bundle. `judge` is the rule,
a pure function of the figures; `HealthWatch` gathers them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.protocol import latency_regressed

from ._config import HealthPolicy
from ._failpoints import failpoint
from ._model import Model

__all__ = ["HealthFigures", "HealthWatch", "Verdict", "golden_p95", "judge", "quantile"]

_WARMUP_PROBES = 3
_MIN_LATENCY_PROBES = 10
_RELIABLE_P95_PROBES = 100


def quantile(values: list[float] | deque[float], q: float) -> float | None:
    """np.percentile's default (linear) rule in plain Python: the watch runs it on short lists, often."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def golden_p95(model: Model | None, reps: int = 15) -> float | None:
    """p95 in ms of REPS runs of MODEL's golden inputs (None without a model or golden inputs)."""
    if model is None:
        return None
    xs = model.bundle.golden_inputs()
    if xs is None:
        return None
    return quantile([model.timed_run(xs)[1] * 1000 for _ in range(reps)], 0.95)


class _Evidence:
    """Live calls and probes counted during a window; the app's threads add to it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.errors = 0
        self.nan = 0
        self.live_ms: list[float] = []
        self.probe_ms: list[float] = []
        self.control_ms: list[float] = []
        self.probes = 0
        self.controls = 0

    def add_control(self, ms: float) -> None:
        with self.lock:
            self.controls += 1
            if self.controls > _WARMUP_PROBES:
                self.control_ms.append(ms)

    def add(self, ms: float | None, error: bool, nan: bool, probe: bool) -> None:
        with self.lock:
            self.calls += 1
            self.errors += int(error)
            self.nan += int(nan)
            if probe:
                self.probes += 1
                # The first runs after a switch or restart pay for cold caches; they say nothing about the model.
                if ms is not None and self.probes > _WARMUP_PROBES:
                    self.probe_ms.append(ms)
            elif ms is not None:
                self.live_ms.append(ms)


@dataclass(frozen=True)
class HealthFigures:
    """What a window has seen so far. `previous_p95_ms`: the control's p95 (or the one measured at the
    smoke test when no control runs); the latency rule needs `latency_probes` pairs of probes."""

    calls: int
    errors: int
    nan: int
    probe_p95_ms: float | None
    probe_p50_ms: float | None
    live_p95_ms: float | None
    previous_p95_ms: float | None
    previous_p50_ms: float | None
    latency_probes: int

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "error_rate": round(self.errors / self.calls if self.calls else 0.0, 4),
            "nan_rate": round(self.nan / self.calls if self.calls else 0.0, 4),
            "p95_ms": self.probe_p95_ms,
            "live_p95_ms": self.live_p95_ms,
            "previous_p95_ms": self.previous_p95_ms,
            "latency_probes": self.latency_probes,
        }


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str | None
    summary: dict[str, Any]


def judge(f: HealthFigures, policy: HealthPolicy, *, at_end: bool, overdue: bool) -> Verdict | None:
    """The window's verdict on F, or None while it is still open. Errors and NaNs fail it as soon as
    `min_calls` have been seen; latency is judged at the end; a window that ends without enough
    evidence (a model too slow to finish its probes) fails once it is overdue, never passes."""
    err_rate = f.errors / f.calls if f.calls else 0.0
    nan_rate = f.nan / f.calls if f.calls else 0.0
    counted = f.calls >= policy.min_calls
    bad = []
    if counted and err_rate > policy.max_error_rate:
        bad.append(f"error rate {err_rate:.3f} > {policy.max_error_rate}")
    if counted and nan_rate > policy.max_nan_rate:
        bad.append(f"NaN output rate {nan_rate:.3f} > {policy.max_nan_rate}")
    if not (bad or at_end):
        return None
    old = f.previous_p95_ms
    enough = old is None or f.latency_probes >= _MIN_LATENCY_PROBES
    if at_end and enough and old is not None and f.probe_p95_ms is not None:
        small = f.latency_probes < _RELIABLE_P95_PROBES
        slow, limit = latency_regressed(
            f.probe_p95_ms,
            old,
            ratio=policy.max_p95_ratio,
            slack_ms=policy.p95_slack_ms,
            median=f.probe_p50_ms if small else None,
            control_median=f.previous_p50_ms if small else None,
        )
        if slow:
            bad.append(f"p95 latency {f.probe_p95_ms:.2f} ms > {limit:.2f} ms (previous bundle {old:.2f} ms)")
    if bad and counted:
        return Verdict(False, "; ".join(bad), f.summary())
    if at_end and counted and enough:
        return Verdict(True, None, f.summary())
    if overdue:
        reason = f"too little evidence in the health window: {f.calls} calls, {f.latency_probes} latency probes"
        return Verdict(False, reason, f.summary())
    return None


class HealthWatch:
    """One health window at a time: `begin` after a switch, `tick` from the agent's loop until a verdict."""

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self.evidence = _Evidence()
        self.until = 0.0
        self.next_probe = 0.0
        self._turn = False
        self.control: Model | None = None
        self.active = False

    def begin(self, control: Model | None) -> None:
        """Open a window of `policy.window_s`, probing CONTROL (the previous bundle; None: judge latency
        against the p95 measured at the smoke test)."""
        self.end()
        self.evidence.reset()
        self.until = time.monotonic() + self.policy.window_s
        self.next_probe = 0.0
        self.active = True
        self.control = control

    def end(self) -> None:
        self.active = False
        ctl, self.control = self.control, None
        if ctl is not None:
            ctl.close()

    def record_call(self, ms: float | None, error: bool, nan: bool) -> None:
        """One of the app's own calls (ms None: it raised)."""
        if self.active:
            self.evidence.add(ms, error, nan, probe=False)

    def due_s(self, now: float) -> float:
        """Seconds until the next probe or the end of the window."""
        due = [self.next_probe - now]
        if now < self.until:
            due.append(self.until - now)
        return min(due)

    def tick(self, model: Model | None, old_p95_ms: float | None) -> Verdict | None:
        """Probe when one is due, then judge; a verdict ends the window."""
        now = time.monotonic()
        if model is not None and now >= self.next_probe:
            self.next_probe = now + self.policy.probe_interval_s
            # The first run after the loop's sleep pays for caches other work has evicted; taking turns
            # keeps that cost from always landing on the new bundle.
            self._turn = not self._turn
            if self.control is not None and self._turn:
                self._probe(self.control, control=True)
                self._probe(model, control=False)
            else:
                self._probe(model, control=False)
                if self.control is not None:
                    self._probe(self.control, control=True)
        failpoint("watch.tick")
        at_end, overdue = now >= self.until, now >= self.until + 4 * self.policy.window_s
        # Sorting for quantiles matters only for a verdict, and most ticks have none.
        verdict = judge(self._figures(old_p95_ms, latency=at_end), self.policy, at_end=at_end, overdue=overdue)
        if verdict is not None and not at_end:
            verdict = judge(self._figures(old_p95_ms, latency=True), self.policy, at_end=at_end, overdue=overdue)
        if verdict is not None:
            if verdict.healthy:
                failpoint("watch.pass")
            self.end()
        return verdict

    def _figures(self, old_p95_ms: float | None, *, latency: bool) -> HealthFigures:
        h, controlled = self.evidence, self.control is not None

        def q(values: list[float], at: float) -> float | None:
            return quantile(values, at) if latency else None

        with h.lock:
            return HealthFigures(
                calls=h.calls,
                errors=h.errors,
                nan=h.nan,
                probe_p95_ms=q(h.probe_ms, 0.95),
                probe_p50_ms=q(h.probe_ms, 0.5),
                live_p95_ms=q(h.live_ms, 0.95),
                previous_p95_ms=q(h.control_ms, 0.95) if controlled else old_p95_ms,
                previous_p50_ms=q(h.control_ms, 0.5) if controlled else None,
                latency_probes=min(len(h.probe_ms), len(h.control_ms)) if controlled else len(h.probe_ms),
            )

    def _probe(self, model: Model, control: bool) -> None:
        xs = model.bundle.golden_inputs()
        if xs is None:
            return
        try:
            outs, seconds = model.timed_run(xs)
        except Exception:  # an erroring model is exactly what the watch looks for
            if not control:
                self.evidence.add(None, True, False, True)
            return
        y, ms = outs[0], seconds * 1000
        if control:
            self.evidence.add_control(ms)
        else:
            self.evidence.add(ms, False, not bool(np.isfinite(y).all()), True)
