"""Shadow budget: what a shadow run costs the app's own calls, side by side in one process.

The app calls EfficientNet-Lite0 (int8 ONNX, batch 1) on the runtime's default threads, back to back (the
worst case: the app never leaves the cores idle) and paced at one call every 10 ms (an app with work of its
own between calls), and offers every call to a shadow exactly as the agent does (`Shadow.offer` after
`predict`), with the same bundle as the candidate on one inference thread: no shadow; a shadow within the
default CPU share (0.25); a shadow with no budget (share 1.0: the candidate runs whenever it has a sample).
Variants interleave per round; the figures are the medians over rounds of each round's p50 / p95 per-call
latency.

    .venv/bin/python benchmarks/shadow_budget.py [--rounds 10] [--calls 200]

Writes benchmarks/results/shadow_budget.json and benchmarks/results/shadow_budget.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgefleet.runtime as rt  # noqa: E402
from benchmarks.runtime_overhead import RESULTS, _bundles  # noqa: E402
from edgefleet.protocol import BundleRef  # noqa: E402
from edgefleet.runtime._shadow import SHADOW_CPU_SHARE, Shadow  # noqa: E402

VARIANTS: dict[str, float | None] = {"no shadow": None, f"shadow, share {SHADOW_CPU_SHARE}": SHADOW_CPU_SHARE,
                                     "shadow, no budget (1.0)": 1.0}  # fmt: skip


def _round(
    app: rt.Model, candidate: rt.Model, share: float | None, x: np.ndarray, calls: int, gap_s: float
) -> dict[str, float]:
    ref = BundleRef("bench", "1.0.0", "http://localhost/x.efb", "0" * 64, 1)
    sh = None if share is None else Shadow(candidate, ref, 1.0, 3600.0, "bench", cpu_share=share)
    times = []
    t_start = time.perf_counter()
    try:
        for _ in range(calls):
            if gap_s:
                time.sleep(gap_s)  # the app's own work between calls (sleeping: it leaves the cores free)
            if sh is not None:
                sh.app_call_started()  # as Agent.predict does: the candidate runs between the app's calls
            t0 = time.perf_counter()
            y = app.predict(x)
            ms = (time.perf_counter() - t0) * 1000
            if sh is not None:
                sh.app_call_ended()
                sh.offer(x, y, ms)
            times.append(ms)
    finally:
        rep = None
        if sh is not None:
            sh.stop.set()
            sh.thread.join(5)
            rep = {"samples": sh.samples, "dropped": sh.dropped, "busy_s": sh.busy_s}
    total_s = time.perf_counter() - t_start
    out = {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}
    if rep is not None:
        out["shadowed"] = rep["samples"] / calls
        out["cpu_share"] = rep["busy_s"] / total_s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    path = _bundles()["efficientnet"]
    app = rt.load(path, allow_unsigned=True, backend="onnx")
    candidate = rt.load(path, allow_unsigned=True, backend="onnx", threads=1)
    x = app.bundle.golden_inputs()[:1].astype(np.float32)  # a real photo view, as the app would send
    for _ in range(20):
        app.predict(x)
    rows = []
    for app_mode, gap_s in (("back to back", 0.0), ("a call every 10 ms", 0.01)):
        per: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for name, share in VARIANTS.items():
                per[name].append(_round(app, candidate, share, x, args.calls, gap_s))
        mode_rows = []
        for name, rounds in per.items():
            row: dict[str, Any] = {"app": app_mode, "variant": name}
            for k in rounds[0]:
                row[k] = round(statistics.median(r[k] for r in rounds), 4)
            mode_rows.append(row)
        base = mode_rows[0]
        for r in mode_rows:
            r["p50_x"] = round(r["p50_ms"] / base["p50_ms"], 3)
            r["p95_x"] = round(r["p95_ms"] / base["p95_ms"], 3)
        rows += mode_rows
    result = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": "efficientnet_lite0 onnx-int8, batch 1",
        "app_threads": app.info.threads,
        "rounds": args.rounds,
        "calls": args.calls,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shadow_budget.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Shadow budget",
        "",
        f"Measured {result['measured']} on {result['machine']}; the app calls {result['model']} "
        f"({result['app_threads']} inference threads), {args.calls} calls a round, {args.rounds} interleaved "
        "rounds, medians over rounds. Every call is offered to the shadow (sample rate 1.0); the candidate is "
        "the same bundle on one thread.",
        "",
        "| app | variant | app p50 ms | app p95 ms | p50 x | p95 x | calls shadowed | candidate busy share |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shadowed = f"{r['shadowed']:.2f}" if "shadowed" in r else "-"
        busy = f"{r['cpu_share']:.2f}" if "cpu_share" in r else "-"
        lines.append(
            f"| {r['app']} | {r['variant']} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['p50_x']:.2f} | "
            f"{r['p95_x']:.2f} | {shadowed} | {busy} |"
        )
    lines += [
        "",
        "The busy share is the candidate's inference time over the app's elapsed time. Within its share the "
        "candidate runs only once the app has been between calls for 1 ms and rests after each call; samples "
        "it cannot take so are dropped (counted), never waited for. An app calling back to back leaves it no "
        "room (little is shadowed); one that leaves time between calls has its samples run there.",
    ]
    (RESULTS / "shadow_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
