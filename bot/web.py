"""The daemon's one aiohttp server: every adapter's routes, /healthz, and errors as JSON."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from aiohttp import web

from adapters.http_body import BODY_TIMEOUT, EVENT_LIMIT, TRUSTED_PROXIES
from core.errors import BadInput, Busy, ImsightError

__all__ = ["WebServer"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class WebServer:
    """Routes are added before ``start()``; ``stop()`` stops taking requests first."""

    def __init__(self, host: str, port: int, *, shutdown_timeout_s: float, allowed_hosts: Sequence[str] = ("*",),
                 max_connections: int = 512, header_timeout_s: float = 10, body_timeout_s: float = 60,
                 trusted_proxies: Sequence[str] = ()) -> None:
        # Bodies read whole (forms, platform events) are small; the API streams its own within max_body_mb.
        self.app = web.Application(client_max_size=EVENT_LIMIT,
                                   middlewares=[_errors_as_json, _same_site_only(allowed_hosts)])  # type: ignore[list-item]
        self.app[BODY_TIMEOUT] = body_timeout_s
        self.app[TRUSTED_PROXIES] = frozenset(trusted_proxies)
        self.app.router.add_get("/healthz", _healthz)
        self._host, self._port = host, port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._max_connections, self._header_timeout_s = max_connections, header_timeout_s
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._shutdown_timeout_s,
                                     keepalive_timeout=75)
        await self._runner.setup()
        site = GuardedSite(self._runner, self._host, self._port, max_connections=self._max_connections,
                           header_timeout_s=self._header_timeout_s)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ImsightError(f"cannot listen on {self._host}:{self._port}: {exc.strerror}") from None
        self.port = self._runner.addresses[0][1]  # the real one when port 0 was asked for
        log.info("listening on http://%s:%d", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class GuardedSite(web.BaseSite):
    """A TCP site that refuses connections past a cap (each holds a file descriptor: 1,100 half-open
    ones took the daemon down) and closes those that do not finish their request headers in time."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 header_timeout_s: float) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.open_connections = 0
        self._said_full_at = -60.0

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        make = self._runner.server
        assert make is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guard(make(), self), self._host, self._port, reuse_address=True)

    def full(self) -> None:
        now = time.monotonic()
        if now - self._said_full_at >= 60:
            self._said_full_at = now
            log.warning("%d connections open ([server] max_connections): new ones are refused until some close",
                        self.open_connections)


class _Guard(asyncio.Protocol):
    """Stands between the socket and aiohttp's protocol: counts the connection and times its headers."""

    def __init__(self, inner: asyncio.Protocol, site: GuardedSite) -> None:
        self._inner: asyncio.Protocol | None = inner
        self._site = site
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, to find the end of the headers across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._site.open_connections >= self._site.max_connections:
            self._site.full()
            self._inner = None
            transport.close()
            return
        self._site.open_connections += 1
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._site.header_timeout_s, self._too_slow)
        assert self._inner is not None
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._timer.cancel()  # later requests on this connection: aiohttp's keep-alive timeout
                self._timer = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._site.open_connections -= 1
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def _too_slow(self) -> None:
        self._timer = None
        if self._transport is not None:
            log.info("closed a connection that sent no complete request headers within %.0fs",
                     self._site.header_timeout_s)
            self._transport.close()


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal is a JSON body ``{"error": {"code", "message"}}`` with a fitting status."""
    try:
        return await handler(request)
    except Busy as exc:
        response = _error(exc.status, exc.code, str(exc))
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    except BadInput as exc:
        return _error(exc.status, exc.code, str(exc))
    except ImsightError as exc:  # the store or engine cannot take it now: nothing was half-written
        log.warning("%s %s refused: %s", request.method, request.path, exc)
        return _error(503, "unavailable", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal", "internal error; see the daemon's log")


def _same_site_only(allowed_hosts: Sequence[str]) -> Middleware:
    """421 for a Host not ours (DNS rebinding: a page on attacker.example that resolves to us);
    403 for a state-changing request a browser sent from another site (a cross-site form)."""
    allowed = {h.lower().strip("[]") for h in allowed_hosts}

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = (urlsplit(f"//{request.host}").hostname or "").lower()
        if "*" not in allowed and host not in allowed:
            raise _Refused(421, "misdirected_request", f"this server does not answer for host {host!r} "
                                                       "([server] allowed_hosts)")
        origin = request.headers.get("Origin")
        if request.method not in {"GET", "HEAD", "OPTIONS"} and origin and origin != "null" and (
                urlsplit(origin).netloc.lower() != request.host.lower()):
            raise _Refused(403, "cross_site", f"cross-site request from {origin} refused")
        return await handler(request)

    return check


class _Refused(BadInput):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.status = status


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)

