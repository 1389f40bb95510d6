"""Leases: which one of several server processes on one database runs the rollout engine (or the drift
monitor) right now.

A lease is a row `(name, holder, expires)`. Its holder renews it every tick; another process takes it
over once it has expired, so a holder that dies (kill -9, a lost host) is replaced within `ttl_s`.
Taking and renewing are one conditional upsert, atomic on SQLite and PostgreSQL alike. A holder acts
only while `held()`: it stops `margin_s` before its lease could be taken over, so two processes never
act at once as long as their clocks agree to within that margin (time is each host's wall clock).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from ._db import Database

__all__ = ["Lease", "LeasedLoop"]

log = logging.getLogger("edgefleet.fleet")

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


class LeasedLoop:
    """A daemon thread that runs WORK every INTERVAL_S in the one process holding LEASE.

    With `acquire=True` the loop takes or renews the lease before each round and skips the round when
    another process holds it; with False, WORK does that itself (the rollout engine, whose `tick` is
    also called directly). An exception in a round is logged and the next round goes on. `stop` ends the
    thread and gives the lease up, so another process takes over at once instead of after its expiry.
    """

    def __init__(
        self,
        name: str,
        lease: Lease,
        interval_s: float,
        work: Callable[[], object],
        *,
        acquire: bool = True,
        run_first: bool = False,
        join_s: float = 30.0,
    ) -> None:
        self.name, self.lease, self.interval_s, self.work = name, lease, interval_s, work
        self.acquire, self.run_first, self.join_s = acquire, run_first, join_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"edgefleet-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.join_s)
        if self.lease.held():
            self.lease.release()

    def _run(self) -> None:
        if not self.run_first and self._stop.wait(self.interval_s):
            return
        while True:
            try:
                if not self.acquire or self.lease.acquire():
                    self.work()
            except Exception:
                log.exception("%s failed", self.name)  # tried again next round
            if self._stop.wait(self.interval_s):
                return
