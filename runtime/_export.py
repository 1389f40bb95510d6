"""Telemetry export: the durable buffer drained oldest first through an exporter, within a bandwidth cap.

In the manner of OpenTelemetry's batch processor and exporter: `BufferDrain` owns what is sent when
(the cursor, the byte budget, the record of having drained dry), a `TelemetryExporter` owns how (the
transport, its in-flight window and acknowledgements). A record leaves the buffer only when its
exporter says it was delivered, so a crash or a dropped link sends it again, never loses it; the
receiver counts each idempotency key once.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgefleet.protocol import topic

from ._telemetry import TelemetryBuffer

__all__ = ["BufferDrain", "ExportResult", "MqttExporter", "Record", "TelemetryExporter"]

log = logging.getLogger("edgefleet.agent")


@dataclass(frozen=True)
class Record:
    seq: int
    kind: str  # "telemetry" or "events": the topic it goes to
    key: str
    body: bytes


@dataclass(frozen=True)
class ExportResult:
    sent: int  # how many of the batch, in order, the exporter took
    retry_in_s: float | None = None  # took fewer because the transport refused: try again after this


class TelemetryExporter(Protocol):
    """A transport for buffered records. Delivery is confirmed later, through `acknowledged`."""

    @property
    def epoch(self) -> int:
        """Changes whenever records taken but not acknowledged must be sent again (a new connection)."""
        ...

    def room(self) -> int:
        """How many records it can take now (0 while it has no connection)."""
        ...

    def export(self, batch: Sequence[Record]) -> ExportResult: ...

    def acknowledged(self) -> list[str]:
        """Keys delivered since the last call."""
        ...

    def unacknowledged(self, keys: list[str]) -> None:
        """Give back keys from `acknowledged` that could not be removed from the buffer yet."""
        ...


class BufferDrain:
    """Sends `buffer`'s records through `exporter`, at most `bytes_per_s` on average."""

    def __init__(self, buffer: TelemetryBuffer, exporter: TelemetryExporter, bytes_per_s: float) -> None:
        self.buffer, self.exporter, self.rate = buffer, exporter, bytes_per_s
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._cursor = 0
        self._epoch = exporter.epoch
        # (records added, epoch, cursor) when the buffer was last drained dry: nothing to query.
        self._drained: tuple[int, int, int] | None = None
        self.retry_at = 0.0  # when a send held back by the cap or a refused export is due

    def rewind(self) -> None:
        """Send everything not yet acknowledged again (the fleet's `flush` command)."""
        self._cursor = 0

    def apply_acks(self) -> None:
        keys = self.exporter.acknowledged()
        if not keys:
            return
        try:
            self.buffer.ack(*keys)
        except sqlite3.Error as exc:
            log.warning("cannot remove %d acknowledged records from the buffer yet: %s", len(keys), exc)
            self.exporter.unacknowledged(keys)

    def run_once(self) -> None:
        """Remove what was delivered, then send what is due and fits the budget."""
        self.apply_acks()
        epoch = self.exporter.epoch
        if epoch != self._epoch:
            self._epoch, self._cursor = epoch, 0
        room = self.exporter.room()
        if room <= 0:
            return
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now
        added = self.buffer.added
        if self._drained == (added, epoch, self._cursor):
            return
        rows = [Record(*r) for r in self.buffer.pending(limit=room, after_seq=self._cursor)]
        dry = len(rows) < room
        fits = 0
        for r in rows:
            # A record larger than the whole budget goes once the bucket is full, or it would never go.
            if self._tokens < len(r.body) and self._tokens < self.rate:
                dry = False
                self.retry_at = now + (min(len(r.body), self.rate) - self._tokens) / self.rate
                break
            self._tokens -= len(r.body)
            fits += 1
        if not fits:
            return
        res = self.exporter.export(rows[:fits])
        if res.sent < fits:
            dry = False
            for r in rows[res.sent : fits]:
                self._tokens += len(r.body)
            if res.retry_in_s is not None:
                self.retry_at = now + res.retry_in_s
        if self.exporter.epoch != epoch:
            self._cursor = 0  # the link dropped meanwhile: everything unacknowledged is sent again
            return
        if res.sent:
            self._cursor = rows[res.sent - 1].seq
        if dry:
            self._drained = (added, epoch, self._cursor)

    def flush(self, timeout_s: float) -> bool:
        """Send until every record is acknowledged, or TIMEOUT_S passes; True when the buffer is empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.run_once()
            if not self.buffer.pending(limit=1):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.005, min(0.05, self.retry_at - time.monotonic())))


class MqttExporter:
    """Publishes records at QoS 1 to the device's `telemetry` / `events` topics on a paho client; the
    broker's PUBACK is the acknowledgement. At most `max_inflight` unacknowledged at once."""

    def __init__(self, device_id: str, max_inflight: int = 32, on_room: Callable[[], None] | None = None) -> None:
        self.device_id, self.max_inflight = device_id, max_inflight
        self._on_room = on_room
        self._lock = threading.Lock()
        self._client: Any = None
        self._epoch = 0
        self._inflight: dict[int, str] = {}
        self._early: OrderedDict[int, bool] = OrderedDict()
        self._acked: list[str] = []
        self._topics = {k: topic(device_id, k) for k in ("telemetry", "events")}

    # The link calls these from paho's network thread.
    def connected(self, client: Any) -> None:
        with self._lock:
            self._client = client
            self._inflight.clear()
            self._epoch += 1

    def disconnected(self) -> None:
        with self._lock:
            self._client = None
            self._inflight.clear()
            self._epoch += 1

    def published(self, mid: int, ok: bool) -> None:
        with self._lock:
            key = self._inflight.pop(mid, None)
            if key is None:
                # The PUBACK beat `export` to recording the mid (or it is a state / status message).
                self._early[mid] = ok
                while len(self._early) > 1024:
                    self._early.popitem(last=False)
            elif ok:
                # Removed from the buffer by the agent's thread, many in one transaction.
                self._acked.append(key)
        if self._on_room is not None:
            self._on_room()

    # TelemetryExporter
    @property
    def epoch(self) -> int:
        return self._epoch

    def room(self) -> int:
        with self._lock:
            return 0 if self._client is None else self.max_inflight - len(self._inflight)

    def export(self, batch: Sequence[Record]) -> ExportResult:
        with self._lock:
            client, epoch = self._client, self._epoch
        if client is None:
            return ExportResult(0)
        sent = 0
        # paho's own locks are taken inside publish(); never call it while holding ours (lock order).
        for r in batch:
            info = client.publish(self._topics[r.kind], r.body, qos=1)
            if info.rc != 0:
                return ExportResult(sent, retry_in_s=0.5)
            with self._lock:
                if epoch != self._epoch:
                    return ExportResult(sent)
                early = self._early.pop(info.mid, None)
                if early is None:
                    self._inflight[info.mid] = r.key
                elif early:
                    self._acked.append(r.key)
            sent += 1
        return ExportResult(sent)

    def acknowledged(self) -> list[str]:
        with self._lock:
            keys, self._acked = self._acked, []
        return keys

    def unacknowledged(self, keys: list[str]) -> None:
        with self._lock:
            self._acked[:0] = keys
