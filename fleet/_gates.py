"""A rollout stage's gates: typed thresholds, typed cohort figures, and `evaluate`, a pure function of them.

The canary (a stage's updated devices, on the new version) is compared with the control cohort
(selected devices still on another version), over the same time since the stage's first order:

- enough devices updated (`min_devices`), and as many of them (at most all) sending telemetry on the
  new version: until they do, the error, latency and drift gates would pass on no evidence;
- update failure rate (devices that failed or rolled back by themselves) <= `max_update_failure`;
- post-update error rate <= control + `max_error_increase`;
- p95 latency <= max(control x `max_p95_ratio`, control + `p95_slack_ms`); while the canary has made
  fewer than `reliable_p95_calls` calls its p95 is a handful of calls (a scheduling hiccup can make
  it), so the median must be slower too (the rule devices apply in their health window:
  `edgefleet.protocol.latency_regressed`); when the devices ran on different accelerators, latency is
  judged per accelerator both sides used (like with like), and overall only when they share none;
- prediction drift: PSI of the predicted-class distribution against the control <= `max_prediction_psi`,
  judged once both sides have `min_prediction_samples` predictions and only when the difference is
  also significant (chi-square p < `prediction_p_value`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._drift import chi2_two_sample, psi
from edgefleet.protocol import latency_quantile, latency_regressed

__all__ = ["DEFAULT_GATES", "Cohort", "Gates", "StageDevices", "Verdict", "evaluate"]

_WHOLE = ("min_devices", "reliable_p95_calls", "min_prediction_samples", "min_labelled")


@dataclass(frozen=True)
class Gates:
    min_devices: int = 1
    max_update_failure: float = 0.2
    max_error_increase: float = 0.02
    max_p95_ratio: float = 1.5
    # Sub-millisecond models jitter by more than 50% between devices; below this the ratio is not judged.
    p95_slack_ms: float = 1.0
    reliable_p95_calls: int = 1000
    max_prediction_psi: float = 0.25
    # PSI on a few dozen predictions is noise (an empty class bin alone adds ~0.7): the prediction gate
    # needs this many predictions on each side and a significant chi-square difference as well.
    min_prediction_samples: int = 100
    prediction_p_value: float = 0.001
    min_stage_s: float = 10.0
    stage_timeout_s: float = 300.0
    # Accuracy on labels devices fed back: judged once both sides have this many, failing when the canary
    # is more than max_accuracy_drop below the control and a one-sided two-proportion test agrees.
    max_accuracy_drop: float = 0.02
    min_labelled: int = 100
    accuracy_p_value: float = 0.01

    @classmethod
    def parse(cls, given: Mapping[str, Any] | None) -> Gates:
        """Gates from a mapping of overrides; an unknown name or a value that is not a number >= 0 is an
        InputError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = set(given or {}) - known
        if unknown:
            raise InputError(f"unknown gate(s) {sorted(unknown)}; known: {sorted(known)}")
        out: dict[str, Any] = {}
        for k, v in (given or {}).items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            if not ok or (k in _WHOLE and float(v) != int(v)):
                kind = "a whole number" if k in _WHOLE else "a number"
                raise InputError(f"gate {k} must be {kind} >= 0, got {v!r}")
            out[k] = int(v) if k in _WHOLE else float(v)
        return cls(**out)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_GATES: dict[str, float] = Gates().to_dict()


@dataclass(frozen=True)
class Cohort:
    """Telemetry of a group of devices, merged: what the gates compare."""

    calls: int = 0
    errors: int = 0
    p95_ms: float | None = None
    p50_ms: float | None = None
    classes: np.ndarray | None = field(default=None, compare=False)  # predicted-class counts
    windows: int = 0
    reporting: int = 0  # devices with at least one call
    labelled: int = 0  # predictions the devices' apps fed the true class back for
    correct: int = 0  # of those, predicted right
    # latency histogram per accelerator the calls ran on (the windows' `accelerator`)
    latency_by_accel: dict[str, list[int]] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class StageDevices:
    """The stage's devices so far: assigned to the rollout, updated, failed; and whether any control
    device (selected, not assigned, on another version) exists."""

    assigned: int
    updated: int
    failed: int
    has_control: bool


@dataclass
class Verdict:
    ok: bool
    failed_gates: list[str]
    values: dict[str, Any]
    wait_for_predictions: bool  # too few predictions to judge drift against the control yet
    wait_for_telemetry: bool  # updated devices that have not reported on the new version yet
    # The only failure is a prediction shift, and labels are coming in on both sides but too few yet to
    # say whether the canary's changed answers are right: watch longer (until stage_timeout_s).
    wait_for_labels: bool = False
    halt: str | None = None
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["halt"] is None:
            del d["halt"]
        return d


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _like_with_like(new: Cohort, control: Cohort) -> dict[str, tuple[list[int], list[int]]] | None:
    """Per accelerator both sides ran on, their latency histograms; None when both ran on one and the same
    accelerator (or say nothing of it): the overall comparison is then like with like already."""
    a, b = new.latency_by_accel, control.latency_by_accel
    if not a or not b or (len(a) == 1 and a.keys() == b.keys()):
        return None
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys())}


