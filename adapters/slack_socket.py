"""Slack's Socket Mode: events over a WebSocket the daemon opens (PROTOCOLS.md §7).

``apps.connections.open`` (with the app-level ``xapp-`` token) gives a one-time URL; the server
says ``hello``, then sends envelopes: ``events_api`` with an ``event_callback`` as ``payload``, each
acknowledged by sending back its ``envelope_id`` (Slack retries an unacknowledged one with
``retry_attempt`` + 1). ``disconnect`` asks for a new connection.

Why not slack_sdk's ``SocketModeClient``: its ``connect()`` retries a refused token forever, so a
revoked app token at start would never stop the daemon with an error, and it runs each envelope in
a task nothing keeps, so a stop could not wait for the events being stored (nothing may be
acknowledged that was not, and nothing taken in after ``stop_intake``). The connection is kept by
``PushConnection`` as for Feishu and DingTalk; the Web API calls go through slack_sdk's
``AsyncWebClient``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.push_connection import PushConnection, Reconnect
from core.errors import AdapterError, BadInput, ShuttingDown

__all__ = ["SlackSocket"]

log = logging.getLogger(__name__)


class SlackSocket(PushConnection):
    platform = "slack"

    def __init__(self, http: Callable[[], aiohttp.ClientSession], base_url: str, app_token: str,
                 take: Callable[[Any, int], Awaitable[None]]) -> None:
        super().__init__()
        self._http, self._base, self._app_token = http, base_url, app_token
        self._take = take

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        http = self._http()
        web = AsyncWebClient(base_url=self._base, session=http)
        refused: SlackApiError | None = None
        try:
            answer = await web.apps_connections_open(app_token=self._app_token)
        except SlackApiError as exc:
            refused = exc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdapterError(self.platform, f"apps.connections.open: {exc}", retryable=True) from exc
        if refused is not None:  # raised outside the handler: our words, not slack_sdk's, reach the start-up error
            data = refused.response.data
            error = str(data.get("error", "")) if isinstance(data, dict) else ""
            said = error or f"HTTP {refused.response.status_code}"
            raise AdapterError(self.platform, f"apps.connections.open: {said}"
                               + (" (check app_token, and that Socket Mode is on)" if error in _REFUSED else ""),
                               retryable=error not in _REFUSED)
        try:
            return await http.ws_connect(str(answer["url"]), heartbeat=30)
        except (aiohttp.ClientError, TimeoutError, KeyError) as exc:
            raise AdapterError(self.platform, f"cannot open the Socket Mode WebSocket: {exc}", retryable=True) from exc

    async def serve(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in self.json_frames(socket):
            kind, envelope = frame.get("type"), frame.get("envelope_id")
            if kind == "disconnect":
                raise Reconnect(str(frame.get("reason", "")))
            if kind == "events_api" and envelope:
                payload = frame.get("payload")
                event = payload.get("event") if isinstance(payload, dict) else None
                channel = str(event.get("channel", "")) if isinstance(event, dict) else ""
                self.handle(self._envelope(socket, str(envelope), payload, int(frame.get("retry_attempt") or 0)),
                            after=channel)
            elif envelope:  # slash commands, interactivity: not used; acknowledged so Slack stops retrying
                await socket.send_json({"envelope_id": envelope})

    async def _envelope(self, socket: aiohttp.ClientWebSocketResponse, envelope: str, payload: Any,
                        attempt: int) -> None:
        try:
            await self._take(payload, attempt)
        except ShuttingDown:
            return  # not acknowledged: Slack retries it, and the next daemon takes it
        except (BadInput, ValueError) as exc:  # a retry would not make it readable
            log.warning("slack: an event refused (%s); acknowledged", exc)
        if not socket.closed:
            await socket.send_json({"envelope_id": envelope})


_REFUSED = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "not_allowed_token_type"}
