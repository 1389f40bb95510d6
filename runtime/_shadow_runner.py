"""The agent's side of shadow orders: fetch and load the candidate off the loop, start its run when ready,
report progress and the end; a newer order supersedes the one before it (a fetch under way is cancelled,
a run is ended with its report)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.protocol import BundleRef, Command

from ._model import Model
from ._shadow import Shadow

__all__ = ["ShadowRunner"]


class ShadowRunner:
    def __init__(
        self,
        *,
        emit: Callable[..., None],
        fetch: Callable[[BundleRef, Path, threading.Event], Path],
        load: Callable[[Path], Model],
        wake: Callable[[], None],
        directory: Path,
        cpu_share: float,
        progress_s: float,
    ) -> None:
        self._emit, self._fetch, self._load, self._wake = emit, fetch, load, wake
        self.directory, self.cpu_share, self.progress_s = directory, cpu_share, progress_s
        self.current: Shadow | None = None
        # The order whose candidate is being fetched (command id, cancel), and the candidates ready to run.
        self._fetching: tuple[str, threading.Event] | None = None
        self._ready: queue.Queue[tuple[Command, BundleRef, Model, threading.Event]] = queue.Queue()

    def order(self, c: Command) -> None:
        """A `shadow` command: fetch and load the candidate in a thread of its own (a slow download must not
        hold up the loop's telemetry and orders); `check` starts the run once it is ready."""
        ref = BundleRef.parse(c.args.get("bundle"), "shadow command bundle")  # parse_command checked it
        self.cancel()
        cancel = threading.Event()
        self._fetching = (c.id, cancel)
        threading.Thread(
            target=self._prepare, args=(c, ref, cancel), name="edgefleet-shadow-fetch", daemon=True
        ).start()

    def cancel(self) -> None:
        """Cancel a fetch under way (a newer order, or the agent stops)."""
        if self._fetching is not None:
            self._fetching[1].set()

    def _prepare(self, c: Command, ref: BundleRef, cancel: threading.Event) -> None:
        try:
            model = self._load(self._fetch(ref, self.directory, cancel))
        except Exception as exc:  # a download or disk error, a refused bundle, a bug: reported, never silent
            if not cancel.is_set():
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._emit("shadow_failed", command_id=c.id, reason=reason)
            return
        if cancel.is_set():
            model.close()  # superseded, or the agent stops
            return
        self._ready.put((c, ref, model, cancel))
        self._wake()

    def check(self) -> None:
        """On the agent's loop: start the runs that are ready, report progress, end a run that is done."""
        while True:
            try:
                c, ref, model, cancel = self._ready.get_nowait()
            except queue.Empty:
                break
            if cancel.is_set():  # superseded after it was fetched
                model.close()
                continue
            self._start(c, ref, model)
        sh = self.current
        if sh is None:
            return
        now = time.monotonic()
        if sh.done(now):
            self.current = None
            self._end(sh)
        elif sh.progress_due(now):
            self._emit("shadow_progress", **sh.progress())

    def due_in(self, now: float) -> float | None:
        """Seconds until the run's next progress report or its end (None: no run)."""
        sh = self.current
        return None if sh is None else min(sh.deadline, sh.progress_at) - now

    def _start(self, c: Command, ref: BundleRef, model: Model) -> None:
        if self._fetching is not None and self._fetching[0] == c.id:
            self._fetching = None
        old, self.current = (
            self.current,
            Shadow(
                model,
                ref,
                float(c.args.get("sample_rate", 0.1)),
                float(c.args.get("duration_s", 60)),
                c.id,
                int(c.args.get("min_samples", 0)),
                cpu_share=self.cpu_share,
                progress_s=self.progress_s,
            ),
        )
        if old is not None:
            self._end(old, superseded_by=c.id)
        self._emit("shadow_started", command_id=c.id, candidate={"name": ref.name, "version": ref.version})

    def _end(self, sh: Shadow, **extra: Any) -> None:
        report = sh.report()  # stops the run: the last progress covers everything
        self._emit("shadow_progress", **sh.progress())
        self._emit("shadow_report", **report, **extra)
