"""The device agent: MQTT link to the fleet, durable telemetry upload, safe A/B updates, shadow runs.

Updates are an explicit state machine persisted in `agent.json` (atomic writes), in the manner of
Mender's update agent:

    idle -> downloading -> verifying -> staging -> smoke_test -> switching -> health_watch
         -> committing -> idle                       (kept)
         -> rolling_back -> idle                     (health window failed; old slot re-activated)

Each state is written before its work starts, and its work is safe to repeat, so a restart after a
crash at any point resumes from the persisted state. The active model is whatever `active.json`
names; it only ever changes by an atomic rename (see `_slots`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import random
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import BundleError, EdgefleetError, InputError, __version__, open_bundle
from edgefleet._errors import require
from edgefleet._fs import atomic_write
from edgefleet._manifest import semver_key
from edgefleet._topics import (
    EVENT_SCHEMA,
    STATE_SCHEMA,
    STATUS_SCHEMA,
    BundleRef,
    Command,
    Desired,
    parse_command,
    parse_desired,
    topic,
)

from ._config import AgentConfig
from ._download import DownloadError, download, origin
from ._failpoints import failpoint
from ._model import Model, SessionFactory, load
from ._netloop import NetworkLoop
from ._slots import SlotInfo, SlotStore
from ._telemetry import TelemetryBuffer

__all__ = ["Agent", "UpdateState"]

log = logging.getLogger("edgefleet.agent")

_MAX_INFLIGHT = 32
_DOWNLOAD_RETRIES = 8
_WARMUP_PROBES = 3
_MIN_LATENCY_PROBES = 10
_IDLE_TICK_S = 2.0  # the longest an idle agent sleeps with nothing due
_RELIABLE_P95_PROBES = 100


class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SMOKE_TEST = "smoke_test"
    SWITCHING = "switching"
    HEALTH_WATCH = "health_watch"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling_back"


_HISTORY = 32  # committed bundles remembered as rollback targets


def _history_key(bundle: dict[str, Any]) -> str:
    """How a committed bundle (a SlotInfo or BundleRef as a dict) is named in `_Persisted.history`."""
    return f"{bundle.get('name')}:{bundle.get('version')}:{bundle.get('sha256')}"


_BEFORE_SWITCH = {UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGING, UpdateState.SMOKE_TEST}


@dataclass
class _Persisted:
    state: UpdateState = UpdateState.IDLE
    committed: dict[str, Any] | None = None
    target: dict[str, Any] | None = None  # Desired.to_dict()
    target_slot: str | None = None
    previous: dict[str, Any] | None = None
    old_p95_ms: float | None = None
    watch_restarts: int = 0
    attempts: int = 0
    refused: dict[str, str | None] = field(default_factory=dict)  # "name:version" -> rollout it failed in
    last_result: dict[str, Any] | None = None
    # "name:version:sha256" of the bundles this device committed, oldest first: what a rollback may go to.
    history: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        d = dict(self.__dict__)
        d["state"] = self.state.value
        # No indent: json's C encoder does not do indentation, and this is written on every transition.
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _Persisted:
        d = json.loads(data)
        d["state"] = UpdateState(d["state"])
        return cls(**d)


class _Health:
    """Live evidence about the active model during a health window."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.errors = 0
        self.nan = 0
        self.live_ms: list[float] = []
        self.probe_ms: list[float] = []
        self.control_ms: list[float] = []
        self.probes = 0
        self.controls = 0

    def add_control(self, ms: float) -> None:
        with self.lock:
            self.controls += 1
            if self.controls > _WARMUP_PROBES:
                self.control_ms.append(ms)

    def add(self, ms: float | None, error: bool, nan: bool, probe: bool) -> None:
        with self.lock:
            self.calls += 1
            self.errors += int(error)
            self.nan += int(nan)
            if probe:
                self.probes += 1
                # The first runs after a switch or restart pay for cold caches; they say nothing about the model.
                if ms is not None and self.probes > _WARMUP_PROBES:
                    self.probe_ms.append(ms)
            elif ms is not None:
                self.live_ms.append(ms)


