"""Crash-safe file writes shared by the parts."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in directory PATH durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o644,
    *,
    before_rename: Callable[[], None] | None = None,
    after_rename: Callable[[], None] | None = None,
) -> None:
    """Write DATA to PATH through a temp file in the same directory: fsync, rename, fsync the directory.

    A reader sees the old content or the new, never a mix, even after a crash or power cut.
    The hooks let crash tests stop the process between the steps.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if after_rename is not None:
        after_rename()
    fsync_dir(p.parent)
