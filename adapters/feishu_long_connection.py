"""Feishu / Lark long connection: events over a WebSocket the daemon opens (PROTOCOLS.md §1.10, §7).

``POST {base_url}/callback/ws/endpoint`` with the app's credentials gives the socket's URL and the
client settings (ping and reconnect intervals, which later pongs may change). Frames are protobuf
(``adapters.feishu_frames``); an event may come split over several frames (``sum``/``seq``). Each
event is answered with its frame sent back (payload ``{"code": 200}``) only once it is stored;
without that answer Feishu delivers it again. Events are plaintext: no token, no encryption.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

from adapters.feishu_frames import CONTROL, DATA, DecodeError, Frame, headers_of, make_frame
from adapters.push_connection import PushConnection
from core.errors import AdapterError, BadInput, ShuttingDown

__all__ = ["FeishuLongConnection"]

log = logging.getLogger(__name__)

_RETRY_CODES = {1, 1000040343, 1000040350}  # busy, internal error, too many connections: try again later
_SPLIT_EVENTS = 64  # events half-received at once; older halves are dropped (Feishu sends them again)


class FeishuLongConnection(PushConnection):
    platform = "feishu"

    def __init__(self, http: Callable[[], aiohttp.ClientSession], base_url: str, app_id: str, app_secret: str,
                 take: Callable[[Any], Awaitable[None]]) -> None:
        super().__init__(first_wait_s=30.0, longest_wait_s=120.0)  # until the server's settings say otherwise
        self._http, self._base = http, base_url.rstrip("/")
        self._app_id, self._app_secret = app_id, app_secret
        self._take = take
        self._ping_s = 120.0
        self._service = 0
        self._parts: collections.OrderedDict[str, list[bytes | None]] = collections.OrderedDict()

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        http = self._http()
        try:
            async with http.post(f"{self._base}/callback/ws/endpoint",
                                 json={"AppID": self._app_id, "AppSecret": self._app_secret}) as resp:
                status = resp.status
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdapterError(self.platform, f"long connection: endpoint: {exc}", retryable=True) from exc
        code = answer.get("code") if isinstance(answer, dict) else None
        data = (answer.get("data") or {}) if isinstance(answer, dict) else {}
        if status != 200 or code != 0 or not data.get("URL"):
            message = answer.get("msg", "") if isinstance(answer, dict) else ""
            raise AdapterError(self.platform, f"long connection: endpoint answered HTTP {status}, code {code}: "
                               f"{message}".rstrip(": ") + ("" if code in _RETRY_CODES or status >= 500 else
                                                           " (check app_id and app_secret, and that the app "
                                                           "subscribes to events over the long connection)"),
                               retryable=code in _RETRY_CODES or status >= 500)
        self._configure(data.get("ClientConfig") or {})
        url = str(data["URL"])
        self._service = int((parse_qs(urlsplit(url).query).get("service_id") or ["0"])[0] or 0)
        try:
            return await http.ws_connect(url)
        except aiohttp.WSServerHandshakeError as exc:
            said = exc.headers.get("handshake-msg", "") if exc.headers else ""
            raise AdapterError(self.platform, f"long connection refused: HTTP {exc.status} {said}".rstrip(),
                               retryable=True) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(self.platform, f"long connection: cannot open the WebSocket: {exc}",
                               retryable=True) from exc

    def _configure(self, config: dict[str, Any]) -> None:
        """The server's client settings (seconds), as the endpoint and pongs give them."""
        if (ping := config.get("PingInterval")) and ping > 0:
            self._ping_s = float(ping)
        if (nonce := config.get("ReconnectNonce")) and nonce > 0:
            self.first_wait_s = float(nonce)
        if (interval := config.get("ReconnectInterval")) and interval > 0:
            self.longest_wait_s = float(interval)

    async def serve(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        pinging = asyncio.create_task(self._ping(socket))
        try:
            async for message in socket:
                if message.type == aiohttp.WSMsgType.ERROR:
                    raise aiohttp.ClientError(f"WebSocket error: {socket.exception()}")
                if message.type != aiohttp.WSMsgType.BINARY:
                    continue
                frame: Any = Frame()
                try:
                    frame.ParseFromString(message.data)
                except DecodeError:
                    log.warning("feishu: a long-connection frame that is not a pbbp2.Frame, ignored")
                    continue
                headers = headers_of(frame)
                if frame.method == CONTROL:
                    if headers.get("type") == "pong" and frame.payload:
                        with contextlib.suppress(ValueError, TypeError, AttributeError):  # a pong as it should be
                            self._configure(json.loads(frame.payload))
                elif frame.method == DATA and (payload := self._whole(headers, frame.payload)) is not None:
                    if headers.get("type") == "event":
                        self.handle(self._event(socket, frame, payload), after=_chat(payload))
                    else:  # card callbacks: not used by this bot
                        await self._answer(socket, frame, 200, time.monotonic())
        finally:
            pinging.cancel()

    async def _ping(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):  # it closed: serve sees it
            while not socket.closed:
                await socket.send_bytes(make_frame(CONTROL, self._service, {"type": "ping"}).SerializeToString())
                await asyncio.sleep(self._ping_s)

    def _whole(self, headers: dict[str, str], payload: bytes) -> bytes | None:
        """An event's payload once all its parts are here; ``None`` until then."""
        count, seq = int(headers.get("sum") or 1), int(headers.get("seq") or 0)
        if count <= 1:
            return payload
        key = headers.get("message_id", "")
        parts = self._parts.setdefault(key, [None] * count)
        if len(parts) != count or not 0 <= seq < count:
            del self._parts[key]
            return None
        parts[seq] = payload
        if any(part is None for part in parts):
            while len(self._parts) > _SPLIT_EVENTS:
                self._parts.popitem(last=False)
            return None
        del self._parts[key]
        return b"".join(part or b"" for part in parts)

    async def _event(self, socket: aiohttp.ClientWebSocketResponse, frame: Any, payload: bytes) -> None:
        started = time.monotonic()
        try:
            await self._take(json.loads(payload))
        except ShuttingDown:
            return  # not answered: Feishu delivers it again, to the next daemon
        except (BadInput, ValueError) as exc:  # delivering it again would not make it readable
            log.warning("feishu: an event refused (%s); answered as handled", exc)
        except Exception:
            await self._answer(socket, frame, 500, started)  # Feishu delivers it again
            raise
        await self._answer(socket, frame, 200, started)

    async def _answer(self, socket: aiohttp.ClientWebSocketResponse, frame: Any, code: int, started: float) -> None:
        if socket.closed:
            return
        answer: Any = Frame()
        answer.CopyFrom(frame)
        answer.headers.add(key="biz_rt", value=str(int((time.monotonic() - started) * 1000)))
        answer.payload = json.dumps({"code": code, "headers": None, "data": None}).encode()
        await socket.send_bytes(answer.SerializeToString())


def _chat(payload: bytes) -> str:
    """The chat an event's message belongs to ("" when unreadable: ``_event`` says why)."""
    try:
        event = json.loads(payload).get("event") or {}
        return str((event.get("message") or {}).get("chat_id", ""))
    except (ValueError, AttributeError):
        return ""
