"""What a device installs: the size on disk of each runtime extra with everything it pulls in, measured from
the installed distributions of this environment (the files each one's RECORD lists), side by side.

    .venv/bin/python benchmarks/install_size.py

Writes benchmarks/results/install_size.json and benchmarks/results/install_size.md. Target: a device install
with one backend (runtime-onnx or runtime-tflite) <= 200 MB.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET_MB = 200.0
EXTRAS = ("runtime-onnx", "runtime-tflite", "runtime", "fleet")


def _name(req: str) -> tuple[str, set[str], str]:
    """(distribution, extras, marker) of a requirement string."""
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?([^;]*)(;(.*))?", req)
    assert m is not None, req
    extras = {e.strip() for e in (m.group(2) or "[]")[1:-1].split(",") if e.strip()}
    return m.group(1), extras, (m.group(5) or "").strip()


def _applies(marker: str, extras: set[str]) -> bool:
    if not marker:
        return True
    found = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if found:
        return any(e in extras for e in found)
    try:
        from packaging.markers import Marker

        return bool(Marker(marker).evaluate())
    except Exception:
        return True


def closure(dist: str, extras: set[str], seen: dict[str, int]) -> None:
    key = re.sub(r"[-_.]+", "-", dist).lower()
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return
    if key not in seen:
        seen[key] = sum((f.size or 0) for f in (d.files or []))
    for req in d.requires or []:
        name, sub, marker = _name(req)
        if _applies(marker, extras):
            if re.sub(r"[-_.]+", "-", name).lower() == "edgefleet":
                closure(name, sub, seen)
            elif re.sub(r"[-_.]+", "-", name).lower() not in seen:
                closure(name, sub, seen)


def main() -> int:
    results = {}
    for extra in EXTRAS:
        seen: dict[str, int] = {}
        closure("edgefleet", {extra}, seen)
        seen.pop("edgefleet", None)  # this checkout (editable here); the wheel is well under 1 MB
        results[extra] = {
            "total_mb": round(sum(seen.values()) / 1e6, 1),
            "largest": sorted(((k, round(v / 1e6, 1)) for k, v in seen.items()), key=lambda kv: -kv[1])[:6],
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "install_size.json").write_text(json.dumps({"target_mb": TARGET_MB, "extras": results}, indent=1) + "\n")
    lines = [
        "# Install size per extra (installed files, this environment)",
        "",
        "| extra | MB on disk | largest parts (MB) | one backend <= 200 MB |",
        "|---|---|---|---|",
    ]
    for extra, r in results.items():
        parts = ", ".join(f"{k} {v}" for k, v in r["largest"])
        ok = "yes" if r["total_mb"] <= TARGET_MB else "no"
        lines.append(f"| {extra} | {r['total_mb']} | {parts} | {ok if extra.startswith('runtime-') else '-'} |")
    md = "\n".join(lines) + "\n"
    (RESULTS / "install_size.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
