"""edgefleet.runtime: load a verified bundle, run it on CPU or an accelerator, keep telemetry.

    model = edgefleet.runtime.load("digits-1.0.0.efb", trusted_keys=["publisher.pub"])
    y = model.predict(x)          # float in, float out; int8 files are (de)quantized for you
    model.info.accelerator        # what actually runs it

Needs `pip install 'edgefleet[runtime]'` (onnxruntime, ai-edge-litert, paho-mqtt); never torch or tensorflow.
"""

from __future__ import annotations

from edgefleet import BundleError, InputError

from ._agent import Agent, UpdateState
from ._aggregate import WindowAggregator
from ._backends import Session, SessionOptions
from ._config import AgentConfig, HealthPolicy, MqttConfig, load_config
from ._model import GoldenResult, Model, ModelInfo, SessionFactory, load
from ._netloop import NetworkLoop
from ._telemetry import BufferStats, TelemetryBuffer

__all__ = [
    "Agent",
    "AgentConfig",
    "BufferStats",
    "BundleError",
    "GoldenResult",
    "HealthPolicy",
    "InputError",
    "Model",
    "ModelInfo",
    "MqttConfig",
    "NetworkLoop",
    "Session",
    "SessionFactory",
    "SessionOptions",
    "TelemetryBuffer",
    "UpdateState",
    "WindowAggregator",
    "load",
    "load_config",
]
