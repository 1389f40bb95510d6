"""What this device can run: CPU architecture and features, and each inference runtime installed with its
version and accelerators. The agent reports it in its state document, so the fleet can see which devices
can load which bundles."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform
from typing import Any

__all__ = ["capabilities"]

# CPU features that decide which kernels run fast (x86-64 vector units, Arm dot products and fp16).
_FLAGS = ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c", "neon", "asimd",
          "asimddp", "fphp", "sve", "sve2", "i8mm")  # fmt: skip


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return []
    words: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words |= set(value.split())
    return [f for f in _FLAGS if f in words]


@functools.cache
def capabilities() -> dict[str, Any]:
    """The device's hardware and runtimes (computed once per process)."""
    runtimes: dict[str, Any] = {}
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            ort = importlib.import_module("onnxruntime")
            runtimes["onnx"] = {
                "module": "onnxruntime",
                "version": str(getattr(ort, "__version__", "")),
                "accelerators": list(ort.get_available_providers()),
            }
        except Exception as exc:  # a broken install is reported, not raised
            runtimes["onnx"] = {"module": "onnxruntime", "error": str(exc).splitlines()[0][:200] if str(exc) else ""}
    if importlib.util.find_spec("ai_edge_litert") is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("ai-edge-litert")
        except PackageNotFoundError:
            v = ""
        runtimes["tflite"] = {"module": "ai_edge_litert", "version": v, "accelerators": ["xnnpack", "cpu", "reference"]}
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpus": os.cpu_count() or 1,
        "cpu_flags": _cpu_flags(),
        "python": platform.python_version(),
        "runtimes": runtimes,
    }
