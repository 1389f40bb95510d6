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


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    # Every server line with its time (alerts, broker restarts, failures); -v adds the INFO lines.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    from edgefleet import InputError
    from edgefleet._errors import require

    # Named before anything imports them, so a runtime-only install gets the extra to install, not a traceback.
    for mod in ("fastapi", "jinja2", "paho.mqtt.client"):
        require(mod, "fleet", "the fleet server")
    uvicorn: Any = require("uvicorn", "fleet", "the fleet server")

    from ._http import create_app
    from ._retention import Retention
    from ._server import FleetServer, ServerConfig

    cfg = ServerConfig(
        data_dir=Path(args.data_dir),
        http_port=args.http_port,
        mqtt_port=args.mqtt_port,
        db_url=args.db,
        broker_url=args.broker,
        broker_ca=args.broker_ca,
        broker_username=args.broker_username,
        broker_password=args.broker_password,
        broker_reload=args.broker_reload,
        broker_device_url=args.broker_device_url,
        public_host=args.public_host,
        trusted_keys=[Path(k) for k in args.trusted_key or []],
        drift_interval_s=args.drift_interval,
        drift_window_s=args.drift_window,
        metrics_open=args.metrics_open,
        mqtt_bind=args.mqtt_bind,
        retention=Retention(
            windows_s=args.keep_windows_days * 86400,
            rollups_s=args.keep_rollups_days * 86400,
            captures_s=args.keep_captures_days * 86400,
        ),
        tls_cert=_existing(args.tls_cert, "--tls-cert"),
        tls_key=_existing(args.tls_key, "--tls-key"),
        tls_ca=_existing(args.tls_ca, "--tls-ca"),
    )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise InputError("--tls-cert and --tls-key go together (the server's certificate and its private key)")
    if cfg.tls_cert is not None:
        import ssl

        try:  # before the broker and HTTPS fail on them later with less to say
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.tls_cert, cfg.tls_key)
            if cfg.tls_ca is not None:
                ssl.create_default_context(cafile=str(cfg.tls_ca))
        except (ssl.SSLError, OSError) as exc:
            raise InputError(
                f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key} / --tls-ca: not a usable PEM certificate, "
                f"key and CA ({exc})"
            ) from exc
    server = FleetServer(cfg)
    server.start()
    app = create_app(server)
    tls = {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)} if cfg.tls_cert else {}
    ucfg = uvicorn.Config(app, host=args.host, port=args.http_port, log_level="warning", **tls)
    userver = uvicorn.Server(ucfg)
    stop = threading.Event()

    def _term(signum: int, frame: Any) -> None:
        userver.should_exit = True
        stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    print(
        f"edgefleet fleet server: {cfg.base_url}  mqtt{'s' if cfg.tls_cert else ''} port {args.mqtt_port}  "
        f"data {cfg.data_dir}",
        file=sys.stderr,
        flush=True,
    )
    for warning in _plaintext_warnings(args):
        print(f"edgefleet fleet server: WARNING: {warning}", file=sys.stderr, flush=True)
    try:
        userver.run()
    finally:
        server.stop()
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _existing(path: str | None, flag: str) -> Path | None:
    from edgefleet import InputError

    if path is None:
        return None
    if not Path(path).is_file():
        raise InputError(f"{flag} {path} does not exist")
    return Path(path)


