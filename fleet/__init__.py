"""edgefleet.fleet: the fleet server (MQTT ingest, drift aggregation, canary rollouts, dashboard).

    from edgefleet.fleet import FleetServer, ServerConfig
    server = FleetServer(ServerConfig(data_dir=Path("fleet-data"), trusted_keys=[Path("publisher.pub")]))

Needs `pip install 'edgefleet[fleet]'`. Names load on first use, so `edgefleet --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._auth import create_token
    from ._drift import DriftMonitor
    from ._ingest import IngestWorker
    from ._provision import provision
    from ._rollout import RolloutEngine
    from ._server import FleetServer, ServerConfig
    from ._simulate import Simulation

__all__ = [
    "DriftMonitor",
    "FleetServer",
    "IngestWorker",
    "RolloutEngine",
    "ServerConfig",
    "Simulation",
    "create_token",
    "provision",
]

_WHERE = {
    "DriftMonitor": "._drift",
    "FleetServer": "._server",
    "IngestWorker": "._ingest",
    "RolloutEngine": "._rollout",
    "ServerConfig": "._server",
    "Simulation": "._simulate",
    "create_token": "._auth",
    "provision": "._provision",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'edgefleet.fleet' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
