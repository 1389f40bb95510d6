"""Retention: raw telemetry windows are kept for a while, rollups much longer and ever coarser.

One server process at a time (the holder of the `housekeeping` lease) does, every `interval_s`:
compact minute rollups into hours and hours into days as they age, and delete raw windows, rollups and
per-device rows past their keep, a batch per transaction so ingest is never held up for long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet import InputError

from ._db import Database
from ._lease import Lease, LeasedLoop
from ._rollups import DAY, HOUR, compact

__all__ = ["Housekeeper", "Retention", "count_devices"]

log = logging.getLogger("edgefleet.fleet.retention")

_BATCH = 5000


@dataclass(frozen=True)
class Retention:
    """How long what is kept: raw windows, rollups (any width), and when rollups are made coarser."""

    windows_s: float = 7 * DAY
    rollups_s: float = 400 * DAY
    minutes_s: float = 6 * HOUR  # minute rollups older than this become hours
    hours_s: float = 14 * DAY  # hour rollups older than this become days
    captures_s: float = 90 * DAY  # captured samples (datasets)

    def __post_init__(self) -> None:
        for name in ("windows_s", "rollups_s", "minutes_s", "hours_s", "captures_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise InputError(f"retention {name} must be a positive number of seconds, got {v!r}")
        if self.rollups_s < self.windows_s:
            raise InputError("rollups must be kept at least as long as raw windows (they are what is left of them)")


def sweep(db: Database, now: float, keep: Retention) -> dict[str, int]:
    """One pass: compaction, then deletion of what aged out. Returns rows folded and deleted per table."""
    out = {"compacted": compact(db, now, keep.minutes_s, keep.hours_s)}
    for table, column, limit in (
        ("windows", "start", now - keep.windows_s),
        ("rollups", "bucket", now - keep.rollups_s),
        ("window_devices", "last_start", now - keep.rollups_s),
        ("device_counts", "bucket", now - keep.rollups_s),
    ):
        key = "key" if table == "windows" else None
        deleted = 0
        while True:
            if key is not None:
                # By primary key, a batch at a time: a week of a large fleet is millions of rows.
                n = db.execute(
                    f"DELETE FROM {table} WHERE key IN (SELECT key FROM {table} WHERE {column} < ? LIMIT {_BATCH})",
                    (limit,),
                )
            else:
                n = db.execute(f"DELETE FROM {table} WHERE {column} < ?", (limit,))
            deleted += n
            if key is None or n < _BATCH:
                break
        out[table] = deleted
    return out


def count_devices(db: Database, now: float) -> None:
    """Record how many devices are registered and online in NOW's minute (the overview charts them)."""
    online, registered = db.query("SELECT COALESCE(SUM(online), 0), COUNT(*) FROM devices")[0]
    db.execute(
        "INSERT INTO device_counts (bucket, online, registered) VALUES (?, ?, ?) "
        "ON CONFLICT (bucket) DO UPDATE SET online = ?, registered = ?",
        (now - now % 60, int(online), int(registered), int(online), int(registered)),
    )


class Housekeeper:
    """Runs `sweep` every INTERVAL_S in the process holding the `housekeeping` lease."""

    def __init__(
        self, db: Database, keep: Retention | None = None, interval_s: float = 60.0, lease_holder: str | None = None
    ) -> None:
        self.db = db
        self.keep = keep or Retention()
        self.interval_s = interval_s
        self.last: dict[str, int] = {}
        self.also: Callable[[float], dict[str, int]] | None = None  # more to sweep (the server's captures)
        self.lease = Lease(db, "housekeeping", max(10.0, 3 * interval_s), lease_holder)
        self._loop = LeasedLoop("housekeeping", self.lease, interval_s, self.round, run_first=True)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def round(self) -> None:
        """One sweep (the loop calls it while holding the lease)."""
        now = time.time()
        count_devices(self.db, now)
        self.last = sweep(self.db, now, self.keep)
        if self.also is not None:
            self.last |= self.also(now)
        if any(self.last.values()):
            log.info("housekeeping: %s", self.last)
