"""`edgefleet fleet capture` and `fleet dataset`: ask a cohort for samples, watch the answers, export them."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_capture_parsers"]


def _show(c: dict[str, Any]) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c["created"]))
    alert = f", asked by alert {c['alert_id']}" if c.get("alert_id") else ""
    print(
        f"capture {c['id']}: up to {c['samples']} sample(s) per device tagged '{c['selector']}' - {c['state']} "
        f"({when} UTC{alert}); {c['total_samples']} sample(s), {c['total_labelled']} labelled, from "
        f"{len(c['uploads'])} of {c['devices']} device(s)"
    )
    for u in c["uploads"]:
        print(f"  {u['device']:<24} {u['samples']:>6} samples {u['labelled']:>6} labelled  {u['bundle']}")
    for r in c["refused"]:
        print(f"  {r['device']:<24} refused: {r['reason']}")


def _capture(args: argparse.Namespace, client: Callable[..., Any]) -> int:
    from edgefleet import InputError

    if args.action == "create":
        if not args.selector:
            raise InputError("capture create needs --selector TAG")
        body = {"selector": args.selector, "samples": args.samples, "when_alert": args.when_alert}
        if args.alert:
            body["alert_id"] = args.alert
        r = client(args, "POST", "/api/captures", json.dumps(body).encode())
    elif args.action == "list":
        r = client(args, "GET", "/api/captures")
        if args.json:
            print(json.dumps(r, indent=1))
        else:
            for c in r:
                print(f"{c['id']} '{c['selector']}' up to {c['samples']} per device - {c['state']}")
        return 0
    elif args.action == "forget":
        if not args.id:
            raise InputError("capture forget needs the DEVICE whose captured samples are to be deleted")
        r = client(args, "DELETE", f"/api/devices/{args.id}/captures")
        print(json.dumps(r, indent=1) if args.json else f"{r['device']}: {r['uploads_deleted']} upload(s) deleted")
        return 0
    else:
        if not args.id:
            raise InputError("capture status needs the capture id")
        r = client(args, "GET", f"/api/captures/{args.id}")
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        _show(r)
    return 0


def _dataset(args: argparse.Namespace, client: Callable[..., Any]) -> int:
    from edgefleet._fs import atomic_write

    query = "?labelled_only=true" if args.labelled_only else ""
    data = client(args, "GET", f"/api/captures/{args.id}/dataset.npz{query}", raw=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    import numpy as np

    with np.load(out, allow_pickle=False) as z:
        n, labelled = len(z["x"]), int((z["y"] >= 0).sum())
    if args.json:
        print(json.dumps({"output": str(out), "samples": n, "labelled": labelled, "bytes": len(data)}))
    else:
        print(f"{out}: {n} sample(s), {labelled} labelled ('x', 'y'; 'device', 'bundle', 'ts' say where from)")
    return 0


def add_capture_parsers(
    fs: Any, client_args: Callable[[argparse.ArgumentParser], None], client: Callable[..., Any]
) -> None:
    p = fs.add_parser("capture", help="ask devices that opted in for captured samples (data for retraining)")
    p.add_argument("action", choices=["create", "status", "list", "forget"])
    p.add_argument("id", nargs="?", help="capture id (status), or DEVICE (forget: delete its captured samples)")
    p.add_argument("--selector", help="device tag")
    p.add_argument("--samples", type=int, default=100, help="at most this many samples per device")
    p.add_argument(
        "--when-alert", action="store_true", help="ask when a drift alert next opens on the --selector cohort"
    )
    p.add_argument("--alert", help="the drift alert this capture answers (provenance)")
    client_args(p)
    p.set_defaults(func=lambda args: _capture(args, client))

    p = fs.add_parser("dataset", help="export a capture as an .npz that 'edgefleet build' reads")
    p.add_argument("action", choices=["export"])
    p.add_argument("id", help="capture id")
    p.add_argument("-o", "--output", required=True, help="the .npz to write")
    p.add_argument(
        "--labelled-only", action="store_true", help="only samples a label was fed back for (for --train / --eval)"
    )
    client_args(p)
    p.set_defaults(func=lambda args: _dataset(args, client))
