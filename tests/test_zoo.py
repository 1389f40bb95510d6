"""The conversion zoo (examples/zoo): architectures the other examples do not use, trained on package
data, built in ONNX and TFLite at fp32, fp16, dynamic and int8 with real exporters, quantizers and runtimes.
Every cell is built within its tolerance or refused in one line naming the format; none ends in a
traceback; every architecture builds int8 in at least one format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.tensorflow, pytest.mark.slow]
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
pytest.importorskip("torch")

from examples.zoo.models import ZOO  # noqa: E402
from examples.zoo.run import TOLERANCE, run_entry  # noqa: E402


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_zoo_entry_builds_every_cell_or_says_why(entry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cells = run_entry(entry, tmp_path)  # any exception but InputError fails here
    assert len(cells) == 8
    for c in cells:
        where = f"{c.arch} {c.format} {c.precision}"
        if c.status == "built":
            assert c.agreement is not None and c.agreement >= TOLERANCE[c.precision], f"{where}: {c}"
            assert c.size_bytes and c.size_bytes > 0
        else:
            assert c.reason and "\n" not in c.reason and "Traceback" not in c.reason, f"{where}: {c.reason!r}"
            assert any(w in c.reason for w in ("ONNX", "TFLite", "onnx", "tflite")), f"{where}: {c.reason}"
    assert any(c.precision == "int8" and c.status == "built" for c in cells), [c.reason for c in cells]
    # What is built as fp32 runs like its source: at least one format exports for every architecture.
    assert any(c.precision == "fp32" and c.status == "built" for c in cells)
