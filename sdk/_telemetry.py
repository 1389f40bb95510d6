"""The telemetry window: what a device reports per time window, and how the fleet merges it.

A window holds counts only (latency histogram, errors, histograms on the bundle's drift-baseline
bins), so windows from many devices and minutes merge by addition. Each carries an idempotency
`key`; a receiver counts a key once however often it arrives. Documented in docs/topics.md.
"""

from __future__ import annotations

import math
from typing import Any

from ._errors import InputError

__all__ = [
    "LATENCY_EDGES_MS",
    "WINDOW_SCHEMA",
    "Bins",
    "baseline_bins",
    "check_window",
    "latency_quantile",
    "latency_regressed",
]

# Feature name -> number of bins, for inputs and outputs: what a window's histograms must have.
Bins = dict[str, dict[str, int]]
_MAX_WINDOW_S = 86400.0

WINDOW_SCHEMA = "edgefleet.telemetry/1"
# Inner bin edges in milliseconds, 0.01 ms to 10 s, about 26% apart (ten per decade): a quantile read
# from the merged histogram is within one bin (±13% around the bin's geometric middle).
LATENCY_EDGES_MS: list[float] = [round(10 ** (k / 10), 6) for k in range(-20, 41)]

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "key": str,
    "device_id": str,
    "bundle": dict,
    "start": (int, float),
    "end": (int, float),
    "calls": int,
    "samples": int,
    "errors": dict,
    "nan_outputs": int,
    "latency_ms": dict,
    "inputs": dict,
    "outputs": dict,
}


def _check_feedback(fb: Any, classes: int | None) -> None:
    """A window's `feedback`: a square confusion matrix of counts (rows true class, columns predicted) whose
    total is `labelled`, with one row per class of the bundle's baseline when that is known."""
    if not isinstance(fb, dict) or not _count(fb.get("labelled")) or not isinstance(fb.get("confusion"), list):
        raise InputError("telemetry window field 'feedback' needs 'labelled' (a count) and 'confusion' (a list)")
    rows = fb["confusion"]
    n = len(rows)
    if not n or (classes is not None and n != classes):
        raise InputError(f"telemetry window feedback.confusion must have one row per class ({classes or 'n'})")
    if not all(isinstance(r, list) and len(r) == n and all(_count(v) for v in r) for r in rows):
        raise InputError("telemetry window feedback.confusion must be a square matrix of non-negative integer counts")
    if sum(sum(r) for r in rows) != fb["labelled"]:
        raise InputError("telemetry window feedback.confusion does not add up to feedback.labelled")


def baseline_bins(baseline: dict[str, Any]) -> Bins:
    """The histogram sizes a bundle's drift baseline defines (manifest `drift_baseline`)."""
    inputs = {str(f["name"]): len(f["proportions"]) for f in baseline.get("inputs", []) if isinstance(f, dict)}
    outputs = {str(k): len(v["proportions"]) for k, v in (baseline.get("outputs") or {}).items() if isinstance(v, dict)}
    return {"inputs": inputs, "outputs": outputs}


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _counts(v: Any, where: str, n: int | None = None) -> list[int]:
    # type() is int: exactly int, so neither bool nor float (this runs on every bin of every window)
    if not isinstance(v, list) or not all(type(c) is int and c >= 0 for c in v):
        raise InputError(f"telemetry window field '{where}' must be a list of non-negative integer counts")
    # Empty: nothing counted (every call of the window failed or gave NaN), which the runtime sends as [].
    if n is not None and v and len(v) != n:
        raise InputError(f"telemetry window field '{where}' has {len(v)} bins; the bundle's baseline has {n}")
    return v


