"""A/B bundle slots with an atomically switched active pointer.

Layout under the agent's data directory:

    slots/a/bundle.efb, slots/b/bundle.efb    the two slots (each written temp -> fsync -> rename)
    active.json                               {"slot", "name", "version", "sha256"}: what runs

Switching writes active.json through a temp file, fsync, rename and a directory fsync, so after a
crash the pointer names exactly the old or exactly the new slot, and that slot's file is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet._bundle import sha256_file
from edgefleet._fs import atomic_copy, atomic_write

from ._failpoints import failpoint

__all__ = ["SlotInfo", "SlotStore"]

SLOTS = ("a", "b")


@dataclass(frozen=True)
class SlotInfo:
    slot: str
    name: str
    version: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SlotStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for s in SLOTS:
            (self.root / "slots" / s).mkdir(parents=True, exist_ok=True)
        self.pointer = self.root / "active.json"
        # Leftover temp files are from a write a crash interrupted; the rename never happened.
        for s in SLOTS:
            for tmp in (self.root / "slots" / s).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        for tmp in self.root.glob(".active.json.*.tmp"):
            tmp.unlink(missing_ok=True)
        # This store is the pointer's only writer, so what it read or wrote last is what is on disk;
        # the agent asks many times a second.
        self._active: SlotInfo | None = None
        self._known = False

    def path(self, slot: str) -> Path:
        return self.root / "slots" / slot / "bundle.efb"

    def active(self) -> SlotInfo | None:
        """The active slot, or None before the first install. A pointer that does not parse is an error."""
        if self._known:
            return self._active
        if not self.pointer.exists():
            return None
        d = json.loads(self.pointer.read_text())
        self._active = SlotInfo(str(d["slot"]), str(d["name"]), str(d["version"]), str(d["sha256"]))
        self._known = True
        return self._active

    def inactive(self) -> str:
        a = self.active()
        return "b" if a is not None and a.slot == "a" else "a"

    def holds(self, info: SlotInfo) -> bool:
        p = self.path(info.slot)
        return p.exists() and sha256_file(p) == info.sha256

    def stage(self, src: Path, slot: str) -> str:
        """Copy the verified bundle SRC into SLOT (atomically); returns its sha256."""
        dest = self.path(slot)
        atomic_copy(
            src,
            dest,
            before_rename=lambda: failpoint("stage.temp_written"),
            after_rename=lambda: failpoint("stage.renamed"),
        )
        return sha256_file(dest)

    def switch(self, info: SlotInfo) -> None:
        """Point at INFO's slot: after this returns (or a crash in it) the pointer is old or new, whole."""
        self._known = False
        atomic_write(
            self.pointer,
            json.dumps(info.to_dict(), sort_keys=True).encode(),
            before_rename=lambda: failpoint("switch.temp_written"),
            after_rename=lambda: failpoint("switch.renamed"),
        )
