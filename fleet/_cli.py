"""`edgefleet fleet ...`: registered through the `edgefleet.commands` entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _ingest(args: argparse.Namespace) -> int:
    """One more ingest worker on the shared subscription, in its own process (or machine)."""
    import signal
    import threading

    from edgefleet import InputError

    from ._broker import SERVER_USER
    from ._db import Database
    from ._endpoint import BrokerEndpoint
    from ._ingest import IngestWorker
    from ._provision import recorded_broker

    data = Path(args.data_dir)
    # Explicit flags first, then how the server in --data-dir runs its broker, then the default port.
    explicit = f"mqtt://{args.mqtt_host or '127.0.0.1'}:{args.mqtt_port or 1883}"
    given = args.mqtt_host is not None or args.mqtt_port is not None
    rec = recorded_broker(data) or {}
    if rec.get("embedded") and args.mqtt_port is not None and args.mqtt_port == rec.get("port") and not args.broker:
        raise InputError(
            f"port {args.mqtt_port} is the embedded broker's listener for devices; the server's clients use "
            f"{rec.get('url')} (leave out --mqtt-port to use it)"
        )
    url = args.broker or (explicit if given else (recorded_broker(data) or {}).get("url") or explicit)
    endpoint = BrokerEndpoint.parse(url, ca=args.broker_ca, username=args.username, password=args.password)
    if not endpoint.password:
        secret = data / "mosquitto" / "server.secret"
        if not secret.exists():
            raise InputError(f"no broker password given and no {secret}: pass --password or the server's --data-dir")
        endpoint = BrokerEndpoint(
            endpoint.host, endpoint.port, endpoint.tls, endpoint.ca, SERVER_USER, secret.read_text().strip()
        )
    db = Database(args.db or f"sqlite:///{data / 'fleet.db'}")
    worker = IngestWorker(db, endpoint, args.name, durable=args.durable)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    worker.start()
    print(f"edgefleet ingest worker {args.name} on {endpoint.url()}", file=sys.stderr, flush=True)
    stop.wait()
    worker.stop()
    return 0


def _broker_auth(args: argparse.Namespace) -> int:
    """Create the password and ACL files an external Mosquitto reads, and print the lines for its config."""
    from ._broker import Broker

    b = Broker(Path(args.data_dir) / "mosquitto", 0)
    print(
        "# Add to your mosquitto.conf (Mosquitto 2.0). The fleet server adds devices to these files and runs\n"
        "# 'fleet serve --broker-reload CMD' after each change (e.g. kill -HUP of the broker).\n"
        "# Devices use the first listener, where a client's id is replaced by its username, so one device's\n"
        "# credentials cannot take over another device's session or the server's; the server's clients use\n"
        "# the second (only its user may): fleet serve --broker mqtt[s]://HOST:SERVER_PORT\n"
        "#   --broker-device-url mqtt[s]://PUBLIC_HOST:PORT. Put each listener's TLS lines (certfile,\n"
        "# keyfile, cafile) right after its 'listener' line.\n" + b.listener_lines(args.port, args.server_port).rstrip()
    )
    return 0


def _token(args: argparse.Namespace) -> int:
    from ._auth import create_token

    token = create_token(Path(args.data_dir), args.name, args.db)
    print(json.dumps({"name": args.name, "token": token}) if args.json else token)
    return 0


def _provision(args: argparse.Namespace) -> int:
    from ._provision import provision

    tags = [t for t in (args.tags or "").split(",") if t]
    out = provision(
        Path(args.data_dir),
        args.device_id,
        tags,
        Path(args.out or f"{args.device_id}.toml"),
        args.mqtt_host,
        args.mqtt_port,
        args.db,
        args.self_test_hz,
    )
    if args.json:
        print(json.dumps({"device_id": args.device_id, "config": str(out), "tags": sorted(set(tags))}))
    else:
        print(str(out))
    return 0


def _client(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: bytes | None = None,
    ctype: str = "application/json",
    raw: bool = False,
) -> Any:
    """Call the server's API: the decoded JSON answer (RAW: the bytes), or an InputError saying why not."""
    from edgefleet import InputError

    server = args.server or os.environ.get("EDGEFLEET_SERVER")
    token = args.token or os.environ.get("EDGEFLEET_TOKEN")
    if not server or not token:
        raise InputError("give --server URL and --token T (or EDGEFLEET_SERVER / EDGEFLEET_TOKEN)")
    req = urllib.request.Request(server.rstrip("/") + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            data = resp.read()
            return data if raw else json.loads(data or b"null")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise InputError(f"server refused: HTTP {exc.code}: {detail}") from exc
    except urllib.error.URLError as exc:
        raise InputError(f"cannot reach the fleet server at {server}: {exc.reason}") from exc


def _devices(args: argparse.Namespace) -> int:
    devs = _client(args, "GET", "/api/devices")
    if args.json:
        print(json.dumps(devs, indent=1))
        return 0
    print(f"{'device':<20} {'online':<7} {'bundle':<20} {'state':<14} tags")
    for d in devs:
        bundle = f"{d['bundle_name'] or '-'} {d['bundle_version'] or ''}"
        print(
            f"{d['id']:<20} {('silent' if d.get('stale') else 'yes') if d['online'] else 'no':<7} {bundle:<20} "
            f"{d['update_state'] or '-':<14} "
            f"{','.join(d['tags'])}"
        )
    return 0


def _publish(args: argparse.Namespace) -> int:
    from edgefleet import InputError

    p = Path(args.bundle)
    if not p.is_file():
        raise InputError(f"bundle {p} does not exist")
    ref = _client(args, "PUT", "/api/bundles", p.read_bytes(), "application/octet-stream")
    print(json.dumps(ref, indent=1) if args.json else f"published {ref['name']} {ref['version']} ({ref['size']} B)")
    return 0


def _desire(args: argparse.Namespace) -> int:
    body = json.dumps({"bundle": args.bundle, "action": args.action}).encode()
    res = _client(args, "POST", f"/api/devices/{args.device_id}/desired", body)
    print(json.dumps(res) if args.json else f"{res['device']} -> {res['bundle']}")
    return 0


def _drift(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    q = f"/api/drift?bundle={quote(args.bundle)}"
    for k in ("tag", "against", "since"):
        if getattr(args, k) is not None:
            q += f"&{k}={quote(str(getattr(args, k)))}"
    rep = _client(args, "GET", q)
    if args.json:
        print(json.dumps(rep, indent=1))  # the API's document as it is
        return 0
    print(
        f"drift of {rep['bundle']}{' on ' + args.tag if args.tag else ''} against its baseline: "
        f"{rep['windows']} windows, {rep['samples']} samples"
    )
    _drift_table(rep["features"])
    if "cohorts" in rep:
        c = rep["cohorts"]
        print(f"\ncohort {c['a']} against cohort {c['b']} ({c['samples'][0]} and {c['samples'][1]} samples)")
        _drift_table(c["features"])
    return 0


def _drift_table(features: dict[str, Any]) -> None:
    print(f"{'feature':<28} {'psi':>8} {'js':>7} {'ks':>7} {'chi2 p':>9}  drifted")
    for k, v in features.items():
        if v["psi"] is None:
            print(f"{k:<28} {'-':>8}")
            continue
        print(
            f"{k:<28} {v['psi']:>8.4f} {v['js']:>7.4f} {v['ks']:>7.4f} {v['p_value']:>9.2g}  "
            f"{'YES' if v['drifted'] else 'no'}"
        )


def _alerts(args: argparse.Namespace) -> int:
    from edgefleet import InputError

    if args.action == "ack":
        if not args.ids:
            raise InputError("alerts ack needs the alert ids (from 'edgefleet fleet alerts')")
        body = json.dumps({"ids": args.ids, "mute_hours": args.mute_hours}).encode()
        r = _client(args, "POST", "/api/alerts/ack", body)
        print(json.dumps(r) if args.json else f"acknowledged {r['acknowledged']} alert(s)")
        return 0
    rows = _client(args, "GET", f"/api/alerts?state={args.state}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    import time

    print(
        f"{'id':<14} {'opened (UTC)':<20} {'state':<7} {'kind':<10} {'bundle':<16} {'cohort':<14} {'feature':<28} value"
    )
    for a in rows:
        opened = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["opened"]))
        value = (
            f"accuracy {a['accuracy']:.3f} (expected {a['reference']:.3f})"
            if a["feature"] == "accuracy" and a.get("accuracy") is not None
            else f"psi {a['psi'] if a['psi'] is not None else float('nan'):.3f}"
        )
        mark = " [muted]" if a.get("muted") else " [acknowledged]" if a.get("acknowledged") else ""
        print(
            f"{a['id']:<14} {opened:<20} {a['state']:<7} {a['kind']:<10} {a['bundle']:<16} {a['cohort']:<14} "
            f"{a['feature']:<28} {value}{mark}"
        )
    return 0


def _rollout(args: argparse.Namespace) -> int:
    from edgefleet import InputError

    if args.action == "create":
        if not args.bundle or not args.selector:
            raise InputError("rollout create needs --bundle NAME:VERSION and --selector TAG")
        gates = {}
        for g in args.gate or []:
            k, _, v = g.partition("=")
            try:
                gates[k] = float(v)
            except ValueError as exc:
                raise InputError(f"--gate {g!r}: use NAME=NUMBER") from exc
        try:
            stages = [float(s) for s in args.stages.split(",")]
        except ValueError as exc:
            raise InputError(f"--stages {args.stages!r}: use percentages like 10,50,100") from exc
        body = {"bundle": args.bundle, "selector": args.selector, "stages": stages, "gates": gates}
        if args.after_shadow:
            body |= {
                "after_shadow": args.after_shadow,
                "min_agreement": args.min_agreement,
                "max_shadow_p95_ratio": args.max_shadow_p95_ratio,
            }
        r = _client(args, "POST", "/api/rollouts", json.dumps(body).encode())
    elif args.action == "list":
        r = _client(args, "GET", "/api/rollouts")
        print(json.dumps(r, indent=1) if args.json else "\n".join(f"{x['id']} {x['bundle']} {x['state']}" for x in r))
        return 0
    else:
        if not args.id:
            raise InputError(f"rollout {args.action} needs the rollout id")
        method, path = (
            ("GET", f"/api/rollouts/{args.id}")
            if args.action == "status"
            else ("POST", f"/api/rollouts/{args.id}/{args.action}")
        )
        r = _client(args, method, path)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"rollout {r['id']}: {r['bundle']} to '{r['selector']}' - {r['state']} (stage {r['stage']})")
        for s in r["stages"]:
            print(
                f"  stage {s['stage']} {s['percent']:g}%: {s['status']}, {s['updated']}/{s['assigned']} updated, "
                f"{s['failed']} failed"
            )
            g = s.get("gates") or {}
            for why in g.get("failed_gates") or []:
                print(f"    failed gate: {why}")
            if g.get("halt"):
                print(f"    halted: {g['halt']}")
        if r["state"] in ("halted", "rolled_back", "aborted") and r.get("history"):
            print(f"  last: {r['history'][-1]['note']}")
        trouble = [d for d in r.get("devices", []) if d["status"] != "updated" or d.get("reason")]
        for d in trouble[:20]:
            reason = f": {d['reason']}" if d.get("reason") else ""
            print(f"  {d['id']} (stage {d['stage']}, from {d['previous_version'] or '-'}) {d['status']}{reason}")
        if len(trouble) > 20:
            print(f"  ... and {len(trouble) - 20} more device(s) not updated (--json lists every device)")
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="fleet server URL (or EDGEFLEET_SERVER)")
    p.add_argument("--token", help="operator API token (or EDGEFLEET_TOKEN)")
    p.add_argument("--json", action="store_true")


