"""The demo's second half: the fleet closes the loop on a drifted cohort.

Its inputs move; the drift alert fires a capture that was armed for it; the captured samples, with the
labels the devices' apps fed back, retrain a v4; v4 runs in shadow on that cohort; its canary rollout there
is gated on accuracy against the cohort's own control; the cohort's accuracy recovers and the alerts close.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ._demo_fleet import CONTROL_COHORT, DRIFT_COHORT, Api, DemoFailed, Story, rollout, stderr_to, versions, wait

# Labelled samples captured after the shift that v4 is retrained on (40%), calibrated (20%) and judged by (40%).
MIN_CAPTURED = 240


def _accuracy(api: Api, bundle: str, tag: str, since: float) -> dict[str, Any]:
    return dict(api("GET", f"/api/accuracy?bundle={quote(bundle)}&tag={tag}&since={since}"))


def _open_alerts(api: Api, bundle: str | None = None) -> list[dict[str, Any]]:
    return [a for a in api("GET", "/api/alerts?state=open") if bundle is None or a["bundle"] == bundle]


def drift_and_capture(api: Api, story: Story, sim: Any, args: Any, server_url: str) -> dict[str, Any]:
    """Shift the drift cohort's inputs on v2 with a capture armed for its first alert; returns what the
    next steps need: the shift's time, the alerts, the capture."""
    s = story.step(
        f"Shift the inputs of {DRIFT_COHORT} (+{args.shift} brightness) on v2: drift, falling accuracy, a capture"
    )
    cap = api("POST", "/api/captures", {"selector": DRIFT_COHORT, "samples": args.capture, "when_alert": True})
    story.say(
        s,
        f"capture {cap['id']} armed: the first drift alert on {DRIFT_COHORT} asks its devices for up to "
        f"{args.capture} samples each (they opted in with capture_upload; their apps feed true labels back)",
    )
    # The fleet's figures are kept per minute, and a range starts at its minute: shifted on a minute
    # boundary, "since the shift" reads the shifted inputs only.
    pause = 60.2 - time.time() % 60
    story.say(s, f"waiting {pause:.0f} s for the next minute: the fleet keeps its figures per minute")
    time.sleep(pause)
    since = time.time()
    sim.drift[DRIFT_COHORT] = args.shift
    bundle = "digits:2.0.0"

    def report(tag: str) -> dict[str, Any]:
        return dict(api("GET", f"/api/drift?bundle={quote(bundle)}&tag={tag}&since={since}"))

    def flagged() -> Any:
        rep = report(DRIFT_COHORT)
        enough = min((f["samples"] for k, f in rep["features"].items() if not k.startswith("output")), default=0)
        return rep if enough >= 300 and rep["drifted"] else None

    rep = wait("drift to be flagged on the shifted cohort", flagged, 90)
    calm = report(CONTROL_COHORT)
    top = sorted(rep["drifted"], key=lambda k: -(rep["features"][k]["psi"] or 0))
    for k in top[:5]:
        f = rep["features"][k]
        story.say(s, f"{DRIFT_COHORT} {k}: PSI {f['psi']:.3f}, JS {f['js']:.3f}, KS {f['ks']:.3f} -> drifted")
    story.say(
        s,
        f"{len(rep['drifted'])} feature(s) drifted on {DRIFT_COHORT} ({rep['samples']} samples); {CONTROL_COHORT}: "
        f"{len(calm['drifted'])} drifted, max PSI {max((f['psi'] or 0) for f in calm['features'].values()):.3f}",
        drifted=rep["drifted"],
        drifted_control=calm["drifted"],
    )
    if calm["drifted"]:
        raise DemoFailed(f"the unshifted cohort was flagged too: {calm['drifted']}")

    def accuracy_fell() -> Any:
        a = _accuracy(api, bundle, DRIFT_COHORT, since)
        return a if a["labelled"] >= 300 else None

    acc = wait(f"300 labelled predictions on {DRIFT_COHORT}", accuracy_fell, 60)
    ctl = _accuracy(api, bundle, CONTROL_COHORT, since)
    lo, hi = acc["ci95"]
    story.say(
        s,
        f"accuracy on the labels the apps fed back: {DRIFT_COHORT} {acc['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, "
        f"{acc['labelled']} labelled), {CONTROL_COHORT} {ctl['accuracy']:.3f}, at build time "
        f"{acc['reference_accuracy']:.3f}",
        accuracy_drifted=acc["accuracy"],
        accuracy_control=ctl["accuracy"],
        accuracy_reference=acc["reference_accuracy"],
    )

    def recorded() -> Any:
        mine = [a for a in _open_alerts(api, bundle) if a["cohort"] == DRIFT_COHORT]
        # the accuracy alert needs labelled predictions: it comes a check or two after the data drift one
        return mine if any(a.get("kind") in ("accuracy", "concept") for a in mine) else None

    alerts = wait(
        "the drift alerts, the accuracy one included, to be recorded",
        recorded,
        60,
        detail=lambda: [(a["feature"], a.get("kind")) for a in _open_alerts(api, bundle)],
    )
    kinds = sorted({a.get("kind", "data") for a in alerts})
    story.say(
        s,
        f"{len(alerts)} open alert(s) on {DRIFT_COHORT}: "
        + ", ".join(f"{a['feature']} ({a.get('kind', 'data')})" for a in alerts[:6]),
        alerts=len(alerts),
        alert_kinds=kinds,
    )
    overview = api.fetch("GET", "/").decode()
    exported = api.fetch("GET", "/metrics").decode().count(f'cohort="{DRIFT_COHORT}"')
    shown = overview.count(f"<td>{DRIFT_COHORT}</td>")
    story.say(
        s,
        f"{shown} on the dashboard overview, {exported} series in /metrics; {server_url}/drift?bundle={bundle}",
        alerts_on_dashboard=shown,
    )
    if not shown:
        raise DemoFailed("the dashboard overview does not show the drift alerts")
    return {"since": since, "alerts": alerts, "capture": cap["id"]}


