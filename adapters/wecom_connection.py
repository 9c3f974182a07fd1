"""WeCom's intelligent robot (智能机器人) long connection: JSON frames over a WebSocket the daemon
opens (PROTOCOLS.md §7, read from wecom-aibot-python-sdk 1.0.2).

The client subscribes first (``aibot_subscribe`` with the robot's id and secret; errcode 0 or the
start fails with what WeCom said), pings every 30 s (two unanswered: the link is dead, connect
again), and receives ``aibot_msg_callback`` / ``aibot_event_callback`` frames. What it sends
(``aibot_respond_msg`` with a callback's ``req_id``, ``aibot_send_msg``) is answered by a frame
with the same ``req_id`` and an errcode; frames of one ``req_id`` go one at a time, since their
answers cannot be told apart otherwise.

Why not the SDK: it forces TLS on the URL (no loopback test server, no plain egress proxy), gives
up after ten reconnects, and runs handlers as tasks nothing keeps (a stop could not wait for the
messages being stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from adapters.push_connection import PushConnection, Superseded
from core.errors import AdapterError, BadInput, RateLimited, ShuttingDown

__all__ = ["WeComConnection"]

log = logging.getLogger(__name__)

_ANSWER_WAIT_S = 10.0  # for the subscription's answer, and a reply's
_PING_EVERY_S = 30.0
_MISSED_PINGS = 2
_THROTTLED = {45009: 5.0, 45033: 5.0}  # "api freq out of limit", "too many concurrent calls": seconds to hold


class WeComConnection(PushConnection):
    platform = "wecom"

    def __init__(self, http: Callable[[], aiohttp.ClientSession], ws_url: str, bot_id: str, secret: str,
                 take: Callable[[dict[str, Any]], Awaitable[None]], *, ping_every_s: float = _PING_EVERY_S) -> None:
        super().__init__()
        self._http, self._url, self._bot_id, self._secret = http, ws_url, bot_id, secret
        self._take = take
        self._ping_every_s = ping_every_s
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._one_at_a_time: dict[str, asyncio.Lock] = {}
        self._unanswered_pings = 0

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        try:
            socket = await self._http().ws_connect(self._url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(self.platform, f"cannot open the long connection: {exc}", retryable=True) from exc
        req_id = f"aibot_subscribe_{uuid.uuid4().hex}"
        try:
            await socket.send_json({"cmd": "aibot_subscribe", "headers": {"req_id": req_id},
                                    "body": {"bot_id": self._bot_id, "secret": self._secret}})
            async with asyncio.timeout(_ANSWER_WAIT_S):
                answer = await _first_answer(socket, req_id)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            await socket.close()
            raise AdapterError(self.platform, f"subscribe: no answer ({type(exc).__name__})", retryable=True) from exc
        if answer.get("errcode") != 0:
            await socket.close()
            raise AdapterError(self.platform, f"subscribe refused: {answer.get('errcode')} {answer.get('errmsg', '')}"
                               " (check bot_id and secret)", retryable=False)
        self._unanswered_pings = 0
        return socket

    async def serve(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        pinger = asyncio.create_task(self._ping(socket))
        try:
            async for frame in self.json_frames(socket):
                headers = frame.get("headers")
                cmd, req_id = frame.get("cmd"), str(headers.get("req_id", "")) if isinstance(headers, dict) else ""
                if cmd == "aibot_msg_callback":
                    body = frame.get("body")
                    chat = str(body.get("chatid") or (body.get("from") or {}).get("userid") or "") if (
                        isinstance(body, dict)) else ""
                    self.handle(self._callback(frame), after=chat)
                elif cmd == "aibot_event_callback":
                    event = (frame.get("body") or {}).get("event") or {}
                    if isinstance(event, dict) and event.get("eventtype") == "disconnected_event":
                        raise Superseded("disconnected_event")
                elif req_id.startswith("ping"):
                    self._unanswered_pings = 0
                elif (waiting := self._answers.pop(req_id, None)) is not None and not waiting.done():
                    waiting.set_result(frame)
        finally:
            pinger.cancel()
            for waiting in self._answers.values():
                if not waiting.done():
                    waiting.set_exception(AdapterError(self.platform, "the connection closed", retryable=True))
            self._answers.clear()

    async def _ping(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        while not socket.closed:
            await asyncio.sleep(self._ping_every_s)
            if self._unanswered_pings >= _MISSED_PINGS:
                log.warning("wecom: %d pings unanswered; connecting again", self._unanswered_pings)
                await socket.close()
                return
            self._unanswered_pings += 1
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await socket.send_json({"cmd": "ping", "headers": {"req_id": f"ping_{uuid.uuid4().hex}"}})

    async def _callback(self, frame: dict[str, Any]) -> None:
        try:
            await self._take(frame)
        except ShuttingDown:
            return  # the next daemon sees it only if WeCom delivers it again; nothing was stored
        except (BadInput, ValueError) as exc:
            log.warning("wecom: a message refused (%s)", exc)

    async def request(self, cmd: str, body: dict[str, Any], req_id: str = "") -> dict[str, Any]:
        """Send ``cmd`` (a callback's ``req_id`` for a reply, a new one otherwise) and wait for WeCom's answer."""
        req_id = req_id or f"{cmd}_{uuid.uuid4().hex}"
        async with self._one_at_a_time.setdefault(req_id, asyncio.Lock()):
            socket = self._socket
            if socket is None or socket.closed:
                raise AdapterError(self.platform, f"{cmd}: the long connection is down", retryable=True)
            waiting: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._answers[req_id] = waiting
            try:
                await socket.send_json({"cmd": cmd, "headers": {"req_id": req_id}, "body": body})
                async with asyncio.timeout(_ANSWER_WAIT_S):
                    answer = await waiting
            except (ConnectionError, aiohttp.ClientError, TimeoutError) as exc:
                raise AdapterError(self.platform, f"{cmd}: no answer ({type(exc).__name__})", retryable=True) from exc
            finally:
                self._answers.pop(req_id, None)
        errcode = int(answer.get("errcode") or 0)
        if errcode in _THROTTLED:
            raise RateLimited(self.platform, f"{cmd}: {errcode} {answer.get('errmsg', '')}",
                              retry_after_s=_THROTTLED[errcode])
        if errcode:
            raise AdapterError(self.platform, f"{cmd}: {errcode} {answer.get('errmsg', '')}", retryable=False)
        return answer


async def _first_answer(socket: aiohttp.ClientWebSocketResponse, req_id: str) -> dict[str, Any]:
    """The frame answering ``req_id`` (the subscription: nothing else comes before it)."""
    async for message in socket:
        if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            frame: Any = json.loads(message.data)
            if isinstance(frame, dict) and (frame.get("headers") or {}).get("req_id") == req_id:
                return dict(frame)
    raise aiohttp.ClientError("closed before the subscription was answered")
