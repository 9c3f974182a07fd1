"""A chat platform on loopback, and the smallest adapter that speaks to it over HTTP.

The platform serves image files by id (as Telegram's getFile or Feishu's message resources do)
and records what the bot sends. The adapter turns test events into ``Incoming`` and uses the real
HTTP path for downloads and replies; the daemon's intake, inbox and job queue under it are real.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from core.errors import AdapterError
from core.types import Accepted, Host, ImageRef, Incoming, Reply


class FakePlatform:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.open = asyncio.Event()  # cleared: downloads hang until it is set
        self.open.set()
        self.unavailable = 0  # answer this many downloads with 503 first
        self.downloads: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_get("/files/{file_id}", self._file)
        self.app.router.add_post("/send", self._send)

    async def _file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        self.downloads.append(file_id)
        await self.open.wait()
        if self.unavailable > 0:
            self.unavailable -= 1
            return web.Response(status=503)
        if file_id not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[file_id], content_type="image/png")

    async def _send(self, request: web.Request) -> web.Response:
        self.sent.append(await request.json())
        return web.json_response({"message_id": f"sent-{len(self.sent)}"})


class FakeChatAdapter:
    name = "fake"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.host: Host | None = None
        self._http: aiohttp.ClientSession | None = None

    def mount(self, app: web.Application) -> None:
        pass

    async def start(self, host: Host) -> None:
        self.host = host
        self._http = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def deliver(self, incoming: Incoming) -> Accepted:
        assert self.host is not None
        return await self.host.accept(incoming)

    async def download(self, image: ImageRef) -> bytes:
        assert self._http is not None
        async with self._http.get(f"{self.base_url}/files/{image.ref}") as resp:
            if resp.status != 200:
                raise AdapterError(self.name, f"download: HTTP {resp.status}", retryable=resp.status >= 500)
            return await resp.read()

    async def send(self, reply: Reply) -> str:
        assert self._http is not None
        body = {"chat_id": reply.chat_id, "reply_to": reply.reply_to, "text": reply.text,
                "images": list(reply.images), "failed": reply.failed}
        async with self._http.post(f"{self.base_url}/send", json=body) as resp:
            return str((await resp.json())["message_id"])