def register(sub: Any) -> None:
    from edgefleet._errors import missing_note

    fleet = sub.add_parser(
        "fleet", help="run and operate the fleet server" + missing_note(("fastapi", "uvicorn", "jinja2"), "fleet")
    )
    fs = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND")
    fs.required = True

    from ._cli_serve import add_serve_parser

    add_serve_parser(fs)

    p = fs.add_parser("ingest", help="run an extra ingest worker (scale-out over a shared subscription)")
    p.add_argument("--data-dir", default="fleet-data")
    p.add_argument("--db", help="database URL (default: DATA_DIR/fleet.db)")
    p.add_argument(
        "--broker", help="mqtt[s]://HOST:PORT (default: --mqtt-host/port, else the broker of the server in --data-dir)"
    )
    p.add_argument("--broker-ca", help="CA certificate of an mqtts:// broker")
    p.add_argument("--mqtt-host", help="default: the server's broker, else 127.0.0.1")
    p.add_argument("--mqtt-port", type=int, help="default: the server's broker, else 1883")
    p.add_argument("--username")
    p.add_argument("--password", help="default: the server secret in DATA_DIR (or EDGEFLEET_BROKER_PASSWORD)")
    p.add_argument("--name", default=f"ingest-{os.getpid()}")
    p.add_argument(
        "--durable",
        action="store_true",
        help="persistent MQTT session named after --name (unique per broker): while this worker is down "
        "the broker queues its share for it; for a worker that is restarted, not one retired",
    )
    p.set_defaults(func=_ingest)

    p = fs.add_parser("broker-auth", help="password and ACL files for an external Mosquitto, and its config lines")
    p.add_argument("--data-dir", default="fleet-data")
    p.add_argument("--port", type=int, default=8883, help="the devices' listener (default 8883)")
    p.add_argument("--server-port", type=int, default=8884, help="the server clients' listener (default 8884)")
    p.set_defaults(func=_broker_auth)

    p = fs.add_parser("token", help="operator API tokens")
    p.add_argument("action", choices=["create"])
    p.add_argument("--data-dir", default="fleet-data")
    p.add_argument("--name", default="operator")
    p.add_argument("--db")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_token)

    p = fs.add_parser("provision", help="register a device and write its device.toml")
    p.add_argument("device_id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tags", help="comma-separated")
    p.add_argument("--data-dir", default="fleet-data")
    p.add_argument("--out", help="where to write the config (default DEVICE_ID.toml)")
    p.add_argument("--mqtt-host", help="broker host devices use (default: the server's broker, else 127.0.0.1)")
    p.add_argument("--mqtt-port", type=int, help="broker port devices use (default: the server's, else 1883)")
    p.add_argument(
        "--self-test-hz",
        type=float,
        default=0.0,
        metavar="HZ",
        help="run the bundle's golden inputs HZ times a second as traffic: for a trial device with no app of its "
        "own, which would otherwise send no telemetry (and a rollout's telemetry gate would halt on it)",
    )
    p.add_argument("--db")
    p.set_defaults(func=_provision)

    p = fs.add_parser("devices", help="list devices")
    _client_args(p)
    p.set_defaults(func=_devices)

    p = fs.add_parser("publish", help="upload a signed bundle")
    p.add_argument("bundle")
    _client_args(p)
    p.set_defaults(func=_publish)

    p = fs.add_parser("rollout", help="canary rollouts: create, status, list, pause, resume, abort")
    p.add_argument("action", choices=["create", "status", "list", "pause", "resume", "abort"])
    p.add_argument("id", nargs="?")
    p.add_argument("--bundle", help="NAME:VERSION")
    p.add_argument("--selector", help="device tag")
    p.add_argument("--stages", default="10,50,100", help="percentages, e.g. 10,50,100")
    p.add_argument("--gate", action="append", help="override a gate, e.g. max_p95_ratio=2 (repeatable)")
    p.add_argument("--after-shadow", metavar="ID", help="start only if this shadow deployment of the bundle passed")
    p.add_argument("--min-agreement", type=float, default=0.98, help="with --after-shadow: top-1 agreement needed")
    p.add_argument(
        "--max-shadow-p95-ratio", type=float, default=1.5, help="with --after-shadow: candidate p95 / active p95"
    )
    _client_args(p)
    p.set_defaults(func=_rollout)

    from ._cli_shadow import add_shadow_parser

    add_shadow_parser(fs, _client_args, _client)

    from ._cli_simulate import add_simulate_parser

    add_simulate_parser(fs)

    p = fs.add_parser("drift", help="fleet drift of a bundle version against its baseline")
    p.add_argument("--bundle", required=True, help="NAME:VERSION")
    p.add_argument("--tag", help="only devices with this tag")
    p.add_argument("--against", help="also compare cohort --tag with the devices of this tag")
    p.add_argument("--since", type=float, help="only windows that started after this Unix time")
    _client_args(p)
    p.set_defaults(func=_drift)

    from ._cli_ops import add_ops_parsers

    add_ops_parsers(fs, _client_args, _client)

    from ._cli_capture import add_capture_parsers

    add_capture_parsers(fs, _client_args, _client)

    p = fs.add_parser("alerts", help="drift alerts the server has raised; 'ack ID...' acknowledges (and mutes)")
    p.add_argument("action", nargs="?", choices=["list", "ack"], default="list")
    p.add_argument("ids", nargs="*", help="ack: the alert ids")
    p.add_argument("--mute-hours", type=float, default=0.0, help="ack: hide them from the dashboard this long")
    p.add_argument("--state", default="open", choices=["open", "closed", "all"])
    _client_args(p)
    p.set_defaults(func=_alerts)

    p = fs.add_parser("desire", help="order one device onto a published bundle")
    p.add_argument("device_id")
    p.add_argument("--bundle", required=True, help="NAME:VERSION")
    p.add_argument("--action", default="update", choices=["update", "rollback"])
    _client_args(p)
    p.set_defaults(func=_desire)
