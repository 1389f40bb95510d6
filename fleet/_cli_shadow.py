"""`edgefleet fleet shadow`: order, watch and stop shadow deployments through the server's API."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["add_shadow_parser"]


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _show(s: dict[str, Any]) -> None:
    d, o = s["devices"], s["overall"]
    print(
        f"shadow {s['id']}: {s['bundle']} beside the active bundle on '{s['selector']}' - {s['state']}; "
        f"{d['reported']}/{d['ordered']} device(s) reported, {len(d['failed'])} failed"
    )
    rows = [("overall", o), *sorted(s["cohorts"].items())]
    print(
        f"  {'cohort':<16} {'samples':>8} {'agreement':>9} {'out. PSI':>8} {'active p95':>10} {'cand. p95':>10} "
        f"{'errors':>6} {'labelled':>8} {'active acc':>10} {'cand. acc':>9}"
    )
    for name, m in rows:
        print(
            f"  {name:<16} {m['samples']:>8} {_fmt(m['agreement']):>9} {_fmt(m.get('output_psi')):>8} "
            f"{_fmt(m['active_p95_ms'], '.3f'):>10} "
            f"{_fmt(m['candidate_p95_ms'], '.3f'):>10} {m['candidate_errors']:>6} {m.get('labelled', 0):>8} "
            f"{_fmt(m.get('active_accuracy')):>10} {_fmt(m.get('candidate_accuracy')):>9}"
        )
    for dev, why in d["failed"].items():
        print(f"  {dev} failed: {why}")


def _shadow(args: argparse.Namespace, client: Callable[..., Any]) -> int:
    from edgefleet import InputError

    if args.action == "create":
        if not args.bundle or not args.selector:
            raise InputError("shadow create needs --bundle NAME:VERSION and --selector TAG")
        body = {
            "bundle": args.bundle,
            "selector": args.selector,
            "sample_rate": args.sample_rate,
            "duration_s": args.duration,
            "min_samples": args.min_samples,
        }
        r = client(args, "POST", "/api/shadows", json.dumps(body).encode())
    elif args.action == "list":
        r = client(args, "GET", "/api/shadows")
        if args.json:
            print(json.dumps(r, indent=1))
        else:
            for s in r:
                agreement = _fmt(s["overall"]["agreement"])
                print(f"{s['id']} {s['bundle']} on {s['selector']} {s['state']} agreement {agreement}")
        return 0
    else:
        if not args.id:
            raise InputError(f"shadow {args.action} needs the shadow id")
        r = client(
            args,
            *(
                ("GET", f"/api/shadows/{args.id}")
                if args.action == "status"
                else ("POST", f"/api/shadows/{args.id}/stop")
            ),
        )
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        _show(r)
    return 0


def add_shadow_parser(
    fs: Any, client_args: Callable[[argparse.ArgumentParser], None], client: Callable[..., Any]
) -> None:
    p = fs.add_parser("shadow", help="shadow deployments: a candidate beside the active bundle on live inputs")
    p.add_argument("action", choices=["create", "status", "list", "stop"])
    p.add_argument("id", nargs="?")
    p.add_argument("--bundle", help="NAME:VERSION of the candidate (published)")
    p.add_argument("--selector", help="device tag")
    p.add_argument(
        "--sample-rate", type=float, default=0.1, help="share of each device's calls also run on the candidate"
    )
    p.add_argument("--duration", type=float, default=600.0, help="seconds the devices run it")
    p.add_argument("--min-samples", type=int, default=0, help="a device reports early once it has this many")
    client_args(p)
    p.set_defaults(func=lambda args: _shadow(args, client))
