"""A fake DingTalk Open API on loopback (token, picture download, session webhook, robot send),
robot callbacks signed the way DingTalk signs them, and Stream mode: ``connections/open`` and a
WebSocket speaking its JSON frames (PROTOCOLS.md §2.7), which re-sends what was not acknowledged."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from aiohttp import WSMsgType, web

from adapters.dingtalk import sign
from helpers import connections_opened

APP_KEY, APP_SECRET, ROBOT = "dingbot1", "demo-app-secret", "dingbot1"


class FakeDingTalk:
    def __init__(self) -> None:
        self.pictures: dict[str, bytes] = {}  # download code -> bytes
        self.webhook_posts: list[dict[str, Any]] = []
        self.api_sends: list[dict[str, Any]] = []
        self.tokens_issued = 0
        self.app_secret = APP_SECRET
        self.down = False  # session webhooks answer 503
        self._keys = itertools.count(1)
        self.url = ""
        # Stream mode
        self.tickets: list[str] = []  # issued, in order
        self.socket: web.WebSocketResponse | None = None  # the client's connection now
        self.connections = 0
        self.acks: list[dict[str, Any]] = []  # every frame the client sent back
        self.unacked: dict[str, dict[str, Any]] = {}  # messageId -> frame: re-sent on the next connection
        self.ignore_acks = 0  # acknowledgements to lose (as if the connection broke before they arrived)
        self.stream_allowed = True  # False: connections/open refuses (the app has no Stream mode)
        self._frames = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1.0/oauth2/accessToken", self._token)
        app.router.add_post("/v1.0/robot/messageFiles/download", self._download)
        app.router.add_get("/files/{code}", self._file)
        app.router.add_post("/robot/sendBySession", self._webhook)
        app.router.add_post("/v1.0/robot/groupMessages/send", self._send)
        app.router.add_post("/v1.0/robot/oToMessages/batchSend", self._send)
        app.router.add_post("/v1.0/gateway/connections/open", self._open)
        app.router.add_get("/stream", self._stream)
        return app

    # ---- Stream mode ----------------------------------------------------------------------------

    async def _open(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not self.stream_allowed:
            return web.json_response({"code": "Forbidden.AccessDenied", "message": "no stream mode"}, status=403)
        if (body.get("clientId"), body.get("clientSecret")) != (APP_KEY, self.app_secret):
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "bad credentials"}, status=401)
        assert {"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"} in body["subscriptions"]
        self.tickets.append(f"ticket-{len(self.tickets) + 1}")
        return web.json_response({"endpoint": f"{self.url.replace('http', 'ws', 1)}/stream",
                                  "ticket": self.tickets[-1]})

    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        ticket = request.query.get("ticket")
        if not self.tickets or ticket != self.tickets[-1]:
            raise web.HTTPForbidden(text="unknown ticket")
        self.tickets[-1] = "(used)"  # a ticket opens one connection
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.socket, self.connections = socket, self.connections + 1
        for frame in list(self.unacked.values()):  # what the last connection did not acknowledge
            await socket.send_json(frame)
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                continue
            ack = json.loads(message.data)
            if self.ignore_acks:
                self.ignore_acks -= 1
                continue
            self.acks.append(ack)
            self.unacked.pop(ack["headers"]["messageId"], None)
        return socket

    async def push(self, payload: dict[str, Any], *, message_id: str | None = None) -> str:
        """A robot message down the stream; returns the frame's messageId."""
        message_id = message_id or f"frame-{next(self._frames)}"
        frame = {"specVersion": "1.0", "type": "CALLBACK", "data": json.dumps(payload),
                 "headers": {"appId": "app", "connectionId": "c1", "contentType": "application/json",
                             "messageId": message_id, "time": str(int(time.time() * 1000)),
                             "topic": "/v1.0/im/bot/messages/get"}}
        self.unacked[message_id] = frame
        assert self.socket is not None
        await self.socket.send_json(frame)
        return message_id

    async def system(self, topic: str, data: dict[str, Any]) -> None:
        assert self.socket is not None
        await self.socket.send_json({"specVersion": "1.0", "type": "SYSTEM", "data": json.dumps(data),
                                     "headers": {"messageId": f"sys-{next(self._frames)}", "topic": topic,
                                                 "contentType": "application/json"}})

    async def connected(self, count: int) -> None:
        """Until the client has opened ``count`` connections (and the last is open)."""
        await connections_opened(self, count)

    def _denied(self, request: web.Request) -> web.Response | None:
        if request.headers.get("x-acs-dingtalk-access-token") != f"token-{self.tokens_issued}":
            return web.json_response({"code": "InvalidAuthentication", "message": "bad token"}, status=401)
        return None

    async def _token(self, request: web.Request) -> web.Response:
        if await request.json() != {"appKey": APP_KEY, "appSecret": self.app_secret}:
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "no"}, status=400)
        self.tokens_issued += 1
        return web.json_response({"accessToken": f"token-{self.tokens_issued}", "expireIn": 7200})

    async def _download(self, request: web.Request) -> web.Response:
        if denied := self._denied(request):
            return denied
        body = await request.json()
        if body.get("robotCode") != ROBOT or body.get("downloadCode") not in self.pictures:
            return web.json_response({"code": "invalidParameter.robotCode.downloadCode", "message": "bad"}, status=400)
        return web.json_response({"downloadUrl": f"{self.url}/files/{body['downloadCode']}"})

    async def _file(self, request: web.Request) -> web.Response:
        data = self.pictures.get(request.match_info["code"])
        return web.Response(body=data, content_type="application/octet-stream") if data else web.Response(status=404)

    async def _webhook(self, request: web.Request) -> web.Response:
        if self.down:
            return web.json_response({"errcode": -1, "errmsg": "system busy"}, status=503)
        body = await request.json()
        body["session"] = request.query.get("session")
        self.webhook_posts.append(body)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _send(self, request: web.Request) -> web.Response:
        if denied := self._denied(request):
            return denied
        body = await request.json()
        assert json.loads(body["msgParam"])["text"] and body["robotCode"] == ROBOT
        self.api_sends.append({**body, "path": request.path})
        return web.json_response({"processQueryKey": f"pqk-{next(self._keys)}"})


