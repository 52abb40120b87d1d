"""Access rules of the web app: bind address vs token, the bearer-token check, the request-body limit.

- The server listens on 127.0.0.1 unless told otherwise; any non-loopback bind needs a token
  (``--token`` or ``$PIPELINE_WEB_TOKEN``), required as ``Authorization: Bearer <token>`` on every ``/api``
  call. The token is compared in constant time and never logged (it is not in any URL the page builds).
- Bodies are limited while they stream in (:class:`BodyLimit`): a declared ``Content-Length`` over the limit
  is refused before reading anything, a chunked body is cut off as soon as it passes the limit.
- CORS is closed unless origins are named (no ``Access-Control-Allow-*`` header at all by default).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
from typing import Any, Awaitable, Callable

from fastapi import HTTPException, Request

from pipeline.errors import UsageError

__all__ = ["TOKEN_ENV", "is_loopback", "resolve_token", "require_token", "BodyLimit", "BodyTooLarge"]

TOKEN_ENV = "PIPELINE_WEB_TOKEN"
_MIN_TOKEN_LEN = 16


def is_loopback(host: str) -> bool:
    """True if ``host`` (a name or an address) only resolves to loopback addresses."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def resolve_token(host: str, flag_token: str | None) -> str | None:
    """The token to require (flag first, then the env variable); a UsageError for a bind that needs one."""
    token = flag_token or os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < _MIN_TOKEN_LEN:
        raise UsageError(f"the API token is shorter than {_MIN_TOKEN_LEN} characters",
                         hint=f"use a random one, e.g. export {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    if token is None and not is_loopback(host):
        raise UsageError(f"--host {host} is reachable from other machines and needs an API token",
                         hint=f"set {TOKEN_ENV} (preferred: not visible in `ps`) or pass --token, or bind to 127.0.0.1")
    return token


def require_token(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that checks ``Authorization: Bearer <token>`` (no check when token is None)."""
    expected = token.encode() if token else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(status_code=401, detail={"error": "missing or wrong API token",
                                                         "hint": "send the header Authorization: Bearer <token>"},
                                headers={"WWW-Authenticate": "Bearer"})

    return check


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when a request body passes the limit."""


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than ``max_bytes`` with 413, whatever the route."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        exceeded = False
        refused = False

        async def limited_receive() -> dict:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal refused
            if not exceeded:
                await send(message)
            elif not refused:  # the app turned BodyTooLarge into its own error response: answer 413 instead
                refused = True
                await self._refuse(send)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if exceeded and not refused:
            await self._refuse(send)

    async def _refuse(self, send: Callable) -> None:
        body = json.dumps({"detail": {"error": f"request body larger than {self.max_bytes:,} bytes",
                                      "hint": "upload a smaller image (the server's --max-upload-mb)"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
