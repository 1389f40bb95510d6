"""edgefleet.protocol: the MQTT contract between device agents and the fleet server, as code.

What docs/topics.md specifies, for the agent, the server and third-party implementations alike:

    from edgefleet.protocol import topic, parse_desired, check_window
    topic("cam-7", "telemetry")          # "edgefleet/v1/devices/cam-7/telemetry"
    desired = parse_desired(json.loads(payload))   # InputError naming what is wrong

Topics and payload schemas (`topic`, `parse_topic`, the `*_SCHEMA` names), the server's orders
(`Desired`, `BundleRef`, `Command` and their validators), what devices send (`parse_status`,
`parse_state`, `parse_event` and their records), telemetry windows (`check_window`, the
latency histogram's `LATENCY_EDGES_MS`, `latency_quantile`), and the latency rule devices and rollouts
both apply (`latency_regressed`). Everything here validates what it reads and needs only the core
install.
"""

from __future__ import annotations

from ._messages import (
    BUNDLE_FIELDS,
    EVENT_TYPES,
    UPDATE_STATES,
    Event,
    State,
    Status,
    check_bundle_name,
    parse_event,
    parse_state,
    parse_status,
)
from ._telemetry import (
    LATENCY_EDGES_MS,
    WINDOW_SCHEMA,
    Bins,
    baseline_bins,
    check_window,
    latency_quantile,
    latency_regressed,
)
from ._topics import (
    COMMAND_SCHEMA,
    COMMANDS,
    DESIRED_SCHEMA,
    DEVICE_ID,
    EVENT_SCHEMA,
    KINDS,
    MAX_CAPTURE_SAMPLES,
    REFUSAL_SCHEMA,
    ROOT,
    STATE_SCHEMA,
    STATUS_SCHEMA,
    BundleRef,
    Command,
    Desired,
    Refusal,
    check_device_id,
    parse_command,
    parse_desired,
    parse_refusal,
    parse_topic,
    topic,
)

__all__ = [
    "BUNDLE_FIELDS",
    "COMMANDS",
    "COMMAND_SCHEMA",
    "DESIRED_SCHEMA",
    "DEVICE_ID",
    "EVENT_SCHEMA",
    "EVENT_TYPES",
    "KINDS",
    "LATENCY_EDGES_MS",
    "MAX_CAPTURE_SAMPLES",
    "REFUSAL_SCHEMA",
    "ROOT",
    "STATE_SCHEMA",
    "STATUS_SCHEMA",
    "UPDATE_STATES",
    "WINDOW_SCHEMA",
    "Bins",
    "BundleRef",
    "Command",
    "Desired",
    "Event",
    "Refusal",
    "State",
    "Status",
    "baseline_bins",
    "check_bundle_name",
    "check_device_id",
    "check_window",
    "latency_quantile",
    "latency_regressed",
    "parse_command",
    "parse_desired",
    "parse_event",
    "parse_refusal",
    "parse_state",
    "parse_status",
    "parse_topic",
    "topic",
]
