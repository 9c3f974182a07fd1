"""A chat platform on loopback, and the smallest adapter that speaks to it over HTTP.

The platform serves image files by id (as Telegram's getFile or Feishu's message resources do)
and records what the bot sends. The adapter turns test events into ``Incoming`` and uses the real
HTTP path for downloads and replies; the daemon's intake, inbox and job queue under it are real.
``FakeChatSettings`` makes it a platform of its own, added through ``adapters.registry`` alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from adapters.base import (
    Accepted,
    Adapter,
    Deployment,
    Finding,
    Host,
    ImageRef,
    Incoming,
    PlatformSettings,
    Reply,
)
from core.errors import AdapterError

log = logging.getLogger(__name__)


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

    def __init__(self, base_url: str, *, name: str = "fake", token: str = "") -> None:
        self.name = name
        self.base_url = base_url
        self.host: Host | None = None
        self._token = token
        self._http: aiohttp.ClientSession | None = None

    def mount(self, app: web.Application) -> None:
        app.router.add_post(f"/{self.name}/events", self._on_event)

    async def _on_event(self, request: web.Request) -> web.Response:
        """The platform pushes ``{"chat", "id", "text", "images": [file ids]}``; addressed when it has text."""
        assert self.host is not None
        event = await request.json()
        accepted = await self.host.accept(Incoming(
            platform=self.name, chat_id=event["chat"], message_id=event["id"], event_id=event["id"],
            sender_id=event.get("sender", "ann"), text=event.get("text", ""), addressed=bool(event.get("text")),
            images=tuple(ImageRef(ref=r) for r in event.get("images", ())), chat_kind="direct"))
        return web.json_response({"job_id": accepted.job_id})

    async def start(self, host: Host) -> None:
        self.host = host
        # As a careless platform library would: the token in a log line (the daemon must scrub it).
        log.info("%s: connecting to %s with token %s", self.name, self.base_url, self._token)
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


class FakeChatSettings(PlatformSettings):
    """``[adapters.fakechat]``: a new platform, added with ``adapters.registry.register`` and nothing else."""

    base_url: str = ""
    token: SecretStr | None = None

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        if not self.base_url:
            yield "base_url", "required when fakechat is enabled"
        if self.token is None:
            yield "token", "required when fakechat is enabled (or IMSIGHT_FAKECHAT_TOKEN)"

    def build(self, deployment: Deployment) -> Adapter:
        assert self.token is not None
        return FakeChatAdapter(self.base_url, name="fakechat", token=self.token.get_secret_value())

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        yield Finding("ok", f"talks to {self.base_url}")
