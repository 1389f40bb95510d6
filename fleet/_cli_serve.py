"""`edgefleet fleet serve`: the server's options, the checks made before it starts, and its start."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_serve_parser"]


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


def add_serve_parser(fs: Any) -> None:
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
