"""Named crash points for the agent's kill tests.

`EDGEFLEET_FAILPOINTS=name[,name...]` makes the process SIGKILL itself when it reaches one of the
names, so tests can stop a real agent between any two durable steps. Unset, it costs a set lookup.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(p for p in os.environ.get("EDGEFLEET_FAILPOINTS", "").split(",") if p)


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
