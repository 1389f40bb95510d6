"""Build every zoo architecture in every format and precision and record each cell: built (size,
agreement with the source model, speed against the same format's fp32 file) or refused (the one-line
reason). `python -m examples.zoo.run --out build/zoo` prints the table; benchmarks/zoo.py keeps it."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet import InputError

from .models import ZOO, Entry, make

__all__ = ["PRECISIONS", "TOLERANCE", "Cell", "run_entry"]

PRECISIONS = ("fp32", "fp16", "dynamic", "int8")
FORMATS = ("onnx", "tflite")
# Top-1 agreement with the source model on the evaluation set that a built cell must reach (docs: README).
TOLERANCE = {"fp32": 0.99, "fp16": 0.99, "dynamic": 0.97, "int8": 0.95}


@dataclass
class Cell:
    arch: str
    format: str
    precision: str  # what was asked
    status: str  # "built" or "refused"
    built_precision: str | None = None  # what the file is (int8, mixed, fp16, fp32)
    size_bytes: int | None = None
    agreement: float | None = None
    accuracy: float | None = None
    source_accuracy: float | None = None
    speed_vs_fp32: float | None = None
    latency_ms_p50: float | None = None
    batch: int | None = None
    reason: str | None = None
    seconds: float | None = None


def run_entry(entry: Entry, work: Path, precisions: tuple[str, ...] = PRECISIONS) -> list[Cell]:
    """One build per precision, both formats asked: a format that cannot be built is a refused cell."""
    from edgefleet.converters import BuildConfig, Dataset, Quantize, build

    model, data = make(entry, work)
    calib, ev = Dataset(*data["calib"], name="calib"), Dataset(*data["eval"], name="eval")
    cells: list[Cell] = []
    for prec in precisions:
        cfg = BuildConfig(
            name=entry.name.replace("_", "-"),
            formats=list(FORMATS),
            layout=entry.layout,
            quantize=Quantize(mode="none" if prec == "fp32" else prec),
        )
        t = time.perf_counter()
        try:
            res = build(model, work / f"{entry.name}-{prec}.efb", cfg, calibration=calib, evaluation=ev,
                        progress=lambda _msg: None)  # fmt: skip
        except InputError as exc:
            cells += [Cell(entry.name, f, prec, "refused", reason=str(exc)) for f in FORMATS]
            continue
        secs = round(time.perf_counter() - t, 1)
        built = {a["format"]: a for a in res.report["artifacts"]}
        for fmt in FORMATS:
            a = built.get(fmt)
            if a is None:
                why = next((w for w in res.report["warnings"] if w.startswith(f"{fmt} not built")), "not built")
                cells.append(Cell(entry.name, fmt, prec, "refused", reason=why.removeprefix(f"{fmt} not built: ")))
                continue
            cells.append(
                Cell(
                    entry.name, fmt, prec, "built", a["precision"], a["size_bytes"], a["agreement"], a["accuracy"],
                    res.report["source"]["accuracy"], a["speed_vs_fp32"], a["latency_ms_p50"], a["batch"],
                    seconds=secs,
                )
            )  # fmt: skip
    return cells


def table(cells: list[Cell]) -> str:
    """The zoo as a markdown table: one row per architecture and format, one column per precision."""
    fp32_size = {(c.arch, c.format): c.size_bytes for c in cells if c.precision == "fp32" and c.size_bytes}
    lines = [
        "| architecture | format | " + " | ".join(PRECISIONS) + " |",
        "|---|---|" + "---|" * len(PRECISIONS),
    ]
    for arch in dict.fromkeys(c.arch for c in cells):
        for fmt in FORMATS:
            row = []
            for prec in PRECISIONS:
                c = next((c for c in cells if (c.arch, c.format, c.precision) == (arch, fmt, prec)), None)
                if c is None:
                    row.append("")
                elif c.status == "refused":
                    row.append(f"refused: {(c.reason or '')[:160]}")
                else:
                    base = fp32_size.get((arch, fmt))
                    size = f"{c.size_bytes / base:.2f}× size" if base and c.size_bytes else f"{c.size_bytes} B"
                    speed = f", {c.speed_vs_fp32:.2f}× speed" if c.speed_vs_fp32 and prec != "fp32" else ""
                    kind = (
                        f" ({c.built_precision})" if c.built_precision not in (prec, None) and prec != "dynamic" else ""
                    )
                    row.append(f"{c.agreement:.3f} agree, {size}{speed}{kind}")
            lines.append(f"| {arch} | {fmt} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=None, help="keep the bundles here (default: a temporary folder)")
    ap.add_argument("--only", help="comma-separated architecture names")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for entry in ZOO:
            if only and entry.name not in only:
                continue
            print(f"[zoo] {entry.name}: {entry.covers}", file=sys.stderr, flush=True)
            cells += run_entry(entry, work)
    print(table(cells))
    return 0


def as_dicts(cells: list[Cell]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cells]


if __name__ == "__main__":
    sys.exit(main())
