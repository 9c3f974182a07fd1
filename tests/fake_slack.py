"""A fake Slack on loopback: the Web API methods imsight calls (bearer tokens, ``ok``/``error``
answers, 429 with ``Retry-After``), private file downloads, and Socket Mode: ``apps.connections.open``
and a WebSocket that says ``hello``, pushes envelopes and re-sends what was not acknowledged with
``retry_attempt`` + 1 (PROTOCOLS.md §7)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

from aiohttp import WSMsgType, web

from helpers import connections_opened

APP_TOKEN, BOT_TOKEN, BOT_USER, TEAM = "xapp-1-A1-fake", "xoxb-fake-bot", "UBOT", "T1"


class FakeSlack:
    def __init__(self) -> None:
        self.url = ""
        self.files: dict[str, bytes] = {}  # file id -> bytes
        self.posts: list[dict[str, Any]] = []  # chat.postMessage calls, in order
        self.updates: list[dict[str, Any]] = []  # chat.update calls
        self.threads: dict[str, list[dict[str, Any]]] = {}  # thread ts -> its messages (conversations.replies)
        self.limited: dict[str, int] = {}  # method -> calls to refuse with 429 first
        self.refused: list[tuple[str, float]] = []  # (method, when) answered 429
        self.app_token_ok = True
        self.post_delay_s = 0.0  # chat.postMessage answers this late (recorded at once): a slow Slack
        self.socket: web.WebSocketResponse | None = None
        self.connections = 0
        self.acks: list[str] = []
        self.unacked: dict[str, dict[str, Any]] = {}  # envelope id -> envelope, re-sent on the next connection
        self.ignore_acks = 0
        self._ids = itertools.count(1)
        self._ts = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/link", self._link)
        app.router.add_get("/files-pri/{file}", self._file)
        return app

    # ---- the Web API ----------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            args |= await request.json() if request.content_type == "application/json" else dict(await request.post())
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if method == "apps.connections.open":
            if token != APP_TOKEN or not self.app_token_ok:
                return web.json_response({"ok": False, "error": "invalid_auth"})
            return web.json_response({"ok": True, "url": f"{self.url.replace('http', 'ws', 1)}/link?ticket=t1"})
        if token != BOT_TOKEN:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if self.limited.get(method):
            self.limited[method] -= 1
            self.refused.append((method, time.monotonic()))
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "1"})
        if method == "auth.test":
            return web.json_response({"ok": True, "user": "vqa", "user_id": BOT_USER, "team": "Acme", "team_id": TEAM,
                                      "bot_id": "BBOT"})
        if method == "chat.postMessage":
            assert args.get("text") and args.get("channel")
            ts = f"{time.time():.0f}.{next(self._ts):06d}"
            self.posts.append({**args, "ts": ts, "at": time.monotonic()})
            if args.get("thread_ts"):  # what conversations.replies shows of the thread
                self.threads.setdefault(str(args["thread_ts"]), []).append(
                    {"type": "message", "user": BOT_USER, "bot_id": "BBOT", "text": args["text"], "ts": ts})
            await asyncio.sleep(self.post_delay_s)
            return web.json_response({"ok": True, "channel": args["channel"], "ts": ts})
        if method == "chat.update":
            assert args.get("ts") and args.get("text")
            self.updates.append(args)
            for message in (m for thread in self.threads.values() for m in thread if m["ts"] == args["ts"]):
                message["text"] = args["text"]
            return web.json_response({"ok": True, "channel": args["channel"], "ts": args["ts"]})
        if method == "conversations.replies":
            messages = self.threads.get(str(args.get("ts")))
            if messages is None:
                return web.json_response({"ok": False, "error": "thread_not_found"})
            return web.json_response({"ok": True, "messages": messages[: int(args.get("limit", 100))]})
        return web.json_response({"ok": False, "error": "unknown_method"})

    async def _file(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            # What Slack does without the token: a sign-in page, status 200.
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        data = self.files.get(request.match_info["file"])
        return web.Response(body=data, content_type="image/png") if data else web.Response(status=404)

    def file(self, file_id: str, data: bytes) -> dict[str, Any]:
        """A file object as events carry it, its bytes served at ``url_private_download``."""
        self.files[file_id] = data
        url = f"{self.url}/files-pri/{file_id}"
        return {"id": file_id, "mimetype": "image/png", "filetype": "png", "name": f"{file_id}.png",
                "url_private": url, "url_private_download": url}

    # ---- Socket Mode ------------------------------------------------------------------------------

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.socket, self.connections = socket, self.connections + 1
        await socket.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A1"}})
        for envelope in list(self.unacked.values()):  # Slack's retry of what was not acknowledged
            envelope["retry_attempt"] += 1
            envelope["retry_reason"] = "timeout"
            await socket.send_json(envelope)
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                continue
            envelope_id = json.loads(message.data)["envelope_id"]
            if self.ignore_acks:
                self.ignore_acks -= 1
                continue
            self.acks.append(envelope_id)
            self.unacked.pop(envelope_id, None)
        return socket

    async def push(self, event: dict[str, Any], *, event_id: str | None = None) -> str:
        """An Events API envelope down the socket; returns its envelope id."""
        envelope_id = f"env-{next(self._ids)}"
        envelope = {"envelope_id": envelope_id, "type": "events_api", "accepts_response_payload": False,
                    "retry_attempt": 0, "retry_reason": "",
                    "payload": {"type": "event_callback", "team_id": TEAM, "api_app_id": "A1",
                                "event_id": event_id or f"Ev{next(self._ids)}", "event_time": int(time.time()),
                                "event": event}}
        self.unacked[envelope_id] = envelope
        assert self.socket is not None
        await self.socket.send_json(envelope)
        return envelope_id

    async def disconnect(self, reason: str = "refresh_requested") -> None:
        assert self.socket is not None
        await self.socket.send_json({"type": "disconnect", "reason": reason})

    async def connected(self, count: int) -> None:
        await connections_opened(self, count)


def message(text: str, *, ts: str, channel: str = "C1", user: str = "U1", thread_ts: str | None = None,
            files: list[dict[str, Any]] | None = None, kind: str = "message") -> dict[str, Any]:
    """A message event as Slack sends it (a channel message, or ``app_mention``)."""
    event: dict[str, Any] = {"type": kind, "channel": channel, "user": user, "text": text, "ts": ts,
                             "event_ts": ts, "channel_type": "im" if channel.startswith("D") else "channel"}
    if thread_ts:
        event["thread_ts"] = thread_ts
    if files:
        event["files"], event["subtype"] = files, "file_share"
    return event
