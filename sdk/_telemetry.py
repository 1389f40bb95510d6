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
    "check_window",
    "latency_quantile",
]

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


def check_window(obj: Any) -> dict[str, Any]:
    """Validate a decoded window; raise InputError naming the first bad field."""
    if not isinstance(obj, dict):
        raise InputError("telemetry window must be a JSON object")
    if obj.get("schema") != WINDOW_SCHEMA:
        raise InputError(f"telemetry window schema is {obj.get('schema')!r}; this receiver reads {WINDOW_SCHEMA!r}")
    for k, t in _REQUIRED.items():
        if k not in obj:
            raise InputError(f"telemetry window lacks field '{k}'")
        if not isinstance(obj[k], t) or isinstance(obj[k], bool):
            raise InputError(f"telemetry window field '{k}' has the wrong type")
    lat = obj["latency_ms"].get("counts")
    if not isinstance(lat, list) or len(lat) != len(LATENCY_EDGES_MS) + 1:
        raise InputError(f"telemetry window field 'latency_ms.counts' must list {len(LATENCY_EDGES_MS) + 1} counts")
    for k in ("name", "version"):
        if not isinstance(obj["bundle"].get(k), str):
            raise InputError(f"telemetry window field 'bundle.{k}' must be a string")
    if obj["calls"] < 0 or obj["samples"] < 0 or sum(lat) != obj["calls"]:
        raise InputError("telemetry window latency counts do not add up to its call count")
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
