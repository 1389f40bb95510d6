"""Ingest: MQTT messages from devices into the database, as workers on a shared subscription.

Each worker subscribes to `$share/<group>/edgefleet/v1/devices/+/+`, so the broker (Mosquitto here, or a
cluster such as EMQX) spreads messages over however many workers run, in any number of processes or
machines. The group's name is derived from the server's broker password (`share_group`): Mosquitto lets any
client subscribe to any filter and only withholds delivery, so a device that joined a group with a known
name would be dealt its share of every device's messages, acknowledged and never stored.
Telemetry windows and events are stored under their idempotency key with
`INSERT ... ON CONFLICT DO NOTHING`: a redelivered or duplicated message is counted once.
Nothing a device sends can stop a worker: bad messages are counted and dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any

from edgefleet import InputError
from edgefleet.protocol import (
    KINDS,
    ROOT,
    Bins,
    Refusal,
    baseline_bins,
    check_window,
    parse_event,
    parse_state,
    parse_status,
    parse_topic,
)
from edgefleet.protocol import topic as topic_of

from ._db import Database
from ._endpoint import BrokerEndpoint
from ._rollups import StoredWindow, add_windows, insert_windows

__all__ = ["SHARE_GROUP", "IngestWorker", "share_group"]

log = logging.getLogger("edgefleet.fleet.ingest")

SHARE_GROUP = "edgefleet-ingest"  # the prefix; alone only for a broker without passwords
MAX_PAYLOAD = 256 * 1024
_BATCH = 500
_BATCH_S = 0.05
_QUIET_S = 0.005
# Unacknowledged messages the broker may have in flight to a worker (MQTT 5 Receive Maximum): room for one
# batch being written while the next one arrives.
_RECEIVE_MAX = 2 * _BATCH
_RETRY_S = (0.5, 10.0)
_BINS_RETRY_S = 30.0
_MAX_REASONS = 50  # distinct refusal reasons kept per device
_TAGS_S = 30.0
_ANSWERS_PER_MIN = 20  # refusals told to one device per minute; the rest are only counted
_SERVER_KINDS = frozenset(k for k, (direction, _, _) in KINDS.items() if direction == "server")


def share_group(password: str | None) -> str:
    """The shared-subscription group of the ingest workers that connect with PASSWORD: every server process
    knows it (each connects as the server user), no device can guess it."""
    if not password:
        return SHARE_GROUP
    return f"{SHARE_GROUP}-{hashlib.sha256(b'edgefleet share group' + bytes(1) + password.encode()).hexdigest()[:32]}"


class IngestWorker:
    """One ingest worker: a paho client on the shared subscription and a thread writing batches."""

    def __init__(
        self,
        db: Database,
        broker: BrokerEndpoint,
        name: str = "ingest-0",
        *,
        durable: bool = False,
        session_expiry_s: int = 3600,
    ) -> None:
        """DURABLE: a persistent MQTT session under a client id made from NAME (which must then be unique
        on the broker), kept SESSION_EXPIRY_S after a disconnect: what devices send while the worker is
        down is queued by the broker and stored when it is back, instead of being dropped. The cost:
        Mosquitto keeps dealing a stopped durable worker its share of the shared subscription until it
        returns or the session expires (measured with 2.0.11), so only a worker that comes back should
        be durable."""
        self.db = db
        self.broker = broker
        self.name = name
        self.durable = durable
        self.session_expiry_s = session_expiry_s
        self._filter = f"$share/{share_group(broker.password)}/{ROOT}/devices/+/+"
        # topic, payload, mid and QoS of each message received and not yet stored (nor acknowledged)
        self._pending: list[tuple[str, bytes, int, int]] = []
        self._pending_since = 0.0
        self._last_arrival = 0.0
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # device -> (its tags, when read): windows are added to the rollups of the tags a device carries,
        # read again after _TAGS_S, so a changed tag applies to windows stored from then on.
        self._known: dict[str, tuple[list[str], float]] = {}
        # (name, version) -> the histogram sizes of its published baseline, or None (not published: checked
        # again after _BINS_RETRY_S) with the time it was looked up.
        self._bin_cache: dict[tuple[str, str], tuple[Bins | None, float]] = {}
        self.stats = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0, "unknown_device": 0}
        self._answered: dict[str, tuple[int, int]] = {}  # device -> (minute, refusals answered in it)
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    def start(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client_id = f"edgefleet-{self.name}" if self.durable else f"edgefleet-{self.name}-{time.time_ns()}"
        # manual_ack: a message is acknowledged to the broker only once it is in the database, so a worker
        # that dies, or a database that is down, loses nothing the broker has handed over.
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        self.broker.configure(c)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = lambda *a: self.connected.clear()
        c.reconnect_delay_set(0.5, 10)  # type: ignore[arg-type]  # paho takes float seconds; its hint says int
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = _RECEIVE_MAX
        if self.durable:
            props.SessionExpiryInterval = self.session_expiry_s
        c.connect_async(
            self.broker.host, self.broker.port, keepalive=30, clean_start=not self.durable, properties=props
        )
        c.loop_start()
        self._client = c
        self._thread = threading.Thread(target=self._flusher, name=f"edgefleet-{self.name}", daemon=True)
        self._thread.start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("ingest worker %s: broker refused the connection: %s", self.name, reason_code)
            return
        client.subscribe(self._filter, qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.rsplit("/", 1)[-1] in _SERVER_KINDS:
            client.ack(msg.mid, msg.qos)
            return  # the server's own messages to devices
        now = time.monotonic()
        with self._pending_lock:
            if not self._pending:
                self._pending_since = now
                self._wake.set()
            self._pending.append((msg.topic, bytes(msg.payload), msg.mid, msg.qos))
            self._last_arrival = now
            full = len(self._pending) >= _BATCH and now >= self._retry_at
        if full:
            # Written here, in paho's network thread: handing every message to another thread made the
            # two threads trade the GIL across cores per message (115 us of CPU per window against 75 us
            # with both threads pinned to one core, measured with a backlog of 60,000 windows).
            self._flush()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop receiving, write and acknowledge what is pending, disconnect (a durable worker keeps its
        subscription, and the broker redelivers whatever could not be written)."""
        if self._client is not None and not self.durable:
            self._client.unsubscribe(self._filter)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self._flush(final=True)  # what arrived meanwhile: stored, its acknowledgement no longer matters

    def _refresh(self, topics: list[str]) -> None:
        """Read the tags of the devices on TOPICS not read within _TAGS_S (and whether they are registered:
        a device registered a moment ago says 'online' first of all), in one query per 500."""
        now = time.monotonic()
        stale = sorted(
            {
                p[0]
                for p in map(parse_topic, topics)
                if p is not None and now - self._known.get(p[0], ([], -_TAGS_S))[1] >= _TAGS_S
            }
        )
        if len(self._known) + len(stale) > 200_000:
            self._known.clear()
        for i in range(0, len(stale), 500):
            chunk = stale[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            for dev, tags in self.db.query(f"SELECT id, tags FROM devices WHERE id IN ({marks})", chunk):
                self._known[dev] = (list(json.loads(tags)), now)
            for dev in chunk:
                if dev in self._known and self._known[dev][1] != now:
                    del self._known[dev]  # deregistered meanwhile

    def _is_known(self, device: str) -> bool:
        return device in self._known

    def _tags(self, device: str) -> list[str]:
        hit = self._known.get(device)
        return [] if hit is None else hit[0]

    def _flush(self, due_only: bool = False, final: bool = False) -> None:
        """Write what is pending and acknowledge it. DUE_ONLY (the timer): only once no message has come
        for _QUIET_S or the oldest has waited _BATCH_S (a broker may allow fewer messages in flight than
        a batch holds). While the database is unavailable the messages stay pending, unacknowledged, and
        are tried again after a growing delay; the broker sends no more than _RECEIVE_MAX meanwhile."""
        if not self._write_lock.acquire(blocking=not due_only):
            return  # the network thread is writing a full batch
        try:
            now = time.monotonic()
            with self._pending_lock:
                if not self._pending or (not final and now < self._retry_at):
                    return
                if due_only and now - self._last_arrival < _QUIET_S and now - self._pending_since < _BATCH_S:
                    return
                batch, self._pending = self._pending, []
            done = self._store(batch)
            if done < len(batch):
                with self._pending_lock:
                    self._pending[:0] = batch[done:]
                    self._retry_delay = min(_RETRY_S[1], max(_RETRY_S[0], 2 * self._retry_delay))
                    self._retry_at = time.monotonic() + self._retry_delay
            else:
                self._retry_delay = 0.0
            if self._client is not None:
                for _, _, mid, qos in batch[:done]:
                    self._client.ack(mid, qos)
        finally:
            self._write_lock.release()

    def _store(self, batch: list[tuple[str, bytes, int, int]]) -> int:
        """Write BATCH; returns how many of its messages are done with (stored, or refused for good)."""
        try:
            self._write([(t, p) for t, p, _, _ in batch])
            return len(batch)
        except Exception as exc:
            if self.db.unavailable(exc):
                log.warning("ingest worker %s: database unavailable, %d messages wait: %s", self.name, len(batch), exc)
                return 0
            log.exception(
                "ingest worker %s: the database refused a batch of %d; writing one at a time", self.name, len(batch)
            )
        # One message the database refuses must not hold back the others.
        for i, (topic, payload, _, _) in enumerate(batch):
            try:
                self._write([(topic, payload)])
            except Exception as exc:
                if self.db.unavailable(exc):
                    return i
                log.error("ingest worker %s: dropped a %s message the database refused: %s", self.name, topic, exc)
                try:
                    self.db.bump("ingest_rejected")
                except Exception as bump_exc:
                    if self.db.unavailable(bump_exc):
                        return i  # this message comes back, and is counted, once the database does
                    log.warning("ingest worker %s: could not count the refused message: %s", self.name, bump_exc)
                self.stats["rejected"] += 1
        return len(batch)

    def _flusher(self) -> None:
        """Write partial batches once traffic pauses (full ones are written as they fill)."""
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            while not self._stop.is_set():
                with self._pending_lock:
                    if not self._pending:
                        break
                self._stop.wait(max(_QUIET_S, self._retry_at - time.monotonic()))
                self._flush(due_only=True)
        self._flush(final=True)

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        counts = dict.fromkeys(self.stats, 0)
        now = time.time()
        # Parse and check everything before the transaction: SQLite has one writer at a time, and what
        # happens under its lock is what several workers cannot do side by side.
        ops: list[tuple[str, str, tuple[Any, ...]]] = []
        refused: list[tuple[str, str, str | None, str]] = []  # device, kind, key, reason
        self._refresh([t for t, _ in batch])
        for topic, payload in batch:
            counts["received"] += 1
            parsed = parse_topic(topic)
            if parsed is None:
                counts["rejected"] += 1
                continue
            device, kind = parsed
            if not self._is_known(device):
                counts["unknown_device"] += 1
                continue
            obj = None
            try:
                if len(payload) > MAX_PAYLOAD:
                    raise InputError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
                obj = json.loads(payload) if payload else None
                op = self._prepare(device, kind, obj, payload, now)
            except (InputError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropped %s message from %s: %s", kind, device, exc)
                counts["rejected"] += 1
                key = obj.get("key") if isinstance(obj, dict) else None
                reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                refused.append((device, kind, key if isinstance(key, str) else None, reason))
                continue
            if op is None:
                counts["duplicates"] += 1  # nothing new to store
                continue
            ops.append(op)
        with self.db.transaction() as cur:
            seen: set[str] = set()
            windows: list[StoredWindow] = []
            new = insert_windows(cur, [(d, p[0], p[1]) for k, d, p in ops if k == "telemetry"], now)
            for kind, device, params in ops:
                if kind == "telemetry":
                    w = params[0]
                    stored = w["key"] in new
                    if stored:
                        new.discard(w["key"])  # the same window twice in a batch is stored, and counted, once
                        windows.append(StoredWindow(device, self._tags(device), w))
                else:
                    stored = self._apply(cur, kind, device, params)
                counts["stored" if stored else "duplicates"] += 1
                if stored and kind in ("telemetry", "events"):
                    seen.add(device)
            # the same transaction: a window is in the rollups exactly when it is stored
            add_windows(cur, self.db.kind == "postgresql", windows)
            # once per device and batch, not per window
            for device in sorted(seen):
                cur.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device))
            self._record_refusals(cur, refused, now)
            counts_named = dict(counts)
            counts_named[f"worker_{self.name}_received"] = counts["received"]
            for _, kind, _, _ in refused:
                counts_named[f"refused_{kind}"] = counts_named.get(f"refused_{kind}", 0) + 1
            for k, v in counts_named.items():
                if v:
                    cur.execute(
                        "INSERT INTO counters (name, value) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = counters.value + ?",
                        (f"ingest_{k}", v, v),
                    )
        for k, v in counts.items():
            self.stats[k] += v
        self._answer(refused, now)

    def _record_refusals(self, cur: Any, refused: list[tuple[str, str, str | None, str]], now: float) -> None:
        for device, kind, key, reason in refused:
            cur.execute("SELECT COUNT(*) FROM refusals WHERE device_id = ?", (device,))
            if cur.fetchall()[0][0] >= _MAX_REASONS:
                reason = "other"
            cur.execute(
                "INSERT INTO refusals (device_id, kind, reason, count, last_ts, last_key) VALUES (?, ?, ?, 1, ?, ?) "
                "ON CONFLICT (device_id, kind, reason) DO UPDATE SET count = refusals.count + 1, last_ts = ?, "
                "last_key = ?",
                (device, kind, reason, now, key, now, key),
            )

    def _answer(self, refused: list[tuple[str, str, str | None, str]], now: float) -> None:
        """Tell each device what of its messages was refused (at most _ANSWERS_PER_MIN a minute each): it was
        acknowledged, so the device would otherwise never know its windows were dropped."""
        client = self._client
        if client is None or not refused:
            return
        minute = int(now // 60)
        for device, kind, key, reason in refused:
            seen = self._answered.get(device)
            n = seen[1] + 1 if seen is not None and seen[0] == minute else 1
            self._answered[device] = (minute, n)
            if n > _ANSWERS_PER_MIN:
                continue
            body = json.dumps(Refusal(kind, key, reason, now).to_dict(device))
            client.publish(topic_of(device, "refusals"), body, qos=1)
        if len(self._answered) > 100_000:
            self._answered.clear()

    def _bins(self, name: Any, version: Any) -> Bins | None:
        """The bins windows of bundle NAME:VERSION must have, from its published manifest (None: not known)."""
        if not isinstance(name, str) or not isinstance(version, str):
            return None
        key, now = (name, version), time.monotonic()
        hit = self._bin_cache.get(key)
        if hit is not None and (hit[0] is not None or now - hit[1] < _BINS_RETRY_S):
            return hit[0]
        rows = self.db.query("SELECT manifest FROM bundles WHERE name = ? AND version = ?", (name, version))
        bins = None
        if rows:
            try:
                baseline = json.loads(rows[0][0]).get("drift_baseline")
                bins = baseline_bins(baseline) if baseline else None
            except (ValueError, TypeError, KeyError, AttributeError):
                bins = None
        if len(self._bin_cache) > 10_000:
            self._bin_cache.clear()
        self._bin_cache[key] = (bins, now)
        return bins

    def _prepare(
        self, device: str, kind: str, obj: Any, payload: bytes, now: float
    ) -> tuple[str, str, tuple[Any, ...]] | None:
        """Check one message and turn it into the parameters of its statement (None: nothing to store)."""
        if kind == "telemetry":
            bundle = obj.get("bundle") if isinstance(obj, dict) else None
            bins = self._bins(bundle.get("name"), bundle.get("version")) if isinstance(bundle, dict) else None
            w = check_window(obj, bins, device)
            return kind, device, (w, payload.decode())  # checked JSON already; stored as the device sent it
        if kind == "events":
            ev = parse_event(obj, device)
            return kind, device, (ev.key, device, ev.type, ev.ts, payload.decode())
        if kind == "status":
            if obj is None:
                return None  # a cleared retained status
            return kind, device, (1 if parse_status(obj, device).online else 0, now, device)
        if kind == "state":
            st = parse_state(obj, device)
            active = st.active or {}
            return (
                kind,
                device,
                (
                    payload.decode(),
                    active.get("bundle"),
                    active.get("version"),
                    (st.staged or {}).get("version"),
                    active.get("accelerator"),
                    st.agent_version,
                    st.update_state,
                    now,
                    device,
                ),
            )
        raise InputError(f"unknown message kind {kind!r}")

    @staticmethod
    def _apply(cur: Any, kind: str, device: str, params: tuple[Any, ...]) -> bool:
        """Run one prepared statement (not telemetry); False when it was a duplicate."""
        if kind == "events":
            cur.execute(
                "INSERT INTO events (key, device_id, type, ts, body) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                params,
            )
            return bool(cur.rowcount)
        if kind == "status":
            cur.execute("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?", params)
            return True
        cur.execute(
            "UPDATE devices SET state = ?, bundle_name = ?, bundle_version = ?, staged_version = ?, "
            "accelerator = ?, agent_version = ?, update_state = ?, last_seen = ? WHERE id = ?",
            params,
        )
        return True
