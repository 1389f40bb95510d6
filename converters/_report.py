"""The readable build report table."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table"]


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: dict[str, Any]) -> str:
    src = report["source"]
    src_size = src["size_bytes"] or 1
    head = (
        f"{'file':<28} {'format':<7} {'prec':<6} {'bytes':>10} {'size x':>7} "
        f"{'accuracy':>9} {'agree':>7} {'p50 ms':>8} {'fp32 ms':>8} {'speed x':>8}"
    )
    lines = [head, "-" * len(head)]
    lines.append(
        f"{'source':<28} {src['format']:<7} {src['precision']:<6} {src['size_bytes']:>10} {1:>7.3f} "
        f"{_f(src['accuracy'], '.4f'):>9} {_f(src['agreement'], '.4f'):>7} {'-':>8} {'-':>8} {'-':>8}"
    )
    for a in report["artifacts"]:
        batch = f" (batch {a['batch']})" if a.get("batch") not in (None, 1) else ""
        lines.append(
            f"{a.get('file', a['format']):<28} {a['format']:<7} {a['precision']:<6} {a['size_bytes']:>10} "
            f"{a['size_bytes'] / src_size:>7.3f} {_f(a['accuracy'], '.4f'):>9} {_f(a['agreement'], '.4f'):>7} "
            f"{_f(a['latency_ms_p50'], '.3f'):>8} {_f(a.get('fp32_latency_ms_p50'), '.3f'):>8} "
            f"{_f(a.get('speed_vs_fp32'), '.2f'):>8}{batch}"
        )
    lines.append(
        "speed x: the file against its own fp32 export in the same runtime (ONNX Runtime or LiteRT), "
        f"timed in turns; the source runs {_f(src['latency_ms_p50'], '.3f')} ms in {src.get('latency_runtime', '?')}"
    )
    for a in report["artifacts"]:
        trail = " -> ".join(f"{s['after']} {s['score']:.4f}" for s in a.get("scores", []))
        if trail:
            lines.append(
                f"{a['format']}: source {_f(src['accuracy'] if src['accuracy'] is not None else 1.0, '.4f')} -> {trail}"
            )
    gate = report.get("gate") or {}
    if gate.get("max_accuracy_drop") is not None:
        lines.append(
            f"gate: at most {gate['max_accuracy_drop']} lost against the source "
            f"({gate['allowed_samples']} of {gate['samples']} samples): met"
        )
    lines.append("steps: " + " -> ".join(s["pass"] for s in report["steps"]) if report["steps"] else "steps: none")
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    b = report["bundle"]
    lines.append(f"bundle: {b['path']} ({b['size_bytes']} bytes, {'signed' if b['signed'] else 'unsigned'})")
    return "\n".join(lines)
