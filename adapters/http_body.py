"""Reading a request's body the same way on every route: within a size limit and a time limit.

The limits are the daemon's (``[server]``), set on the app by the web server; a route passes its own
size limit, fitting what its platform really sends (a chat event is a few kilobytes).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from core.errors import BadInput, TooLarge

__all__ = [
    "BODY_TIMEOUT", "EVENT_LIMIT", "TRUSTED_PROXIES", "RequestTimeout", "client_address", "off_loop", "over_tls",
    "parse_json",
    "read_limited",
]

BODY_TIMEOUT = web.AppKey("imsight_body_timeout_s", float)
TRUSTED_PROXIES = web.AppKey("imsight_trusted_proxies", frozenset)
EVENT_LIMIT = 1 << 20  # a platform's event: Telegram, Feishu and DingTalk send kilobytes
_CHUNK = 256 * 1024
T = TypeVar("T")
_ON_LOOP_BYTES = 64 * 1024


class RequestTimeout(BadInput):
    status = 408
    code = "request_timeout"


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, or 413 past ``limit`` (on the declared length before a byte is read), or 408."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body is over the {limit}-byte limit for {request.path}")
    data = bytearray()
    try:
        async with asyncio.timeout(request.app.get(BODY_TIMEOUT, 60.0)):
            async for chunk in request.content.iter_chunked(_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise TooLarge(f"body is over the {limit}-byte limit for {request.path}")
    except TimeoutError:
        raise RequestTimeout("the body did not arrive in time") from None
    return bytes(data)


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, on a thread when ``size`` bytes make it slow enough to stall the loop (a 30 MB
    JSON body with base64 images takes the loop away for a tenth of a second or more)."""
    if size > _ON_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def parse_json(raw: bytes | str, *, code: str = "invalid_json") -> Any:
    """JSON, on a thread when it is large; 400 ``code`` for junk, deep nesting included."""
    try:
        return await off_loop(len(raw), json.loads, raw)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"body is not valid JSON: {str(exc)[:200]}", code=code) from None


def client_address(request: web.Request) -> str:
    """The caller's address; behind a trusted proxy, the one its ``X-Forwarded-For`` names last."""
    remote = request.remote or ""
    if remote in request.app.get(TRUSTED_PROXIES, frozenset()):
        forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",") if a.strip()]
        if forwarded:
            return forwarded[-1]  # the address our proxy saw; earlier entries are the client's say-so
    return remote


def over_tls(request: web.Request) -> bool:
    """Whether the client reached us over HTTPS: directly, or as a trusted proxy's X-Forwarded-Proto says."""
    if request.secure:
        return True
    forwarded = request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    return forwarded and (request.remote or "") in request.app.get(TRUSTED_PROXIES, frozenset())
