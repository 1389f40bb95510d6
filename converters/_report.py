"""The readable build report table."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table"]


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: dict[str, Any]) -> str:
    rows = [("source", report["source"])] + [(a.get("file", a["format"]), a) for a in report["artifacts"]]
    src_size = report["source"]["size_bytes"] or 1
    src_lat = report["source"]["latency_ms_p50"] or 1
    head = (
        f"{'file':<28} {'format':<7} {'prec':<6} {'bytes':>10} {'size x':>7} "
        f"{'accuracy':>9} {'agree':>7} {'p50 ms':>8} {'speed x':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows:
        fmt = r.get("format", "")
        lines.append(
            f"{name:<28} {fmt:<7} {r['precision']:<6} {r['size_bytes']:>10} {r['size_bytes'] / src_size:>7.3f} "
            f"{_f(r['accuracy'], '.4f'):>9} {_f(r['agreement'], '.4f'):>7} {_f(r['latency_ms_p50'], '.3f'):>8} "
            f"{src_lat / r['latency_ms_p50'] if r['latency_ms_p50'] else 0:>8.2f}"
        )
    lines.append("steps: " + " -> ".join(s["pass"] for s in report["steps"]) if report["steps"] else "steps: none")
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    b = report["bundle"]
    lines.append(f"bundle: {b['path']} ({b['size_bytes']} bytes, {'signed' if b['signed'] else 'unsigned'})")
    return "\n".join(lines)
