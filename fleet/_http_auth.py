"""Authentication and body limits before any request body is read.

FastAPI reads and parses a JSON body before a route's dependencies run, so an unauthenticated POST of any
size was read whole (and parsed) before its 401. This ASGI middleware answers every state-changing request
that lacks its credential at once, reading nothing, and refuses a body over the route's limit by its
declared length or as it arrives: operators' routes take an API token and at most 1 MiB, `PUT /api/bundles`
(streamed to disk by its route) 2 GiB, a device's capture upload its device token and 64 MiB, dashboard
forms the operator's cookie and 64 KiB, `/login` 4 KiB.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastapi import HTTPException
from starlette.requests import cookie_parser

from ._auth import device_of
from ._captures import MAX_UPLOAD_BYTES
from ._dashboard import COOKIE
from ._server import MAX_BUNDLE_BYTES

if TYPE_CHECKING:
    from ._server import FleetServer

__all__ = ["AuthFirst"]

_API_BODY = 1 << 20
_FORM_BODY = 64 << 10
_LOGIN_BODY = 4 << 10
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _TooLarge(HTTPException):
    """Raised while a body is read: FastAPI answers an HTTPException as it is (any other exception while it
    parses a body would become a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the {limit}-byte limit of this route")
        self.limit = limit


class AuthFirst:
    def __init__(self, app: Any, server: FleetServer) -> None:
        self.app, self.server = app, server

    def _rule(self, method: str, path: str, headers: dict[bytes, bytes]) -> tuple[bool, int, bool]:
        """(allowed, body limit, is the dashboard) for a state-changing request."""
        scheme, _, credential = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
        # the scheme in any case, as the routes' own HTTPBearer takes it
        auth = f"Bearer {credential.strip()}" if scheme.lower() == "bearer" and credential.strip() else None
        if path == "/login":
            return True, _LOGIN_BODY, True
        if path.startswith("/api/captures/") and path.endswith("/upload"):
            return device_of(self.server.db, auth) is not None, MAX_UPLOAD_BYTES, False
        if path.startswith("/api/"):
            limit = MAX_BUNDLE_BYTES if (method, path) == ("PUT", "/api/bundles") else _API_BODY
            return self.server.check_token(auth), limit, False
        # Starlette's own parser (the pages read the cookie with it): it copes with other apps' cookies
        tok = cookie_parser(headers.get(b"cookie", b"").decode("latin-1")).get(COOKIE, "")
        return bool(tok) and self.server.check_token(f"Bearer {tok}"), _FORM_BODY, True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in _WRITES:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        # the token lookup is a database query: off the event loop, as the routes' own work is
        allowed, limit, dashboard = await anyio.to_thread.run_sync(self._rule, scope["method"], scope["path"], headers)
        if not allowed:
            if dashboard:
                await _answer(send, 303, b"", [(b"location", b"/login")])
            else:
                detail = (
                    "missing or wrong token: an operator's API token ('edgefleet fleet token create'), or a device's"
                )
                await _answer(
                    send, 401, json.dumps({"detail": detail}).encode(), [(b"content-type", b"application/json")]
                )
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(scope["path"], send, limit)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return msg

        started = False

        async def tracked(msg: Any) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:  # raised where no route turned it into its answer (a route streaming the body)
            if not started:
                await self._too_large(scope["path"], send, limit)

    async def _too_large(self, path: str, send: Any, limit: int) -> None:
        if path.startswith("/api/captures/"):  # a device's upload refused: counted with the route's own refusals
            await anyio.to_thread.run_sync(self.server.db.bump, "capture_uploads_refused")
        body = json.dumps({"detail": f"request body is larger than the {limit}-byte limit of this route"}).encode()
        await _answer(send, 413, body, [(b"content-type", b"application/json")])


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
