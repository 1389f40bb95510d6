"""The dashboard's charts over time: figures per bundle version read from the rollups, drawn as SVG on the
server (axes, time labels, a legend; no JavaScript, nothing fetched from a CDN)."""

from __future__ import annotations

import html
import json
import math
import time
from typing import Any

import numpy as np

from edgefleet._telemetry import latency_quantile

from ._db import Database
from ._rollups import ALL, accumulate, empty_merge, series

__all__ = ["OUTCOMES", "RANGES", "device_counts", "device_history", "fleet_history", "svg_chart", "update_outcomes"]

# Update outcome events (docs/topics.md) as the overview names them.
OUTCOMES = {"committed": "committed", "rolled_back": "rolled back", "update_failed": "failed",
            "update_refused": "refused"}  # fmt: skip

# The overview's time ranges (the query's `hours`): seconds back from now.
RANGES: dict[str, float] = {"1": 3600.0, "6": 6 * 3600.0, "24": 86400.0, "168": 7 * 86400.0}
_COLOURS = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563")


def fleet_history(
    db: Database, since: float, until: float, buckets: int = 48, cohort: str = ALL
) -> dict[str, dict[str, list[float | None]]]:
    """Per bundle version (NAME:VERSION) and figure - calls per minute, error rate, p95 latency (ms) -
    the values of BUCKETS equal spans of [SINCE, UNTIL), from COHORT's rollups (None where no window)."""
    width = (until - since) / buckets
    merged: dict[str, list[dict[str, Any]]] = {}
    for r in series(db, cohort=cohort, since=since, until=until):
        i = min(buckets - 1, max(0, int((r.bucket - since) / width)))
        accumulate(
            merged.setdefault(f"{r.bundle[0]}:{r.bundle[1]}", [empty_merge() for _ in range(buckets)])[i], r.counts
        )
    return {bundle: _figures(spans, width) for bundle, spans in sorted(merged.items())}


def device_history(
    db: Database, device_id: str, since: float, until: float, buckets: int = 48
) -> dict[str, dict[str, list[float | None]]]:
    """As `fleet_history`, for one device, from its raw windows (kept for the retention period)."""
    width = (until - since) / buckets
    merged: dict[str, list[dict[str, Any]]] = {}
    rows = db.query(
        "SELECT bundle_name, bundle_version, start, body FROM windows WHERE device_id = ? AND start >= ? "
        "AND start < ? ORDER BY start",
        (device_id, since, until),
    )
    for name, version, start, body in rows:
        i = min(buckets - 1, max(0, int((float(start) - since) / width)))
        spans = merged.setdefault(f"{name}:{version}", [empty_merge() for _ in range(buckets)])
        accumulate(spans[i], json.loads(body))
    return {bundle: _figures(spans, width) for bundle, spans in sorted(merged.items())}


def device_counts(db: Database, since: float, until: float, buckets: int = 48) -> dict[str, list[float | None]]:
    """Devices online and registered over time (the housekeeper's per-minute counts): the last count in
    each of BUCKETS equal spans of [SINCE, UNTIL), None where none was taken."""
    width = (until - since) / buckets
    out: dict[str, list[float | None]] = {"online": [None] * buckets, "registered": [None] * buckets}
    rows = db.query(
        "SELECT bucket, online, registered FROM device_counts WHERE bucket >= ? AND bucket < ? ORDER BY bucket",
        (since - since % 60, until),
    )
    for bucket, online, registered in rows:
        i = min(buckets - 1, max(0, int((float(bucket) - since) / width)))
        out["online"][i], out["registered"][i] = float(online), float(registered)
    return out


def update_outcomes(db: Database, since: float, until: float, buckets: int = 48) -> dict[str, list[float | None]]:
    """How many updates ended each way (committed, rolled back, failed, refused) in each of BUCKETS equal spans
    of [SINCE, UNTIL), by the devices' own outcome events."""
    width = (until - since) / buckets
    out: dict[str, list[float | None]] = {label: [0.0] * buckets for label in OUTCOMES.values()}
    marks = ", ".join("?" * len(OUTCOMES))
    rows = db.query(
        f"SELECT type, ts FROM events WHERE type IN ({marks}) AND ts >= ? AND ts < ?",
        (*OUTCOMES, since, until),
    )
    for typ, ts in rows:
        i = min(buckets - 1, max(0, int((float(ts) - since) / width)))
        counts = out[OUTCOMES[typ]]
        counts[i] = (counts[i] or 0.0) + 1
    return out


