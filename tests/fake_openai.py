"""A fake OpenAI-compatible chat server on loopback that checks every request's shape, as vLLM would."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

MODEL = "glm-4v-9b"
KEY = "sk-test-key"


@dataclass
class FakeOpenAI:
    """Answers with what it understood; ``fail_next`` statuses are answered first, one per request."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    reply: str | None = None  # instead of the description of the request
    delay_s: float = 0.0  # before the answer starts: a slow model
    plain_json: bool = False  # answer as one JSON completion, ignoring "stream" (some servers do)
    junk: bytes | None = None  # sent as the first streamed chunk (a broken server)
    cut: bool = False  # finish_reason "length": the answer hit max_tokens
    usage: dict[str, int] | None = None  # token counts to report (a last, usage-only chunk when streaming)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        body = await request.json()
        self.requests.append(body)
        if self.fail_next:
            return web.json_response({"error": {"message": "busy"}}, status=self.fail_next.pop(0))
        await asyncio.sleep(self.delay_s)
        try:
            sizes, question = _validate(body)
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": {"message": f"bad request: {exc!r}"}}, status=400)
        text = self.reply or f"I see {len(sizes)} image(s) {' '.join(sizes)}; turns {len(body['messages'])}; {question}"
        finish = "length" if self.cut else "stop"
        if self.plain_json:
            return web.json_response({"id": "c1", "object": "chat.completion", "model": MODEL, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                **({"usage": self.usage} if self.usage else {})})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.junk is not None:
            await resp.write(self.junk)
        await resp.write(_event({"role": "assistant", "content": ""}))
        async for piece in _pieces(text):
            await resp.write(_event({"content": piece}))
        await resp.write(_event({}, finish))
        if self.usage:
            await resp.write(f"data: {json.dumps({'id': 'c1', 'choices': [], 'usage': self.usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _validate(body: dict[str, Any]) -> tuple[list[str], str]:
    """The OpenAI chat shape with images as data URLs only; returns image sizes and the last question."""
    assert body["model"] == MODEL, "unknown model"
    assert body["stream"] is True
    assert isinstance(body["max_tokens"], int) and body["max_tokens"] > 0
    messages = body["messages"]
    assert messages and messages[-1]["role"] == "user"
    sizes: list[str] = []
    for message in messages:
        assert message["role"] in ("system", "user", "assistant")
        content = message["content"]
        if isinstance(content, str):
            continue
        for part in content:
            if part["type"] == "text":
                assert isinstance(part["text"], str)
            else:
                assert part["type"] == "image_url"
                url = part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,"), "images must be data URLs"
                with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True))) as image:
                    image.load()
                    sizes.append(f"{image.width}x{image.height}")
    last = messages[-1]["content"]
    question = last if isinstance(last, str) else next(p["text"] for p in last if p["type"] == "text")
    return sizes, question


def _event(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def _pieces(text: str) -> AsyncIterator[str]:
    for start in range(0, len(text), 7):
        yield text[start:start + 7]