def check_window(obj: Any, bins: Bins | None = None, device_id: str | None = None) -> dict[str, Any]:
    """Validate a decoded window; raise InputError naming the first bad field. With DEVICE_ID (the device
    of the topic it came on), the window must name that device.

    Every count is a non-negative integer and the sums agree (docs/topics.md lists the rules). With BINS
    (`baseline_bins` of the bundle the window names), every histogram must be one of the baseline's
    features with exactly its number of bins: a window that does not fit would poison the fleet's merged
    statistics for that bundle.
    """
    if not isinstance(obj, dict):
        raise InputError("telemetry window must be a JSON object")
    if obj.get("schema") != WINDOW_SCHEMA:
        raise InputError(f"telemetry window schema is {obj.get('schema')!r}; this receiver reads {WINDOW_SCHEMA!r}")
    for k, t in _REQUIRED.items():
        if k not in obj:
            raise InputError(f"telemetry window lacks field '{k}'")
        if not isinstance(obj[k], t) or isinstance(obj[k], bool):
            raise InputError(f"telemetry window field '{k}' has the wrong type")
    for k in ("name", "version"):
        if not isinstance(obj["bundle"].get(k), str):
            raise InputError(f"telemetry window field 'bundle.{k}' must be a string")
    for k in ("calls", "samples", "nan_outputs"):
        if not _count(obj[k]):
            raise InputError(f"telemetry window field '{k}' must be a non-negative integer")
    start, end = obj["start"], obj["end"]
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end <= start + _MAX_WINDOW_S):
        raise InputError("telemetry window 'start' and 'end' must be finite times with start <= end, at most a day")
    lat = _counts(obj["latency_ms"].get("counts"), "latency_ms.counts", len(LATENCY_EDGES_MS) + 1)
    if sum(lat) != obj["calls"]:
        raise InputError("telemetry window latency counts do not add up to its call count")
    for k in ("sum", "max"):
        v = obj["latency_ms"].get(k, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise InputError(f"telemetry window field 'latency_ms.{k}' must be a non-negative number")
    errors = obj["errors"]
    if not all(isinstance(k, str) and _count(v) for k, v in errors.items()):
        raise InputError("telemetry window field 'errors' must map error kinds to non-negative integer counts")
    if sum(errors.values()) > obj["calls"]:
        raise InputError("telemetry window counts more errors than calls")
    summarised = obj.get("summarised", obj["samples"])
    if not _count(summarised) or summarised > obj["samples"]:
        raise InputError("telemetry window field 'summarised' must be a count no larger than 'samples'")
    if "feedback" in obj:
        _check_feedback(obj["feedback"], None if bins is None else bins.get("outputs", {}).get("predicted_class"))
    if device_id is not None and obj["device_id"] != device_id:
        raise InputError(f"telemetry window names device {obj['device_id']!r} but came from {device_id!r}")
    for group in ("inputs", "outputs"):
        want = None if bins is None else bins.get(group, {})
        for name, v in obj[group].items():
            if want is not None and name not in want:
                raise InputError(f"telemetry window {group} feature {name!r} is not in the bundle's drift baseline")
            _counts(v, f"{group}.{name}", None if want is None else want[name])
    return obj


def latency_quantile(counts: list[int], q: float) -> float | None:
    """The Q-quantile (0..1) in ms from latency histogram COUNTS (geometric middle of its bin)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    acc = 0
    for i, c in enumerate(counts):
        acc += c
        if acc >= rank and c:
            lo = LATENCY_EDGES_MS[i - 1] if i > 0 else LATENCY_EDGES_MS[0] / 10**0.1
            hi = LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS) else LATENCY_EDGES_MS[-1] * 10**0.1
            return math.sqrt(lo * hi)
    return LATENCY_EDGES_MS[-1]


def latency_regressed(
    p95: float,
    control_p95: float,
    *,
    ratio: float,
    slack_ms: float,
    median: float | None = None,
    control_median: float | None = None,
) -> tuple[bool, float]:
    """The latency rule a device's health window and a fleet rollout both apply: (slower, p95 limit).

    Slower means p95 > max(control p95 x RATIO, control p95 + SLACK_MS). Give MEDIAN and CONTROL_MEDIAN
    when the p95s come from a small sample (a p95 of a few dozen figures is one or two of them, which a
    scheduling hiccup can make): then the median must be slower too, > max(control x RATIO, control +
    SLACK_MS / 2), which hiccups do not move.
    """
    limit = max(control_p95 * ratio, control_p95 + slack_ms)
    slow = p95 > limit
    if slow and median is not None and control_median is not None:
        slow = median > max(control_median * ratio, control_median + slack_ms / 2)
    return slow, limit