def _figures(spans: list[dict[str, Any]], width: float) -> dict[str, list[float | None]]:
    calls, errors, p95 = [], [], []
    for m in spans:
        n = m["calls"]
        calls.append(round(n / (width / 60.0), 2) if m["windows"] else None)
        errors.append(round((m["errors"] + m["nan_outputs"]) / n, 5) if n else None)
        lat = m["latency"]
        p95.append(latency_quantile(np.asarray(lat).tolist(), 0.95) if lat is not None and lat.sum() else None)
    return {"calls_per_min": calls, "error_rate": errors, "p95_ms": p95}


def charts(history: dict[str, dict[str, list[float | None]]], since: float, until: float, label: str) -> list[str]:
    """The three charts of HISTORY: calls per minute, error rate, p95 latency, a line per bundle version."""
    return [
        svg_chart(title, {b: h[key] for b, h in history.items()}, since, until, unit, label)
        for title, key, unit in (
            ("calls per minute", "calls_per_min", ""),
            ("error rate", "error_rate", "%"),
            ("p95 latency (ms)", "p95_ms", ""),
        )
    ]


def _ticks(top: float) -> list[float]:
    """Round values from 0 to the first at or above TOP, at most four steps apart."""
    if top <= 0:
        return [0.0]
    base = 10 ** math.floor(math.log10(top / 2))
    step = next(m * base for m in (1, 2, 5, 10, 20) if math.ceil(top / (m * base) - 1e-9) <= 4)
    return [round(k * step, 12) for k in range(math.ceil(top / step - 1e-9) + 1)]


def _fmt(v: float, unit: str) -> str:
    if unit == "%":
        return f"{v * 100:g}%"
    return f"{v:g}"


def svg_chart(
    title: str, lines: dict[str, list[float | None]], since: float, until: float, unit: str = "", label: str = ""
) -> str:
    """A line per key of LINES (equal spans of [SINCE, UNTIL)) with a y axis from 0, time labels (UTC) on
    the x axis and a legend; gaps where a value is None."""
    w, h, left, right, top_m, bottom = 560, 170, 52, 12, 22, 34
    pw, ph = w - left - right, h - top_m - bottom
    values = [v for vs in lines.values() for v in vs if v is not None]
    top = max(values, default=0.0) * 1.1 or 1.0
    ticks = _ticks(top)
    top = max(top, ticks[-1])
    esc = html.escape
    out = [f'<svg class="chart" width="{w}" height="{h}" role="img" aria-label="{esc(title)}">']
    out.append(f'<text x="{left}" y="14" font-size="12" font-weight="600">{esc(title)}</text>')
    for t in ticks:
        y = top_m + ph - t / top * ph
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{esc(_fmt(t, unit))}</text>')
    span = until - since
    day = span > 86400
    for k in range(5):
        t = since + span * k / 4
        x = left + pw * k / 4
        txt = time.strftime("%m-%d %H:%M" if day else "%H:%M", time.gmtime(t))
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        out.append(f'<text x="{x:.1f}" y="{h - bottom + 14}" font-size="10" text-anchor="{anchor}">{txt}</text>')
    out.append(
        f'<line x1="{left}" y1="{top_m + ph}" x2="{w - right}" y2="{top_m + ph}" stroke="#6b7280"/>'
        f'<line x1="{left}" y1="{top_m}" x2="{left}" y2="{top_m + ph}" stroke="#6b7280"/>'
    )
    if label:
        out.append(f'<text x="{w - right}" y="14" font-size="10" text-anchor="end" fill="#6b7280">{esc(label)}</text>')
    lx = left
    for i, (name, vs) in enumerate(lines.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        n = len(vs)
        step = pw / max(n - 1, 1)
        run: list[str] = []
        for j, v in enumerate([*vs, None]):
            if v is not None:
                run.append(f"{left + j * step:.1f},{top_m + ph - v / top * ph:.1f}")
                continue
            if len(run) == 1:
                cx, cy = run[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            elif run:
                out.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
            run = []
        out.append(f'<rect x="{lx}" y="{h - 12}" width="10" height="3" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{h - 8}" font-size="10">{esc(name)}</text>')
        lx += 24 + 6 * len(name)
    if not values:
        out.append(
            f'<text x="{left + pw / 2}" y="{top_m + ph / 2}" font-size="11" text-anchor="middle" fill="#6b7280">'
            "no telemetry in this range</text>"
        )
    out.append("</svg>")
    return "".join(out)
