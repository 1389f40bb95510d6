"""Storage for the fleet server: SQLite by default, PostgreSQL for scale-out, one SQL dialect.

Statements are written with `?` placeholders and the portable subset both engines share
(`INSERT ... ON CONFLICT DO NOTHING`, `FLOAT8`, `INTEGER`, `TEXT`). Floats are `FLOAT8`: PostgreSQL's
`REAL` is 4 bytes, which rounds Unix times to minutes and p-values below 1e-38 to an error.
"""

from __future__ import annotations

import fcntl
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgefleet import InputError
from edgefleet._errors import require

__all__ = ["Database"]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS devices (
        id TEXT PRIMARY KEY, tags TEXT NOT NULL DEFAULT '[]', created FLOAT8 NOT NULL,
        last_seen FLOAT8, online INTEGER NOT NULL DEFAULT 0, state TEXT,
        bundle_name TEXT, bundle_version TEXT, staged_version TEXT, accelerator TEXT, agent_version TEXT,
        update_state TEXT)""",
    """CREATE TABLE IF NOT EXISTS bundles (
        name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
        path TEXT NOT NULL, manifest TEXT NOT NULL, created FLOAT8 NOT NULL, PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS windows (
        key TEXT PRIMARY KEY, device_id TEXT NOT NULL, bundle_name TEXT NOT NULL, bundle_version TEXT NOT NULL,
        start FLOAT8 NOT NULL, calls INTEGER NOT NULL, samples INTEGER NOT NULL, errors INTEGER NOT NULL,
        nan_outputs INTEGER NOT NULL, body TEXT NOT NULL, received FLOAT8 NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS windows_bundle ON windows (bundle_name, bundle_version, start)",
    # the device page's telemetry history: one device's raw windows of the last hours
    "CREATE INDEX IF NOT EXISTS windows_device ON windows (device_id, start)",
    """CREATE TABLE IF NOT EXISTS events (
        key TEXT PRIMARY KEY, device_id TEXT NOT NULL, type TEXT NOT NULL, ts FLOAT8 NOT NULL, body TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS events_device ON events (device_id, ts)",
    "CREATE INDEX IF NOT EXISTS events_type ON events (type, ts)",  # update outcomes over time
    # devices online and registered, a row per minute (the housekeeper's), for the overview's chart
    """CREATE TABLE IF NOT EXISTS device_counts (
        bucket FLOAT8 PRIMARY KEY, online INTEGER NOT NULL, registered INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS alerts (
        id TEXT PRIMARY KEY, bundle_name TEXT NOT NULL, bundle_version TEXT NOT NULL, cohort TEXT NOT NULL,
        feature TEXT NOT NULL, state TEXT NOT NULL, opened FLOAT8 NOT NULL, closed FLOAT8, updated FLOAT8 NOT NULL,
        psi FLOAT8, p_value FLOAT8, samples INTEGER NOT NULL, detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, opened)",
    # An operator's acknowledgement of an alert (who, when) and how long it is muted on the dashboard.
    """CREATE TABLE IF NOT EXISTS alert_acks (
        alert_id TEXT PRIMARY KEY, acked_by TEXT NOT NULL, acked_at FLOAT8 NOT NULL, muted_until FLOAT8)""",
    """CREATE TABLE IF NOT EXISTS tokens (sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, created FLOAT8 NOT NULL)""",
    # A device's bundle-download token (its hash): lets it fetch bundles, nothing else of the API.
    """CREATE TABLE IF NOT EXISTS device_tokens (
        device_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, created FLOAT8 NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS device_tokens_sha256 ON device_tokens (sha256)",
    """CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)""",
    # Commands the server sent (an audit: who asked, when, what).
    """CREATE TABLE IF NOT EXISTS commands (
        id TEXT PRIMARY KEY, device_id TEXT NOT NULL, command TEXT NOT NULL, args TEXT NOT NULL,
        sent FLOAT8 NOT NULL, sent_by TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS commands_device ON commands (device_id, sent)",
    # Messages the ingest refused, per device, kind and reason (a device gets at most 50 reasons; the
    # rest count as 'other', so a hostile device cannot grow the table without bound).
    """CREATE TABLE IF NOT EXISTS refusals (
        device_id TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
        last_ts FLOAT8 NOT NULL, last_key TEXT, PRIMARY KEY (device_id, kind, reason))""",
    "CREATE INDEX IF NOT EXISTS windows_start ON windows (start)",
    # Telemetry summed per bundle version, cohort and time bucket (see _rollups), and per device and
    # version when it last reported.
    """CREATE TABLE IF NOT EXISTS rollups (
        bundle_name TEXT NOT NULL, bundle_version TEXT NOT NULL, cohort TEXT NOT NULL, bucket FLOAT8 NOT NULL,
        width INTEGER NOT NULL, windows INTEGER NOT NULL, body TEXT NOT NULL, updated FLOAT8 NOT NULL,
        PRIMARY KEY (bundle_name, bundle_version, cohort, bucket, width))""",
    "CREATE INDEX IF NOT EXISTS rollups_age ON rollups (width, bucket)",
    """CREATE TABLE IF NOT EXISTS window_devices (
        bundle_name TEXT NOT NULL, bundle_version TEXT NOT NULL, device_id TEXT NOT NULL,
        first_start FLOAT8 NOT NULL, last_start FLOAT8 NOT NULL, last_called FLOAT8,
        windows INTEGER NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY (bundle_name, bundle_version, device_id))""",
    "CREATE INDEX IF NOT EXISTS window_devices_age ON window_devices (last_start)",
]


class Database:
    """A small thread-safe wrapper: `execute`, `query`, `transaction`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self.kind = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        if self.kind == "sqlite":
            if not url.startswith("sqlite:///"):
                raise InputError(f"database URL {url!r} is not understood; use sqlite:///PATH or postgresql://...")
            self.path = Path(url[len("sqlite:///") :])
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.transaction() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)

    def _conn(self) -> Any:
        c = getattr(self._local, "conn", None)
        if c is not None and self.kind == "postgresql" and (c.closed or c.broken):
            c = None  # the server restarted or the network dropped: connect again
        if c is None:
            if self.kind == "sqlite":
                c = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
                c.execute("PRAGMA busy_timeout=30000")
            else:
                psycopg: Any = require("psycopg", "fleet", "using PostgreSQL")
                c = psycopg.connect(self.url, autocommit=True)
            self._local.conn = c
        return c

    def _writer_lock(self) -> Any:
        """This thread's handle on the SQLite writers' lock file (None for PostgreSQL)."""
        if self.kind != "sqlite":
            return None
        f = getattr(self._local, "lockfile", None)
        if f is None:
            # One open file per thread: flock() excludes per open file, not per process.
            f = self._local.lockfile = open(f"{self.path}-writer.lock", "a+b")
        return f

    def unavailable(self, exc: BaseException) -> bool:
        """True when EXC means the database cannot be reached or written just now (worth trying again),
        as opposed to refusing the statement itself."""
        if self.kind == "sqlite":
            return isinstance(exc, sqlite3.OperationalError)
        psycopg = sys.modules.get("psycopg")
        return psycopg is not None and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction; `execute(sql, params)` on it takes `?` placeholders."""
        conn = self._conn()
        lock = self._writer_lock()
        if lock is not None:
            # Writers in every process queue on a file lock first: the kernel wakes the next one the moment
            # it is free, where SQLite's busy handler sleeps 1, 2, 5, 10 ms... between tries (two ingest
            # workers on one database left ~8% of the cores idle that way).
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE" if self.kind == "sqlite" else "BEGIN")
            wrapped = _Cursor(cur, self._sql)
            try:
                yield wrapped
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.transaction() as cur:
            cur.execute(sql, params)
            return int(cur.rowcount)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._conn().cursor()
        cur.execute(self._sql(sql), tuple(params))
        return [tuple(r) for r in cur.fetchall()]

    def bump(self, name: str, n: int = 1) -> None:
        self.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + ?",
            (name, n, n),
        )

    def counters(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.query("SELECT name, value FROM counters")}


class _Cursor:
    def __init__(self, cur: Any, sql: Any) -> None:
        self._cur, self._sql = cur, sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(self._sql(sql), tuple(params))

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())
