"""The daemon's one aiohttp server: every adapter's routes, /healthz, and errors as JSON."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from aiohttp import web

from core.errors import BadInput, Busy, ImsightError

__all__ = ["WebServer"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class WebServer:
    """Routes are added before ``start()``; ``stop()`` stops taking requests first."""

    def __init__(self, host: str, port: int, *, max_body_bytes: int, shutdown_timeout_s: float,
                 allowed_hosts: Sequence[str] = ("*",)) -> None:
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[_errors_as_json, _same_site_only(allowed_hosts)])  # type: ignore[list-item]
        self.app.router.add_get("/healthz", _healthz)
        self._host, self._port = host, port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
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

