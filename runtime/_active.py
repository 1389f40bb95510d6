"""The model `Agent.predict` runs, and the smoke-tested candidate kept open for the switch."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ._model import Model
from ._slots import SlotInfo

__all__ = ["ActiveModel"]


class ActiveModel:
    """Which slot's model is active, swapped under a lock while the app's threads call `model`."""

    def __init__(
        self, load: Callable[[Path], Model], attach: Callable[[Model], None], slot_path: Callable[[str], Path]
    ):
        self._load, self._attach, self._slot_path = load, attach, slot_path
        self.lock = threading.RLock()
        self.model: Model | None = None
        self.info: SlotInfo | None = None
        self.recent_ms: deque[float] = deque(maxlen=500)
        # A smoke-tested candidate (slot, sha256, model): each load verifies the whole bundle again, and an
        # update needed four.
        self._staged: tuple[str, str, Model] | None = None
        self.changed = threading.Event()  # set on every swap, for the state document

    def activate(self, info: SlotInfo | None, model: Model | None = None, keep: SlotInfo | None = None) -> Model | None:
        """Make the model in INFO's slot the active one (None: no model). MODEL: that slot's bundle, already
        loaded and checked. The model it replaces is closed, or returned when it is KEEP's."""
        new = None
        if info is not None:
            new = model if model is not None else self._load(self._slot_path(info.slot))
            self._attach(new)
        with self.lock:
            old, self.model = self.model, new
            old_info, self.info = self.info, info
        self.recent_ms.clear()
        self.changed.set()
        if old is None:
            return None
        if keep is not None and old_info is not None and (old_info.slot, old_info.sha256) == (keep.slot, keep.sha256):
            old.detach_telemetry()
            return old
        old.close()
        return None

    def stage(self, slot: str, sha256: str, model: Model) -> None:
        self.drop_staged()
        self._staged = (slot, sha256, model)

    def take_staged(self, slot: str, sha256: str) -> Model | None:
        st = self._staged
        if st is not None and (st[0], st[1]) == (slot, sha256):
            self._staged = None
            return st[2]
        self.drop_staged()
        return None

    def drop_staged(self) -> None:
        if self._staged is not None:
            self._staged[2].close()
            self._staged = None

    def flush(self) -> None:
        with self.lock:
            if self.model is not None:
                self.model.flush_telemetry()