def _plaintext_warnings(args: argparse.Namespace) -> list[str]:
    """What this server sends unencrypted beyond this machine: tokens and passwords travel in the clear."""
    out: list[str] = []
    if args.tls_cert:
        return out
    if not _loopback(args.host):
        out.append(
            f"HTTP on {args.host}:{args.http_port} is plaintext (API tokens, device download tokens and bundles "
            "travel unencrypted): --tls-cert/--tls-key, a TLS proxy in front, or --host 127.0.0.1 for this machine only"
        )
    if args.broker == "embedded" and not _loopback(args.mqtt_bind):
        out.append(
            f"the embedded broker on {args.mqtt_bind}:{args.mqtt_port} is plaintext (device passwords travel "
            "unencrypted): --tls-cert/--tls-key, --broker mqtts://... with a TLS broker, or --mqtt-bind 127.0.0.1"
        )
    return out


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
    rows = _client(args, "GET", f"/api/alerts?state={args.state}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    import time

    print(f"{'opened (UTC)':<20} {'state':<7} {'kind':<10} {'bundle':<16} {'cohort':<14} {'feature':<28} value")
    for a in rows:
        opened = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["opened"]))
        value = (
            f"accuracy {a['accuracy']:.3f} (expected {a['reference']:.3f})"
            if a["feature"] == "accuracy" and a.get("accuracy") is not None
            else f"psi {a['psi'] if a['psi'] is not None else float('nan'):.3f}"
        )
        print(
            f"{opened:<20} {a['state']:<7} {a['kind']:<10} {a['bundle']:<16} {a['cohort']:<14} {a['feature']:<28} "
            f"{value}"
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

    p = fs.add_parser("serve", help="start the server (embedded Mosquitto and SQLite by default)")
    p.add_argument("--data-dir", default="fleet-data")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--host", default="0.0.0.0", help="HTTP listen address")
    p.add_argument("--mqtt-bind", default="0.0.0.0", help="the embedded broker's listen address")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO lines too (rollout moves, housekeeping)")
    p.add_argument("--public-host", default="127.0.0.1", help="host name devices use to reach this server")
    p.add_argument(
        "--metrics-open",
        action="store_true",
        help="serve /metrics without an API token (default: Prometheus scrapes it with one, as a bearer token)",
    )
    p.add_argument("--db", help="sqlite:///PATH (default: DATA_DIR/fleet.db) or postgresql://...")
    p.add_argument(
        "--broker", default="embedded", help="embedded (default), or an external broker: mqtt[s]://[USER@]HOST:PORT"
    )
    p.add_argument("--broker-ca", help="CA certificate of an mqtts:// broker (default: the system's CAs)")
    p.add_argument(
        "--broker-device-url",
        help="mqtt[s]://HOST:PORT devices are given when their listener is not --broker's (see fleet broker-auth)",
    )
    p.add_argument("--broker-username", help="the server's user on an external broker (default: edgefleet-server)")
    p.add_argument(
        "--broker-password",
        help="its password (or EDGEFLEET_BROKER_PASSWORD; default: DATA_DIR/mosquitto/server.secret)",
    )
    p.add_argument(
        "--broker-reload",
        help="shell command run after device credentials change (external broker reading "
        "DATA_DIR/mosquitto/passwd and acl), e.g. 'systemctl reload mosquitto'",
    )
    p.add_argument("--trusted-key", action="append", help="public key bundles must be signed with (repeatable)")
    p.add_argument("--tls-cert", help="PEM certificate: HTTPS, and TLS on the embedded broker's devices' listener")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument(
        "--tls-ca", help="the CA certificate devices are given to check the server with (default: system CAs)"
    )
    p.add_argument("--drift-interval", type=float, default=30.0, help="seconds between drift alert checks")
    p.add_argument("--drift-window", type=float, default=900.0, help="seconds of telemetry a drift check covers")
    p.add_argument(
        "--keep-windows-days", type=float, default=7.0, help="days raw telemetry windows are kept (default 7)"
    )
    p.add_argument(
        "--keep-rollups-days",
        type=float,
        default=400.0,
        help="days the per-minute/hour/day telemetry rollups are kept (default 400)",
    )
    p.add_argument(
        "--keep-captures-days",
        type=float,
        default=90.0,
        help="days captured samples (datasets) are kept, then deleted with their files (default 90)",
    )
    p.set_defaults(func=_serve)

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

    p = fs.add_parser("alerts", help="drift alerts the server has raised")
    p.add_argument("--state", default="open", choices=["open", "closed", "all"])
    _client_args(p)
    p.set_defaults(func=_alerts)

    p = fs.add_parser("desire", help="order one device onto a published bundle")
    p.add_argument("device_id")
    p.add_argument("--bundle", required=True, help="NAME:VERSION")
    p.add_argument("--action", default="update", choices=["update", "rollback"])
    _client_args(p)
    p.set_defaults(func=_desire)
