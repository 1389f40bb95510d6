"""Leases: which one of several server processes on one database runs the rollout engine (or the drift
monitor) right now.

A lease is a row `(name, holder, expires)`. Its holder renews it every tick; another process takes it
over once it has expired, so a holder that dies (kill -9, a lost host) is replaced within `ttl_s`.
Taking and renewing are one conditional upsert, atomic on SQLite and PostgreSQL alike. A holder acts
only while `held()`: it stops `margin_s` before its lease could be taken over, so two processes never
act at once as long as their clocks agree to within that margin (time is each host's wall clock).
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from ._db import Database

__all__ = ["Lease"]

SCHEMA = "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires FLOAT8 NOT NULL)"


class Lease:
    def __init__(self, db: Database, name: str, ttl_s: float = 10.0, holder: str | None = None) -> None:
        self.db, self.name, self.ttl_s = db, name, ttl_s
        self.margin_s = min(2.0, ttl_s / 4)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._until = 0.0
        db.execute(SCHEMA)

    def acquire(self) -> bool:
        """Take or renew the lease; True while this process holds it."""
        now = time.time()
        got = self.db.execute(
            "INSERT INTO leases (name, holder, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
            "WHERE leases.holder = excluded.holder OR leases.expires < ?",
            (self.name, self.holder, now + self.ttl_s, now),
        )
        self._until = now + self.ttl_s - self.margin_s if got else 0.0
        return bool(got)

    def held(self) -> bool:
        """Whether this process may still act on its last `acquire`."""
        return time.time() < self._until

    def release(self) -> None:
        """Give the lease up at once (a clean shutdown), so another process need not wait for it to expire."""
        self._until = 0.0
        self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (self.name, self.holder))

    def current_holder(self) -> str | None:
        rows = self.db.query("SELECT holder, expires FROM leases WHERE name = ?", (self.name,))
        return rows[0][0] if rows and rows[0][1] >= time.time() else None
