"""The server's Prometheus text (`/metrics`): devices, ingest outcomes, drift alerts and PSI."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._server import FleetServer

__all__ = ["metrics_text"]


def metrics_text(server: FleetServer) -> str:
    c = server.db.counters()
    lines = [
        "# HELP edgefleet_devices Registered devices.",
        "# TYPE edgefleet_devices gauge",
        f"edgefleet_devices {server.db.query('SELECT COUNT(*) FROM devices')[0][0]}",
        "# HELP edgefleet_devices_online Devices whose last status says online.",
        "# TYPE edgefleet_devices_online gauge",
        f"edgefleet_devices_online {server.db.query('SELECT COUNT(*) FROM devices WHERE online = 1')[0][0]}",
        "# HELP edgefleet_ingest_messages_total Messages handled by ingest workers, by outcome.",
        "# TYPE edgefleet_ingest_messages_total counter",
    ]
    for k in ("received", "stored", "duplicates", "rejected", "unknown_device"):
        lines.append(f'edgefleet_ingest_messages_total{{outcome="{k}"}} {c.get("ingest_" + k, 0)}')
    lines += [
        "# HELP edgefleet_ingest_refused_total Device messages refused (and answered on the device's refusals topic).",
        "# TYPE edgefleet_ingest_refused_total counter",
    ]
    for kind in ("telemetry", "events", "state", "status"):
        lines.append(f'edgefleet_ingest_refused_total{{kind="{kind}"}} {c.get("ingest_refused_" + kind, 0)}')
    # Per device, bounded: how many devices had messages refused (which ones, and why: the device pages and
    # GET /api/devices/ID/refusals; a label per device or per free-text reason would be unbounded).
    refusing = dict(server.db.query("SELECT kind, COUNT(DISTINCT device_id) FROM refusals GROUP BY kind"))
    lines += [
        "# HELP edgefleet_ingest_refusing_devices Devices that had messages of this kind refused.",
        "# TYPE edgefleet_ingest_refusing_devices gauge",
    ]
    for kind in ("telemetry", "events", "state", "status"):
        lines.append(f'edgefleet_ingest_refusing_devices{{kind="{kind}"}} {int(refusing.get(kind, 0))}')
    lines += [
        "# HELP edgefleet_capture_uploads_refused_total Capture uploads the server refused (no device token, not "
        "asked, answered already, too large, too many samples, labels outside the bundle's classes, not an .npz).",
        "# TYPE edgefleet_capture_uploads_refused_total counter",
        f"edgefleet_capture_uploads_refused_total {c.get('capture_uploads_refused', 0)}",
    ]
    alerts = server.db.query(
        "SELECT bundle_name, bundle_version, cohort, feature FROM alerts WHERE state = 'open' ORDER BY 1, 2, 3, 4"
    )
    lines += [
        "# HELP edgefleet_drift_alerts_open Open drift alerts.",
        "# TYPE edgefleet_drift_alerts_open gauge",
        f"edgefleet_drift_alerts_open {len(alerts)}",
        "# HELP edgefleet_drift_alert One per open drift alert (bundle, cohort, feature).",
        "# TYPE edgefleet_drift_alert gauge",
    ]
    for n, v, cohort, feature in alerts:
        lines.append(
            f'edgefleet_drift_alert{{bundle="{n}:{v}",cohort="{_label(cohort)}",feature="{_label(feature)}"}} 1'
        )
    lines += [
        "# HELP edgefleet_accuracy Accuracy on fed-back labels at the last drift check (cohort '*': all devices).",
        "# TYPE edgefleet_accuracy gauge",
    ]
    for (b, cohort), value in sorted(server.drift.accuracy.items()):
        lines.append(f'edgefleet_accuracy{{bundle="{b}",cohort="{_label(cohort)}"}} {value}')
    detail = sorted(server.drift.accuracy_detail.items())
    lines += [
        "# HELP edgefleet_accuracy_ci95 Bounds of the 95% (Wilson) interval of edgefleet_accuracy.",
        "# TYPE edgefleet_accuracy_ci95 gauge",
    ]
    for (b, cohort), acc in detail:
        for bound, v in zip(("low", "high"), acc["ci95"], strict=True):
            lines.append(f'edgefleet_accuracy_ci95{{bundle="{b}",cohort="{_label(cohort)}",bound="{bound}"}} {v}')
    lines += [
        "# HELP edgefleet_labelled_predictions Labelled predictions edgefleet_accuracy is computed on.",
        "# TYPE edgefleet_labelled_predictions gauge",
    ]
    for (b, cohort), acc in detail:
        lines.append(f'edgefleet_labelled_predictions{{bundle="{b}",cohort="{_label(cohort)}"}} {acc["labelled"]}')
    lines += [
        "# HELP edgefleet_class_f1 Per-class F1 on fed-back labels at the last drift check.",
        "# TYPE edgefleet_class_f1 gauge",
    ]
    for (b, cohort), acc in detail:
        for c in acc["per_class"]:
            if c["f1"] is not None:
                lines.append(
                    f'edgefleet_class_f1{{bundle="{b}",cohort="{_label(cohort)}",class="{_label(str(c["class"]))}"}} '
                    f"{c['f1']}"
                )
    lines += [
        "# HELP edgefleet_drift_psi PSI against the bundle's baseline at the last drift check.",
        "# TYPE edgefleet_drift_psi gauge",
    ]
    for (b, cohort, feature), value in sorted(server.drift.last.items()):
        lines.append(
            f'edgefleet_drift_psi{{bundle="{b}",cohort="{_label(cohort)}",feature="{_label(feature)}"}} {value}'
        )
    if server.broker is not None:
        lines += [
            "# HELP edgefleet_broker_restarts_total Restarts of the embedded broker by its supervisor.",
            "# TYPE edgefleet_broker_restarts_total counter",
            f"edgefleet_broker_restarts_total {server.broker.restarts}",
        ]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