def callback(fake: FakeDingTalk, msg_id: str, *, text: str | None = None, picture: str | None = None,
             rich: tuple[str, str] | None = None, group: bool = True, at_bot: bool = True,
             webhook_expires_ms: int | None = None, admin: bool | None = None) -> dict[str, Any]:
    """A robot message as DingTalk posts it (PROTOCOLS.md §2.3)."""
    now = int(time.time() * 1000)
    payload: dict[str, Any] = {
        "msgId": msg_id, "createAt": now, "conversationType": "2" if group else "1",
        "conversationId": "cidG1" if group else "cidP1", "senderStaffId": "user01", "senderNick": "Ann",
        "senderId": "$:LWCP_v1:$abc", "chatbotUserId": "$:LWCP_v1:$bot", "robotCode": ROBOT,
        "isInAtList": at_bot if group else False,
        "sessionWebhook": f"{fake.url}/robot/sendBySession?session=s-{msg_id}",
        "sessionWebhookExpiredTime": webhook_expires_ms if webhook_expires_ms is not None else now + 5_400_000,
    }
    if admin is not None:
        payload["isAdmin"] = admin
    if text is not None:
        payload["msgtype"], payload["text"] = "text", {"content": (" " if group else "") + text}
    elif picture is not None:
        payload["msgtype"], payload["content"] = "picture", {"downloadCode": picture}
    else:
        assert rich is not None
        question, code = rich
        payload["msgtype"] = "richText"
        payload["content"] = {"richText": [{"text": f"@VQA {question}"},
                                           {"type": "picture", "downloadCode": code, "pictureDownloadCode": "p"}]}
    return payload


def signed_headers(timestamp_ms: int | None = None, secret: str = APP_SECRET) -> dict[str, str]:
    timestamp = str(timestamp_ms if timestamp_ms is not None else int(time.time() * 1000))
    return {"timestamp": timestamp, "sign": sign(timestamp, secret), "Content-Type": "application/json"}
