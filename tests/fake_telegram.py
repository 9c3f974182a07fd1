"""A fake Telegram Bot API server on loopback: the real JSON of the methods the adapter uses.

python-telegram-bot is pointed at it with ``base_url``/``base_file_url``. Updates pushed with
``push`` are served by ``getUpdates`` (long polling) or POSTed to a webhook; what the bot sends is
recorded, and can be answered with an error first (``fail_next``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from aiohttp import web

TOKEN = "123456:TEST-token"
BOT = {"id": 123456, "is_bot": True, "first_name": "Sight", "username": "sight_bot",
       "can_join_groups": True, "can_read_all_group_messages": True, "supports_inline_queries": False}


class FakeTelegram:
    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.new_update = asyncio.Event()
        self.files: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}  # file_size getFile reports instead of the real one
        self.sent: list[dict[str, Any]] = []  # sendMessage calls, parameters decoded
        self.results: list[dict[str, Any]] = []  # the messages those calls made, as Telegram returns them
        self.edits: list[dict[str, Any]] = []  # editMessageText calls
        self.actions: list[dict[str, Any]] = []  # sendChatAction calls
        self.calls: list[str] = []
        self.log: list[tuple[float, str, str, int]] = []  # (monotonic time, method, chat_id, HTTP status)
        self.fail_next: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.webhook: dict[str, Any] | None = None
        self.admins: set[int] = set()  # user ids getChatMember reports as administrators
        self.members_held: asyncio.Event | None = None  # set: getChatMember answers only once it is set
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(9000)
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        return app

    def push(self, message: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), "message": message}
        self.updates.append(update)
        self.new_update.set()
        return update

    def add_file(self, file_id: str, data: bytes) -> None:
        self.files[file_id] = data

    async def _method(self, request: web.Request) -> web.Response:
        if unquote(request.match_info["token"]) != TOKEN:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        self.calls.append(method)
        params = _decode(await request.post())
        chat = str(params.get("chat_id", ""))
        if failures := self.fail_next.get(method):
            status, parameters = failures.pop(0)
            self.log.append((time.monotonic(), method, chat, status))
            return _error(status, "Too Many Requests: retry later" if status == 429 else "Internal error",
                          parameters)
        handler = getattr(self, f"_{method}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        result = await handler(params)
        self.log.append((time.monotonic(), method, chat, 200))
        return web.json_response({"ok": True, "result": result})

    async def _getMe(self, params: Mapping[str, Any]) -> Any:
        return BOT

    async def _deleteWebhook(self, params: Mapping[str, Any]) -> Any:
        self.webhook = None
        return True

    async def _setWebhook(self, params: Mapping[str, Any]) -> Any:
        self.webhook = dict(params)
        return True

    async def _getUpdates(self, params: Mapping[str, Any]) -> Any:
        offset = int(params.get("offset", 0) or 0)
        self.updates = [u for u in self.updates if u["update_id"] >= offset]
        if not self.updates:
            self.new_update.clear()
            with contextlib.suppress(TimeoutError):  # long polling, but short: the adapter stops quickly
                await asyncio.wait_for(self.new_update.wait(), min(float(params.get("timeout", 0) or 0), 0.5))
        return self.updates[:100]

    async def _getFile(self, params: Mapping[str, Any]) -> Any:
        file_id = params["file_id"]
        if file_id not in self.files:
            raise web.HTTPBadRequest(text=json.dumps({"ok": False, "error_code": 400,
                                                      "description": "Bad Request: invalid file_id"}),
                                     content_type="application/json")
        data = self.files[file_id]
        return {"file_id": file_id, "file_unique_id": f"u-{file_id}", "file_size": self.sizes.get(file_id, len(data)),
                "file_path": f"photos/{file_id}.png"}

    async def _sendMessage(self, params: Mapping[str, Any]) -> Any:
        self.sent.append(dict(params))
        message = {"message_id": next(self._message_ids), "date": int(time.time()),
                   "chat": {"id": int(params["chat_id"]), "type": "supergroup"},
                   "from": {k: BOT[k] for k in ("id", "is_bot", "first_name", "username")},
                   "text": params["text"]}
        if "message_thread_id" in params:
            message["message_thread_id"] = int(params["message_thread_id"])
            message["is_topic_message"] = True
        self.results.append(message)
        return message

    async def _getChatMember(self, params: Mapping[str, Any]) -> Any:
        if self.members_held is not None:
            await self.members_held.wait()
        user = int(params["user_id"])
        status = "administrator" if user in self.admins else "member"
        member: dict[str, Any] = {"status": status, "user": {"id": user, "is_bot": False, "first_name": "U"}}
        if status == "administrator":
            member.update({k: False for k in (
                "can_be_edited", "is_anonymous", "can_manage_chat", "can_delete_messages", "can_manage_video_chats",
                "can_restrict_members", "can_promote_members", "can_change_info", "can_invite_users",
                "can_post_stories", "can_edit_stories", "can_delete_stories")})
        return member

    async def _sendChatAction(self, params: Mapping[str, Any]) -> Any:
        self.actions.append(dict(params))
        return True

    async def _editMessageText(self, params: Mapping[str, Any]) -> Any:
        self.edits.append(dict(params))
        message = next(m for m in self.results if m["message_id"] == int(params["message_id"]))
        message["text"] = params["text"]
        message["edit_date"] = int(time.time())
        return message

    def text_of(self, index: int) -> str:
        """The text the ``index``-th message the bot sent shows now (after its edits)."""
        return str(self.results[index]["text"])

    async def _file(self, request: web.Request) -> web.Response:
        if unquote(request.match_info["token"]) != TOKEN:
            return web.Response(status=401)
        file_id = request.match_info["path"].rsplit("/", 1)[-1].removesuffix(".png")
        if file_id not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[file_id], content_type="image/png")


def _decode(form: Mapping[str, Any]) -> dict[str, Any]:
    """Form fields as the Bot API reads them: nested objects arrive as JSON strings."""
    out: dict[str, Any] = {}
    for key, value in form.items():
        text = str(value)
        out[key] = json.loads(text) if text[:1] in "{[" else text
    return out


def _error(status: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)
