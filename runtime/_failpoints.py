"""Named crash and fault points for the agent's kill and fault-injection tests.

`EDGEFLEET_FAILPOINTS=name[,name...]` makes the process SIGKILL itself when it reaches one of the
names, so tests can stop a real agent between any two durable steps. `EDGEFLEET_FAULTS=name[:ERRNO],...`
makes the first arrival at each name raise `OSError` (ENOSPC unless another errno name is given, e.g.
`commit.before:EIO`): a write that fails once there, as on a disk that fills up and is then freed. Unset,
either costs a set lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

_ACTIVE = frozenset(p for p in os.environ.get("EDGEFLEET_FAILPOINTS", "").split(",") if p)


def _faults(spec: str) -> dict[str, int]:
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, code = item.partition(":")
        value = getattr(errno, code or "ENOSPC", None)
        if not isinstance(value, int):
            raise ValueError(f"EDGEFLEET_FAULTS: {code!r} is not an errno name (e.g. ENOSPC, EIO)")
        out[name] = value
    return out


_FAULTS = _faults(os.environ.get("EDGEFLEET_FAULTS", ""))
_fired: set[str] = set()
_lock = threading.Lock()


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
    code = _FAULTS.get(name)
    if code is not None:
        with _lock:
            if name in _fired:
                return
            _fired.add(name)
        raise OSError(code, f"{os.strerror(code)} (injected at {name})")
