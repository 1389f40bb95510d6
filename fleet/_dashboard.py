"""The web dashboard: server-rendered pages (Jinja2, inline SVG charts), no JavaScript build step.

Operators sign in with an API token (kept in an HttpOnly cookie). Pages: fleet overview, devices and
device page, rollouts (create, pause, resume, abort; the rollout page refreshes itself while it runs),
drift (per-feature statistics, baseline against live histogram, PSI over time).
"""

from __future__ import annotations

import functools
import html
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from edgefleet import InputError
from edgefleet._drift import psi

from ._accuracy import accuracy_report, accuracy_series
from ._charts import RANGES, charts, device_counts, device_history, fleet_history, svg_chart, update_outcomes
from ._drift import acknowledge, baseline_of, compare_cohorts, drift_report, list_alerts
from ._rollups import ALL, Rollup, accumulate, empty_merge
from ._rollups import series as rollup_series
from ._server import FleetServer

__all__ = ["mount_dashboard"]

COOKIE = "edgefleet_token"


def _svg_bars(ref: list[float], live: np.ndarray | None) -> str:
    w, h = 160, 40
    n = len(ref)
    live_p = (live / live.sum()) if live is not None and live.sum() else None
    top = max([*ref, *(live_p.tolist() if live_p is not None else [])] or [1.0]) or 1.0
    bw = w / max(n, 1) / 2
    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="baseline against live histogram">']
    for i, r in enumerate(ref):
        x = i * 2 * bw
        rh = r / top * (h - 2)
        parts.append(f'<rect x="{x:.1f}" y="{h - rh:.1f}" width="{bw:.1f}" height="{rh:.1f}" fill="#9ca3af"/>')
        if live_p is not None:
            lh = float(live_p[i]) / top * (h - 2)
            parts.append(f'<rect x="{x + bw:.1f}" y="{h - lh:.1f}" width="{bw:.1f}" height="{lh:.1f}" fill="#2563eb"/>')
    parts.append("</svg>")
    return "".join(parts)


def _proportions(counts: Any) -> list[float]:
    c = np.asarray(counts, np.float64)
    return (c / c.sum()).tolist() if c.sum() else c.tolist()


def _svg_line(values: list[float | None], threshold: float) -> str:
    w, h = 160, 40
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    if not pts:
        return '<span class="muted">-</span>'
    top = max(max(v for _, v in pts), threshold * 1.2)
    step = w / max(len(values) - 1, 1)
    coords = " ".join(f"{i * step:.1f},{h - v / top * (h - 2):.1f}" for i, v in pts)
    ty = h - threshold / top * (h - 2)
    return (
        f'<svg width="{w}" height="{h}" role="img" aria-label="PSI over time">'
        f'<line x1="0" y1="{ty:.1f}" x2="{w}" y2="{ty:.1f}" stroke="#c62828" stroke-dasharray="3,3"/>'
        f'<polyline points="{coords}" fill="none" stroke="#2563eb" stroke-width="1.5"/></svg>'
    )


def _series(rows: list[Rollup], baseline: dict[str, Any], buckets: int = 12) -> dict[str, list[float | None]]:
    """PSI against the baseline per feature in BUCKETS equal spans of the rollup rows' time."""
    if not rows:
        return {}
    t0, t1 = rows[0].bucket, rows[-1].bucket + 1e-9
    width = (t1 - t0) / buckets or 1.0
    acc = [empty_merge() for _ in range(buckets)]
    for r in rows:
        accumulate(acc[min(buckets - 1, int((r.bucket - t0) / width))], r.counts)
    refs = {f["name"]: f["proportions"] for f in baseline["inputs"]}
    for k in ("predicted_class", "confidence"):
        refs[f"output:{k}"] = baseline["outputs"][k]["proportions"]
    out: dict[str, list[float | None]] = {}
    for k, ref in refs.items():
        group, _, key = k.rpartition(":")
        vals = []
        for m in acc:
            c = m["outputs" if group else "inputs"].get(key)
            vals.append(round(psi(ref, c), 4) if c is not None and c.sum() and len(c) == len(ref) else None)
        out[k] = vals
    return out


