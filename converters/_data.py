"""Data sets for calibration, evaluation and training, loaded from `.npz` with strict checks."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet import InputError

__all__ = ["Dataset", "load_npz", "padded_batches", "run_batched"]


@dataclass
class Dataset:
    """Inputs `x` (shaped as the model input, batch first) and optional integer labels `y`."""

    x: np.ndarray
    y: np.ndarray | None = None
    name: str = "data"

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x)
        if self.y is not None:
            self.y = np.asarray(self.y)
            if self.y.ndim != 1 or len(self.y) != len(self.x):
                raise InputError(
                    f"{self.name}: labels 'y' must be 1-D with one label per sample; "
                    f"got shape {self.y.shape} for {len(self.x)} samples"
                )
            if not np.issubdtype(self.y.dtype, np.integer):
                raise InputError(f"{self.name}: labels 'y' must be integers, got dtype {self.y.dtype}")

    def __len__(self) -> int:
        return len(self.x)

    def sha256(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()

    def take(self, n: int) -> Dataset:
        return Dataset(self.x[:n], None if self.y is None else self.y[:n], self.name)

    def check_input(self, shape: tuple[int | None, ...], dtype: str = "float32") -> None:
        """Refuse data that does not match the model input (ignoring the batch dimension)."""
        want = tuple(shape[1:])
        got = tuple(self.x.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise InputError(
                f"{self.name}: array 'x' has per-sample shape {got}, but the model expects {want} "
                f"(full shape (N, {', '.join(str(w) for w in want)}))"
            )
        if not np.issubdtype(self.x.dtype, np.floating):
            raise InputError(f"{self.name}: array 'x' must be floating point ({dtype}); got {self.x.dtype}")


def load_npz(path: str | os.PathLike[str], *, need_labels: bool = False, min_samples: int = 1) -> Dataset:
    """Load `x` (and `y` if present) from an .npz file; never unpickles."""
    p = Path(path)
    name = p.name
    try:
        with np.load(p, allow_pickle=False) as data:
            keys = set(data.files)
            if "x" not in keys:
                raise InputError(f"{name}: no array named 'x' (it has: {', '.join(sorted(keys)) or 'nothing'})")
            x = data["x"]
            y = data["y"] if "y" in keys else None
    except FileNotFoundError as exc:
        raise InputError(f"{p} does not exist") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{name} is not a readable .npz file (truncated or corrupt): {exc}") from exc
    except ValueError as exc:
        raise InputError(f"{name} holds pickled objects, which are refused; save plain numeric arrays") from exc
    if need_labels and y is None:
        raise InputError(f"{name}: no array named 'y' with integer labels, which this step needs")
    if x.dtype == object or x.ndim < 2:
        raise InputError(f"{name}: 'x' must be a numeric array with a batch dimension; got {x.dtype} {x.shape}")
    if len(x) < min_samples:
        raise InputError(f"{name}: {len(x)} samples is too few; at least {min_samples} are needed")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise InputError(f"{name}: 'x' contains NaN or infinite values")
    return Dataset(x.astype(np.float32, copy=False) if np.issubdtype(x.dtype, np.floating) else x, y, name)


def padded_batches(x: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Split X into batches of exactly SIZE rows for a model file with a fixed batch dimension.

    Yields (batch, real rows). A short last batch is filled up with repeats of its own rows, not zeros:
    calibration sees only real values, and the caller keeps the first `real rows` outputs.
    """
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(x), size):
        chunk = x[i : i + size]
        n = len(chunk)
        if n < size:
            chunk = np.concatenate([chunk, chunk[np.arange(size - n) % n]])
        yield np.ascontiguousarray(chunk), n


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int) -> np.ndarray:
    """FN over X in batches of SIZE (padded as `padded_batches` does); the outputs of real rows only."""
    return np.concatenate([np.asarray(fn(b))[:n] for b, n in padded_batches(x, size)])