def _quantile(values: list[float] | deque[float], q: float) -> float | None:
    """np.percentile's default (linear) rule in plain Python: the watch runs it on short lists, often."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def _older(a: str, b: str) -> bool:
    """Whether bundle version A precedes B (semver precedence: 1.0.0-rc.1 comes before 1.0.0)."""
    try:
        return semver_key(a) < semver_key(b)
    except ValueError:
        return False  # versions are checked when bundles are read; an odd one is not a downgrade order


def _lock_data_dir(root: Path) -> int:
    """Take DATA_DIR's lock for this agent, or refuse: two agents on one data directory would interleave
    their update states and slots. The kernel releases the lock when the process ends, kill -9 included."""
    fd = os.open(root / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InputError(
            f"another agent (pid {holder}) is running on data directory {root}; stop it first, or give this "
            "device its own data_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _p95(values: list[float] | deque[float]) -> float | None:
    return _quantile(values, 0.95)


class _Shadow:
    """A candidate bundle run beside the active one on a sample of live inputs, in its own thread."""

    def __init__(self, model: Model, ref: BundleRef, rate: float, duration_s: float, command_id: str) -> None:
        self.model, self.ref, self.rate = model, ref, rate
        self.command_id = command_id
        self.deadline = time.monotonic() + duration_s
        self.q: queue.Queue[tuple[np.ndarray, np.ndarray, float]] = queue.Queue(maxsize=64)
        self.samples = self.agree = self.dropped = self.errors = 0
        self.active_ms: list[float] = []
        self.cand_ms: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="edgefleet-shadow", daemon=True)
        self.thread.start()

    def offer(self, x: np.ndarray, y: np.ndarray, ms: float) -> None:
        if random.random() >= self.rate:
            return
        try:
            self.q.put_nowait((x, y, ms))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                x, y, ms = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            t0 = time.perf_counter()
            try:
                yc = self.model.predict(x)
            except EdgefleetError:
                self.errors += 1
                continue
            self.cand_ms.append((time.perf_counter() - t0) * 1000)
            self.active_ms.append(ms)
            n = len(x)
            self.samples += n
            self.agree += int((yc.reshape(n, -1).argmax(1) == y.reshape(n, -1).argmax(1)).sum())

    def report(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join(timeout=5)
        return {
            "command_id": self.command_id,
            "candidate": {"name": self.ref.name, "version": self.ref.version},
            "samples": self.samples,
            "agreement": round(self.agree / self.samples, 6) if self.samples else None,
            "active_p50_ms": float(np.median(self.active_ms)) if self.active_ms else None,
            "active_p95_ms": _p95(self.active_ms),
            "candidate_p50_ms": float(np.median(self.cand_ms)) if self.cand_ms else None,
            "candidate_p95_ms": _p95(self.cand_ms),
            "candidate_errors": self.errors,
            "dropped": self.dropped,
        }


class Agent:
    """Runs the device side: `start()` it, call `predict()` from the app, `stop()` at the end."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        session_factory: SessionFactory | None = None,
        network: NetworkLoop | None = None,
    ) -> None:
        """SESSION_FACTORY: a stand-in inference backend (see `load`); the rest of the agent is unchanged.
        NETWORK: a `NetworkLoop` shared by many agents in this process (default: paho's own thread)."""
        self.config = config
        self._session_factory = session_factory
        self.device_id = config.device_id
        root = Path(config.data_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._lock_fd: int | None = None
        self.slots = SlotStore(root)
        self.downloads = root / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.buffer = TelemetryBuffer(root / "telemetry.db", max_bytes=config.buffer_max_bytes)
        self._state_path = root / "agent.json"
        self.persisted = self._load_state()
        self._model: Model | None = None
        self._model_lock = threading.RLock()
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._network = network
        self._connected = threading.Event()
        self._pub_lock = threading.Lock()
        self._inflight: dict[int, str] = {}
        self._early: OrderedDict[int, bool] = OrderedDict()
        self._acked: list[str] = []  # acknowledged by the broker, still to delete from the buffer
        self._link_gen = 0
        self._cursor = 0
        # (records added, link generation, cursor) when the buffer was last drained dry: nothing to query.
        self._drained: tuple[int, int, int] | None = None
        # Set by MQTT callbacks and stop(): the loop wakes at once instead of polling fast when idle.
        self._wake = threading.Event()
        self.buffer.on_add = self._wake.set  # a closed window or an event: send it without waiting for a tick
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._passes = 0  # loop passes, for tests that check an idle agent sleeps
        self._step_failures = 0  # in a row, for the back-off
        self._last_failure: tuple[str, str] | None = None
        self._drain_retry_at = 0.0  # when a send held back by the bandwidth cap or a refused publish is due
        self._health = _Health()
        self._watch_until = 0.0
        self._next_probe = 0.0
        self._probe_turn = False
        self._control: Model | None = None
        # The slot the active model was loaded from, and a smoke-tested candidate (slot, sha256, model) kept
        # open for the switch: each load verifies the whole bundle again, and an update needed four.
        self._active_info: SlotInfo | None = None
        self._staged: tuple[str, str, Model] | None = None
        self._stats_cache: tuple[float, dict[str, Any]] | None = None
        self._recent_ms: deque[float] = deque(maxlen=500)
        self._desired: Desired | None = None
        self._shadow: _Shadow | None = None
        self._state_dirty = True
        self._next_self_test = 0.0
        self._backoff_until = 0.0
        if self.buffer.reset_reason:
            self._event("buffer_reset", reason=self.buffer.reset_reason)

    # -- persisted state -----------------------------------------------------------------------
    def _load_state(self) -> _Persisted:
        if not self._state_path.exists():
            return _Persisted()
        try:
            return _Persisted.from_json(self._state_path.read_bytes())
        except (ValueError, KeyError, TypeError) as exc:
            # atomic_write means this only happens if someone edited the file; start from the pointer.
            log.error("agent state %s is unreadable (%s); starting idle from the active slot", self._state_path, exc)
            aside = self._state_path.with_suffix(".json.bad")
            self._state_path.replace(aside)
            st = _Persisted()
            a = self.slots.active()
            st.committed = a.to_dict() if a else None
            return st

    def _persist(self, state: UpdateState | None = None, **changes: Any) -> None:
        old_target = self.persisted.target
        for k, v in changes.items():
            if k != "reason":
                setattr(self.persisted, k, v)
        if changes.get("committed"):
            key = _history_key(changes["committed"])
            kept = [h for h in self.persisted.history if h != key][-(_HISTORY - 1) :]
            self.persisted.history = [*kept, key]
        if state is not None:
            old = self.persisted.state
            self.persisted.state = state
            if old != state:
                target = self.persisted.target or old_target or {}
                self._event(
                    "update_state",
                    from_state=old.value,
                    to_state=state.value,
                    target=target.get("bundle", {}).get("version"),
                    rollout=target.get("rollout"),
                    **{k: v for k, v in changes.items() if k == "reason"},
                )
        atomic_write(self._state_path, self.persisted.to_json())
        self._state_dirty = True

    # -- public API ----------------------------------------------------------------------------
    @property
    def model(self) -> Model | None:
        return self._model

    @property
    def state(self) -> UpdateState:
        return self.persisted.state

    def predict(self, x: Any) -> np.ndarray:
        """Run the active bundle on X (telemetry, health watch and shadow runs included)."""
        model = self._model
        if model is None:
            raise BundleError(f"device {self.device_id} has no active bundle yet; it waits for the fleet to send one")
        t0 = time.perf_counter()
        try:
            y = model.predict(x)
        except InputError:
            raise
        except Exception:
            self._health.add(None, True, False, False)
            raise
        ms = (time.perf_counter() - t0) * 1000
        self._recent_ms.append(ms)
        if self.persisted.state == UpdateState.HEALTH_WATCH:
            self._health.add(ms, False, not bool(np.isfinite(y).all()), False)
        sh = self._shadow
        if sh is not None:
            sh.offer(np.asarray(x), y, ms)
        return y

    def start(self) -> None:
        """Recover from any interrupted update, then run the agent in a background thread. Refused (InputError)
        while another agent runs on the same data directory."""
        if self._lock_fd is None:
            self._lock_fd = _lock_data_dir(self.root)
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-agent", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush telemetry to the buffer, say offline, disconnect."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._model_lock:
            if self._model is not None:
                self._model.flush_telemetry()
        self._end_watch()
        self._drop_staged()
        if self._client is not None:
            try:
                if self._connected.is_set():
                    info = self._client.publish(topic(self.device_id, "status"), self._status(False), 1, True)
                    info.wait_for_publish(timeout=2)
                self._client.disconnect()
            except (RuntimeError, ValueError, OSError):
                pass
            if self._network is not None:
                self._network.remove(self._client)
            else:
                self._client.loop_stop()
        self._apply_acks()
        self.buffer.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the data directory's lock
            self._lock_fd = None

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- model activation ----------------------------------------------------------------------
    def _load(self, path: Path) -> Model:
        return load(
            path,
            [str(k) for k in self.config.trusted_keys],
            self.config.backend,
            self.config.accelerators,
            threads=self.config.threads,
            session_factory=self._session_factory,
        )

    def _activate(
        self, info: SlotInfo | None, model: Model | None = None, keep: SlotInfo | None = None
    ) -> Model | None:
        """Make the model in INFO's slot the one `predict` uses (None: no model). MODEL: that slot's bundle,
        already loaded and checked. The model it replaces is closed, or returned when it is KEEP's."""
        new = None
        if info is not None:
            new = model if model is not None else self._load(self.slots.path(info.slot))
            new.attach_telemetry(
                self.buffer,
                device_id=self.device_id,
                window_s=self.config.window_s,
                capture_per_hour=self.config.capture_per_hour,
            )
        with self._model_lock:
            old, self._model = self._model, new
            old_info, self._active_info = self._active_info, info
        self._recent_ms.clear()
        self._state_dirty = True
        if old is None:
            return None
        if keep is not None and old_info is not None and (old_info.slot, old_info.sha256) == (keep.slot, keep.sha256):
            old.detach_telemetry()
            return old
        old.close()
        return None

    def _take_staged(self, slot: str, sha256: str) -> Model | None:
        st = self._staged
        if st is not None and (st[0], st[1]) == (slot, sha256):
            self._staged = None
            return st[2]
        self._drop_staged()
        return None

    def _drop_staged(self) -> None:
        if self._staged is not None:
            self._staged[2].close()
            self._staged = None

    def _recover(self) -> None:
        """Bring the device to a consistent state after a restart, whatever was interrupted."""
        st = self.persisted
        active = self.slots.active()
        if active is not None and not self.slots.holds(active):
            # Cannot happen with atomic writes short of disk corruption; fall back to the other slot.
            self._event("slot_corrupt", slot=active.slot, version=active.version)
            prev = st.previous or st.committed
            if prev and prev.get("slot") != active.slot and self.slots.holds(SlotInfo(**prev)):
                self.slots.switch(SlotInfo(**prev))
                active = SlotInfo(**prev)
            else:
                active = None
        if st.state == UpdateState.HEALTH_WATCH:
            restarts = st.watch_restarts + 1
            if restarts > self.config.health.max_restarts:
                reason = f"the agent restarted {restarts} times during the health window"
                self._persist(
                    UpdateState.ROLLING_BACK, watch_restarts=restarts, last_result={"reason": reason}, reason=reason
                )
            else:
                self._persist(watch_restarts=restarts)
        if st.state == UpdateState.IDLE and active is None and self.config.initial_bundle is not None:
            self._install_initial(self.config.initial_bundle)
            return
        if self.persisted.state in (UpdateState.ROLLING_BACK, UpdateState.COMMITTING):
            self._activate(self.slots.active())
            self._step()
            return
        self._activate(self.slots.active())
        if self.persisted.state == UpdateState.HEALTH_WATCH:
            self._begin_watch()

    def _install_initial(self, path: Path) -> None:
        b = open_bundle(path, [str(k) for k in self.config.trusted_keys])
        self._load(path).close()
        slot = self.slots.inactive()
        sha = self.slots.stage(path, slot)
        info = SlotInfo(slot, b.manifest.name, b.manifest.version, sha)
        self.slots.switch(info)
        self._persist(UpdateState.IDLE, committed=info.to_dict())
        self._activate(info)
        self._event("installed", bundle={"name": info.name, "version": info.version})

    # -- desired state and commands ------------------------------------------------------------
    def _on_desired(self, d: Desired) -> None:
        self._desired = d
        self._consider_desired()

    def _consider_desired(self) -> None:
        d = self._desired
        if d is None:
            return
        st = self.persisted
        ref = d.bundle
        target = (st.target or {}).get("bundle", {})
        if st.state != UpdateState.IDLE:
            if target.get("sha256") == ref.sha256:
                if st.state == UpdateState.DOWNLOADING and target.get("url") != ref.url:
                    # The same bundle at a corrected URL: fetch it from there now, not once the old URL's
                    # retries have run out (about 90 s of back-off).
                    self._persist(target=d.to_dict(), attempts=0)
                    self._backoff_until = 0.0
                return
            if st.state in _BEFORE_SWITCH:
                self._event("update_superseded", old=target.get("version"), new=ref.version)
                self._persist(UpdateState.IDLE, target=None, target_slot=None, attempts=0)
            else:
                return  # finish the health window first; the latest desired is looked at again when idle
        active = self.slots.active()
        if active is not None and active.sha256 == ref.sha256:
            return
        key = f"{ref.name}:{ref.version}"
        if key in st.refused and st.refused[key] == d.rollout:
            return  # rolled back from in this rollout already; only a new rollout may offer it again
        committed = st.committed
        if d.action == "rollback":
            # A rollback goes back to something this device ran; any other older bundle is a downgrade.
            ran = st.history or ([_history_key(committed)] if committed else [])
            if _history_key(ref.to_dict()) not in ran:
                last = st.last_result or {}
                if last.get("refused_rollback") != key:
                    self._event(
                        "update_refused",
                        bundle=ref.to_dict(),
                        reason="rollback to a bundle this device never committed",
                    )
                    self._persist(last_result={"refused_rollback": key})
                return
        if (
            committed is not None
            and d.action != "rollback"
            and committed.get("name") == ref.name
            and _older(ref.version, str(committed.get("version")))
        ):
            last = st.last_result or {}
            if last.get("refused_downgrade") != key:
                self._event("update_refused", bundle=ref.to_dict(), reason="downgrade below the committed version")
                self._persist(last_result={"refused_downgrade": key})
            return
        self._persist(UpdateState.DOWNLOADING, target=d.to_dict(), target_slot=None, attempts=0, watch_restarts=0)

    def _on_command(self, c: Command) -> None:
        if c.command == "flush":
            if self._model is not None:
                self._model.flush_telemetry()
            self._cursor = 0
        elif c.command == "report":
            self._state_dirty = True
        elif c.command == "shadow":
            self._start_shadow(c)

    def _start_shadow(self, c: Command) -> None:
        try:
            # parse_command checked these when the command arrived.
            ref = BundleRef.parse(c.args.get("bundle"), "shadow command bundle")
            rate = float(c.args.get("sample_rate", 0.1))
            duration = float(c.args.get("duration_s", 60))
            min_samples = int(c.args.get("min_samples", 0))
            path = self._fetch(ref, self.root / "shadow")
            model = self._load(path)
        except EdgefleetError as exc:
            self._event("shadow_failed", command_id=c.id, reason=str(exc))
            return
        if self._shadow is not None:
            self._shadow.report()
        self._shadow = _Shadow(model, ref, rate, duration, c.id)
        self._shadow_min = min_samples
        self._event("shadow_started", command_id=c.id, candidate={"name": ref.name, "version": ref.version})

    def _check_shadow(self) -> None:
        sh = self._shadow
        if sh is None:
            return
        if time.monotonic() >= sh.deadline or (self._shadow_min and sh.samples >= self._shadow_min):
            self._shadow = None
            self._event("shadow_report", **sh.report())
            sh.model.close()

    # -- the update state machine --------------------------------------------------------------
    def _fetch(self, ref: BundleRef, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / f"{ref.sha256}.efb"
        if dest.exists():
            return dest
        return download(
            ref.url,
            dest,
            size=ref.size,
            sha256=ref.sha256,
            token=self.config.http_token,
            token_for=self._token_for,
            max_bytes_per_s=self.config.download_bytes_per_s,
            max_size=self.config.max_bundle_bytes,
            # A device capped below the stall limit must still finish: half its own cap is not a stall.
            min_bytes_per_s=min(1024.0, 0.5 * (self.config.download_bytes_per_s or 2048.0)),
        )

    def _token_for(self, url: str) -> bool:
        """Whether URL's origin may receive the device's download token (see AgentConfig.token_origins)."""
        if not self.config.token_origins:
            # A config from before token_origins: the URLs of the server's own desired states (redirects to
            # another origin still lose the token in download()).
            return True
        try:
            return origin(url) in {origin(t) for t in self.config.token_origins}
        except ValueError:
            return False

    def _fail(self, reason: str) -> None:
        target = self.persisted.target or {}
        self._event("update_failed", target=target.get("bundle"), rollout=target.get("rollout"), reason=reason)
        for p in self.downloads.glob("*.efb*"):
            p.unlink(missing_ok=True)
        b = target.get("bundle", {})
        refused = dict(self.persisted.refused)
        refused[f"{b.get('name')}:{b.get('version')}"] = target.get("rollout")
        self._persist(
            UpdateState.IDLE,
            target=None,
            target_slot=None,
            last_result={"result": "failed", "reason": reason, "bundle": b},
            refused=refused,
            reason=reason,
        )

    def _slot_with(self, sha: str) -> str | None:
        return next((s for s in ("a", "b") if self.slots.holds(SlotInfo(s, "", "", sha))), None)

    def _step(self) -> None:
        """Do the work of the current state once; each is safe to repeat after a crash."""
        st = self.persisted
        if st.state == UpdateState.IDLE or time.monotonic() < self._backoff_until:
            return
        if st.state == UpdateState.HEALTH_WATCH:
            self._watch()  # every tick of the window: nothing below is needed for it
            return
        target = Desired(
            BundleRef.parse(st.target["bundle"], "target") if st.target else None,
            (st.target or {}).get("action", "update"),
            (st.target or {}).get("rollout"),
            0.0,
        )
        ref = target.bundle
        dl = self.downloads / f"{ref.sha256}.efb" if ref else None
        if st.state == UpdateState.DOWNLOADING:
            kept = self._slot_with(ref.sha256)
            if kept is not None and kept != self._active_slot():
                # Still in the inactive slot from an earlier try; the smoke test's load verifies it again.
                self._persist(UpdateState.SMOKE_TEST, target_slot=kept)
                return
            try:
                self._fetch(ref, self.downloads)
            except DownloadError as exc:
                attempts = st.attempts + 1
                if attempts >= _DOWNLOAD_RETRIES:
                    self._fail(f"download failed {attempts} times: {exc}")
                else:
                    self._persist(attempts=attempts)
                    self._backoff_until = time.monotonic() + min(30.0, 0.5 * 2**attempts)
                return
            except BundleError as exc:
                self._fail(str(exc))
                return
            self._persist(UpdateState.VERIFYING)
        elif st.state == UpdateState.VERIFYING:
            assert dl is not None
            failpoint("verify.before")
            try:
                # Loading verifies signature and hashes, the runtime requirements and that every op is known here.
                with self._load(dl) as m:
                    got = (m.manifest.name, m.manifest.version)
                if got != (ref.name, ref.version):
                    raise BundleError(f"downloaded bundle is {got[0]} {got[1]}, not {ref.name} {ref.version}")
            except (BundleError, FileNotFoundError) as exc:
                self._fail(f"verification failed: {exc}")
                return
            failpoint("verify.after")
            self._persist(UpdateState.STAGING)
        elif st.state == UpdateState.STAGING:
            assert dl is not None
            slot = self.slots.inactive()
            try:
                self.slots.stage(dl, slot)
            except OSError as exc:
                self._fail(f"staging into slot {slot} failed: {exc}")
                return
            failpoint("stage.done")
            self._persist(UpdateState.SMOKE_TEST, target_slot=slot)
        elif st.state == UpdateState.SMOKE_TEST:
            failpoint("smoke.before")
            slot = st.target_slot or ""
            self._drop_staged()
            try:
                cand = self._load(self.slots.path(slot))
            except (BundleError, OSError) as exc:
                self._fail(f"smoke test failed: {exc}")
                return
            try:
                res = cand.check_golden()
                new_ms = self._golden_p95(cand)
            except (BundleError, OSError) as exc:
                cand.close()
                self._fail(f"smoke test failed: {exc}")
                return
            if not res.ok:
                cand.close()
                self._fail(f"smoke test failed: golden outputs differ by {res.max_abs_diff:.4g} (atol {res.atol:.4g})")
                return
            self._staged = (slot, ref.sha256, cand)
            old_ms = self._golden_p95(self._model) if self._model is not None else None
            failpoint("smoke.after")
            self._persist(UpdateState.SWITCHING, old_p95_ms=old_ms, last_result={"smoke_p95_ms": new_ms})
        elif st.state == UpdateState.SWITCHING:
            slot = st.target_slot or ""
            active = self.slots.active()
            if active is None or active.slot != slot or active.sha256 != ref.sha256:
                if st.previous is None or (active is not None and active.slot != slot):
                    self._persist(previous=active.to_dict() if active else None)
                failpoint("switch.before")
                self.slots.switch(SlotInfo(slot, ref.name, ref.version, ref.sha256))
            failpoint("switch.after")
            prev = SlotInfo(**st.previous) if st.previous else None
            # The previous bundle, still loaded, becomes the health window's latency control.
            old = self._activate(self.slots.active(), self._take_staged(slot, ref.sha256), keep=prev)
            if st.previous is None:
                # First install through the fleet: nothing to roll back to, so nothing to watch against.
                self._persist(UpdateState.COMMITTING)
            else:
                self._persist(UpdateState.HEALTH_WATCH)
                self._begin_watch(old)
        elif st.state == UpdateState.COMMITTING:
            failpoint("commit.before")
            active = self.slots.active()
            # Reported before it is recorded: a crash in between reports it twice, never not at all.
            self._event("committed", bundle=ref.to_dict() if ref else None, rollout=target.rollout)
            result = {
                "result": "committed",
                "bundle": ref.to_dict() if ref else None,
                "health": (st.last_result or {}).get("health"),
            }
            self._persist(
                UpdateState.IDLE,
                committed=active.to_dict() if active else None,
                target=None,
                target_slot=None,
                previous=None,
                last_result=result,
            )
            for p in self.downloads.glob("*.efb*"):
                p.unlink(missing_ok=True)
            failpoint("commit.after")
        elif st.state == UpdateState.ROLLING_BACK:
            failpoint("rollback.before")
            prev = SlotInfo(**st.previous) if st.previous else None
            active = self.slots.active()
            if prev is not None and (active is None or active.slot != prev.slot):
                self.slots.switch(prev)
            failpoint("rollback.switched")
            self._activate(self.slots.active())
            refused = dict(st.refused)
            key = f"{ref.name}:{ref.version}" if ref else "?"
            refused[key] = target.rollout
            reason = (st.last_result or {}).get("reason", "health window failed")
            self._event("rolled_back", bundle=ref.to_dict() if ref else None, rollout=target.rollout, reason=reason)
            self._persist(
                UpdateState.IDLE,
                target=None,
                target_slot=None,
                previous=None,
                refused=refused,
                last_result={"result": "rolled_back", "bundle": ref.to_dict() if ref else None, "reason": reason},
            )
            failpoint("rollback.after")

    def _active_slot(self) -> str | None:
        a = self.slots.active()
        return a.slot if a else None

    def _golden_p95(self, model: Model | None, reps: int = 15) -> float | None:
        if model is None:
            return None
        xs = model.bundle.golden_inputs()
        if xs is None:
            return None
        return _p95([model._timed_run(xs)[1] * 1000 for _ in range(reps)])

    def _begin_watch(self, control: Model | None = None) -> None:
        self._health.reset()
        self._watch_until = time.monotonic() + self.config.health.window_s
        self._next_probe = 0.0
        self._end_watch()
        prev = self.persisted.previous
        if control is not None:
            self._control = control
        elif prev is not None:
            # The previous bundle is probed alongside the new one, so both latencies are measured under the
            # same load at the same time: a busy device does not fail a good bundle.
            try:
                self._control = self._load(self.slots.path(str(prev["slot"])))
            except (EdgefleetError, OSError) as exc:
                log.warning("cannot load the previous bundle as latency control: %s", exc)

    def _end_watch(self) -> None:
        ctl, self._control = self._control, None
        if ctl is not None:
            ctl.close()

    def _probe(self, model: Model, control: bool) -> None:
        xs = model.bundle.golden_inputs()
        if xs is None:
            return
        try:
            outs, seconds = model._timed_run(xs)
        except Exception:  # an erroring model is exactly what the watch looks for
            if not control:
                self._health.add(None, True, False, True)
            return
        y, ms = outs[0], seconds * 1000
        if control:
            self._health.add_control(ms)
        else:
            self._health.add(ms, False, not bool(np.isfinite(y).all()), True)

    def _watch(self) -> None:
        hp = self.config.health
        now = time.monotonic()
        model = self._model
        if model is not None and now >= self._next_probe:
            self._next_probe = now + hp.probe_interval_s
            # The first run after the loop's sleep pays for caches other work has evicted; taking turns
            # keeps that cost from always landing on the new bundle.
            self._probe_turn = not self._probe_turn
            if self._control is not None and self._probe_turn:
                self._probe(self._control, control=True)
                self._probe(model, control=False)
            else:
                self._probe(model, control=False)
                if self._control is not None:
                    self._probe(self._control, control=True)
        failpoint("watch.tick")
        h = self._health
        with h.lock:
            calls, errors, nan = h.calls, h.errors, h.nan
            n_probes = min(len(h.probe_ms), len(h.control_ms)) if self._control is not None else len(h.probe_ms)
        err_rate = errors / calls if calls else 0.0
        nan_rate = nan / calls if calls else 0.0
        bad = []
        if calls >= hp.min_calls and err_rate > hp.max_error_rate:
            bad.append(f"error rate {err_rate:.3f} > {hp.max_error_rate}")
        if calls >= hp.min_calls and nan_rate > hp.max_nan_rate:
            bad.append(f"NaN output rate {nan_rate:.3f} > {hp.max_nan_rate}")
        at_end = now >= self._watch_until
        overdue = now >= self._watch_until + 4 * hp.window_s
        if not (bad or at_end):
            return  # the latency figures below matter only for a verdict; most ticks have none
        with h.lock:
            probe_p95, live_p95 = _p95(h.probe_ms), _p95(h.live_ms)
            control_p95 = _p95(h.control_ms)
            probe_med = _quantile(h.probe_ms, 0.5)
            control_med = _quantile(h.control_ms, 0.5)
        old = control_p95 if self._control is not None else self.persisted.old_p95_ms
        enough = old is None or n_probes >= _MIN_LATENCY_PROBES
        if at_end and enough and old is not None and probe_p95 is not None:
            limit = max(old * hp.max_p95_ratio, old + hp.p95_slack_ms)
            slow = probe_p95 > limit
            if slow and n_probes < _RELIABLE_P95_PROBES and control_med is not None and probe_med is not None:
                # A p95 from a few dozen probes is one or two samples: a scheduling hiccup can make it. Below
                # that sample size the median has to be slower too, which hiccups do not move.
                slow = probe_med > max(control_med * hp.max_p95_ratio, control_med + hp.p95_slack_ms / 2)
            if slow:
                bad.append(f"p95 latency {probe_p95:.2f} ms > {limit:.2f} ms (previous bundle {old:.2f} ms)")
        summary = {
            "calls": calls,
            "error_rate": round(err_rate, 4),
            "nan_rate": round(nan_rate, 4),
            "p95_ms": probe_p95,
            "live_p95_ms": live_p95,
            "previous_p95_ms": old,
            "latency_probes": n_probes,
        }
        if bad and calls >= hp.min_calls:
            reason = "; ".join(bad)
            self._end_watch()
            self._persist(UpdateState.ROLLING_BACK, last_result={"reason": reason, "health": summary}, reason=reason)
        elif at_end and calls >= hp.min_calls and enough:
            # A model too slow to finish enough probes in the window is not passed for lack of evidence.
            failpoint("watch.pass")
            self._end_watch()
            self._persist(UpdateState.COMMITTING, last_result={"health": summary})
        elif overdue:
            reason = f"too little evidence in the health window: {calls} calls, {n_probes} latency probes"
            self._end_watch()
            self._persist(UpdateState.ROLLING_BACK, last_result={"reason": reason, "health": summary}, reason=reason)

    # -- MQTT ------------------------------------------------------------------------------------
    def _status(self, online: bool) -> bytes:
        return json.dumps(
            {"schema": STATUS_SCHEMA, "device_id": self.device_id, "online": online, "ts": time.time()}
        ).encode()

    def _buffer_stats(self) -> dict[str, Any]:
        # State documents go out on every update transition; the buffer's figures (a few SQL counts)
        # may be a few seconds old in them.
        now = time.monotonic()
        if self._stats_cache is None or now - self._stats_cache[0] > 5.0:
            self._stats_cache = (now, dict(self.buffer.stats().__dict__))
        return self._stats_cache[1]

    def state_doc(self) -> dict[str, Any]:
        m = self._model
        st = self.persisted
        return {
            "schema": STATE_SCHEMA,
            "device_id": self.device_id,
            "agent_version": __version__,
            "tags": list(self.config.tags),
            "active": None if m is None else {**m.info.as_dict(), "slot": self._active_slot()},
            "committed": st.committed,
            "staged": (st.target or {}).get("bundle") if st.state != UpdateState.IDLE else None,
            "update": {
                "state": st.state.value,
                "rollout": (st.target or {}).get("rollout"),
                "last_result": st.last_result,
                "refused": st.refused,
            },
            "buffer": self._buffer_stats(),
            "ts": time.time(),
        }

    def _event(self, kind: str, **fields: Any) -> None:
        ev = {
            "schema": EVENT_SCHEMA,
            "key": f"{self.device_id}:ev:{uuid.uuid4().hex}",
            "device_id": self.device_id,
            "type": kind,
            "ts": time.time(),
            **fields,
        }
        log.info("event %s %s", kind, {k: v for k, v in fields.items() if k != "bundle"})
        self.buffer.add(ev, kind="events")

    def _connect(self) -> None:
        mqtt = require("paho.mqtt.client", "runtime", "connecting the device agent to the fleet")
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = self.config.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5)
        if c.username:
            client.username_pw_set(c.username, c.password)
        if c.tls:
            client.tls_set(ca_certs=c.ca, certfile=c.cert, keyfile=c.key)
        client.will_set(topic(self.device_id, "status"), self._status(False), qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        client.connect_async(c.host, c.port, keepalive=c.keepalive, clean_start=True, properties=props)
        self._client = client
        if self._network is not None:
            self._network.add(client)
        else:
            client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connection refused: %s", reason_code)
            return
        with self._pub_lock:
            self._inflight.clear()
            self._cursor = 0
            self._link_gen += 1
        client.subscribe([(topic(self.device_id, "desired"), 1), (topic(self.device_id, "commands"), 1)])
        client.publish(topic(self.device_id, "status"), self._status(True), qos=1, retain=True)
        self._connected.set()
        self._state_dirty = True
        self._wake.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        with self._pub_lock:
            self._inflight.clear()
            self._cursor = 0
            self._link_gen += 1

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            if not msg.payload:
                return  # a cleared retained message
            obj = json.loads(msg.payload)
            self._inbox.put(("desired", parse_desired(obj)) if kind == "desired" else ("command", parse_command(obj)))
            self._wake.set()
        except Exception as exc:  # anything off the network; paho's network thread must survive it
            log.warning("ignoring malformed %s message: %s", kind, exc)
            try:
                self._event("bad_message", topic=kind, reason=f"{type(exc).__name__}: {exc}"[:300])
            except Exception as exc2:
                log.error("could not record bad_message: %s", exc2)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        ok = not reason_code.is_failure
        with self._pub_lock:
            key = self._inflight.pop(mid, None)
            if key is None:
                # The PUBACK beat `_drain` to recording the mid (or it is a state / status message).
                self._early[mid] = ok
                while len(self._early) > 1024:
                    self._early.popitem(last=False)
            if key is not None and ok:
                # Deleted by the loop thread, many in one transaction: this is paho's network thread.
                self._acked.append(key)
        self._wake.set()  # room in flight again

    def _apply_acks(self) -> None:
        with self._pub_lock:
            keys, self._acked = self._acked, []
        if not keys:
            return
        try:
            self.buffer.ack(*keys)
        except sqlite3.Error as exc:
            log.warning("cannot remove %d acknowledged records from the buffer yet: %s", len(keys), exc)
            with self._pub_lock:
                self._acked[:0] = keys

    def _drain(self) -> None:
        """Publish buffered windows and events oldest first, within the bandwidth cap and in-flight limit."""
        self._apply_acks()
        if self._client is None or not self._connected.is_set():
            return
        rate = self.config.drain_bytes_per_s
        now = time.monotonic()
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        with self._pub_lock:
            room = _MAX_INFLIGHT - len(self._inflight)
            cursor, gen = self._cursor, self._link_gen
        if room <= 0:
            return
        added = self.buffer.added
        if self._drained == (added, gen, cursor):
            return
        rows = self.buffer.pending(limit=room, after_seq=cursor)
        dry = len(rows) < room
        # paho's own locks are taken inside publish(); never call it while holding ours (lock order).
        for seq, kind, key, body in rows:
            if self._tokens < len(body) and self._tokens < rate:
                dry = False
                self._drain_retry_at = now + (min(len(body), rate) - self._tokens) / rate
                break
            info = self._client.publish(topic(self.device_id, kind), body, qos=1)
            if info.rc != 0:
                dry = False
                self._drain_retry_at = now + 0.5
                break
            with self._pub_lock:
                early = self._early.pop(info.mid, None)
                if gen != self._link_gen:
                    dry = False
                    break  # the link dropped meanwhile: everything unacknowledged is sent again
                if early is None:
                    self._inflight[info.mid] = key
                self._cursor = seq
            if early:
                self.buffer.ack(key)
            self._tokens -= len(body)
        if dry:
            with self._pub_lock:
                self._drained = (added, self._link_gen, self._cursor)

    def _publish_state(self) -> None:
        if self._client is None or not self._connected.is_set() or not self._state_dirty:
            return
        self._state_dirty = False
        body = json.dumps(self.state_doc(), default=str).encode()
        self._client.publish(topic(self.device_id, "state"), body, qos=1, retain=True)

    def _tick_s(self) -> float:
        """How long the loop may sleep: short during an update, to the next probe in the health window, else
        until something is due, at most `_IDLE_TICK_S` (MQTT callbacks and new buffer records wake it earlier)."""
        st = self.persisted.state
        if st == UpdateState.HEALTH_WATCH:
            # Probes are due at fixed times; live calls' errors are counted as they happen and judged at the
            # next probe (a device watching hundreds of windows at once pays for every wake-up).
            now = time.monotonic()
            due = [0.5, self._next_probe - now]
            if now < self._watch_until:
                due.append(self._watch_until - now)
            if self.config.self_test_hz > 0:
                due.append(self._next_self_test - now)
            return max(0.0, min(due))
        if st != UpdateState.IDLE:
            return 0.02
        # Idle: messages, PUBACKs and new buffer records wake the loop; otherwise it sleeps until a window
        # closes, a self-test call or a bandwidth-capped send is due (a thousand idle agents share a host
        # in the simulator, and a device's CPU is better spent on its app).
        now = time.monotonic()
        due = [_IDLE_TICK_S]
        if self._drain_retry_at > now:  # one in the past was tried in this very loop pass
            due.append(self._drain_retry_at - now)
        if self.config.self_test_hz > 0:
            due.append(self._next_self_test - now)
        m = self._model
        left = m.telemetry_due_s() if m is not None else None
        if left is not None:
            due.append(left + 0.01)
        if self._shadow is not None:
            due.append(self._shadow.deadline - now)
        return max(0.0, min(due))

    def _self_test(self) -> None:
        hz = self.config.self_test_hz
        m = self._model
        if hz <= 0 or m is None or time.monotonic() < self._next_self_test:
            return
        self._next_self_test = time.monotonic() + 1.0 / hz
        xs = m.bundle.golden_inputs()
        if xs is not None:
            i = random.randrange(len(xs))
            try:
                self.predict(xs[i : i + 1])
            except EdgefleetError as exc:
                log.warning("self-test prediction failed: %s", exc)

    def _loop(self) -> None:
        try:
            self._connect()
        except EdgefleetError as exc:
            log.error("%s", exc)
            self._stop.set()
            return
        last_state = 0.0
        while not self._stop.is_set():
            self._passes += 1
            before = self.persisted.state
            while True:
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    if kind == "desired":
                        self._on_desired(item)
                    else:
                        self._on_command(item)
                except Exception as exc:  # one bad order must not stop the loop; see _failed
                    self._failed(kind, exc)
            try:
                self._step()
                if self.persisted.state == UpdateState.IDLE:
                    self._consider_desired()
                self._check_shadow()
                self._self_test()
                m = self._model
                if m is not None:
                    m.flush_telemetry(force=False)
                if time.monotonic() - last_state > 30:
                    self._state_dirty, last_state = True, time.monotonic()
                # State before events: the server marks a device updated on its 'committed' event, and its
                # registry (active version) should not lag behind that.
                self._publish_state()
                self._drain()
                self._step_failures = 0
                self._last_failure = None  # a reason coming back after a good pass is reported again
            except Exception as exc:  # see _failed: the loop outlives any one step (ENOSPC, MemoryError, a bug)
                self._failed("step", exc)
                self._step_failures += 1
                # Back off while the same step keeps failing (a full disk, a broken slot): 0.5 s doubling to 60 s.
                self._wake.wait(min(60.0, 0.5 * 2 ** min(self._step_failures - 1, 7)))
                self._wake.clear()
                continue
            if self.persisted.state not in (before, UpdateState.IDLE):
                continue  # an update moved on a state: do the next one's work without sleeping
            self._wake.wait(self._tick_s())
            self._wake.clear()

    def _failed(self, where: str, exc: BaseException) -> None:
        """Log and report a failure the loop survives, as an `agent_error` event (once per distinct reason
        in a row, so a step failing every few seconds for hours does not fill the buffer)."""
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgefleetError) else str(exc)
        reason = reason.splitlines()[0][:500] if reason else type(exc).__name__
        if isinstance(exc, EdgefleetError):
            log.error("agent %s failed: %s", where, reason)
        else:
            log.error("agent %s failed: %s", where, reason, exc_info=exc)
        key = (where, reason)
        if key == self._last_failure:
            return
        self._last_failure = key
        try:
            self._event("agent_error", where=where, state=self.persisted.state.value, reason=reason)
        except Exception as exc2:  # the buffer itself may be what fails (a full disk)
            log.error("could not record agent_error: %s", exc2)
