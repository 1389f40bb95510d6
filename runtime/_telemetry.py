"""On-device telemetry: per-window aggregation in memory, a bounded SQLite buffer on disk.

Durability: the buffer runs SQLite in WAL mode with `synchronous=NORMAL`. A killed process loses
nothing that was flushed (committed transactions are in the WAL); a power cut can lose the windows
committed since the last WAL checkpoint, never corrupt the file. The window still being aggregated
in memory (at most `window_s`, 60 s by default) is lost on a kill; `flush()` closes it early.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._drift import window_counts
from edgefleet._fs import atomic_write
from edgefleet._telemetry import LATENCY_EDGES_MS, WINDOW_SCHEMA

__all__ = ["BufferStats", "TelemetryBuffer", "WindowAggregator"]

log = logging.getLogger("edgefleet.runtime")

_LAT_EDGES_S = np.asarray(LATENCY_EDGES_MS, dtype=np.float64) / 1000.0
# Small inputs are copied and summarised in batches (cheap per call); large ones are summarised at once,
# which costs little beside their inference and avoids holding many copies.
_BATCH_SAMPLES = 256
# Fast-path calls queued before they are filed into windows (at most this many per filing).
_BATCH_CALLS = 256
_COPY_LIMIT_BYTES = 64 * 1024
# Input histograms are computed only while that costs at most this share of the inference time itself
# (the window's `summarised` says how many rows they hold); every call's output class and confidence
# are always counted. Measured between inference calls of a tiny model, summarising an 8x8 input costs
# ~2 us, a tenth of the call itself: all of them would double telemetry's cost per call.
SUMMARY_BUDGET = 0.01
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


def _is_full(exc: sqlite3.Error) -> bool:
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
                    self._drop_oldest(len(body))
                    self._db.execute(
                        "INSERT OR IGNORE INTO windows (key, kind, start, end, body, size) VALUES (?, ?, ?, ?, ?, ?)",
                        (window["key"], kind, start, window.get("end", start), body, len(body)),
                    )
                    self._db.execute("COMMIT")
                    self._bytes += len(body)
                    self.added += 1
                    break
                except sqlite3.OperationalError as exc:
                    self._rollback()
                    self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM windows").fetchone()[0])
                    if not _is_full(exc):
                        raise
                    self._on_full(attempt)
            else:
                # Still full after freeing space: this window is the one lost, and counted.
                self._count_quietly("dropped_windows")
                return
        if self.on_add is not None:
            self.on_add()

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

    def add_sample(self, ts: float, bundle: str, x: np.ndarray, y: np.ndarray) -> None:
        """Keep one raw input/output pair (opt-in capture), oldest dropped beyond `sample_max_bytes`."""
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
                self._db.execute(
                    "INSERT INTO samples (ts, bundle, input, output, size) VALUES (?, ?, ?, ?, ?)",
                    (ts, bundle, bx.getvalue(), by.getvalue(), size),
                )
                self._db.execute("COMMIT")
                self._sample_bytes += size
            except sqlite3.OperationalError as exc:
                self._rollback()
                if not _is_full(exc):
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
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _RateLimit:
    """Token bucket: at most RATE events per hour, bursts of one."""

    def __init__(self, per_hour: float, clock: Callable[[], float]) -> None:
        self.interval = 3600.0 / per_hour if per_hour > 0 else float("inf")
        self.clock = clock
        self.next = clock()

    def allow(self) -> bool:
        now = self.clock()
        if now < self.next:
            return False
        self.next = now + self.interval
        return True


class WindowAggregator:
    """Aggregates `predict` calls of one model into telemetry windows handed to a sink.

    Per call it appends a few numbers (and a copy of small inputs); histograms are computed in
    batches, so telemetry stays a few microseconds per call. SUMMARY_BUDGET: the largest share of
    inference time spent on input histograms (None: every input, whatever it costs).
    """

    def __init__(
        self,
        sink: Callable[[dict[str, Any]], None],
        *,
        device_id: str,
        bundle: dict[str, str],
        baseline: dict[str, Any],
        backend: str,
        accelerator: str,
        fallbacks: list[str],
        window_s: float = 60.0,
        capture_per_hour: float = 0.0,
        capture_sink: Callable[[float, np.ndarray, np.ndarray], None] | None = None,
        clock: Callable[[], float] = time.time,
        summary_budget: float | None = SUMMARY_BUDGET,
    ) -> None:
        self._sink = sink
        self.device_id = device_id
        self.bundle = dict(bundle)
        self.baseline = baseline
        self.backend = backend
        self.accelerator = accelerator
        self.fallbacks = list(fallbacks)
        self.window_s = float(window_s)
        self._clock = clock
        self._capture = _RateLimit(capture_per_hour, clock) if capture_per_hour > 0 and capture_sink else None
        self._capture_sink = capture_sink
        self._budget = summary_budget
        self._lock = threading.Lock()
        self._q: collections.deque[tuple[float, float, np.ndarray, np.ndarray]] = collections.deque()
        # Raw-sample capture decides per call, so it takes the filed path.
        self._fast = self._capture is None
        self._start = self._window_start(clock())
        self._end = self._start + self.window_s
        self._reset()

    def _window_start(self, now: float) -> float:
        return now - (now % self.window_s)

    def _reset(self) -> None:
        self._lat: list[float] = []
        self._errors: dict[str, int] = {}
        self._xs: list[np.ndarray] = []
        self._ys: list[np.ndarray] = []
        self._ys_only: list[np.ndarray] = []  # outputs of large calls whose inputs are not summarised
        self._pending = 0
        self._samples = 0
        self._summarised = 0
        self._nan = 0
        self._infer_s = 0.0
        self._summary_s = 0.0
        self._counts: dict[str, Any] | None = None

    def record(self, x: np.ndarray | None, y: np.ndarray | None, latency_s: float, error: str | None = None) -> None:
        """One predict call: its float input and output batches, or the kind of error it raised."""
        if self._fast and error is None and x is not None and y is not None and x.nbytes <= _COPY_LIMIT_BYTES:
            # The common call: one append, no lock (deque appends are atomic); it is sorted into its
            # window with the others of its batch. Measured between two ORT runs of a tiny model, this
            # costs ~2 us where taking the lock and filing each call costs ~7 us.
            q = self._q
            q.append((self._clock(), latency_s, x.copy(), y.copy()))
            if len(q) >= _BATCH_CALLS:
                with self._lock:
                    self._absorb()
            return
        now = self._clock()
        with self._lock:
            self._absorb()
            if now >= self._end:
                self._roll(now)
            self._lat.append(latency_s)
            if error is not None or x is None or y is None:
                self._errors[error or "runtime"] = self._errors.get(error or "runtime", 0) + 1
                return
            self._infer_s += latency_s
            if x.nbytes > _COPY_LIMIT_BYTES:
                if self._within_budget():
                    self._add_counts(x, y)
                else:  # outputs only, counted in batches
                    self._ys_only.append(y.copy())
                    self._pending += len(y)
                    if self._pending >= _BATCH_SAMPLES:
                        self._summarise()
            else:
                self._xs.append(x.copy())
                self._ys.append(y.copy())
                self._pending += len(x)
                if self._pending >= _BATCH_SAMPLES:
                    self._summarise()
            if self._capture is not None and self._capture.allow() and self._capture_sink is not None:
                self._capture_sink(now, x[:1].copy(), y[:1].copy())

    def _absorb(self) -> None:
        """File the queued fast-path calls into their windows (closing a window a call is past)."""
        q = self._q
        n = len(q)
        if not n:
            return
        items = [q.popleft() for _ in range(n)]
        i = 0
        while i < n:
            end = self._end
            j = i
            while j < n and items[j][0] < end:
                j += 1
            if j > i:
                for _, lat, x, y in items[i:j]:
                    self._lat.append(lat)
                    self._infer_s += lat
                    self._xs.append(x)
                    self._ys.append(y)
                    self._pending += len(x)
            if j < n:
                self._roll(items[j][0])
            i = j
        if self._pending >= _BATCH_SAMPLES:
            self._summarise()

    def _within_budget(self) -> bool:
        """Whether summarising inputs now keeps their cost within the budget share of inference time."""
        return self._budget is None or self._summary_s <= self._budget * self._infer_s

    def _summarise(self) -> None:
        if self._xs:
            ys = np.concatenate(self._ys)
            self._add_counts(np.concatenate(self._xs) if self._within_budget() else None, ys)
            self._xs, self._ys = [], []
        if self._ys_only:
            self._add_counts(None, np.concatenate(self._ys_only))
            self._ys_only = []
        self._pending = 0

    def _add_counts(self, x: np.ndarray | None, y: np.ndarray) -> None:
        """Count a batch: outputs always (every call's class and confidence), inputs when X is given."""
        t0 = time.perf_counter()
        ok = np.isfinite(y.reshape(len(y), -1)).all(axis=1)
        n_bad = int(len(ok) - ok.sum())
        if n_bad:
            self._nan += n_bad
            y = y[ok]
            x = None if x is None else x[ok]
        self._samples += len(y)
        if len(y) and self.baseline:
            if x is not None:
                self._summarised += len(x)
            c = window_counts(x, y, self.baseline)
            if self._counts is None:
                self._counts = c
            else:
                acc = self._counts
                for k, v in c["inputs"].items():
                    old = acc["inputs"].get(k)
                    acc["inputs"][k] = v if old is None else [a + b for a, b in zip(old, v, strict=True)]
                for k in ("predicted_class", "confidence"):
                    acc[k] = [a + b for a, b in zip(acc[k], c[k], strict=True)]
        if x is not None:
            self._summary_s += time.perf_counter() - t0

    def _roll(self, now: float, forced: bool = False) -> None:
        window = self._close()
        aligned = self._window_start(now)
        self._start = now if forced else aligned
        self._end = aligned + self.window_s
        self._reset()
        if window is not None:
            self._sink(window)

    def _close(self) -> dict[str, Any] | None:
        self._summarise()
        if not self._lat:
            return None
        lat = np.asarray(self._lat)
        hist = np.bincount(np.searchsorted(_LAT_EDGES_S, lat, side="right"), minlength=len(_LAT_EDGES_S) + 1)
        counts = self._counts or {"inputs": {}, "predicted_class": [], "confidence": []}
        return {
            "schema": WINDOW_SCHEMA,
            "key": f"{self.device_id}:{int(self._start * 1000)}:{uuid.uuid4().hex[:12]}",
            "device_id": self.device_id,
            "bundle": self.bundle,
            "backend": self.backend,
            "accelerator": self.accelerator,
            "fallbacks": self.fallbacks,
            "start": self._start,
            "end": min(self._end, self._clock()),
            "calls": len(self._lat),
            "samples": self._samples,
            "summarised": self._summarised,
            "errors": dict(self._errors),
            "nan_outputs": self._nan,
            "latency_ms": {
                "counts": hist.tolist(),
                "sum": round(float(lat.sum()) * 1000, 6),
                "max": round(float(lat.max()) * 1000, 6),
            },
            "inputs": counts["inputs"],
            "outputs": {"predicted_class": counts["predicted_class"], "confidence": counts["confidence"]},
        }

    def seconds_left(self) -> float:
        """Time until the current window is due to close."""
        return max(0.0, self._end - self._clock())

    def flush(self, force: bool = False) -> None:
        """Close the current window if its time is up (or now, with FORCE) and hand it to the sink."""
        now = self._clock()
        with self._lock:
            self._absorb()
            if force or now >= self._end:
                self._roll(now, forced=now < self._end)
