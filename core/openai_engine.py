"""An engine that asks an OpenAI-compatible server: vLLM, SGLang, LMDeploy or Ollama.

Images travel inside the request as ``data:`` URLs, never as links the server would fetch (the
model host may have no route to them, and server-side fetching is an SSRF risk). Servers keep no
conversation state, so every question resends the whole history; their prefix caches make that cheap.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from core.answer_text import CUT_NOTE, without_thinking
from core.engine import GenerationLimits, PreparedImage, Turn, Usage
from core.errors import EngineError, EngineUnavailable

__all__ = ["OpenAIEngine", "chat_messages"]

log = logging.getLogger(__name__)

_RETRYABLE = {408, 429, 500, 502, 503, 504}


class OpenAIEngine:
    name = "openai"
    supports_images = True

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120,
        attempts: int = 3,
        max_batch: int = 8,
        retry_base_s: float = 0.5,
    ) -> None:
        self._url = base_url.rstrip("/")
        self._model = self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        self._attempts = attempts
        self._retry_base_s = retry_base_s
        self.max_batch = max_batch  # the server batches; this bounds how many questions are in flight
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        # A server that is down now may be up by the first question: say so, but do not refuse to start.
        try:
            async with self._session.get(f"{self._url}/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                served = [m.get("id") for m in (await resp.json(content_type=None)).get("data", [])]
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            log.warning("model server %s not reachable yet (%s); questions fail until it is",
                        self._url, _describe(exc))
            return
        if self._model not in served:
            log.warning("model server %s does not list %r; it serves %s", self._url, self._model, served)
        else:
            log.info("model server %s serves %r", self._url, self._model)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def answer(
        self,
        images: Sequence[PreparedImage],
        turns: Sequence[Turn],
        question: str,
        limits: GenerationLimits,
        usage: Usage | None = None,
    ) -> AsyncIterator[str]:
        if self._session is None:
            raise EngineError("engine is not started")
        messages = await asyncio.to_thread(chat_messages, images, turns, question)  # PNG encoding is CPU work
        body = {"model": self._model, "messages": messages, "stream": True,
                "max_tokens": limits.max_new_tokens, "temperature": 0}
        resp = await self._post(body)
        try:
            async for text in without_thinking(_deltas(resp, usage)):
                yield text
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineUnavailable(f"the model server at {self._url} broke off the answer: {_describe(exc)}") from exc
        finally:
            resp.release()

    async def _post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """Send the question; retry while nothing has been answered yet and the failure may pass."""
        assert self._session is not None
        url = f"{self._url}/chat/completions"
        for attempt in range(1, self._attempts + 1):
            last = attempt == self._attempts
            try:
                resp = await self._session.post(url, json=body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if last:
                    raise EngineUnavailable(
                        f"cannot reach the model server at {self._url} ({_describe(exc)}) after {attempt} "
                        "tries; is it running? ([engine] base_url)"
                    ) from exc
            else:
                if resp.status < 300:
                    return resp
                detail = (await resp.text())[:300]
                resp.release()
                if resp.status in (401, 403):
                    raise EngineError(f"the model server at {self._url} refused the key ({resp.status}); "
                                      "check [engine] api_key or IMSIGHT_ENGINE_API_KEY")
                if resp.status in _RETRYABLE and last:
                    raise EngineUnavailable(f"the model server at {self._url} answered {resp.status}: {detail}")
                if resp.status not in _RETRYABLE:
                    raise EngineError(f"the model server at {self._url} answered {resp.status}: {detail}")
            delay = self._retry_base_s * 2 ** (attempt - 1)
            log.info("model server %s: try %d failed; again in %.1fs", self._url, attempt, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def _count(event: Any, usage: Usage | None) -> None:
    """A chunk's ``usage`` object (OpenAI's shape) into ``usage``."""
    counts = event.get("usage") if isinstance(event, dict) else None
    if usage is not None and isinstance(counts, dict):
        usage.prompt_tokens = int(counts.get("prompt_tokens") or 0)
        usage.completion_tokens = int(counts.get("completion_tokens") or 0)


def chat_messages(images: Sequence[PreparedImage], turns: Sequence[Turn], question: str) -> list[dict[str, Any]]:
    """OpenAI chat messages: the images first in the first user message, then the text."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(image)}} for image in images
    ]
    messages: list[dict[str, Any]] = []
    for turn in [*turns, Turn("user", question)]:
        if turn.role == "user" and parts:
            messages.append({"role": "user", "content": [*parts, {"type": "text", "text": turn.text}]})
            parts = []
        else:
            messages.append({"role": turn.role, "content": turn.text})
    return messages


def data_url(image: PreparedImage) -> str:
    buffer = io.BytesIO()
    image.image.save(buffer, format="PNG")  # lossless: screenshots are text, JPEG blurs it
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


async def _deltas(resp: aiohttp.ClientResponse, usage: Usage | None = None) -> AsyncIterator[str]:
    """The answer's text as it comes: streamed chunks (SSE ``data:`` lines), or one JSON answer from a
    server that ignores ``stream``; ``CUT_NOTE`` after an answer stopped at its token limit. The
    server's token counts go into ``usage`` where it sends them (a ``usage`` object on a chunk)."""
    if resp.content_type == "application/json":
        answer = await resp.json(content_type=None)
        _count(answer, usage)
        for text in _said(answer, "message"):
            yield text
        return
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments and event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise EngineError(f"the model server sent something unreadable (not JSON): {data[:100]!r}") from exc
        if isinstance(event, dict) and "error" in event:
            raise EngineError(f"the model server failed: {event['error']}")
        _count(event, usage)
        if isinstance(event, dict) and not event.get("choices"):
            continue  # a usage-only chunk
        for text in _said(event, "delta"):
            yield text


def _said(event: Any, part: str) -> list[str]:
    """The text of a completion's (``message``) or chunk's (``delta``) first choice, and ``CUT_NOTE``
    when it stopped at the token limit."""
    choice = _first_choice(event)
    content = (choice.get(part) or {}).get("content")
    said = [str(content)] if content else []
    if choice.get("finish_reason") == "length":
        said.append(CUT_NOTE)
    return said


def _first_choice(event: Any) -> dict[str, Any]:
    """``choices[0]`` of a chat completion or chunk; EngineError naming what came instead."""
    choices = event.get("choices") if isinstance(event, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict) or not isinstance(choice.get("delta") or choice.get("message") or {}, dict):
        raise EngineError(f"the model server sent something unreadable (no chat completion): {str(event)[:100]!r}")
    return choice


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
