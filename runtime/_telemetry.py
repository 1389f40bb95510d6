"""On-device telemetry storage: a bounded SQLite buffer of closed windows, events and captured samples.

Windows are aggregated in memory by `_aggregate.WindowAggregator` and sent by `_export.BufferDrain`.

Durability: the buffer runs SQLite in WAL mode with `synchronous=NORMAL`. A killed process loses
nothing that was flushed (committed transactions are in the WAL); a power cut can lose the windows
committed since the last WAL checkpoint, never corrupt the file. The window still being aggregated
in memory (at most `window_s`, 60 s by default) is lost on a kill; `flush()` closes it early.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._fs import atomic_write

from ._failpoints import failpoint

__all__ = ["BufferStats", "TelemetryBuffer"]

log = logging.getLogger("edgefleet.runtime")

_RESERVE_BYTES = 256 * 1024
# What a full buffer gives up first: telemetry windows, oldest first, then events, oldest first.
_DROP_ORDER = "(kind = 'events'), seq"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL DEFAULT 'telemetry',
    start REAL NOT NULL,
    end REAL NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    bundle TEXT NOT NULL,
    input BLOB NOT NULL,
    output BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class BufferStats:
    windows: int
    bytes: int
    max_bytes: int
    dropped_windows: int
    full_disk_events: int
    corrupt_resets: int
    samples: int
    oldest: float | None
    newest: float | None
    # records lost to a write the disk refused otherwise than full (EIO, a read-only or over-quota
    # filesystem) since the buffer was opened; kept in memory, since the buffer could not record them
    write_errors: int = 0


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return "full" in str(exc).lower() or getattr(exc, "sqlite_errorcode", None) == 13  # SQLITE_FULL


class TelemetryBuffer:
    """Durable, bounded store of closed telemetry windows, oldest dropped first.

    Windows leave only through `ack(key)` (after the server has them) or by being dropped when
    the buffer is over `max_bytes`; drops are counted. A corrupt file is moved aside and a fresh
    buffer started (`reset_reason` says why), so telemetry never stops the device.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 64 << 20, sample_max_bytes: int = 4 << 20):
        if max_bytes < 4096:
            raise InputError(f"telemetry buffer max_bytes is {max_bytes}; use at least 4096")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.sample_max_bytes = sample_max_bytes
        self.reset_reason: str | None = None
        # Records stored by this process: lets a reader skip querying when nothing new arrived.
        self.added = 0
        self.write_errors = 0
        # Called (outside the lock) after each stored record: lets a sender sleep until there is work.
        self.on_add: Callable[[], None] | None = None
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            self._move_aside(str(exc))
            self._db = self._open()
            self._bump("corrupt_resets")
        self._check_identity()
        self._reserve = Path(str(self.path) + ".reserve")
        self._make_reserve()
        self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM windows").fetchone()[0])
        self._sample_bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM samples").fetchone()[0])

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Small checkpoints keep the WAL (and what a power cut can lose) to about 128 KiB.
            db.execute("PRAGMA wal_autocheckpoint=32")
            db.execute("PRAGMA journal_size_limit=1048576")
            # Deleted windows must give their space back to the filesystem when the disk is full.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
            db.executescript(_SCHEMA)
            cols = {r[1] for r in db.execute("PRAGMA table_info(samples)")}
            if "label" not in cols:  # a buffer from before labelled capture
                db.execute("ALTER TABLE samples ADD COLUMN call TEXT")
                db.execute("ALTER TABLE samples ADD COLUMN label INTEGER")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _check_identity(self) -> None:
        """Notice a buffer file that was emptied, deleted or swapped while nobody had it open.

        SQLite opens a zero-byte or missing file as a new, empty database, so the unsent windows would be
        gone without a word. The buffer's id lives both inside the database and in `<path>.id` beside it;
        a database without the id its side file names is a reset, reported like a corrupt one."""
        side = Path(str(self.path) + ".id")
        inside = self._meta("buffer_id")
        try:
            beside = int(side.read_text().strip()) if side.exists() else 0
        except (OSError, ValueError):
            beside = 0
        if inside and inside == beside:
            return
        if beside and inside != beside and self.reset_reason is None:
            what = "emptied or deleted" if not inside else "replaced by another buffer's file"
            self.reset_reason = f"telemetry buffer {self.path} was {what} while closed; unsent windows are lost"
            log.warning(self.reset_reason)
            self._bump("corrupt_resets")
        if not inside:
            inside = int.from_bytes(os.urandom(7), "big") or 1
            self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('buffer_id', ?)", (inside,))
        atomic_write(side, str(inside).encode())

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.replace(p, Path(str(aside) + suffix))
        self.reset_reason = f"telemetry buffer {self.path} was corrupt ({why}); moved to {aside.name}, started afresh"
        log.warning(self.reset_reason)

    def _meta(self, k: str) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, k: str, n: int = 1) -> None:
        self._db.execute(
            "INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = v + excluded.v", (k, n)
        )

    def _drop_oldest(self, need: int) -> None:
        """Delete oldest records until NEED more bytes fit under the cap (inside a transaction): telemetry
        windows first, events only once no window is left, since an update's outcome (`committed`,
        `rolled_back`) must reach the server late rather than never, and a window's loss is only counted."""
        if self._bytes + need <= self.max_bytes:
            return
        freed, doomed = 0, []
        for seq, size in self._db.execute(f"SELECT seq, size FROM windows ORDER BY {_DROP_ORDER}"):
            if self._bytes - freed + need <= self.max_bytes:
                break
            freed += size
            doomed.append(seq)
        if doomed:
            self._db.executemany("DELETE FROM windows WHERE seq = ?", [(s,) for s in doomed])
            self._bump("dropped_windows", len(doomed))
            self._bytes -= freed

    def add(self, window: dict[str, Any], kind: str = "telemetry") -> None:
        """Store a closed window (or, with KIND `events`, an event for the server).

        Never raises for a full disk: the oldest records go, and that is counted.
        """
        body = json.dumps(window, separators=(",", ":"), sort_keys=True).encode()
        start = float(window.get("start", window.get("ts", 0.0)))
        with self._lock:
            if len(body) > self.max_bytes:
                self._db.execute("BEGIN IMMEDIATE")
                self._bump("dropped_windows")
                self._db.execute("COMMIT")
                return
            for attempt in range(3):
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    failpoint("buffer.add")
                    self._drop_oldest(len(body))
                    self._db.execute(
                        "INSERT OR IGNORE INTO windows (key, kind, start, end, body, size) VALUES (?, ?, ?, ?, ?, ?)",
                        (window["key"], kind, start, window.get("end", start), body, len(body)),
                    )
                    self._db.execute("COMMIT")
                    self._bytes += len(body)
                    self.added += 1
                    break
                except (sqlite3.OperationalError, OSError) as exc:
                    self._rollback()
                    self._recount()
                    if not _is_full(exc):
                        if kind == "events":
                            # An update outcome must reach the fleet: the agent's step fails, backs off and
                            # sends it again (it is recorded only after it is buffered).
                            raise
                        self._write_error(kind, exc)
                        return
                    self._on_full(attempt)
            else:
                # Still full after freeing space: this window is the one lost, and counted.
                self._count_quietly("dropped_windows")
                return
        if self.on_add is not None:
            self.on_add()

    def _recount(self) -> None:
        try:
            self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM windows").fetchone()[0])
            self._sample_bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM samples").fetchone()[0])
        except sqlite3.Error:
            pass  # the disk still fails: the figures are refreshed on the next write

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass

    def _make_reserve(self) -> None:
        """Hold back a little disk space: on a full disk, even deleting rows needs room in the WAL."""
        if self._reserve.exists():
            return
        try:
            with open(self._reserve, "wb") as f:
                f.write(b"\0" * _RESERVE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            self._reserve.unlink(missing_ok=True)

    def _on_full(self, attempt: int) -> None:
        log.warning("telemetry buffer: disk full; dropping the oldest windows")
        self._reserve.unlink(missing_ok=True)
        self._checkpoint()
        rows = self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        # Free a quarter of the buffer, then half: deleting needs a little room itself.
        n = max(1, rows // (4 if attempt == 0 else 2))
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                f"DELETE FROM windows WHERE seq IN (SELECT seq FROM windows ORDER BY {_DROP_ORDER} LIMIT ?)", (n,)
            )
            self._bump("dropped_windows", min(n, rows))
            self._bump("full_disk_events")
            self._db.execute("COMMIT")
        except sqlite3.OperationalError:
            self._rollback()
        self._checkpoint()
        try:
            self._db.execute("PRAGMA incremental_vacuum")
        except sqlite3.OperationalError:
            pass
        self._checkpoint()
        self._make_reserve()
        self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM windows").fetchone()[0])

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            pass

    def _count_quietly(self, k: str) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._bump(k)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError:
            self._rollback()

    def add_sample(self, ts: float, bundle: str, x: np.ndarray, y: np.ndarray, call: str | None = None) -> None:
        """Keep one raw input/output pair (opt-in capture), oldest dropped beyond `sample_max_bytes`; CALL
        (the call's key) lets a label fed back later find it (`label_sample`)."""
        bx, by = io.BytesIO(), io.BytesIO()
        np.save(bx, x, allow_pickle=False)
        np.save(by, y, allow_pickle=False)
        size = bx.tell() + by.tell()
        if size > self.sample_max_bytes:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                while self._sample_bytes + size > self.sample_max_bytes:
                    row = self._db.execute("SELECT seq, size FROM samples ORDER BY seq LIMIT 1").fetchone()
                    if row is None:
                        break
                    self._db.execute("DELETE FROM samples WHERE seq = ?", (row[0],))
                    self._sample_bytes -= row[1]
                failpoint("buffer.add_sample")
                self._db.execute(
                    "INSERT INTO samples (ts, bundle, input, output, size, call) VALUES (?, ?, ?, ?, ?, ?)",
                    (ts, bundle, bx.getvalue(), by.getvalue(), size, call),
                )
                self._db.execute("COMMIT")
                self._sample_bytes += size
            except (sqlite3.OperationalError, OSError) as exc:
                self._rollback()
                self._recount()
                if not _is_full(exc):
                    self._write_error("sample", exc)

    def label_sample(self, call: str, label: int) -> None:
        """The true class of the captured sample of call CALL, when one was captured."""
        with self._lock:
            try:
                failpoint("buffer.label")
                self._db.execute("UPDATE samples SET label = ? WHERE call = ?", (int(label), call))
            except (sqlite3.OperationalError, OSError) as exc:
                if not _is_full(exc):
                    self._write_error("label", exc)

    def _write_error(self, what: str, exc: BaseException) -> None:
        # Never into the app's predict (which closes windows and captures samples): the record is lost,
        # counted in `write_errors` and logged; the next write tries the disk again.
        self.write_errors += 1
        log.error("telemetry buffer: a %s was lost to a disk error: %s", what, exc)

    def take_samples(
        self, limit: int, max_bytes: int, bundle_name: str | None = None
    ) -> list[tuple[int, float, str, np.ndarray, np.ndarray, int | None]]:
        """The newest LIMIT captured samples (of bundle BUNDLE_NAME, any version), at most MAX_BYTES of them,
        in the order they were taken: (seq, ts, bundle, input, output, label or None). They stay until `drop_samples`.

        Newest first because the fleet asks when something changed (a drift alert): what it needs is the
        cohort as it is now, not the oldest samples the byte cap has kept."""
        with self._lock:
            rows = self._db.execute("SELECT seq, ts, bundle, input, output, size, label FROM samples ORDER BY seq DESC")
            out: list[tuple[int, float, str, np.ndarray, np.ndarray, int | None]] = []
            total = 0
            for seq, ts, bundle, bx, by, size, label in rows:
                if bundle_name is not None and str(bundle).rpartition(":")[0] != bundle_name:
                    continue
                if len(out) >= limit or total + int(size) > max_bytes:
                    break
                total += int(size)
                x = np.load(io.BytesIO(bx), allow_pickle=False)
                y = np.load(io.BytesIO(by), allow_pickle=False)
                out.append((int(seq), float(ts), str(bundle), x, y, None if label is None else int(label)))
        out.reverse()  # in the order they were taken
        return out

    def drop_samples(self, seqs: list[int]) -> None:
        """Forget the captured samples SEQS (uploaded)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for s in seqs:
                    rows = self._db.execute("DELETE FROM samples WHERE seq = ? RETURNING size", (s,)).fetchall()
                    self._sample_bytes -= sum(int(r[0]) for r in rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def pending(self, limit: int = 100, after_seq: int = 0) -> list[tuple[int, str, str, bytes]]:
        """Oldest first: (seq, kind, key, JSON body) of records not yet acknowledged."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, key, body FROM windows WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        return [(int(s), str(t), str(k), bytes(b)) for s, t, k, b in rows]

    def ack(self, *keys: str) -> None:
        """The server has the windows KEYS: they may leave the buffer (one transaction for all)."""
        if not keys:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                freed = 0
                for key in keys:
                    rows = self._db.execute("DELETE FROM windows WHERE key = ? RETURNING size", (key,)).fetchall()
                    freed += sum(int(r[0]) for r in rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._bytes -= freed

    def windows(self, kind: str = "telemetry") -> Iterator[dict[str, Any]]:
        """The stored, unacknowledged records of KIND, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM windows WHERE kind = ? ORDER BY seq", (kind,)).fetchall()
        for (b,) in rows:
            yield json.loads(b)

    def samples(self) -> Iterator[tuple[float, str, np.ndarray, np.ndarray]]:
        with self._lock:
            rows = self._db.execute("SELECT ts, bundle, input, output FROM samples ORDER BY seq").fetchall()
        for ts, bundle, bx, by in rows:
            yield ts, bundle, np.load(io.BytesIO(bx), allow_pickle=False), np.load(io.BytesIO(by), allow_pickle=False)

    def stats(self) -> BufferStats:
        with self._lock:
            n, lo, hi = self._db.execute("SELECT COUNT(*), MIN(start), MAX(end) FROM windows").fetchone()
            ns = self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            return BufferStats(
                windows=int(n),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                dropped_windows=self._meta("dropped_windows"),
                full_disk_events=self._meta("full_disk_events"),
                corrupt_resets=self._meta("corrupt_resets"),
                samples=int(ns),
                oldest=lo,
                newest=hi,
                write_errors=self.write_errors,
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
