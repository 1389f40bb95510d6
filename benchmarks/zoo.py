"""Conversion zoo: every architecture of examples/zoo in ONNX and TFLite at fp32, fp16, dynamic and int8.

Each cell is built (top-1 agreement with the source model on held-out data, size against the same
format's fp32 file, speed against that fp32 file in the same runtime, timed in turns) or refused with
its one-line reason. Target: every architecture builds int8 in at least one format; no cell ends in a
traceback.

    .venv/bin/python benchmarks/zoo.py [--only NAME,...]

Writes benchmarks/results/zoo.json and benchmarks/results/zoo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.zoo.models import ZOO  # noqa: E402
from examples.zoo.run import TOLERANCE, as_dicts, run_entry, table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated architecture names")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    cells = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-zoo-") as d:
        for entry in ZOO:
            if only and entry.name not in only:
                continue
            print(f"[zoo] {entry.name}: {entry.covers}", file=sys.stderr, flush=True)
            cells += run_entry(entry, Path(d))
    archs = list(dict.fromkeys(c.arch for c in cells))
    int8_ok = [a for a in archs if any(c.arch == a and c.precision == "int8" and c.status == "built" for c in cells)]
    results = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "tolerance": TOLERANCE,
        "architectures": {e.name: e.covers for e in ZOO if e.name in archs},
        "cells": as_dicts(cells),
        "int8_in_some_format": int8_ok,
    }
    built = [c for c in cells if c.status == "built"]
    md = "\n".join(
        [
            "# Conversion zoo",
            "",
            f"Measured {results['measured_at']} on {results['machine']}. Each cell: top-1 agreement with the source "
            "model on its held-out data, size against the same format's fp32 file, speed against that fp32 file "
            "in the same runtime (ONNX Runtime or LiteRT, batch 1 or the file's fixed batch, timed in turns); "
            "`(mixed)` means the accuracy gate kept some nodes in float. Models are small (10-60 k parameters, "
            "0.01-0.2 ms a call), where the cost of quantizing inputs and outputs weighs more than on large models.",
            "",
            table(cells),
            "",
            f"Built {len(built)} of {len(cells)} cells; int8 in at least one format: {len(int8_ok)} of {len(archs)} "
            f"architectures (target: all). Tolerances (top-1 agreement): "
            + ", ".join(f"{k} {v}" for k, v in TOLERANCE.items())
            + ".",
            "",
            "| architecture | covers |",
            "|---|---|",
            *(f"| {e.name} | {e.covers} |" for e in ZOO if e.name in archs),
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zoo.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (RESULTS / "zoo.md").write_text(md + "\n")
    print(md)
    return 0 if len(int8_ok) == len(archs) else 1


if __name__ == "__main__":
    sys.exit(main())
