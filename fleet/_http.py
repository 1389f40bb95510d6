"""The HTTP side of the fleet server: REST API (OpenAPI at /openapi.json), bundle downloads with
Range, Prometheus /metrics, /healthz. Imported only by `edgefleet fleet serve` (needs the fleet extra)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edgefleet import BundleError, InputError

from ._auth import device_of
from ._captures import MAX_UPLOAD_BYTES
from ._http_auth import AuthFirst
from ._rollups import ALL, accumulate, empty_merge
from ._server import MAX_BUNDLE_BYTES, FleetServer

__all__ = ["create_app"]

_CHUNK = 256 * 1024  # bytes a bundle download is read from disk and sent in


def create_app(server: FleetServer) -> Any:
    app = FastAPI(title="edgefleet fleet server", version="1", description="Devices, bundles, rollouts, drift.")
    app.add_middleware(AuthFirst, server=server)
    bearer = HTTPBearer(auto_error=False)

    def operator(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if creds is None or not server.check_token(f"Bearer {creds.credentials}"):
            raise HTTPException(401, "missing or wrong API token: create one with 'edgefleet fleet token create'")

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(BundleError)
    async def _bundle(request: Request, exc: BundleError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"ok": server.ready}, status_code=200 if server.ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:  # noqa: B008
        if not server.config.metrics_open:
            operator(creds)
        return server.metrics()

    @app.get("/api/devices", dependencies=[Depends(operator)])
    def devices(
        response: Response,
        q: str | None = None,
        tag: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        sort: str = "id",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Registered devices with their online state, bundle, tags: all, or those whose id contains Q, with
        TAG, on VERSION, online or not, sorted (`id`, `last_seen`, `version`), a page of LIMIT from OFFSET;
        the `X-Total-Count` header says how many match."""
        if limit is not None and not 1 <= limit <= 10_000:
            raise InputError("limit must be between 1 and 10000")
        total, found = server.find_devices(
            q=q, tag=tag, version=version, online=online, sort=sort, limit=limit, offset=offset
        )
        response.headers["X-Total-Count"] = str(total)
        return found

    @app.post("/api/devices", dependencies=[Depends(operator)])
    def register(body: dict[str, Any]) -> Any:
        """Provision a device (`{"id": ..., "tags": [...]}`): returns its broker credentials and the trusted keys.

        `{"devices": [{"id": ..., "tags": [...]}, ...]}` provisions many at once and returns a list."""

        def one(item: Any) -> tuple[str, list[str]]:
            if not isinstance(item, dict):
                raise InputError('each device must be an object {"id": ..., "tags": [...]}')
            tags = item.get("tags", [])
            if not isinstance(tags, list):
                raise InputError("tags must be a list of strings")
            return str(item.get("id", "")), [str(t) for t in tags]

        if "devices" in body:
            if not isinstance(body["devices"], list) or not body["devices"]:
                raise InputError('"devices" must be a non-empty list')
            return server.register_many([one(x) for x in body["devices"]])
        return server.register(*one(body))

    @app.put("/api/bundles", dependencies=[Depends(operator)])
    async def publish(request: Request) -> dict[str, Any]:
        """Upload a bundle (the raw .efb as the body); it is verified against the server's trusted keys."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BUNDLE_BYTES:
            raise HTTPException(413, f"upload of {declared} bytes is larger than the {MAX_BUNDLE_BYTES}-byte limit")
        # Streamed to disk with the limit enforced while reading; the folder goes whatever happens.
        with tempfile.TemporaryDirectory(prefix="edgefleet-upload-") as d:
            tmp = Path(d) / "upload.efb"
            total = 0
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > MAX_BUNDLE_BYTES:
                        raise HTTPException(413, f"upload is larger than the {MAX_BUNDLE_BYTES}-byte limit")
                    f.write(chunk)
            return server.publish_bundle(tmp)

    @app.post("/api/captures", dependencies=[Depends(operator)])
    def create_capture(body: dict[str, Any]) -> dict[str, Any]:
        """Ask a cohort for captured samples: `{"selector": TAG, "samples": N, "when_alert": false, "alert_id": null}`.
        Devices that opted in (`capture_upload = true`) upload them with the labels fed back for them."""
        return server.captures.create(
            str(body.get("selector") or ""),
            body.get("samples", 100),
            alert_id=body.get("alert_id"),
            when_alert=bool(body.get("when_alert", False)),
        )

    @app.get("/api/captures", dependencies=[Depends(operator)])
    def list_captures() -> list[dict[str, Any]]:
        return server.captures.list()

    @app.get("/api/captures/{cid}", dependencies=[Depends(operator)])
    def get_capture(cid: str) -> dict[str, Any]:
        """A capture: what was asked, each device's upload (samples, labelled, bundle), refusals."""
        return server.captures.get(cid)

    @app.get("/api/captures/{cid}/dataset.npz", dependencies=[Depends(operator)])
    def export_capture(cid: str, labelled_only: bool = False) -> Response:
        """The capture as one .npz (`x`, `y` = fed-back labels or -1, `device`, `bundle`, `ts`)."""
        return Response(server.captures.export(cid, labelled_only), media_type="application/octet-stream")

    @app.post("/api/captures/{cid}/upload")
    async def upload_capture(cid: str, request: Request) -> dict[str, Any]:
        """A device's answer to a capture, with its own download token (see runtime/_upload.py)."""
        device = device_of(server.db, request.headers.get("authorization"))
        if device is None:
            raise HTTPException(401, "a capture upload needs the device's own token (http_token in device.toml)")
        try:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"upload of {declared} bytes is larger than the {MAX_UPLOAD_BYTES}-byte limit")
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > MAX_UPLOAD_BYTES:
                    raise HTTPException(413, f"upload is larger than the {MAX_UPLOAD_BYTES}-byte limit")
                chunks.append(chunk)
            return server.captures.upload(cid, device, b"".join(chunks))
        except (HTTPException, InputError):
            server.db.bump("capture_uploads_refused")  # on /metrics: edgefleet_capture_uploads_refused_total
            raise

    @app.delete("/api/devices/{device_id}/captures", dependencies=[Depends(operator)])
    def delete_captures(device_id: str) -> dict[str, Any]:
        """Delete every sample captured from DEVICE_ID."""
        return {"device": device_id, "uploads_deleted": server.captures.delete_device(device_id)}

    @app.get("/api/bundles", dependencies=[Depends(operator)])
    def bundles() -> list[dict[str, Any]]:
        return [server.bundle_ref(n, v) for n, v in server.published()]

    @app.post("/api/devices/{device_id}/desired", dependencies=[Depends(operator)])
    def desire(device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Order one device onto a published bundle (`{"bundle": "NAME:VERSION", "action": "update"}`)."""
        if not server.has_device(device_id):
            raise HTTPException(404, f"no device {device_id}")
        name, _, version = str(body.get("bundle", "")).partition(":")
        server.set_desired(device_id, name, version, body.get("rollout"), body.get("action", "update"))
        return {"device": device_id, "bundle": f"{name}:{version}"}

    @app.post("/api/rollouts", dependencies=[Depends(operator)])
    def create_rollout(body: dict[str, Any]) -> dict[str, Any]:
        """Start a rollout: `{"bundle": "NAME:VERSION", "selector": TAG, "stages": [10, 50, 100], "gates": {...}}`."""
        stages = [float(s) for s in body.get("stages", [10, 50, 100])]
        bundle = str(body.get("bundle", ""))
        after = body.get("after_shadow")
        if after is not None:
            from ._shadows import check_passed

            check_passed(
                server.shadows.get(str(after)),
                bundle,
                float(body.get("min_agreement", 0.98)),
                float(body.get("max_shadow_p95_ratio", 1.5)),
            )
        rid = server.rollouts.create(bundle, str(body.get("selector", "")), stages, body.get("gates"))
        if after is not None:
            server.rollouts.note(rid, f"after shadow {after}: passed")
        return server.rollouts.get(rid)

    @app.post("/api/shadows", dependencies=[Depends(operator)])
    def create_shadow(body: dict[str, Any]) -> dict[str, Any]:
        """Order a shadow deployment: `{"bundle": "NAME:VERSION", "selector": TAG, "sample_rate": 0.1,
        "duration_s": 600, "min_samples": 0}`."""
        sid = server.shadows.create(
            str(body.get("bundle", "")),
            str(body.get("selector", "")),
            body.get("sample_rate", 0.1),
            body.get("duration_s", 600.0),
            body.get("min_samples", 0),
        )
        return server.shadows.get(sid)

    @app.get("/api/shadows", dependencies=[Depends(operator)])
    def shadows() -> list[dict[str, Any]]:
        return server.shadows.list()

    @app.get("/api/shadows/{sid}", dependencies=[Depends(operator)])
    def shadow(sid: str) -> dict[str, Any]:
        return server.shadows.get(sid)

    @app.get("/api/shadows/{sid}/series", dependencies=[Depends(operator)])
    def shadow_series(sid: str, buckets: int = 48) -> dict[str, Any]:
        """The shadow over time: per span, samples per minute, agreement, both p95s, the output PSI."""
        if not 1 <= buckets <= 500:
            raise InputError("buckets must be between 1 and 500")
        return server.shadows.series(sid, buckets)

    @app.post("/api/shadows/{sid}/stop", dependencies=[Depends(operator)])
    def stop_shadow(sid: str) -> dict[str, Any]:
        return server.shadows.stop(sid)

    @app.get("/api/rollouts", dependencies=[Depends(operator)])
    def rollouts() -> list[dict[str, Any]]:
        return server.rollouts.list()

    @app.get("/api/rollouts/{rid}", dependencies=[Depends(operator)])
    def rollout(rid: str) -> dict[str, Any]:
        return server.rollouts.get(rid)

    @app.post("/api/rollouts/{rid}/{action}", dependencies=[Depends(operator)])
    def rollout_action(rid: str, action: str) -> dict[str, Any]:
        if action not in ("pause", "resume", "abort"):
            raise HTTPException(404, f"unknown action {action}; use pause, resume or abort")
        return server.rollouts.set_state(rid, action)

    @app.get("/api/drift", dependencies=[Depends(operator)])
    def drift(
        bundle: str, since: float | None = None, tag: str | None = None, against: str | None = None
    ) -> dict[str, Any]:
        """Fleet drift for BUNDLE (NAME:VERSION) against its baseline: per feature psi, js, ks, chi2, drifted.

        `tag` limits it to one cohort; `against` adds that cohort compared with another (`cohorts`)."""
        from ._drift import cohort_report, drift_report

        name, _, version = bundle.partition(":")
        rep = drift_report(server.db, name, version, cohort=tag or ALL, since=since)
        if against:
            if not tag:
                raise InputError("'against' compares two cohorts: give 'tag' as well")
            rep["cohorts"] = {
                "a": tag,
                "b": against,
                **cohort_report(server.db, name, version, tag, against, since),
            }
        return rep

    @app.get("/api/accuracy", dependencies=[Depends(operator)])
    def accuracy(bundle: str, tag: str | None = None, since: float | None = None, series: int = 0) -> dict[str, Any]:
        """Accuracy of BUNDLE (NAME:VERSION) on the labels devices fed back: overall with its 95% interval,
        precision, recall and F1 per class (each with its interval); `tag` limits it to one cohort; `series=N`
        adds accuracy over time in N equal spans from SINCE (or the first labelled minute) to now."""
        import time

        from ._accuracy import accuracy_report, accuracy_series
        from ._rollups import series as rollup_series

        if not 0 <= series <= 500:
            raise InputError("series must be between 0 and 500 spans")
        name, _, version = bundle.partition(":")
        rows = rollup_series(server.db, name, version, tag or ALL, since)
        merged = empty_merge()
        for r in rows:
            accumulate(merged, r.counts)
        rep = accuracy_report(server.db, name, version, cohort=tag or ALL, since=since, merged=merged)
        if series:
            start = since if since is not None else (rows[0].bucket if rows else time.time() - 3600)
            now = time.time()
            rep["series"] = {"since": start, "until": now, **accuracy_series(rows, start, now, series)}
        return rep

    @app.get("/api/alerts", dependencies=[Depends(operator)])
    def alerts(state: str = "open") -> list[dict[str, Any]]:
        """Drift alerts (state open, closed or all), newest first."""
        from ._drift import list_alerts

        return list_alerts(server.db, state)

    @app.post("/api/alerts/ack", dependencies=[Depends(operator)])
    def ack_alerts(body: dict[str, Any]) -> dict[str, Any]:
        """Acknowledge alerts (`{"ids": [...], "mute_hours": 0}`): recorded with who and when; muted ones leave
        the dashboard's open list until then (they stay open, and close by themselves)."""
        from ._drift import acknowledge

        ids, hours = body.get("ids"), body.get("mute_hours", 0)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InputError("ids must be a list of alert ids")
        if not isinstance(hours, (int, float)) or isinstance(hours, bool):
            raise InputError("mute_hours must be a number")
        return {"acknowledged": acknowledge(server.db, ids, "operator", float(hours) * 3600)}

    @app.post("/api/commands", dependencies=[Depends(operator)])
    def send_command(body: dict[str, Any]) -> dict[str, Any]:
        """Send a one-off command: `{"command": "flush"|"report", "device": ID}` or `{..., "selector": TAG}`;
        `args` optional. Audited; returns the command ids."""
        cmd, args = str(body.get("command", "")), body.get("args") or {}
        if not isinstance(args, dict):
            raise InputError("'args' must be an object")
        if body.get("device"):
            devices = [str(body["device"])]
        elif body.get("selector"):
            devices = [d["id"] for d in server.devices() if str(body["selector"]) in d["tags"]]
            if not devices:
                raise InputError(f"selector {body['selector']!r} matches no device")
        else:
            raise InputError("give 'device' or 'selector'")
        return {"command": cmd, "ids": dict(zip(devices, server.send_command(cmd, args, devices), strict=True))}

    @app.get("/api/devices/{device_id}/commands", dependencies=[Depends(operator)])
    def device_commands(device_id: str) -> list[dict[str, Any]]:
        """Commands sent to a device, newest first (the audit)."""
        if not server.has_device(device_id):
            raise HTTPException(404, f"no device {device_id}")
        return server.commands(device_id)

    @app.get("/api/devices/{device_id}/refusals", dependencies=[Depends(operator)])
    def device_refusals(device_id: str) -> list[dict[str, Any]]:
        """What the server refused from a device (per kind and reason, with counts), most recent first."""
        if not server.has_device(device_id):
            raise HTTPException(404, f"no device {device_id}")
        return server.refusals(device_id)

    @app.get("/api/devices/{device_id}/events", dependencies=[Depends(operator)])
    def device_events(device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """A device's reported events (update transitions, rollbacks, errors), newest first."""
        if not server.has_device(device_id):
            raise HTTPException(404, f"no device {device_id}")
        return server.events(device_id, min(max(limit, 1), 1000))

    @app.get("/bundles/{name}/{version}.efb")
    def download(name: str, version: str, request: Request) -> Response:
        """A published bundle (Range supported), for a device's download token or an operator's API token."""
        if not server.check_download(request.headers.get("authorization")):
            raise HTTPException(
                401,
                "bundle downloads need a device's token (http_token in its device.toml, from 'edgefleet fleet "
                "provision') or an operator's API token as 'Authorization: Bearer TOKEN'",
            )
        stored = server.bundle_file(name, version)
        if stored is None:
            raise HTTPException(404, f"bundle {name}:{version} is not published")
        path, size = stored
        rng = request.headers.get("range")
        start, end = 0, size - 1
        status = 200
        if rng:
            m = re.match(r"bytes=(\d*)-(\d*)$", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                raise HTTPException(416, "malformed Range header")
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or end < start:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            status = 206
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"

        def chunks() -> Iterator[bytes]:
            # Streamed from disk, a chunk at a time: a 2 GiB bundle costs its chunk, not 2 GiB per download.
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    data = f.read(min(_CHUNK, left))
                    if not data:
                        return
                    left -= len(data)
                    yield data

        return StreamingResponse(chunks(), status_code=status, headers=headers, media_type="application/octet-stream")

    from ._dashboard import mount_dashboard

    mount_dashboard(app, server)
    return app