# The drift page's time ranges (the query's `hours`): seconds back from now; '' is everything kept.
_RANGES: dict[str, float | None] = {"": None, "1": 3600.0, "6": 6 * 3600.0, "24": 86400.0, "168": 7 * 86400.0}


def mount_dashboard(app: FastAPI, server: FleetServer) -> None:
    templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

    def authed(request: Request) -> bool:
        tok = request.cookies.get(COOKIE)
        return bool(tok) and server.check_token(f"Bearer {tok}")

    def page(request: Request, name: str, **ctx: Any) -> Response:
        if not authed(request):
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return templates.TemplateResponse(request, name, ctx)

    def signed_in(handler: Callable[..., Response]) -> Callable[..., Response]:
        """Check the token before the handler does any work: an unauthenticated request costs a cookie
        lookup, never a drift computation, and cannot tell which devices or rollouts exist."""

        @functools.wraps(handler)
        def wrapper(request: Request, *args: Any, **kwargs: Any) -> Response:
            if not authed(request):
                return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
            return handler(request, *args, **kwargs)

        return wrapper

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> Response:
        return templates.TemplateResponse(request, "login.html", {"error": None, "next": next})

    @app.post("/login", include_in_schema=False)
    def login(request: Request, token: str = Form(...)) -> Response:
        if not server.check_token(f"Bearer {token.strip()}"):
            return templates.TemplateResponse(
                request, "login.html", {"error": "That token is not valid."}, status_code=401
            )
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict")
        return resp

    def _bundles() -> list[str]:
        return [f"{n}:{v}" for n, v in server.published()]

    def _open_alerts() -> list[dict[str, Any]]:
        alerts = list_alerts(server.db, "open")
        for a in alerts:
            a["opened_text"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["opened"]))
        return alerts

    def _grouped(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Open alerts per bundle x cohort: one row each, with its kinds and features (the worst first)."""
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for a in sorted(alerts, key=lambda a: -(a.get("psi") or 0)):
            g = groups.setdefault(
                (a["bundle"], a["cohort"]),
                {"bundle": a["bundle"], "cohort": a["cohort"], "alerts": [], "kinds": set(), "opened": a["opened"]},
            )
            g["alerts"].append(a)
            g["kinds"].add(a["kind"])
            g["opened"] = min(g["opened"], a["opened"])
        out = sorted(groups.values(), key=lambda g: (g["bundle"], g["cohort"] != "*", g["cohort"]))
        for g in out:
            g["kinds"] = sorted(g["kinds"])
            g["opened_text"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(g["opened"]))
            g["ids"] = ",".join(a["id"] for a in g["alerts"])
            g["acknowledged"] = all(a["acknowledged"] for a in g["alerts"])
        return out

    @app.post("/alerts/ack", include_in_schema=False)
    def ack(request: Request, ids: str = Form(...), mute_hours: float = Form(0.0)) -> Response:
        if not authed(request):
            return RedirectResponse("/login", status_code=303)
        try:
            acknowledge(server.db, [i for i in ids.split(",") if i], "operator", mute_hours * 3600)
        except InputError:
            pass  # alerts closed meanwhile: nothing left to acknowledge
        return RedirectResponse("/", status_code=303)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @signed_in
    def overview(request: Request, hours: str = "6") -> Response:
        span = RANGES.get(hours)
        if span is None:
            return HTMLResponse(f"hours must be one of {', '.join(RANGES)}", status_code=400)
        now = time.time()
        drawn = charts(fleet_history(server.db, now - span, now), now - span, now, "per bundle version")
        drawn.append(svg_chart("devices", device_counts(server.db, now - span, now), now - span, now))
        drawn.append(svg_chart("updates ended", update_outcomes(server.db, now - span, now), now - span, now))
        # counted in SQL: the overview of a 10,000-device fleet reads no device list
        versions: dict[str, int] = {}
        total = online = 0
        for name, version, n, up in server.db.query(
            "SELECT bundle_name, bundle_version, COUNT(*), COALESCE(SUM(online), 0) FROM devices "
            "GROUP BY bundle_name, bundle_version"
        ):
            key = f"{name}:{version}" if version else "(none)"
            versions[key] = versions.get(key, 0) + int(n)
            total, online = total + int(n), online + int(up)
        running = server.db.query("SELECT COUNT(*) FROM rollouts WHERE state = 'running'")[0][0]
        every = _open_alerts()
        alerts = [a for a in every if not a["muted"]]  # muted ones: acknowledged, hidden for a while
        return page(
            request,
            "overview.html",
            registered=total,
            online=online,
            versions=sorted(versions.items()),
            alerts=alerts,
            muted=len(every) - len(alerts),
            groups=_grouped(alerts),
            rollouts_running=running,
            charts=drawn,
            hours=hours,
            ranges=list(RANGES),
        )

    @app.get("/devices", response_class=HTMLResponse, include_in_schema=False)
    @signed_in
    def devices(
        request: Request,
        q: str = "",
        tag: str = "",
        version: str = "",
        online: str = "",
        sort: str = "id",
        page_no: int = 1,
    ) -> Response:
        per_page = 50
        state = {"yes": True, "no": False}.get(online)
        try:
            total, devs = server.find_devices(
                q=q or None,
                tag=tag or None,
                version=version or None,
                online=state,
                sort=sort,
                limit=per_page,
                offset=(max(1, page_no) - 1) * per_page,
            )
        except InputError as exc:
            return HTMLResponse(html.escape(str(exc)), status_code=400)
        for d in devs:
            d["last_seen_text"] = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d["last_seen"])) if d["last_seen"] else "-"
            )
        pages = max(1, -(-total // per_page))
        query = {"q": q, "tag": tag, "version": version, "online": online, "sort": sort}
        return page(
            request,
            "devices.html",
            devices=devs,
            total=total,
            page_no=min(max(1, page_no), pages),
            pages=pages,
            query=query,
            link=lambda n: "/devices?" + urllib.parse.urlencode({**query, "page_no": n}),
        )

    @app.get("/devices/{device_id}", response_class=HTMLResponse, include_in_schema=False)
    @signed_in
    def device(request: Request, device_id: str, hours: str = "6") -> Response:
        d = server.device(device_id)
        if d is None:
            return HTMLResponse(f"no device {html.escape(device_id)}", status_code=404)
        span = RANGES.get(hours)
        if span is None:
            return HTMLResponse(f"hours must be one of {', '.join(RANGES)}", status_code=400)
        now = time.time()
        drawn = charts(device_history(server.db, device_id, now - span, now), now - span, now, "per bundle version")
        d["last_seen_text"] = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d["last_seen"])) if d["last_seen"] else "never"
        )
        events = []
        for ev in server.events(device_id, 50):
            ts, typ, b = ev["ts"], ev["type"], ev["body"]
            detail = b.get("reason") or (
                f"{b.get('from_state')} → {b.get('to_state')}" if typ == "update_state" else ""
            )
            # update events name their bundle (`bundle`, or `target` / `to` for some), others a `version`
            ref: dict[str, Any] = next((b[k] for k in ("bundle", "target", "to") if isinstance(b.get(k), dict)), {})
            version = b.get("version") or ref.get("version")
            if not isinstance(version, str):
                version = ""  # events are the device's word: only a string is shown
            events.append(
                {
                    "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)),
                    "type": typ,
                    "version": version or "",
                    "detail": detail,
                }
            )
        refusals = server.refusals(device_id)
        for r in refusals:
            r["time"] = time.strftime("%H:%M:%S", time.gmtime(r["last"]))
        commands = server.commands(device_id, 20)
        for c in commands:
            c["time"] = time.strftime("%H:%M:%S", time.gmtime(c["sent"]))
        return page(
            request,
            "device.html",
            d=d,
            events=events,
            refusals=refusals,
            commands=commands,
            charts=drawn,
            hours=hours,
            ranges=list(RANGES),
        )

    def _shadows_page(request: Request, error: str | None = None) -> Response:
        items = server.shadows.list()
        for s in items:
            s["created_text"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(s["created"]))
            h = server.shadows.series(s["id"], shadow=s)
            s["charts"] = [
                svg_chart("agreement with the active bundle", {"agreement": h["agreement"]}, h["since"], h["until"]),
                svg_chart(
                    "p95 latency (ms)",
                    {"active": h["active_p95_ms"], "candidate": h["candidate_p95_ms"]},
                    h["since"],
                    h["until"],
                ),
                svg_chart("output PSI, candidate vs active", {"PSI": h["output_psi"]}, h["since"], h["until"]),
            ]
        running = any(s["state"] == "running" for s in items)
        return page(
            request, "shadows.html", shadows=items, bundles=_bundles(), error=error, refresh=5 if running else None
        )

    @app.get("/shadows", response_class=HTMLResponse, include_in_schema=False)
    @signed_in
    def shadows(request: Request) -> Response:
        return _shadows_page(request)

    @app.post("/shadows", include_in_schema=False)
    def create_shadow(
        request: Request,
        bundle: str = Form(...),
        selector: str = Form(...),
        sample_rate: float = Form(0.1),
        duration_s: float = Form(600.0),
    ) -> Response:
        if not authed(request):
            return RedirectResponse("/login", status_code=303)
        try:
            server.shadows.create(bundle, selector.strip(), sample_rate, duration_s)
        except InputError as exc:
            return _shadows_page(request, error=str(exc))
        return RedirectResponse("/shadows", status_code=303)

    @app.post("/shadows/{sid}/stop", include_in_schema=False)
    def stop_shadow(request: Request, sid: str) -> Response:
        if not authed(request):
            return RedirectResponse("/login", status_code=303)
        try:
            server.shadows.stop(sid)
        except InputError as exc:
            return _shadows_page(request, error=str(exc))
        return RedirectResponse("/shadows", status_code=303)

    @app.get("/rollouts", response_class=HTMLResponse, include_in_schema=False)
    @signed_in
    def rollouts(request: Request, error: str | None = None) -> Response:
        return page(request, "rollouts.html", rollouts=server.rollouts.list(), bundles=_bundles(), error=error)

    @app.post("/rollouts", include_in_schema=False)
    def create(
        request: Request,
        bundle: str = Form(...),
        selector: str = Form(...),
        stages: str = Form(...),
        min_stage_s: float = Form(10.0),
    ) -> Response:
        if not authed(request):
            return RedirectResponse("/login", status_code=303)
        try:
            rid = server.rollouts.create(
                bundle, selector.strip(), [float(s) for s in stages.split(",")], {"min_stage_s": min_stage_s}
            )
        except (InputError, ValueError) as exc:
            return page(request, "rollouts.html", rollouts=server.rollouts.list(), bundles=_bundles(), error=str(exc))
        return RedirectResponse(f"/rollouts/{rid}", status_code=303)

    @app.get("/rollouts/{rid}", response_class=HTMLResponse, include_in_schema=False)
    @signed_in
    def rollout(request: Request, rid: str) -> Response:
        try:
            r = server.rollouts.get(rid)
        except InputError:
            return HTMLResponse(f"no rollout {html.escape(rid)}", status_code=404)
        for h in r["history"]:
            h["time"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h["ts"]))
        actions = [
            ("pause", r["state"] == "running"),
            ("resume", r["state"] in ("paused", "halted")),
            ("abort", r["state"] in ("running", "paused", "halted")),
        ]
        return page(request, "rollout.html", r=r, actions=actions, refresh=2 if r["state"] == "running" else None)

    @app.post("/rollouts/{rid}/{action}", include_in_schema=False)
    def act(request: Request, rid: str, action: str) -> Response:
        if not authed(request):
            return RedirectResponse("/login", status_code=303)
        if action in ("pause", "resume", "abort"):
            try:
                server.rollouts.set_state(rid, action)
            except InputError:
                pass
        return RedirectResponse(f"/rollouts/{rid}", status_code=303)

    @app.get("/drift", response_class=HTMLResponse, include_in_schema=False)
    @signed_in
    def drift(
        request: Request, bundle: str | None = None, tag: str | None = None, hours: str = "", against: str = ""
    ) -> Response:
        bundles = _bundles()
        bundle = bundle or (bundles[-1] if bundles else None)
        report = hist = series = accuracy = acc_chart = versus = None
        span = _RANGES.get(hours)
        if bundle:
            name, _, version = bundle.partition(":")
            cohort = tag or ALL
            # The rollups are read once; the report, accuracy, bars and lines are all made from them.
            buckets = rollup_series(server.db, name, version, cohort, None if span is None else time.time() - span)
            merged = empty_merge()
            for r in buckets:
                accumulate(merged, r.counts)
            try:
                accuracy = accuracy_report(server.db, name, version, cohort=cohort, merged=merged)
            except InputError:
                accuracy = None
            if accuracy is not None and accuracy["labelled"] and buckets:
                now = time.time()
                start = now - span if span is not None else buckets[0].bucket
                acc = accuracy_series(buckets, start, now)
                acc_chart = svg_chart(
                    "accuracy on fed-back labels",
                    {"accuracy": acc["accuracy"], "95% low": acc["ci_low"], "95% high": acc["ci_high"]},
                    start,
                    now,
                )
            try:
                report = drift_report(server.db, name, version, cohort=cohort, merged=merged)
            except InputError:
                report = None
            if report is not None:
                baseline = baseline_of(server.db, name, version)
                refs = {f["name"]: f["proportions"] for f in baseline["inputs"]}
                refs.update(
                    {f"output:{k}": baseline["outputs"][k]["proportions"] for k in ("predicted_class", "confidence")}
                )
                live = {**merged["inputs"], **{f"output:{k}": v for k, v in merged["outputs"].items()}}
                hist = {k: _svg_bars(ref, live.get(k)) for k, ref in refs.items()}
                th = report["thresholds"]["psi"]
                series = {k: _svg_line(v, th) for k, v in _series(buckets, baseline).items()}
                for k in refs:
                    series.setdefault(k, '<span class="muted">-</span>')
            if against and tag and against != tag:
                # Cohort against cohort on the same version and range: the tag's live counts (blue) beside the
                # other cohort's (grey), per feature, with the same statistics as against the baseline.
                other = empty_merge()
                for r in rollup_series(server.db, name, version, against, None if span is None else time.time() - span):
                    accumulate(other, r.counts)
                stats = compare_cohorts(merged, other)
                mine = {**merged["inputs"], **{f"output:{k}": v for k, v in merged["outputs"].items()}}
                theirs = {**other["inputs"], **{f"output:{k}": v for k, v in other["outputs"].items()}}
                versus = {
                    "against": against,
                    "samples": [merged["samples"], other["samples"]],
                    "features": stats,
                    "bars": {k: _svg_bars(_proportions(theirs[k]), np.asarray(mine[k])) for k in stats},
                }
        return page(
            request,
            "drift.html",
            bundles=bundles,
            bundle=bundle,
            tag=tag,
            hours=hours,
            ranges=list(_RANGES),
            report=report,
            hist=hist,
            series=series,
            accuracy=accuracy,
            acc_chart=acc_chart,
            against=against,
            versus=versus,
        )
