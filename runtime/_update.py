"""The work of each update state, one handler per state, moving only through the transition table.

Each handler's work is safe to repeat after a crash (a restart resumes the persisted state and runs
its handler again), and ends in one `fire` of the machine or a retry. The active model is whatever
`active.json` names; it only ever changes by an atomic rename (see `_slots`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet import BundleError, EdgefleetError
from edgefleet._manifest import semver_key
from edgefleet.protocol import BundleRef, Desired

from ._active import ActiveModel
from ._download import DownloadError
from ._failpoints import failpoint
from ._health import HealthWatch, golden_p95
from ._model import Model
from ._slots import SlotInfo, SlotStore
from ._update_machine import BEFORE_SWITCH, UpdateEvent, UpdateMachine, UpdateState, history_key

__all__ = ["Updater"]

log = logging.getLogger("edgefleet.agent")

_DOWNLOAD_RETRIES = 8
# Restarts an update survives before the switch: a power cut mid-download is normal, a bundle whose
# verification or smoke test kills the process every time is not (it would never let the device rest).
_MAX_RESUMES = 3

E, S = UpdateEvent, UpdateState
Emit = Callable[..., None]


def _older(a: str, b: str) -> bool:
    """Whether bundle version A precedes B (semver precedence: 1.0.0-rc.1 comes before 1.0.0)."""
    try:
        return semver_key(a) < semver_key(b)
    except ValueError:
        return False  # versions are checked when bundles are read; an odd one is not a downgrade order


def _named(slot: SlotInfo) -> dict[str, str]:
    """How events name a bundle a slot holds (a bundle object, as every event's bundle fields)."""
    return {"name": slot.name, "version": slot.version, "sha256": slot.sha256}


def _key(ref: BundleRef | None) -> str:
    return f"{ref.name}:{ref.version}" if ref else "?"


class _Download:
    """One bundle download in its own thread, so the agent's loop keeps sending telemetry and answering
    orders meanwhile (a slow server could otherwise hold it for minutes)."""

    def __init__(self, fetch: Callable[..., Path], ref: BundleRef, directory: Path, on_done: Callable[[], None]):
        self.ref = ref
        self.cancel = threading.Event()
        self.superseded = False  # cancelled for a newer order: not a failed attempt
        self.result: Path | None = None
        self.error: BaseException | None = None
        self._fetch, self._dir, self._on_done = fetch, directory, on_done
        self.thread = threading.Thread(target=self._run, name="edgefleet-download", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fetch(self.ref, self._dir, self.cancel)
        except BaseException as exc:  # handed to the loop thread, which decides what it means
            self.error = exc
        finally:
            self._on_done()

    def stop(self) -> None:
        self.superseded = True
        self.cancel.set()


class Updater:
    """Runs the update machine against the slots: `consider` offers, `step` does a state's work."""

    def __init__(
        self,
        machine: UpdateMachine,
        slots: SlotStore,
        downloads: Path,
        active: ActiveModel,
        watch: HealthWatch,
        *,
        load: Callable[[Path], Model],
        fetch: Callable[[BundleRef, Path], Path],
        emit: Emit,
        max_watch_restarts: int,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.machine, self.slots, self.downloads = machine, slots, downloads
        self.active, self.watch = active, watch
        self._load, self._fetch, self._emit = load, fetch, emit
        self._max_watch_restarts = max_watch_restarts
        self._wake = wake
        self._job: _Download | None = None
        self.backoff_until = 0.0
        self._handlers: dict[UpdateState, Callable[[Desired], None]] = {
            S.DOWNLOADING: self._downloading,
            S.VERIFYING: self._verifying,
            S.STAGING: self._staging,
            S.SMOKE_TEST: self._smoke_test,
            S.SWITCHING: self._switching,
            S.HEALTH_WATCH: self._health_watch,
            S.COMMITTING: self._committing,
            S.ROLLING_BACK: self._rolling_back,
        }

    @property
    def record(self) -> Any:
        return self.machine.record

    # -- offers ----------------------------------------------------------------------------------
    def consider(self, d: Desired) -> None:
        """Start, redirect, supersede or refuse an update to the desired state D."""
        st = self.record
        ref = d.bundle
        target = st.target.bundle if st.target else None
        if st.state != S.IDLE:
            if target is not None and target.sha256 == ref.sha256:
                if st.state == S.DOWNLOADING and target.url != ref.url:
                    # The same bundle at a corrected URL: fetch it from there now, not once the old URL's
                    # retries have run out (about 90 s of back-off).
                    self.machine.update(target=d, attempts=0)
                    self.backoff_until = 0.0
                    if self._job is not None:
                        self._job.stop()  # the old URL's transfer ends; the next step starts the new one
                return
            if st.state not in BEFORE_SWITCH:
                return  # finish the health window first; the latest desired is looked at again when idle
            self._emit("update_superseded", old=target.to_dict() if target else None, new=ref.to_dict())
            if self._job is not None:
                self._job.stop()
            self.machine.fire(E.SUPERSEDED, target=None, target_slot=None, attempts=0)
        active = self.slots.active()
        if active is not None and active.sha256 == ref.sha256:
            return
        key = _key(ref)
        if key in st.refused and st.refused[key] == d.rollout:
            return  # rolled back from in this rollout already; only a new rollout may offer it again
        committed = st.committed
        if d.action == "rollback":
            # A rollback goes back to something this device ran; any other older bundle is a downgrade.
            ran = st.history or (
                [history_key(committed.name, committed.version, committed.sha256)] if committed else []
            )
            if history_key(ref.name, ref.version, ref.sha256) not in ran:
                self._refuse("refused_rollback", key, d, "rollback to a bundle this device never committed")
                return
        elif committed is not None and committed.name == ref.name and _older(ref.version, committed.version):
            self._refuse("refused_downgrade", key, d, "downgrade below the committed version")
            return
        self.machine.fire(E.OFFERED, target=d)

    def _refuse(self, what: str, key: str, d: Desired, reason: str) -> None:
        # Once per offer: the server's retained desired state arrives again on every reconnect.
        if (self.record.last_result or {}).get(what) != key:
            self._emit("update_refused", bundle=d.bundle.to_dict(), rollout=d.rollout, reason=reason)
            self.machine.update(last_result={what: key})

    # -- restarts ----------------------------------------------------------------------------------
    def recover(self, initial_bundle: Path | None) -> None:
        """Bring the device to a consistent state after a restart, whatever was interrupted."""
        st = self.record
        active = self.slots.active()
        if active is not None and not self.slots.holds(active):
            # Cannot happen with atomic writes short of disk corruption; fall back to the other slot.
            self._emit("slot_corrupt", slot=active.slot, bundle=_named(active))
            prev = st.previous or st.committed
            if prev is not None and prev.slot != active.slot and self.slots.holds(prev):
                self.slots.switch(prev)
                active = prev
            else:
                active = None
        self.resume()
        if st.state == S.IDLE and active is None and initial_bundle is not None:
            self.install_initial(initial_bundle)
            return
        self.active.activate(self.slots.active())
        if st.state in (S.ROLLING_BACK, S.COMMITTING):
            self.step()
        elif st.state == S.HEALTH_WATCH:
            self.watch.begin(self._load_control())

    def resume(self) -> bool:
        """Count a restart into the update in progress. False: it has restarted too often and was ended
        (failed before the switch, rolled back in the health window)."""
        st = self.record
        if st.state == S.IDLE:
            return True
        resumes = st.resumes + 1
        if st.state == S.HEALTH_WATCH and resumes > self._max_watch_restarts:
            reason = f"the agent restarted {resumes} times during the health window"
            self.machine.fire(E.UNHEALTHY, resumes=resumes, last_result={"reason": reason}, reason=reason)
            return False
        if st.state in BEFORE_SWITCH and resumes > _MAX_RESUMES:
            self.machine.update(resumes=resumes)
            self.fail(f"the agent restarted {resumes} times during {st.state.value}")
            return False
        self.machine.update(resumes=resumes)
        return True

    def install_initial(self, path: Path) -> None:
        """Install the config's initial bundle into an empty device."""
        # Loading verifies signature and hashes, and that every op runs here.
        with self._load(path) as m:
            name, version = m.manifest.name, m.manifest.version
        slot = self.slots.inactive()
        sha = self.slots.stage(path, slot)
        info = SlotInfo(slot, name, version, sha)
        self.slots.switch(info)
        self.machine.fire(E.INSTALLED, committed=info)
        self.active.activate(info)
        self._emit("installed", bundle=_named(info))

    # -- the work of each state --------------------------------------------------------------------
    def step(self) -> None:
        """Do the work of the current state once."""
        st = self.record
        if st.state == S.IDLE or time.monotonic() < self.backoff_until:
            return
        if st.target is None:
            raise BundleError(f"update state {st.state.value} has no target in agent.json")
        self._handlers[st.state](st.target)

    def fail(self, reason: str) -> None:
        """End the update before the switch: report, forget the download, refuse the bundle in its rollout."""
        target = self.record.target
        b = target.bundle.to_dict() if target else {}
        self._emit("update_failed", target=b or None, rollout=target.rollout if target else None, reason=reason)
        self._clear_downloads()
        refused = {**self.record.refused, _key(target.bundle if target else None): target.rollout if target else None}
        self.machine.fire(
            E.FAILED,
            target=None,
            target_slot=None,
            last_result={"result": "failed", "reason": reason, "bundle": b},
            refused=refused,
            reason=reason,
        )

    def _clear_downloads(self) -> None:
        for p in self.downloads.glob("*.efb*"):
            p.unlink(missing_ok=True)

    def _slot_with(self, sha: str) -> str | None:
        return next((s for s in ("a", "b") if self.slots.holds(SlotInfo(s, "", "", sha))), None)

    def _downloading(self, d: Desired) -> None:
        ref = d.bundle
        kept = self._slot_with(ref.sha256)
        active = self.slots.active()
        if kept is not None and kept != (active.slot if active else None):
            # Still in the inactive slot from an earlier try; the smoke test's load verifies it again.
            self.machine.fire(E.ALREADY_STAGED, target_slot=kept)
            return
        job = self._job
        if job is not None and job.ref != ref and not job.superseded:
            job.stop()  # another target or URL: that transfer is no longer wanted
        if job is None or (job.superseded and not job.thread.is_alive()):
            # One transfer at a time: a cancelled one may still be writing the same part file.
            self._job = _Download(self._fetch, ref, self.downloads, self._wake)
            return
        if job.thread.is_alive():
            return
        self._job = None
        if job.superseded:
            return
        exc = job.error
        if isinstance(exc, DownloadError):
            attempts = self.record.attempts + 1
            if attempts >= _DOWNLOAD_RETRIES:
                self.fail(f"download failed {attempts} times: {exc}")
            else:
                self.machine.update(attempts=attempts)
                self.backoff_until = time.monotonic() + min(30.0, 0.5 * 2**attempts)
            return
        if isinstance(exc, BundleError):
            self.fail(str(exc))
            return
        if exc is not None:
            raise exc  # a bug or a full disk: the loop reports it and retries the step
        self.machine.fire(E.DOWNLOADED)

    @property
    def downloading(self) -> bool:
        """Whether a transfer is under way in its thread."""
        return self._job is not None and self._job.thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop a transfer under way (its part file stays for a resume)."""
        job, self._job = self._job, None
        if job is not None:
            job.stop()
            job.thread.join(timeout)

    def _verifying(self, d: Desired) -> None:
        ref = d.bundle
        failpoint("verify.before")
        try:
            # Loading verifies signature and hashes, the runtime requirements and that every op is known here.
            with self._load(self.downloads / f"{ref.sha256}.efb") as m:
                got = (m.manifest.name, m.manifest.version)
            if got != (ref.name, ref.version):
                raise BundleError(f"downloaded bundle is {got[0]} {got[1]}, not {ref.name} {ref.version}")
        except (BundleError, FileNotFoundError) as exc:
            self.fail(f"verification failed: {exc}")
            return
        failpoint("verify.after")
        self.machine.fire(E.VERIFIED)

    def _staging(self, d: Desired) -> None:
        slot = self.slots.inactive()
        try:
            self.slots.stage(self.downloads / f"{d.bundle.sha256}.efb", slot)
        except OSError as exc:
            self.fail(f"staging into slot {slot} failed: {exc}")
            return
        failpoint("stage.done")
        self.machine.fire(E.STAGED, target_slot=slot)

    def _smoke_test(self, d: Desired) -> None:
        failpoint("smoke.before")
        slot = self.record.target_slot or ""
        self.active.drop_staged()
        try:
            cand = self._load(self.slots.path(slot))
        except (BundleError, OSError) as exc:
            self.fail(f"smoke test failed: {exc}")
            return
        try:
            res = cand.check_golden()
            new_ms = golden_p95(cand)
        except (BundleError, OSError) as exc:
            cand.close()
            self.fail(f"smoke test failed: {exc}")
            return
        if not res.ok:
            cand.close()
            self.fail(f"smoke test failed: golden outputs differ by {res.max_abs_diff:.4g} (atol {res.atol:.4g})")
            return
        self.active.stage(slot, d.bundle.sha256, cand)
        old_ms = golden_p95(self.active.model)
        failpoint("smoke.after")
        self.machine.fire(E.SMOKE_PASSED, old_p95_ms=old_ms, last_result={"smoke_p95_ms": new_ms})

    def _switching(self, d: Desired) -> None:
        ref, st = d.bundle, self.record
        slot = st.target_slot or ""
        active = self.slots.active()
        if active is None or active.slot != slot or active.sha256 != ref.sha256:
            if st.previous is None or (active is not None and active.slot != slot):
                self.machine.update(previous=active)
            failpoint("switch.before")
            self.slots.switch(SlotInfo(slot, ref.name, ref.version, ref.sha256))
        failpoint("switch.after")
        # The previous bundle, still loaded, becomes the health window's latency control.
        old = self.active.activate(self.slots.active(), self.active.take_staged(slot, ref.sha256), keep=st.previous)
        if st.previous is None:
            # First install through the fleet: nothing to roll back to, so nothing to watch against.
            if old is not None:
                old.close()
            self.machine.fire(E.FIRST_INSTALL)
        else:
            self.machine.fire(E.SWITCHED)
            self.watch.begin(old)

    def _load_control(self) -> Model | None:
        """The previous bundle, loaded again as the health window's latency control after a restart."""
        prev = self.record.previous
        if prev is None:
            return None
        try:
            return self._load(self.slots.path(prev.slot))
        except (EdgefleetError, OSError) as exc:
            log.warning("cannot load the previous bundle as latency control: %s", exc)
            return None

    def _health_watch(self, d: Desired) -> None:
        verdict = self.watch.tick(self.active.model, self.record.old_p95_ms)
        if verdict is None:
            return
        if verdict.healthy:
            self.machine.fire(E.HEALTHY, last_result={"health": verdict.summary})
        else:
            last = {"reason": verdict.reason, "health": verdict.summary}
            self.machine.fire(E.UNHEALTHY, last_result=last, reason=verdict.reason)

    def _committing(self, d: Desired) -> None:
        ref, st = d.bundle, self.record
        failpoint("commit.before")
        active = self.slots.active()
        # Reported before it is recorded: a crash in between reports it twice, never not at all.
        self._emit("committed", bundle=ref.to_dict(), rollout=d.rollout)
        result = {"result": "committed", "bundle": ref.to_dict(), "health": (st.last_result or {}).get("health")}
        self.machine.fire(
            E.COMMITTED, committed=active, target=None, target_slot=None, previous=None, last_result=result
        )
        self._clear_downloads()
        failpoint("commit.after")

    def _rolling_back(self, d: Desired) -> None:
        ref, st = d.bundle, self.record
        failpoint("rollback.before")
        prev = st.previous
        active = self.slots.active()
        if prev is not None and (active is None or active.slot != prev.slot):
            self.slots.switch(prev)
        failpoint("rollback.switched")
        self.active.activate(self.slots.active())
        reason = (st.last_result or {}).get("reason", "health window failed")
        self._emit("rolled_back", bundle=ref.to_dict(), rollout=d.rollout, reason=reason)
        self.machine.fire(
            E.ROLLED_BACK,
            target=None,
            target_slot=None,
            previous=None,
            refused={**st.refused, _key(ref): d.rollout},
            last_result={"result": "rolled_back", "bundle": ref.to_dict(), "reason": reason},
        )
        self._clear_downloads()  # the refused bundle's file would otherwise stay until the next update ends
        failpoint("rollback.after")
