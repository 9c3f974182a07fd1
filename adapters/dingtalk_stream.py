"""DingTalk Stream mode: the robot's messages over a WebSocket the daemon opens (PROTOCOLS.md §2.7, §7).

``POST {base_url}/v1.0/gateway/connections/open`` with the app's credentials gives an endpoint and a
one-time ticket; frames are JSON text. A robot message (``CALLBACK``, topic
``/v1.0/im/bot/messages/get``) carries the same object an HTTP callback posts; it is acknowledged
(``code`` 200 and its ``messageId``) only once stored, so DingTalk delivers again what was not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from adapters.push_connection import PushConnection, Reconnect
from core.errors import AdapterError, BadInput, ShuttingDown

__all__ = ["ROBOT_TOPIC", "DingTalkStream"]

log = logging.getLogger(__name__)

ROBOT_TOPIC = "/v1.0/im/bot/messages/get"


class DingTalkStream(PushConnection):
    platform = "dingtalk"

    def __init__(self, http: Callable[[], aiohttp.ClientSession], base_url: str, app_key: str, app_secret: str,
                 take: Callable[[Any], Awaitable[None]]) -> None:
        super().__init__()
        self._http, self._base = http, base_url.rstrip("/")
        self._app_key, self._app_secret = app_key, app_secret
        self._take = take

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        http = self._http()
        body = {"clientId": self._app_key, "clientSecret": self._app_secret, "ua": "imsight", "localIp": "",
                "subscriptions": [{"type": "CALLBACK", "topic": ROBOT_TOPIC}]}
        try:
            async with http.post(f"{self._base}/v1.0/gateway/connections/open", json=body) as resp:
                status = resp.status
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdapterError(self.platform, f"stream: connections/open: {exc}", retryable=True) from exc
        if not isinstance(answer, dict) or status != 200 or not answer.get("endpoint") or not answer.get("ticket"):
            detail = f"{answer.get('code', '')} {answer.get('message', '')}".strip() if isinstance(answer, dict) else ""
            raise AdapterError(self.platform, f"stream: connections/open answered HTTP {status} {detail}".strip()
                               + (" (check app_key and app_secret)" if status in (400, 401, 403) else ""),
                               retryable=status >= 500 or status == 429)
        try:  # a new ticket for every connection
            return await http.ws_connect(f"{answer['endpoint']}?ticket={quote(str(answer['ticket']))}", heartbeat=60)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(self.platform, f"stream: cannot open the WebSocket: {exc}", retryable=True) from exc

    async def serve(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in self.json_frames(socket):
            kind, headers = frame.get("type"), frame.get("headers") or {}
            if not isinstance(headers, dict):
                log.warning("dingtalk: a stream frame without headers, ignored")
                continue
            topic = headers.get("topic")
            if kind == "SYSTEM" and topic == "ping":
                await socket.send_json(_ack(headers, frame.get("data")))
            elif kind == "SYSTEM" and topic == "disconnect":
                raise Reconnect(str(frame.get("data", ""))[:200])
            elif kind == "CALLBACK" and topic == ROBOT_TOPIC:
                self.handle(self._callback(socket, headers, frame.get("data")), after=_conversation(frame.get("data")))
            elif kind in ("CALLBACK", "EVENT"):  # nothing we subscribed to: acknowledged, not kept
                await socket.send_json(_ack(headers, json.dumps({"response": None})))

    async def _callback(self, socket: aiohttp.ClientWebSocketResponse, headers: dict[str, Any], data: Any) -> None:
        try:
            await self._take(json.loads(data) if isinstance(data, str) else data)
        except ShuttingDown:
            return  # not acknowledged: DingTalk delivers it again, to the next daemon
        except (BadInput, ValueError) as exc:  # delivering it again would not make it readable
            log.warning("dingtalk: a robot message refused (%s); acknowledged", exc)
        if not socket.closed:
            await socket.send_json(_ack(headers, json.dumps({"response": None})))


def _conversation(data: Any) -> str:
    """The conversation a robot message belongs to ("" when unreadable: ``_callback`` says why)."""
    try:
        message = json.loads(data) if isinstance(data, str) else data
        return str(message.get("conversationId", "")) if isinstance(message, dict) else ""
    except ValueError:
        return ""


def _ack(headers: dict[str, Any], data: Any) -> dict[str, Any]:
    return {"code": 200, "headers": {"contentType": "application/json", "messageId": headers.get("messageId", "")},
            "message": "OK", "data": data}
