"""Collect benchmarks/results/*.json into benchmarks/RESULTS.md with one plot (PNG) per benchmark.

.venv/bin/python benchmarks/report.py       (benchmarks/run_all runs every benchmark, then this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "benchmarks" / "RESULTS.md"
ORDER = (
    "compression",
    "int8_peers",
    "zoo",
    "runtime_overhead",
    "accelerators",
    "fleet_ingest",
    "fleet_rollout",
    "fleet_scale",
    "dashboard_pages",
    "shadow_budget",
    "install_size",
)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def plot_compression(d: dict[str, Any], png: Path) -> None:
    plt = _plt()
    examples = list(d["examples"].items())
    fig, axes = plt.subplots(len(examples), 3, figsize=(15, 4.2 * len(examples)), squeeze=False)
    for row, (name, ex) in enumerate(examples):
        rows = ex["rows"]
        labels = [r["variant"].replace("/", "\n") for r in rows]
        y = list(range(len(rows)))
        sizes = [r["size_bytes"] / 1024 for r in rows]
        lat = [r["latency_ms_p50"] or 0 for r in rows]
        qual = [r["accuracy"] if r.get("accuracy") is not None else r.get("agreement") or 0 for r in rows]
        what = "accuracy" if ex.get("labels") else "top-1 agreement with fp32"
        for ax, vals, title in (
            (axes[row][0], sizes, f"{name}: file size (KiB)"),
            (axes[row][1], lat, f"{name}: p50 latency, batch 1 (ms)"),
            (axes[row][2], qual, f"{name}: {what}"),
        ):
            colors = ["#9ca3af" if "fp32" in lb else ("#c2410c" if "onnxruntime" in lb else "#2563eb") for lb in labels]
            ax.barh(y, vals, color=colors)
            ax.set_yticks(y, labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(title, fontsize=9)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        lo = min(q for q in qual if q) if any(qual) else 0
        axes[row][2].set_xlim(max(0.0, lo - 0.05), 1.0)
    fig.suptitle(f"Compression (grey: fp32, orange: ONNX Runtime's own quantizer)  -  {d['machine']}", fontsize=9)
    _save(plt, fig, png)


def plot_runtime(d: dict[str, Any], png: Path) -> None:
    plt = _plt()
    rows = d["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        keys = list(r["us_per_call"])
        vals = [r["us_per_call"][k] for k in keys]
        ax.bar(range(len(keys)), vals, color=["#9ca3af", "#60a5fa", "#2563eb"][: len(keys)])
        ax.set_xticks(range(len(keys)), keys, fontsize=8)
        ax.set_title(f"{r['model']}, {r.get('threads', '?')} thread(s)\n{r['backend']}", fontsize=8)
        ax.set_ylabel("us per call")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"Runtime overhead against the bare backend  -  {d['machine']}", fontsize=9)
    _save(plt, fig, png)


def plot_ingest(d: dict[str, Any], png: Path) -> None:
    plt = _plt()
    keys = ["1 ingest worker", "2 ingest workers"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for off, mode, color in ((-0.2, "backlog", "#1d4ed8"), (0.2, "live", "#93c5fd")):
        vals = [d[mode]["one_worker"]["windows_per_s"], d[mode]["two_workers"]["windows_per_s"]]
        ax.bar([i + off for i in range(2)], vals, width=0.4, color=color, label=mode)
        for i, v in enumerate(vals):
            ax.text(i + off, v, f"{v:,.0f}/s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(2), keys)
    ax.axhline(5000, color="#c62828", ls="--", lw=1)
    ax.text(1.5, 5000, " target 5,000", color="#c62828", fontsize=8, va="bottom", ha="right")
    ax.legend(fontsize=8)
    ax.set_ylabel("telemetry windows per second")
    ax.set_title(f"Fleet ingest (mosquitto_sub: not drawn, see table)\n{d['machine']}", fontsize=8)
    _save(plt, fig, png)


def plot_rollout(d: dict[str, Any], png: Path) -> None:
    plt = _plt()
    ends = [0.0, *d["stage_end_s"]]
    done = [0]
    for n in d["assigned"]:
        done.append(done[-1] + n)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.step(ends, done[: len(ends)], where="post", color="#2563eb")
    ax.plot(ends, done[: len(ends)], "o", color="#2563eb")
    ax.axvline(60, color="#c62828", ls="--", lw=1)
    ax.text(60, 0, " target 60 s", color="#c62828", fontsize=8)
    ax.set_xlabel("seconds after `rollout create`")
    ax.set_ylabel("devices on the new version")
    ax.set_title(
        f"{d['devices']} devices, stages 10/50/100%: {d['rollout_s']} s\n{d['machine']['machine']}, "
        f"{d['machine']['cpus']} CPUs",
        fontsize=8,
    )
    _save(plt, fig, png)


PLOTS = {
    "compression": plot_compression,
    "runtime_overhead": plot_runtime,
    "fleet_ingest": plot_ingest,
    "fleet_rollout": plot_rollout,
}


def main() -> int:
    parts = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run_all` (every benchmark, then `benchmarks/report.py`). Each section is the",
        "benchmark's own table (`benchmarks/results/NAME.md`, numbers in `NAME.json`) with its plot; each says",
        "the machine and time it was measured on. Comparisons are side by side in one run on that machine.",
        "",
    ]
    missing = []
    for name in ORDER:
        js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
        if not js.exists() or not md.exists():
            missing.append(name)
            continue
        data = json.loads(js.read_text())
        text = md.read_text().strip().splitlines()
        parts += ["#" + text[0], *text[1:], ""]
        if name in PLOTS:  # the tables of int8_peers and zoo say it all
            png = RESULTS / f"{name}.png"
            PLOTS[name](data, png)
            parts += [f"![{name}](results/{png.name})", ""]
    if missing:
        parts += [f"Not measured yet: {', '.join(missing)} (run benchmarks/run_all)."]
    OUT.write_text("\n".join(parts) + "\n")
    print(f"wrote {OUT} with {len(ORDER) - len(missing)} benchmarks, plots in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
