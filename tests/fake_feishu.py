"""A fake Feishu Open API on loopback (token, bot info, messages, resources, reply), events built,
encrypted and signed the way Feishu sends them, and the long connection: ``/callback/ws/endpoint``
and a WebSocket speaking protobuf frames built with lark-oapi's own generated schema (pbbp2_pb2),
which delivers again what was not answered."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from typing import Any

from aiohttp import WSMsgType, web

from adapters.feishu_crypto import encrypt, signature
from helpers import connections_opened

APP_ID, APP_SECRET, VERIFICATION_TOKEN, ENCRYPT_KEY = "cli_demo", "app-secret", "demo-verification-token", "k-1"
BOT_OPEN_ID = "ou_bot"


class FakeFeishu:
    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}  # (message id, image key) -> bytes
        self.messages: dict[str, dict[str, Any]] = {}  # what GET /messages/{id} returns
        self.replies: list[dict[str, Any]] = []
        self.edits: list[dict[str, Any]] = []
        self.tokens_issued = 0
        self.expire_token = False  # answer the next call with "token expired" (99991663)
        self.app_secret = APP_SECRET
        self.down = False  # every API call but the token answers 503
        self.held: asyncio.Event | None = None  # set: GET /messages/{id} answers only once it is set
        self.reads: list[str] = []  # message ids read with GET /messages/{id}, in order
        self.limited: list[float] = []  # the next replies answer 429 with x-ogw-ratelimit-reset of these seconds
        self.log: list[tuple[float, str, int]] = []  # (monotonic time, replied-to message id, HTTP status)
        self._ids = itertools.count(1)
        self.url = ""
        # the long connection
        self.socket: web.WebSocketResponse | None = None
        self.connections = 0
        self.endpoint_calls = 0
        self.refuse_connections = False  # the endpoint answers code 514 (auth failed)
        self.busy = 0  # the endpoint's next answers: code 1, system busy
        self.ping_interval = 120
        self.pings: list[dict[str, str]] = []  # headers of the client's pings
        self.acks: list[tuple[dict[str, str], dict[str, Any]]] = []  # (headers, payload) of each answered event
        self.unacked: dict[str, list[bytes]] = {}  # message_id -> its frames: sent again on the next connection
        self.ignore_acks = 0  # answers to lose (as if the connection broke before they arrived)
        self._frames = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", self._token)
        app.router.add_get("/open-apis/bot/v3/info", self._bot)
        app.router.add_get("/open-apis/im/v1/messages/{mid}", self._message)
        app.router.add_get("/open-apis/im/v1/messages/{mid}/resources/{key}", self._resource)
        app.router.add_post("/open-apis/im/v1/messages/{mid}/reply", self._reply)
        app.router.add_put("/open-apis/im/v1/messages/{mid}", self._edit)
        app.router.add_post("/callback/ws/endpoint", self._endpoint)
        app.router.add_get("/ws", self._ws)
        return app

    # ---- the long connection ------------------------------------------------------------------

    async def _endpoint(self, request: web.Request) -> web.Response:
        self.endpoint_calls += 1
        body = await request.json()
        if self.busy:
            self.busy -= 1
            return web.json_response({"code": 1, "msg": "system busy"})
        if self.refuse_connections or body != {"AppID": APP_ID, "AppSecret": self.app_secret}:
            return web.json_response({"code": 514, "msg": "auth failed"})
        url = f"{self.url.replace('http', 'ws', 1)}/ws?device_id=d-{self.endpoint_calls}&service_id=77"
        return web.json_response({"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": {
            "ReconnectCount": -1, "ReconnectInterval": 2, "ReconnectNonce": 1, "PingInterval": self.ping_interval}}})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        pb = _pbbp2()
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.socket, self.connections = socket, self.connections + 1
        for frames in list(self.unacked.values()):  # what the last connection did not answer
            for frame in frames:
                await socket.send_bytes(frame)
        async for message in socket:
            if message.type != WSMsgType.BINARY:
                continue
            frame = pb.Frame()
            frame.ParseFromString(message.data)
            headers = {h.key: h.value for h in frame.headers}
            if frame.method == 0:
                assert frame.service == 77  # the service_id of the URL
                self.pings.append(headers)
            elif self.ignore_acks:
                self.ignore_acks -= 1
            else:
                self.acks.append((headers, json.loads(frame.payload)))
                self.unacked.pop(headers["message_id"], None)
        return socket

    async def push(self, payload: dict[str, Any], *, parts: int = 1, message_id: str | None = None) -> str:
        """An event down the long connection, in ``parts`` frames; returns its message_id."""
        pb = _pbbp2()
        message_id = message_id or f"msg-{next(self._frames)}"
        data = json.dumps(payload).encode()
        size = -(-len(data) // parts)
        frames = []
        for seq in range(parts):
            frame = pb.Frame(SeqID=next(self._frames), LogID=1, service=77, method=1,
                             payload=data[seq * size:(seq + 1) * size])
            for key, value in (("type", "event"), ("message_id", message_id), ("sum", str(parts)),
                               ("seq", str(seq)), ("trace_id", f"trace-{message_id}")):
                header = frame.headers.add()
                header.key, header.value = key, value
            frames.append(frame.SerializeToString())
        self.unacked[message_id] = frames
        assert self.socket is not None
        for frame in frames:
            await self.socket.send_bytes(frame)
        return message_id

    async def pong(self, config: dict[str, Any]) -> None:
        pb = _pbbp2()
        frame = pb.Frame(SeqID=0, LogID=0, service=77, method=0, payload=json.dumps(config).encode())
        header = frame.headers.add()
        header.key, header.value = "type", "pong"
        assert self.socket is not None
        await self.socket.send_bytes(frame.SerializeToString())

    async def connected(self, count: int) -> None:
        """Until the client has opened ``count`` connections (and the last is open)."""
        await connections_opened(self, count)

    def _authorized(self, request: web.Request) -> web.Response | None:
        if self.down:
            return web.json_response({"code": 99991400, "msg": "service unavailable"}, status=503)
        if self.expire_token:
            self.expire_token = False
            return web.json_response({"code": 99991663, "msg": "invalid access token"}, status=400)
        if request.headers.get("Authorization") != f"Bearer t-{self.tokens_issued}":
            return web.json_response({"code": 99991663, "msg": "invalid access token"}, status=400)
        return None

    async def _token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body != {"app_id": APP_ID, "app_secret": self.app_secret}:
            return web.json_response({"code": 10015, "msg": "wrong secret"})
        self.tokens_issued += 1
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": f"t-{self.tokens_issued}",
                                  "expire": 7200})

    async def _bot(self, request: web.Request) -> web.Response:
        return self._authorized(request) or web.json_response(
            {"code": 0, "msg": "ok", "bot": {"app_name": "VQA Bot", "open_id": BOT_OPEN_ID}})

    async def _message(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        self.reads.append(request.match_info["mid"])
        if self.held is not None:
            await self.held.wait()
        found = self.messages.get(request.match_info["mid"])
        if found is None:
            return web.json_response({"code": 230110, "msg": "message deleted"}, status=400)
        return web.json_response({"code": 0, "msg": "ok", "data": {"items": [found]}})

    async def _resource(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        data = self.files.get((request.match_info["mid"], request.match_info["key"]))
        if data is None or request.query.get("type") != "image":
            return web.json_response({"code": 234003, "msg": "file not in message"}, status=400)
        return web.Response(body=data, content_type="image/png")

    async def _reply(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        if self.limited:
            reset = self.limited.pop(0)
            self.log.append((time.monotonic(), request.match_info["mid"], 429))
            return web.json_response({"code": 99991400, "msg": "request trigger frequency limit"}, status=429,
                                     headers={"x-ogw-ratelimit-limit": "5", "x-ogw-ratelimit-reset": f"{reset:g}"})
        self.log.append((time.monotonic(), request.match_info["mid"], 200))
        body = await request.json()
        assert text_of(body)
        if any(r["uuid"] == body["uuid"] for r in self.replies):  # Feishu: one success per uuid
            sent = next(r for r in self.replies if r["uuid"] == body["uuid"])
        else:
            sent = {**body, "message_id": f"om_bot_{next(self._ids)}", "parent_id": request.match_info["mid"]}
            self.replies.append(sent)
            self.messages[sent["message_id"]] = {"message_id": sent["message_id"],
                                                 "sender": {"id": APP_ID, "id_type": "app_id"}}
        return web.json_response({"code": 0, "msg": "ok", "data": {"message_id": sent["message_id"]}})


    async def _edit(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        body = await request.json()
        target = next((r for r in self.replies if r["message_id"] == request.match_info["mid"]), None)
        if target is None:
            return web.json_response({"code": 230071, "msg": "not the sender"}, status=400)
        assert text_of(body)
        self.edits.append(body)
        target.update(msg_type=body["msg_type"], content=body["content"])
        return web.json_response({"code": 0, "msg": "ok", "data": {}})


def text_of(message: dict[str, Any]) -> str:
    """The text a text or post message shows."""
    content = json.loads(message["content"])
    if message["msg_type"] == "text":
        return str(content["text"])
    return "".join(e.get("text", "") for p in content["zh_cn"]["content"] for e in p)


def event(message_id: str, chat_id: str = "oc_g1", *, text: str | None = None, image: str | None = None,
          post: tuple[str, str] | None = None, parent: str | None = None, thread: str | None = None,
          mention_bot: bool = False, event_id: str | None = None) -> dict[str, Any]:
    """An im.message.receive_v1 event as Feishu sends it (plaintext)."""
    message: dict[str, Any] = {"message_id": message_id, "chat_id": chat_id, "chat_type": "group",
                               "create_time": str(int(time.time() * 1000))}
    if text is not None:
        message["message_type"], content = "text", {"text": ("@_user_1 " if mention_bot else "") + text}
    elif image is not None:
        message["message_type"], content = "image", {"image_key": image}
    else:
        assert post is not None
        question, key = post
        paragraph: list[dict[str, Any]] = [{"tag": "text", "text": question}]
        if mention_bot:
            paragraph.insert(0, {"tag": "at", "user_id": "@_user_1", "user_name": "VQA Bot"})
        message["message_type"] = "post"
        content = {"title": "", "content": [paragraph, [{"tag": "img", "image_key": key}]]}
    message["content"] = json.dumps(content)
    if mention_bot:
        message["mentions"] = [{"key": "@_user_1", "id": {"open_id": BOT_OPEN_ID}, "name": "VQA Bot"}]
    if parent:
        message["parent_id"] = message["root_id"] = parent
    if thread:
        message["thread_id"] = thread
    return {"schema": "2.0",
            "header": {"event_id": event_id or f"ev-{message_id}", "event_type": "im.message.receive_v1",
                       "create_time": message["create_time"], "token": VERIFICATION_TOKEN, "app_id": APP_ID,
                       "tenant_key": "t1"},
            "event": {"sender": {"sender_id": {"open_id": "ou_ann"}, "sender_type": "user"}, "message": message}}


def sealed(payload: dict[str, Any], key: str = ENCRYPT_KEY) -> tuple[bytes, dict[str, str]]:
    """The body and headers Feishu sends for ``payload`` with an Encrypt Key: encrypted and signed."""
    body = json.dumps({"encrypt": encrypt(key, json.dumps(payload), os.urandom(16))}).encode()
    timestamp, nonce = str(int(time.time())), os.urandom(8).hex()
    return body, {"X-Lark-Request-Timestamp": timestamp, "X-Lark-Request-Nonce": nonce,
                  "X-Lark-Signature": signature(timestamp, nonce, key, body), "Content-Type": "application/json"}


def _pbbp2() -> Any:
    """lark-oapi's generated frame schema: what the official SDK speaks, not our own copy of it."""
    from lark_oapi.ws.pb import pbbp2_pb2

    return pbbp2_pb2
