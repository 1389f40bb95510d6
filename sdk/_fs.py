"""Crash-safe file writes shared by the parts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_copy", "atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in directory PATH durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | Callable[[BinaryIO], None],
    mode: int = 0o644,
    *,
    before_rename: Callable[[], None] | None = None,
    after_rename: Callable[[], None] | None = None,
) -> None:
    """Write DATA (bytes, or a function writing to the file it is given) to PATH through a temp file in the
    same directory: fsync, rename, fsync the directory.

    A reader sees the old content or the new, never a mix, even after a crash or power cut.
    The hooks let crash tests stop the process between the steps.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
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


def atomic_copy(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    mode: int = 0o644,
    *,
    before_rename: Callable[[], None] | None = None,
    after_rename: Callable[[], None] | None = None,
) -> None:
    """Copy SRC to DEST as `atomic_write` writes: DEST is the old file or a whole copy, never part of one."""
    with open(src, "rb") as fi:
        atomic_write(
            dest,
            lambda fo: shutil.copyfileobj(fi, fo, 1 << 20),
            mode,
            before_rename=before_rename,
            after_rename=after_rename,
        )
