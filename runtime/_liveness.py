"""Whether an agent is alive and not stuck: its loop writes a heartbeat file at most every few seconds, and
republishes its retained status (whose `ts` then advances) every HEARTBEAT_S. A loop that stopped while the
process and its MQTT connection live on shows as a heartbeat that no longer moves: `edgefleet agent status`
reads the file, the fleet the status."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["HEARTBEAT_FILE", "HEARTBEAT_S", "Heartbeat", "agent_status"]

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_S = 30.0  # the retained status and state are republished at least this often
_WRITE_S = 5.0  # the heartbeat file at most this often (a write per loop pass would cost the device's flash)


class Heartbeat:
    """The loop's heartbeat file in the agent's data directory."""

    def __init__(self, root: Path) -> None:
        self.path = root / HEARTBEAT_FILE
        self._written = -_WRITE_S

    def beat(self, passes: int, state: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < _WRITE_S:
            return
        self._written = now
        doc = {"pid": os.getpid(), "ts": time.time(), "passes": passes, "update_state": state}
        tmp = self.path.with_suffix(".tmp")
        try:
            # No fsync: a heartbeat lost to a power cut says nothing wrong (the agent is not running then).
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full disk is reported by the steps that need it; the heartbeat then ages, as it should


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process of that id: it exists
    return True


# A loop backing off a failing step waits up to 60 s between passes (and beats before it waits).
DEFAULT_MAX_AGE_S = 90.0


def agent_status(root: Path, max_age_s: float = DEFAULT_MAX_AGE_S) -> dict[str, Any]:
    """What the heartbeat in data directory ROOT says: `running` (the agent's process exists), `age_s` of
    its loop's last beat, `healthy` (running and beating within MAX_AGE_S), and the update state then."""
    path = root / HEARTBEAT_FILE
    try:
        doc = json.loads(path.read_text())
        pid, ts = int(doc["pid"]), float(doc["ts"])
    except FileNotFoundError:
        return {"running": False, "healthy": False, "reason": f"no heartbeat in {root}: the agent never ran there"}
    except (OSError, ValueError, KeyError, TypeError):
        return {"running": False, "healthy": False, "reason": f"{path} is unreadable"}
    age = max(0.0, time.time() - ts)
    running = _alive(pid)
    out: dict[str, Any] = {
        "running": running,
        "pid": pid,
        "age_s": round(age, 1),
        "passes": doc.get("passes"),
        "update_state": doc.get("update_state"),
        "healthy": running and age <= max_age_s,
    }
    if not running:
        out["reason"] = f"not running (process {pid} is gone; its last loop pass was {age:.0f} s ago)"
    elif age > max_age_s:
        out["reason"] = f"stuck: process {pid} runs, but its loop last passed {age:.0f} s ago (limit {max_age_s:g} s)"
    return out
