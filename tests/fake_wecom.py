"""A fake WeCom intelligent-robot long connection on loopback (plain ws://): the subscription with
the robot's id and secret, pings, message callbacks, answers to ``aibot_respond_msg`` and
``aibot_send_msg`` by ``req_id``, and images served encrypted as WeCom encrypts them (AES-256-CBC,
the key's first 16 bytes as IV, PKCS#7 to 32-byte blocks) (PROTOCOLS.md §7)."""

from __future__ import annotations

import base64
import itertools
import json
import os
from typing import Any

from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from helpers import connections_opened

BOT_ID, SECRET = "aibRobot1", "wecom-robot-secret"


def encrypt_media(data: bytes, key: bytes) -> bytes:
    pad = 32 - len(data) % 32
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize()


class FakeWeCom:
    def __init__(self) -> None:
        self.url = ""
        self.media: dict[str, bytes] = {}  # media id -> encrypted bytes
        self.responses: list[dict[str, Any]] = []  # aibot_respond_msg frames, in order
        self.sent: list[dict[str, Any]] = []  # aibot_send_msg bodies
        self.pings = 0
        self.secret = SECRET
        self.socket: web.WebSocketResponse | None = None
        self.connections = 0
        self.subscriptions = 0
        self.expired: set[str] = set()  # req_ids whose reply window has closed
        self.throttle: dict[str, int] = {}  # cmd -> answers to refuse with 45009 first
        self.throttled: list[str] = []
        self.answer_pings = True
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self._link)
        app.router.add_get("/media/{id}", self._media)
        return app

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    def image(self, data: bytes) -> dict[str, str]:
        """An image as a message carries it: a URL to encrypted bytes and the key, base64 without '='."""
        key, media_id = os.urandom(32), f"m{next(self._ids)}"
        self.media[media_id] = encrypt_media(data, key)
        return {"url": f"{self.url}/media/{media_id}", "aeskey": base64.b64encode(key).decode().rstrip("=")}

    async def _media(self, request: web.Request) -> web.Response:
        data = self.media.get(request.match_info["id"])
        return web.Response(body=data, content_type="application/octet-stream") if data else web.Response(status=404)

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.connections += 1
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            cmd, req_id = frame.get("cmd"), frame["headers"]["req_id"]
            if cmd == "aibot_subscribe":
                ok = frame["body"] == {"bot_id": BOT_ID, "secret": self.secret}
                await socket.send_json({"headers": {"req_id": req_id}, "errcode": 0 if ok else 40001,
                                        "errmsg": "ok" if ok else "invalid secret"})
                if not ok:
                    await socket.close()
                    break
                self.subscriptions += 1
                self.socket = socket
            elif cmd == "ping":
                self.pings += 1
                if self.answer_pings:
                    await socket.send_json({"headers": {"req_id": req_id}, "errcode": 0, "errmsg": "ok"})
            elif self.throttle.get(cmd):
                self.throttle[cmd] -= 1
                self.throttled.append(cmd)
                await socket.send_json({"headers": {"req_id": req_id}, "errcode": 45009,
                                        "errmsg": "api freq out of limit"})
            elif cmd == "aibot_respond_msg":
                if req_id in self.expired:
                    await socket.send_json({"headers": {"req_id": req_id}, "errcode": 846608,
                                            "errmsg": "reply window expired"})
                    continue
                self.responses.append(frame)
                await socket.send_json({"headers": {"req_id": req_id}, "errcode": 0, "errmsg": "ok"})
            elif cmd == "aibot_send_msg":
                self.sent.append(frame["body"])
                await socket.send_json({"headers": {"req_id": req_id}, "errcode": 0, "errmsg": "ok"})
        return socket

    async def push(self, body: dict[str, Any], *, req_id: str | None = None) -> str:
        """A message callback down the connection; returns its req_id."""
        req_id = req_id or f"cb-{next(self._ids)}"
        assert self.socket is not None
        await self.socket.send_json({"cmd": "aibot_msg_callback", "headers": {"req_id": req_id}, "body": body})
        return req_id

    async def event(self, eventtype: str) -> None:
        assert self.socket is not None
        await self.socket.send_json({"cmd": "aibot_event_callback", "headers": {"req_id": f"ev-{next(self._ids)}"},
                                     "body": {"msgtype": "event", "event": {"eventtype": eventtype}}})

    async def connected(self, count: int) -> None:
        await connections_opened(self, count)

    def streams(self, req_id: str) -> list[dict[str, Any]]:
        """The stream frames answering one callback, in order."""
        return [r["body"]["stream"] for r in self.responses if r["headers"]["req_id"] == req_id]


def message(msgid: str, *, text: str = "", image: dict[str, str] | None = None, chat: str | None = "wrGroup1",
            user: str = "zhangsan", quote: dict[str, Any] | None = None) -> dict[str, Any]:
    """A message callback's body: text, an image, or both (mixed); a group chat unless ``chat`` is None."""
    body: dict[str, Any] = {"msgid": msgid, "aibotid": BOT_ID, "chattype": "group" if chat else "single",
                            "from": {"userid": user}}
    if chat:
        body["chatid"] = chat
    if text and image:
        body["msgtype"] = "mixed"
        body["mixed"] = {"msg_item": [{"msgtype": "text", "text": {"content": text}},
                                      {"msgtype": "image", "image": image}]}
    elif image:
        body["msgtype"], body["image"] = "image", image
    else:
        body["msgtype"], body["text"] = "text", {"content": text}
    if quote is not None:
        body["quote"] = quote
    return body