def collect(api: Api, story: Story, args: Any, shifted: dict[str, Any], out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The labelled samples the devices uploaded that were taken after the shift (asking once more, linked
    to the alert, while there are too few)."""
    s = story.step("The alert's capture: labelled samples of the drifted cohort, exported as a dataset")
    since, first = shifted["since"], shifted["capture"]
    alert = shifted["alerts"][0]["id"]
    captures = [first]
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while True:
        cid = captures[-1]

        def status(cid: str = cid) -> dict[str, Any]:
            return dict(api("GET", f"/api/captures/{cid}"))

        def answered(cid: str = cid) -> Any:
            c = status(cid)
            return c if c["state"] != "armed" and len(c["uploads"]) + len(c["refused"]) >= 1 else None

        def all_answered(cid: str = cid) -> Any:
            c = status(cid)
            return c if len(c["uploads"]) + len(c["refused"]) >= c["devices"] else None

        wait(f"devices to answer capture {cid}", answered, 60, detail=status)
        # every asked device's answer (uploaded samples leave the device: one not fetched would be lost)
        try:
            wait(f"every device to answer capture {cid}", all_answered, 30)
        except DemoFailed:
            pass  # a device that is slow to answer: go on with the others' samples
        c = status(cid)
        if cid == first:
            story.say(
                s,
                f"capture {cid} fired on alert {c['alert_id']}: {len(c['uploads'])} device(s) uploaded "
                f"{c['total_samples']} samples ({c['total_labelled']} labelled), {len(c['refused'])} refused",
                capture_devices=len(c["uploads"]),
            )
        if c["uploads"] and cid not in seen:
            seen.add(cid)
            with np.load(io.BytesIO(api.fetch("GET", f"/api/captures/{cid}/dataset.npz?labelled_only=true"))) as d:
                keep = d["ts"] >= since  # the cohort as it is now: samples taken after its inputs moved
                xs.append(d["x"][keep])
                ys.append(d["y"][keep])
        got = sum(len(x) for x in xs)
        if got >= MIN_CAPTURED:
            break
        if time.monotonic() > deadline:
            raise DemoFailed(f"only {got} labelled samples taken after the shift were captured (need {MIN_CAPTURED})")
        story.say(
            s, f"{got} distinct images taken after the shift so far: asking {DRIFT_COHORT} again (linked to {alert})"
        )
        time.sleep(8)
        nxt = api("POST", "/api/captures", {"selector": DRIFT_COHORT, "samples": args.capture, "alert_id": alert})
        captures.append(nxt["id"])
    x, y = np.concatenate(xs), np.concatenate(ys)
    # Devices draw their inputs from one pool of images: the same image may come back from several. Kept
    # once, so that v4's held-out split holds no image it trained on.
    _, first_seen = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first_seen)
    distinct = len(keep)
    x, y = x[keep], y[keep]
    path = out / "v4" / "captured.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    story.say(
        s,
        f"dataset: {distinct} distinct labelled images from {len(captures)} capture(s), taken after the shift "
        f"-> {path}",
        captured=len(x),
        captures=captures,
    )
    return x, y


def retrain(
    api: Api, story: Story, args: Any, built: dict[str, Any], captured: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Build v4 from the original data plus the captured samples; compare it with v2 on the held-out ones."""
    from edgefleet import load_signing_key
    from edgefleet.runtime import load

    from .digits.build import build_retrained

    s = story.step("Retrain v4 on the original data plus the captured samples (distilled, pruned, int8, signed)")
    out: Path = args.out / "v4"
    key = load_signing_key(built["key"])
    with stderr_to(args.out / "build.log"):
        result, split = build_retrained(out, key, captured, "4.0.0", args.epochs)
    ev = np.load(out / "data" / "eval.npz")
    pub = [Path(f"{built['key']}.pub")]
    scores = {}
    for label, path in (("v2", built["v2"]), ("v4", result.path)):
        with load(path, pub) as m:
            pred = np.concatenate([m.predict(ev["x"][i : i + 1]) for i in range(len(ev["x"]))]).argmax(1)
        scores[label] = float((pred == ev["y"]).mean())
    ref = api("PUT", "/api/bundles", raw=Path(result.path).read_bytes())
    story.say(
        s,
        f"v4 trained on {split['original']} original + {split['train']} captured samples (repeated to weigh as "
        f"much), calibrated on {split['calib']}; on the {split['eval']} held-out captured samples: v4 "
        f"{scores['v4']:.3f}, v2 {scores['v2']:.3f}",
        v4_accuracy=scores["v4"],
        v2_accuracy_on_captured=scores["v2"],
    )
    story.say(
        s,
        f"published {ref['name']} {ref['version']} ({ref['size'] / 1024:.0f} KiB); its drift baseline is "
        f"{DRIFT_COHORT}'s inputs as they are now. (The simulated devices draw their inputs from one pool of "
        f"images: v4 has seen {split['train']} of them shifted, so its live figures below are partly on images "
        "it trained on; the held-out ones above it has not seen.)",
    )
    if scores["v4"] <= scores["v2"]:
        raise DemoFailed(f"v4 ({scores['v4']:.3f}) is no better than v2 ({scores['v2']:.3f}) on the captured data")
    return {"v4": result.path, "eval": out / "data" / "eval.npz"}


def shadow(api: Api, story: Story, args: Any) -> str:
    """Run v4 beside v2 on the drifted cohort's live calls; returns the shadow's id."""
    s = story.step(f"Run v4 in shadow beside v2 on {DRIFT_COHORT}'s live calls")
    sh = api(
        "POST",
        "/api/shadows",
        {"bundle": "digits:4.0.0", "selector": DRIFT_COHORT, "sample_rate": 1.0, "duration_s": args.shadow_s},
    )
    sid = sh["id"]
    story.say(s, f"shadow {sid}: {sh['devices']['ordered']} device(s), every call, {args.shadow_s:g} s")
    st = wait(
        f"shadow {sid} to complete",
        lambda: (lambda x: x if x["state"] != "running" else None)(api("GET", f"/api/shadows/{sid}")),
        args.shadow_s + 120,
    )
    o = st["overall"]
    if o["labelled"] < 100:
        raise DemoFailed(f"shadow {sid} came back with {o['labelled']} labelled calls (100 judge it): {o}")
    story.say(
        s,
        f"{st['devices']['reported']} device(s) reported {o['samples']} calls: v4 agrees with v2 on "
        f"{o['agreement']:.3f} of them; on the {o['labelled']} labelled ones v4 is right on "
        f"{o['candidate_accuracy']:.3f}, v2 on {o['active_accuracy']:.3f}; p95 v4 {o['candidate_p95_ms']:.3f} ms, "
        f"v2 {o['active_p95_ms']:.3f} ms",
        shadow_agreement=o["agreement"],
        shadow_candidate_accuracy=o["candidate_accuracy"],
        shadow_active_accuracy=o["active_accuracy"],
        shadow_labelled=o["labelled"],
    )
    story.say(
        s,
        f"v4 answers differently on {1 - o['agreement']:.1%} of the calls, and v2 is wrong on "
        f"{1 - o['active_accuracy']:.1%} of the labelled ones: ground truth, not agreement, judges the candidate",
    )
    return sid


def roll_out_and_recover(api: Api, story: Story, args: Any, sid: str, gates: dict[str, float]) -> None:
    """v4's canary rollout on the drifted cohort, gated on accuracy; then its accuracy and alerts."""
    s = story.step(f"Roll out v4 to {DRIFT_COHORT} after the shadow, gated on accuracy against its control")
    st = rollout(api, story, s, "digits:4.0.0", gates, 600, selector=DRIFT_COHORT, after_shadow=sid)
    figures = [(x.get("gates") or {}).get("values") or {} for x in st["stages"]]
    for i, g in enumerate(figures):
        if g.get("accuracy") is not None:
            story.say(
                s,
                f"  stage {i}: canary accuracy {g['accuracy']:.3f} vs control {g['control_accuracy']:.3f} "
                f"({g['labelled']} labelled)"
                + (
                    "; its changed predictions judged by accuracy"
                    if g.get("prediction_shift_judged_by_accuracy")
                    else ""
                ),
            )
    story.say(
        s,
        f"rollout {st['state']} in {st['duration_s']:.0f} s; devices now {versions(api)}",
        v4_state=st["state"],
        v4_gates=figures,
    )
    if st["state"] != "completed":
        raise DemoFailed(f"the v4 rollout ended {st['state']}: {st.get('history', [])[-1:]}")

    s = story.step(f"{DRIFT_COHORT} recovers: accuracy back, drift alerts closed")
    done = time.time()

    def recovered() -> Any:
        acc = _accuracy(api, "digits:4.0.0", DRIFT_COHORT, done)
        return acc if acc["labelled"] >= 300 and not _open_alerts(api) else None

    acc = wait(
        f"{DRIFT_COHORT}'s alerts to close (the drift monitor looks back {args.drift_window:g} s)",
        recovered,
        args.drift_window + 90,
        every=2,
        detail=lambda: [f"{a['bundle']} {a['cohort']} {a['feature']}" for a in _open_alerts(api)],
    )
    closed = [a for a in api("GET", "/api/alerts?state=closed") if a["cohort"] == DRIFT_COHORT]
    lo, hi = acc["ci95"]
    story.say(
        s,
        f"{DRIFT_COHORT} on v4: accuracy {acc['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {acc['labelled']} "
        f"labelled) on the same shifted inputs; {len(closed)} alert(s) on it closed, none open in the fleet",
        accuracy_recovered=acc["accuracy"],
        alerts_closed=len(closed),
        open_alerts=0,
    )
