"""Checks of a build's inputs before any work: output paths, data the source model can take, labels."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import EdgefleetError, InputError

from ._data import Dataset

__all__ = ["check_labels", "check_writable", "source_runs"]


def check_writable(path: Path, what: str) -> None:
    """Refuse an output path before hours of work, not after: missing directories are made later."""
    if path.is_dir():
        raise InputError(f"{what} path {path} is a directory; give a file name")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot write the {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write the {what} {path}: directory {parent} is not writable")


def source_runs(predict: Callable[[Any, np.ndarray], np.ndarray], model: Any, ds: Dataset, fmt: str) -> None:
    """Refuse data the source model cannot take, with the model's own complaint in one line."""
    try:
        predict(model, ds.x[:2])
    except EdgefleetError:
        raise
    except Exception as exc:  # frameworks raise anything for a wrong shape: RuntimeError, AssertionError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise InputError(
            f"{ds.name}: the {fmt} source model cannot run on 'x' of per-sample shape {tuple(ds.x.shape[1:])} "
            f"({type(exc).__name__}: {first}); give data shaped like the model's input"
        ) from exc


def check_labels(ds: Dataset, src_pred: np.ndarray) -> None:
    if ds.y is None or not len(ds.y):
        return
    classes = int(np.asarray(src_pred).reshape(len(src_pred), -1).shape[1])
    lo, hi = int(ds.y.min()), int(ds.y.max())
    if lo < 0 or hi >= classes:
        raise InputError(
            f"{ds.name}: labels 'y' range from {lo} to {hi}, but the model has {classes} output classes "
            f"(labels 0..{classes - 1}); fix the labels or give the model they belong to"
        )