def evaluate(new: Cohort, control: Cohort, stage: StageDevices, gates: Gates) -> Verdict:
    """The verdict of GATES on the canary NEW against CONTROL (see the module's docstring)."""
    values: dict[str, Any] = {
        "devices_updated": stage.updated,
        "devices_reporting": new.reporting,
        "update_failure_rate": round(stage.failed / stage.assigned, 4) if stage.assigned else 0.0,
        "error_rate": round(new.errors / new.calls, 4) if new.calls else None,
        "control_error_rate": round(control.errors / control.calls, 4) if control.calls else None,
        "p95_ms": _round(new.p95_ms),
        "control_p95_ms": _round(control.p95_ms),
        "prediction_psi": None,
        "prediction_samples": 0,
    }
    failed = []
    if values["update_failure_rate"] > gates.max_update_failure:
        failed.append(f"update failure rate {values['update_failure_rate']} > {gates.max_update_failure}")
    if stage.updated < gates.min_devices and not failed:
        failed.append(f"only {stage.updated} device(s) updated (need {gates.min_devices})")
    if values["error_rate"] is not None:
        base = values["control_error_rate"] or 0.0
        if values["error_rate"] > base + gates.max_error_increase:
            failed.append(f"error rate {values['error_rate']} > control {base} + {gates.max_error_increase}")
    pairs = _like_with_like(new, control)
    if pairs == {}:
        # No accelerator in common: the canary as a whole against the control as a whole (a bundle that no
        # longer runs on the NPU is slower for its users, whatever the reason).
        values["latency_compared"] = (
            f"overall: canary on {sorted(new.latency_by_accel)}, control on {sorted(control.latency_by_accel)}"
        )
        pairs = None
    if pairs is not None:
        # Devices ran on different accelerators (an NPU here, a CPU fallback there): latency is compared per
        # accelerator both sides used, never a canary's CPU calls against a control's NPU calls.
        values["latency_by_accelerator"] = {}
        for accel, (hn, hc) in pairs.items():
            n95, c95 = latency_quantile(hn, 0.95), latency_quantile(hc, 0.95)
            if n95 is None or c95 is None:
                continue
            n50, c50 = latency_quantile(hn, 0.5), latency_quantile(hc, 0.5)
            small = sum(hn) < gates.reliable_p95_calls
            slow, limit = latency_regressed(
                n95,
                c95,
                ratio=gates.max_p95_ratio,
                slack_ms=gates.p95_slack_ms,
                median=n50 if small else None,
                control_median=c50 if small else None,
            )
            values["latency_by_accelerator"][accel] = {"p95_ms": _round(n95), "control_p95_ms": _round(c95)}
            if slow:
                failed.append(f"p95 on {accel} {n95:.3f} ms > {limit:.3f} ms (control {c95:.3f} ms)")
    elif values["p95_ms"] is not None and values["control_p95_ms"] is not None:
        ctl_p95 = values["control_p95_ms"]
        small = new.calls < gates.reliable_p95_calls and control.p50_ms is not None and new.p50_ms is not None
        slow, limit = latency_regressed(
            values["p95_ms"],
            ctl_p95,
            ratio=gates.max_p95_ratio,
            slack_ms=gates.p95_slack_ms,
            median=new.p50_ms if small else None,
            control_median=control.p50_ms if small else None,
        )
        if small and values["p95_ms"] > limit:
            values["p50_ms"], values["control_p50_ms"] = _round(new.p50_ms), _round(control.p50_ms)
        if slow:
            failed.append(f"p95 {values['p95_ms']:.3f} ms > {limit:.3f} ms (control {ctl_p95:.3f} ms)")
    # Ground truth, where devices feed labels back: it judges accuracy, and it decides whether a shift in
    # the predicted classes (the proxy for accuracy without labels) is a regression.
    labelled_both = min(new.labelled, control.labelled) >= gates.min_labelled
    # Shown no worse: within the allowed drop. Not merely "not proven worse", which few labels always are.
    no_worse = False
    if new.labelled and control.labelled:
        a_new, a_ctl = new.correct / new.labelled, control.correct / control.labelled
        values |= {"accuracy": round(a_new, 4), "control_accuracy": round(a_ctl, 4), "labelled": new.labelled}
        no_worse = labelled_both and a_ctl - a_new <= gates.max_accuracy_drop
        if labelled_both and a_ctl - a_new > gates.max_accuracy_drop:
            pooled = (new.correct + control.correct) / (new.labelled + control.labelled)
            se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / new.labelled + 1 / control.labelled))
            p = 0.5 * math.erfc(((a_ctl - a_new) / se) / math.sqrt(2))
            values["accuracy_p_value"] = p
            if p < gates.accuracy_p_value:
                failed.append(
                    f"accuracy {a_new:.4f} < control {a_ctl:.4f} - {gates.max_accuracy_drop} "
                    f"(p {p:.2g}, {new.labelled} labelled)"
                )
    wait_labels = False
    nc, cc = new.classes, control.classes
    if nc is not None and cc is not None and nc.sum() and cc.sum():
        n = int(min(nc.sum(), cc.sum()))
        values["prediction_psi"] = round(psi(cc, nc), 4)
        values["prediction_p_value"] = chi2_two_sample(cc, nc)[1]
        values["prediction_samples"] = n
        if (
            values["prediction_psi"] > gates.max_prediction_psi
            and n >= gates.min_prediction_samples
            and values["prediction_p_value"] < gates.prediction_p_value
        ):
            if no_worse:
                # The canary answers differently and the labels say it is no less often right: a model
                # retrained for inputs the control gets wrong changes exactly those answers.
                values["prediction_shift_judged_by_accuracy"] = True
            else:
                failed.append(
                    f"prediction PSI {values['prediction_psi']} > {gates.max_prediction_psi} "
                    f"(chi-square p {values['prediction_p_value']:.2g}, {n} predictions)"
                )
                wait_labels = len(failed) == 1 and bool(new.labelled and control.labelled) and not labelled_both
    # With a control cohort to compare against, too few predictions means: watch the stage longer.
    wait = stage.has_control and values["prediction_samples"] < gates.min_prediction_samples
    silent = stage.updated > 0 and new.reporting < min(gates.min_devices, stage.updated)
    return Verdict(not failed, failed, values, wait, silent, wait_for_labels=wait_labels)
