"""The device agent: a small coordinator over the update machine, the MQTT link and telemetry export.

    _update_machine   states, events, the transition table, the persisted record (agent.json)
    _update           the work of each update state, and what a restart resumes
    _health           the health window after a switch, and its verdict
    _active           the model `predict` runs, swapped atomically
    _link, _export    the MQTT session; the telemetry buffer drained through an exporter
    _shadow           candidate bundles run beside the active one (_shadow_runner: the orders)

All work happens on the agent's own thread (`_loop`); MQTT callbacks only queue orders and wake it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import BundleError, EdgefleetError, InputError, __version__
from edgefleet.protocol import EVENT_SCHEMA, STATE_SCHEMA, BundleRef, Command, Desired

from ._active import ActiveModel
from ._capabilities import capabilities
from ._config import AgentConfig
from ._download import download, origin
from ._export import BufferDrain, MqttExporter
from ._health import HealthWatch
from ._link import MqttLink
from ._liveness import HEARTBEAT_S, Heartbeat
from ._model import Model, SessionFactory, load
from ._netloop import NetworkLoop
from ._shadow_runner import ShadowRunner
from ._slots import SlotStore
from ._telemetry import TelemetryBuffer
from ._update import Updater
from ._update_machine import UpdateMachine, UpdateRecord, UpdateState, UpdateStore
from ._upload import upload_samples

__all__ = ["Agent", "UpdateState"]

log = logging.getLogger("edgefleet.agent")

_MAX_INFLIGHT = 32
_IDLE_TICK_S = 2.0  # the longest an idle agent sleeps with nothing due


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
        self._stop = threading.Event()
        # Set by MQTT callbacks, new buffer records and stop(): the loop wakes at once instead of polling.
        self._wake = threading.Event()
        self.buffer.on_add = self._wake.set  # a closed window or an event: send it without waiting for a tick
        self._thread: threading.Thread | None = None
        self._passes = 0  # loop passes, for tests that check an idle agent sleeps
        self._step_failures = 0  # in a row, for the back-off
        self._last_failure: tuple[str, str] | None = None
        self._state_dirty = True
        self._stats_cache: tuple[float, dict[str, Any]] | None = None
        self._next_self_test = 0.0
        self._desired: Desired | None = None
        self.shadows = ShadowRunner(
            emit=self._event,
            fetch=self._fetch,
            load=lambda path: self._load(path, threads=1),  # one core at most: the app's calls keep theirs
            wake=self._wake.set,
            directory=self.root / "shadow",
            cpu_share=config.shadow_cpu_share,
            progress_s=config.window_s,
        )
        self.heartbeat = Heartbeat(self.root)
        self._loop_error: str | None = None
        self._upload: threading.Thread | None = None

        store = UpdateStore(root / "agent.json")
        self.machine = UpdateMachine(store, store.load(self.slots.active), self._on_move)
        self.active = ActiveModel(self._load, self._attach, self.slots.path)
        self.watch = HealthWatch(config.health)
        self.updater = Updater(
            self.machine,
            self.slots,
            self.downloads,
            self.active,
            self.watch,
            load=self._load,
            fetch=self._fetch,
            emit=self._event,
            max_watch_restarts=config.health.max_restarts,
            wake=self._wake.set,
        )
        self.exporter = MqttExporter(self.device_id, _MAX_INFLIGHT, on_room=self._wake.set)
        self.drain = BufferDrain(self.buffer, self.exporter, config.drain_bytes_per_s)
        self.link = MqttLink(
            self.device_id,
            config.mqtt,
            self.exporter,
            network=network,
            wake=self._wake,
            on_bad_message=lambda kind, reason: self._event("bad_message", topic=kind, reason=reason),
        )
        self.link.on_connected = self._on_connected
        if self.buffer.reset_reason:
            self._event("buffer_reset", reason=self.buffer.reset_reason)

    # -- public API ----------------------------------------------------------------------------
    @property
    def model(self) -> Model | None:
        return self.active.model

    @property
    def state(self) -> UpdateState:
        return self.machine.state

    @property
    def persisted(self) -> UpdateRecord:
        """The update record as last written to agent.json."""
        return self.machine.record

    def predict(self, x: Any) -> np.ndarray:
        """Run the active bundle on X (telemetry, health watch and shadow runs included)."""
        model = self.active.model
        if model is None:
            raise BundleError(f"device {self.device_id} has no active bundle yet; it waits for the fleet to send one")
        sh = self.shadows.current
        if sh is not None:
            sh.app_call_started()
        t0 = time.perf_counter()
        try:
            y = model.predict(x)
        except InputError:
            raise
        except Exception:
            self.watch.record_call(None, True, False)
            raise
        finally:
            if sh is not None:
                sh.app_call_ended()
        ms = (time.perf_counter() - t0) * 1000
        self.active.recent_ms.append(ms)
        self.watch.record_call(ms, False, not bool(np.isfinite(y).all()))
        if sh is not None:
            call = model.last_call_id
            sh.offer(np.asarray(x), y, ms, None if call is None else (id(model), call))
        return y

    @property
    def last_call_id(self) -> int | None:
        """The id of this thread's last `predict`, for `feedback` (None unless `feedback_calls` is set)."""
        m = self.active.model
        return None if m is None else m.last_call_id

    def feedback(self, call_id: int, labels: Any) -> None:
        """The true class(es) of an earlier `predict`, learnt later (see `Model.feedback`). Calls made before
        an update switched bundles are unknown to the new one: their feedback is refused."""
        m = self.active.model
        if m is None:
            raise BundleError(f"device {self.device_id} has no active bundle")
        m.feedback(call_id, labels)
        sh = self.shadows.current
        if sh is not None:
            sh.label((id(m), call_id), labels)

    def start(self) -> None:
        """Recover from any interrupted update, then run the agent in a background thread. Refused (InputError)
        while another agent runs on the same data directory."""
        if self._lock_fd is None:
            self._lock_fd = _lock_data_dir(self.root)
        self.updater.recover(self.config.initial_bundle)
        self._thread = threading.Thread(target=self._loop, name="edgefleet-agent", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the agent's loop to end (safe from a signal handler); `stop` then finishes the job."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush telemetry to the buffer, say offline, disconnect."""
        self.request_stop()
        self.shadows.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
        self.active.flush()
        self.updater.close()
        self.watch.end()
        self.active.drop_staged()
        self.link.close()
        self.drain.apply_acks()
        self.buffer.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the data directory's lock
            self._lock_fd = None

    def run_forever(self) -> None:
        """Run until `request_stop` (SIGTERM); an EdgefleetError if the loop ended on its own (it could not
        start its MQTT session), so a supervisor sees the process end instead of a silent one."""
        self.start()
        try:
            while not self._stop.wait(1.0):
                if self._thread is not None and not self._thread.is_alive():
                    raise EdgefleetError(f"agent {self.device_id}: its loop ended unexpectedly; see the log above")
        finally:
            self.stop()
        if self._loop_error is not None:
            raise EdgefleetError(self._loop_error)

    def state_doc(self) -> dict[str, Any]:
        """The retained `state` document (docs/topics.md)."""
        m, info = self.active.model, self.active.info
        st = self.machine.record
        return {
            "schema": STATE_SCHEMA,
            "device_id": self.device_id,
            "agent_version": __version__,
            "tags": list(self.config.tags),
            "active": None if m is None else {**m.info.as_dict(), "slot": info.slot if info else None},
            "committed": None if st.committed is None else st.committed.to_dict(),
            "staged": st.target.bundle.to_dict() if st.target is not None and st.state != UpdateState.IDLE else None,
            "update": {
                "state": st.state.value,
                "rollout": st.target.rollout if st.target else None,
                "last_result": st.last_result,
                "refused": st.refused,
            },
            "buffer": self._buffer_stats(),
            "refused_by_fleet": {"count": self.link.refused, "last": self.link.last_refusal},
            "capabilities": capabilities(),
            "ts": time.time(),
        }

    # -- parts' hooks ----------------------------------------------------------------------------
    def _load(self, path: Path, threads: int | None = None) -> Model:
        return load(
            path,
            [str(k) for k in self.config.trusted_keys],
            self.config.backend,
            self.config.accelerators,
            threads=threads or self.config.threads,
            session_factory=self._session_factory,
        )

    def _attach(self, model: Model) -> None:
        model.attach_telemetry(
            self.buffer,
            device_id=self.device_id,
            window_s=self.config.window_s,
            capture_per_hour=self.config.capture_per_hour,
            feedback_calls=self.config.feedback_calls,
            feedback_ttl_s=self.config.feedback_ttl_s,
        )

    def _fetch(self, ref: BundleRef, directory: Path, cancel: threading.Event | None = None) -> Path:
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
            cancel=cancel,
            ca=self.config.http_ca,
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

    def _on_move(self, old: UpdateState, new: UpdateState, record: UpdateRecord, reason: str | None) -> None:
        target = record.target
        extra = {} if reason is None else {"reason": reason}
        self._event(
            "update_state",
            from_state=old.value,
            to_state=new.value,
            target=target.bundle.to_dict() if target else None,
            rollout=target.rollout if target else None,
            **extra,
        )
        self._state_dirty = True

    def _on_connected(self) -> None:
        self._state_dirty = True

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

    def _buffer_stats(self) -> dict[str, Any]:
        # State documents go out on every update transition; the buffer's figures (a few SQL counts)
        # may be a few seconds old in them.
        now = time.monotonic()
        if self._stats_cache is None or now - self._stats_cache[0] > 5.0:
            self._stats_cache = (now, dict(self.buffer.stats().__dict__))
        return self._stats_cache[1]

    # -- orders from the fleet ---------------------------------------------------------------------
    def _on_command(self, c: Command) -> None:
        if c.command == "flush":
            self.active.flush()
            self.drain.rewind()
            self._event("command_done", command_id=c.id, command=c.command)
        elif c.command == "report":
            self._state_dirty = True
            self._event("command_done", command_id=c.id, command=c.command)
        elif c.command == "shadow":
            self.shadows.order(c)
        elif c.command == "capture":
            self._start_upload(c)

    def _start_upload(self, c: Command) -> None:
        """Upload captured samples the fleet asked for, off the loop thread; refused unless opted in."""
        cap = str(c.args["capture_id"])
        if not self.config.capture_upload:
            self._event("capture_refused", command_id=c.id, capture_id=cap, reason="capture_upload is off")
            return
        if not self.config.http_token or not self._token_for(c.args["url"]):
            self._event("capture_refused", command_id=c.id, capture_id=cap, reason="upload URL not of the fleet")
            return
        if self._upload is not None and self._upload.is_alive():
            self._event("capture_refused", command_id=c.id, capture_id=cap, reason="an upload is under way")
            return
        self._upload = threading.Thread(target=self._run_upload, args=(c,), name="edgefleet-upload", daemon=True)
        self._upload.start()

    def _run_upload(self, c: Command) -> None:
        cap = str(c.args["capture_id"])
        m = self.active.model
        try:
            got = upload_samples(
                self.buffer,
                c.args["url"],
                str(self.config.http_token),
                limit=int(c.args["samples"]),
                max_bytes=self.config.capture_upload_max_bytes,
                bytes_per_s=self.config.capture_upload_bytes_per_s or None,
                bundle_name=None if m is None else m.info.bundle,
                ca=None if self.config.http_ca is None else str(self.config.http_ca),
            )
        except EdgefleetError as exc:
            self._event("capture_failed", command_id=c.id, capture_id=cap, reason=str(exc))
            return
        self._event("capture_uploaded", command_id=c.id, capture_id=cap, **got)

    def _self_test(self) -> None:
        hz = self.config.self_test_hz
        m = self.active.model
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

    # -- the loop ----------------------------------------------------------------------------------
    def _tick_s(self) -> float:
        """How long the loop may sleep: short during an update, to the next probe in the health window, else
        until something is due, at most `_IDLE_TICK_S` (MQTT callbacks and new buffer records wake it earlier)."""
        st = self.machine.state
        now = time.monotonic()
        due = [_IDLE_TICK_S]
        if self.config.self_test_hz > 0:
            due.append(self._next_self_test - now)
        if st == UpdateState.HEALTH_WATCH:
            # Probes are due at fixed times; live calls' errors are counted as they happen and judged at the
            # next probe (a device watching hundreds of windows at once pays for every wake-up).
            due += [0.5, self.watch.due_s(now)]
            return max(0.0, min(due))
        if st != UpdateState.IDLE:
            # A download runs in its own thread and wakes the loop when it ends; meanwhile telemetry and orders
            # are due as when idle (the loop is not held up, so nothing else waits on it).
            return 0.5 if self.updater.downloading else 0.02
        # Idle: it sleeps until a window closes, a self-test call or a bandwidth-capped send is due (a
        # thousand idle agents share a host in the simulator, and a device's CPU is better spent on its app).
        if self.drain.retry_at > now:  # one in the past was tried in this very loop pass
            due.append(self.drain.retry_at - now)
        m = self.active.model
        left = m.telemetry_due_s() if m is not None else None
        if left is not None:
            due.append(left + 0.01)
        shadow_due = self.shadows.due_in(now)
        if shadow_due is not None:
            due.append(shadow_due)
        return max(0.0, min(due))

    def _take_orders(self) -> None:
        while True:
            try:
                kind, item = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if isinstance(item, Desired):
                    self._desired = item
                    self.updater.consider(item)
                else:
                    self._on_command(item)
            except Exception as exc:  # one bad order must not stop the loop; see _failed
                self._failed(kind, exc)

    def _loop(self) -> None:
        try:
            self.link.connect()
        except Exception as exc:  # a config the MQTT client refuses (a TLS file), a missing extra
            self._loop_error = f"agent {self.device_id} cannot connect to the fleet: {exc}".splitlines()[0]
            log.error("%s", self._loop_error)
            self._stop.set()
            return
        last_state = 0.0
        while not self._stop.is_set():
            self._passes += 1
            self.heartbeat.beat(self._passes, self.machine.state.value)
            before = self.machine.state
            self._take_orders()
            try:
                self.updater.step()
                if self.machine.state == UpdateState.IDLE and self._desired is not None:
                    self.updater.consider(self._desired)
                self.shadows.check()
                self._self_test()
                m = self.active.model
                if m is not None:
                    m.flush_telemetry(force=False)
                if self.active.changed.is_set():
                    self.active.changed.clear()
                    self._state_dirty = True
                if time.monotonic() - last_state > HEARTBEAT_S:
                    # the retained status's ts and the state advance: the fleet tells a stuck loop by them
                    self._state_dirty, last_state = True, time.monotonic()
                    self.link.publish_status()
                # State before events: the server marks a device updated on its 'committed' event, and its
                # registry (active version) should not lag behind that.
                if self._state_dirty and self.link.publish_state(self.state_doc()):
                    self._state_dirty = False
                self.drain.run_once()
                self._step_failures = 0
                self._last_failure = None  # a reason coming back after a good pass is reported again
            except Exception as exc:  # see _failed: the loop outlives any one step (ENOSPC, MemoryError, a bug)
                self._failed("step", exc)
                self._step_failures += 1
                self.heartbeat.beat(self._passes, self.machine.state.value, force=True)  # alive, backing off
                # Back off while the same step keeps failing (a full disk, a broken slot): 0.5 s doubling to 60 s.
                self._wake.wait(min(60.0, 0.5 * 2 ** min(self._step_failures - 1, 7)))
                self._wake.clear()
                continue
            if self.machine.state not in (before, UpdateState.IDLE):
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
            self._event("agent_error", where=where, state=self.machine.state.value, reason=reason)
        except Exception as exc2:  # the buffer itself may be what fails (a full disk)
            log.error("could not record agent_error: %s", exc2)
