"""`edgefleet fleet simulate`: real agents against a server, with the traffic, labels and drift given."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_simulate_parser"]


def _simulate(args: argparse.Namespace) -> int:
    from edgefleet import InputError

    from ._simulate import PER_PROCESS, Simulation, parse_drift, run, run_sharded

    server = args.server or os.environ.get("EDGEFLEET_SERVER")
    token = args.token or os.environ.get("EDGEFLEET_TOKEN")
    if not server or not token:
        raise InputError("give --server URL and --token T (or EDGEFLEET_SERVER / EDGEFLEET_TOKEN)")
    if args.devices < 1:
        raise InputError("--devices must be at least 1")
    if args.devices > PER_PROCESS:
        return run_sharded(sys.argv[1:], args.devices, args.prefix, args.workdir)
    sim = Simulation(
        server=server,
        token=token,
        devices=args.devices,
        bundle=args.bundle,
        tags=[t for t in (args.tags or "").split(",") if t],
        drift=parse_drift(args.drift or []),
        fail_rate=args.fail_rate,
        rate_hz=args.rate,
        prefix=args.prefix,
        workdir=Path(args.workdir) if args.workdir else None,
        inputs=Path(args.inputs) if args.inputs else None,
        golden_inputs=args.golden_inputs,
        standin=args.standin,
        replace=args.replace,
        feedback=args.feedback,
        capture_per_hour=args.capture_per_hour,
        capture_upload=args.capture_upload,
    )
    run(sim, args.duration, args.json)
    return 0


def add_simulate_parser(fs: Any) -> None:
    p = fs.add_parser("simulate", help="run N simulated devices (real agents and runtime) against a server")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--bundle", help="NAME:VERSION the devices start on (downloaded from the server)")
    p.add_argument("--tags", help="comma-separated tags for every device (each also gets cohort-0 / cohort-1)")
    p.add_argument("--drift", action="append", help="TAG:SHIFT: devices with TAG see inputs shifted (repeatable)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of calls made to fail")
    p.add_argument("--rate", type=float, default=5.0, help="predictions per second per device")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ...")
    p.add_argument(
        "--replace", action="store_true", help="take over devices of this prefix that another simulator runs"
    )
    p.add_argument("--inputs", help=".npz with the inputs 'x' the devices see (and labels 'y' for --feedback)")
    p.add_argument(
        "--golden-inputs",
        action="store_true",
        help="no --inputs: replay the bundle's few golden inputs (a smoke test; drift statistics will show drift)",
    )
    p.add_argument(
        "--feedback",
        type=float,
        default=0.0,
        help="share of calls whose true label (the --inputs file's 'y') the devices feed back (0-1)",
    )
    p.add_argument("--capture-per-hour", type=float, default=0.0, help="raw samples each device keeps per hour")
    p.add_argument("--capture-upload", action="store_true", help="devices send captured samples when the fleet asks")
    p.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    p.add_argument(
        "--standin", action="store_true", help="a fast stand-in predictor instead of the real runtime (large N)"
    )
    p.add_argument("--json", action="store_true", help="JSON lines: the devices once running, versions at the end")
    p.add_argument("--workdir")
    p.add_argument("--server")
    p.add_argument("--token")
    p.set_defaults(func=_simulate)
