"""An OpenAI-compatible chat-completions endpoint: the company's other tools (the ``openai`` package,
LangChain, LlamaIndex, Open WebUI, Dify, n8n) ask the private vision model through imsight.

Routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed as server-sent events, or
one JSON answer). Stateless like OpenAI's API: the client sends the whole conversation every time,
and the answer is about the images and turns in it, nothing looked up. Each question still goes
through the daemon's queue, limits, engine caches and metrics, and is kept in the history under
platform ``openai``, one conversation per API key (its name). Errors have OpenAI's shape and
status codes, so the client libraries raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr

from adapters.base import Adapter, Deployment, Finding, Host, ImageRef, Incoming, PlatformSettings, Reply
from adapters.http_body import off_loop, parse_json, read_limited
from adapters.outbound import HostList, fetch_image
from adapters.webhook_request import decode_base64_image
from core.answer_text import CUT_NOTE
from core.engine import Turn
from core.errors import BadInput, Busy, ImsightError, ShuttingDown, TooLarge

__all__ = ["OpenAIAdapter", "OpenAISettings"]

log = logging.getLogger(__name__)

PLATFORM = "openai"


class _Refused(Exception):
    """An error as OpenAI writes it: ``{"error": {"message", "type", "param", "code"}}`` with its status."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.retry_after_s = status, kind, code, param, retry_after_s

    def response(self) -> web.Response:
        response = web.json_response({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                                "code": self.code}}, status=self.status)
        if self.retry_after_s is not None:
            response.headers["Retry-After"] = str(self.retry_after_s)
        return response


@dataclass
class _Waiting:
    """A request waiting for its job: the answer so far (drafts) and the end (the reply)."""

    drafts: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    reply: asyncio.Future[Reply] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(frozen=True, slots=True)
class _Request:
    question: str
    turns: tuple[Turn, ...]
    images: tuple[ImageRef, ...]  # data: URLs decoded; https URLs still to fetch
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    user: str


class OpenAIAdapter:
    name = PLATFORM

    def __init__(self, keys: Mapping[str, str], *, model: str, allowed_image_hosts: list[str],
                 max_body_bytes: int, max_image_bytes: int, fetch_timeout_s: float = 20,
                 wait_s: float = 600) -> None:
        self._keys = dict(keys)  # name -> key
        self._model = model
        self._image_hosts = HostList(allowed_image_hosts, "[adapters.openai] allowed_image_hosts")
        self._max_body, self._max_image = max_body_bytes, max_image_bytes
        self._fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout_s)
        self._wait_s = wait_s
        self._host: Host | None = None
        self._session: aiohttp.ClientSession | None = None
        self._waiting: dict[str, _Waiting] = {}  # job id -> its request
        self._requests: collections.Counter[str] = collections.Counter()  # by key name

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._completions)

    async def start(self, host: Host) -> None:
        self._host = host
        self._session = aiohttp.ClientSession()
        log.info("OpenAI-compatible endpoint on /v1 (model %r, %d key(s))", self._model, len(self._keys))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- the routes ---------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        try:
            self._caller(request)
        except _Refused as refused:
            return refused.response()
        return web.json_response({"object": "list", "data": [
            {"id": self._model, "object": "model", "created": 0, "owned_by": "imsight"}]})

    def requests_by_key(self) -> Mapping[str, int]:
        """``adapters.base.Keyed``: chat completions asked so far, by key name."""
        return dict(self._requests)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            caller = self._caller(request)
            self._requests[caller] += 1
            asked = await self._parse(request)
            images = await self._fetched(asked.images)
            waiting, job_id = await self._ask(caller, asked, images)
        except _Refused as refused:
            return refused.response()
        completion = f"chatcmpl-{job_id}"
        try:
            if asked.stream:
                return await self._streamed(request, asked, completion, waiting)
            reply = await asyncio.wait_for(asyncio.shield(waiting.reply), self._wait_s)
            if reply.failed:
                return _Refused(500, reply.text, "server_error", "generation_failed").response()
            text, finish = _finished(reply.text, asked.stop)
            body: dict[str, Any] = {
                "id": completion, "object": "chat.completion", "created": int(time.time()), "model": self._model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": _usage(reply),
            }
            return web.json_response(body)
        except TimeoutError:
            return _Refused(504, f"no answer within {self._wait_s:g}s; it is still being made", "server_error",
                            "timeout").response()
        finally:
            self._waiting.pop(job_id, None)

    async def _streamed(self, request: web.Request, asked: _Request, completion: str, waiting: _Waiting
                        ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())

        async def send(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
            chunk = {"id": completion, "object": "chat.completion.chunk", "created": created, "model": self._model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

        async def fail(message: str, code: str) -> None:  # OpenAI's clients raise on an error event
            error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())

        try:
            await send({"role": "assistant", "content": ""})
            shown = ""
            try:
                async for text in _drafts_then_reply(waiting, self._wait_s):
                    visible, _ = _finished(text, asked.stop)
                    if visible.startswith(shown) and len(visible) > len(shown):
                        await send({"content": visible[len(shown):]})
                        shown = visible
            except TimeoutError:
                await fail(f"no answer within {self._wait_s:g}s; it is still being made", "timeout")
                return response
            reply = waiting.reply.result()
            if reply.failed:
                await fail(reply.text, "generation_failed")
                return response
            text, finish = _finished(reply.text, asked.stop)
            if not text.startswith(shown):  # the final text differs from a draft: send the rest as it is
                shown = ""
            if len(text) > len(shown):
                await send({"content": text[len(shown):]})
            await send({}, finish)
            if asked.include_usage:
                chunk = {"id": completion, "object": "chat.completion.chunk", "created": created,
                         "model": self._model, "choices": [], "usage": _usage(reply)}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            log.info("%s: the client went away; the answer is kept in the history", completion)
        return response

    # ---- what the daemon calls ----------------------------------------------------------------

    async def download(self, image: ImageRef) -> bytes:
        raise BadInput("images come with the request", code="image_url_refused")  # fetched before intake

    async def draft(self, reply: Reply) -> str | None:
        """``adapters.base.Drafting``: the answer so far, to a streaming request."""
        waiting = self._waiting.get(reply.job_id)
        if waiting is not None and reply.text:
            waiting.drafts.put_nowait(reply.text)
        return None

    async def send(self, reply: Reply) -> str:
        waiting = self._waiting.get(reply.job_id)
        if waiting is not None and not reply.notice and not waiting.reply.done():
            waiting.reply.set_result(reply)
        return f"chatcmpl-{reply.job_id}"  # kept in the history even when the caller is gone

    # ---- the request --------------------------------------------------------------------------

    def _caller(self, request: web.Request) -> str:
        """The name of the key the request carries."""
        given = request.headers.get("Authorization", "")
        key = given.removeprefix("Bearer ").strip() if given.startswith("Bearer ") else ""
        for name, expected in self._keys.items():
            if key and hmac.compare_digest(key.encode(), expected.encode()):
                return name
        raise _Refused(401, "Incorrect API key provided." if key else "No API key provided (Authorization: Bearer).",
                       "invalid_request_error", "invalid_api_key")

    async def _parse(self, request: web.Request) -> _Request:
        try:
            raw = await read_limited(request, self._max_body)
        except TooLarge as exc:
            raise _Refused(413, str(exc), "invalid_request_error", "request_too_large") from None
        try:
            body = await parse_json(raw)  # on a thread when large; deep nesting refused too
        except BadInput as exc:
            raise _Refused(400, str(exc), "invalid_request_error", exc.code) from None
        if not isinstance(body, dict):
            raise _Refused(400, "The body must be a JSON object.", "invalid_request_error")
        model = body.get("model")
        if model != self._model:
            raise _Refused(404, f"The model {model!r} does not exist; this server serves {self._model!r}.",
                           "invalid_request_error", "model_not_found", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Refused(400, "'messages' must be a non-empty array.", "invalid_request_error", param="messages")
        turns: list[Turn] = []
        images: list[ImageRef] = []
        for n, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user",
                                                                           "assistant", "tool"):
                raise _Refused(400, f"messages[{n}] must be an object with a role.", "invalid_request_error",
                               param=f"messages[{n}]")
            text, found = self._content(message.get("content"), f"messages[{n}].content")
            role = message["role"]
            if role == "user":
                images += found
                turns.append(Turn("user", text))
            elif role == "assistant":
                turns.append(Turn("assistant", text))
            # system, developer and tool messages are not passed on: the model's chat template has its own
        if not turns or turns[-1].role != "user":
            raise _Refused(400, "The last message must be the user's.", "invalid_request_error", param="messages")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise _Refused(400, "max_tokens must be a positive integer.", "invalid_request_error", param="max_tokens")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise _Refused(400, "stop must be a string or up to 4 strings.", "invalid_request_error", param="stop")
        options = body.get("stream_options") or {}
        return _Request(
            question=turns[-1].text, turns=tuple(turns[:-1]), images=tuple(images), max_tokens=int(limit or 0),
            stop=tuple(stop), stream=bool(body.get("stream")),
            include_usage=bool(options.get("include_usage")) if isinstance(options, dict) else False,
            user=str(body.get("user") or "")[:64],
        )

    def _content(self, content: Any, where: str) -> tuple[str, list[ImageRef]]:
        """A message's text and images: a string, or parts (``text``, ``image_url``)."""
        if isinstance(content, str):
            return content, []
        if content is None:
            return "", []
        if not isinstance(content, list):
            raise _Refused(400, f"{where} must be a string or an array of parts.", "invalid_request_error",
                           param=where)
        texts: list[str] = []
        images: list[ImageRef] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(self._image(str(url or ""), where))
            else:
                raise _Refused(400, f"{where}: parts of type {kind!r} are not supported (text, image_url).",
                               "invalid_request_error", param=where)
        return "\n".join(texts), images

    def _image(self, url: str, where: str) -> ImageRef:
        """The URL as named; ``_fetched`` turns it into bytes."""
        if url.startswith("data:") and not url.partition(",")[0].endswith(";base64"):
            raise _Refused(400, f"{where}: a data: URL must be base64.", "invalid_request_error", param=where)
        if not url.startswith(("data:", "https://")):
            raise _Refused(400, f"{where}: image URLs must be data: or https:// URLs.", "invalid_request_error",
                           param=where)
        return ImageRef(ref=url)

    async def _fetched(self, images: tuple[ImageRef, ...]) -> tuple[ImageRef, ...]:
        """Each image's bytes: a data: URL decoded as the generic API decodes its images (on a thread when
        large), an https one fetched now (the client waits for the answer anyway), from allowed hosts only."""
        assert self._session is not None
        fetched = []
        for image in images:
            try:
                if image.ref.startswith("data:"):
                    data = await off_loop(len(image.ref), decode_base64_image, image.ref, self._max_image)
                else:
                    data = await fetch_image(self._session, image.ref, self._image_hosts,
                                             max_bytes=self._max_image, limits=self._fetch_timeout)
            except TooLarge as exc:
                raise _Refused(413, str(exc), "invalid_request_error", "image_too_large") from None
            except BadInput as exc:
                raise _Refused(400, str(exc), "invalid_request_error", exc.code) from None
            fetched.append(ImageRef(data=data))
        return tuple(fetched)

    async def _ask(self, caller: str, asked: _Request, images: tuple[ImageRef, ...]) -> tuple[_Waiting, str]:
        """The question into the daemon (queued like any chat's); returns what to wait on, and the job."""
        assert self._host is not None
        message_id = uuid.uuid4().hex
        # One conversation per key, and per ``user`` within it: a conversation's questions are answered
        # one at a time, in order, so a tool that tells its users apart gets them answered side by side.
        chat_id = f"{caller}:{asked.user}" if asked.user else caller
        incoming = Incoming(
            platform=PLATFORM, chat_id=chat_id, message_id=message_id, event_id=message_id, chat_kind="direct",
            sender_id=asked.user or caller, sender_name=asked.user or caller, text=asked.question, addressed=True,
            images=images, conversation=asked.turns, max_new_tokens=asked.max_tokens,
        )
        try:
            accepted = await self._host.accept(incoming, refuse_when_busy=True)
        except Busy as exc:
            raise _Refused(429, str(exc), "rate_limit_exceeded", "rate_limit_exceeded",
                           retry_after_s=exc.retry_after_s) from None
        except ShuttingDown as exc:
            raise _Refused(503, str(exc), "server_error", "shutting_down") from None
        except BadInput as exc:  # an image that is not one, say
            raise _Refused(400 if exc.status < 500 else exc.status, str(exc), "invalid_request_error",
                           exc.code) from None
        except ImsightError as exc:
            raise _Refused(503, str(exc), "server_error", "unavailable") from None
        if accepted.job_id is None:
            raise _Refused(500, "the question was stored but not queued", "server_error")
        waiting = _Waiting()
        self._waiting[accepted.job_id] = waiting  # before any await: the reply cannot come sooner
        return waiting, accepted.job_id


async def _drafts_then_reply(waiting: _Waiting, wait_s: float) -> AsyncIterator[str]:
    """Each draft as it comes, until the reply is there (or ``wait_s`` has passed)."""
    deadline = time.monotonic() + wait_s
    while not waiting.reply.done():
        draft: asyncio.Future[str] = asyncio.ensure_future(waiting.drafts.get())
        pending: set[asyncio.Future[Any]] = {draft, waiting.reply}
        done, _ = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if draft in done:
            yield draft.result()
        else:
            draft.cancel()
        if not done:
            raise TimeoutError
    while not waiting.drafts.empty():
        waiting.drafts.get_nowait()


def _finished(text: str, stop: tuple[str, ...]) -> tuple[str, str]:
    """The answer as OpenAI's clients expect it, and why it ended: ``length`` when it hit the token
    limit (the chat note saying so is left out), ``stop`` otherwise (cut at the first stop string)."""
    finish = "stop"
    if text.endswith(CUT_NOTE):
        text, finish = text.removesuffix(CUT_NOTE).rstrip(), "length"
    cuts = [text.index(s) for s in stop if s in text]
    if cuts:
        text, finish = text[:min(cuts)], "stop"
    return text, finish


def _usage(reply: Reply) -> dict[str, int]:
    prompt, completion = reply.usage if reply.usage is not None else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAISettings(PlatformSettings):
    """``[adapters.openai]``: an OpenAI-compatible endpoint for other tools."""

    doctor_label: ClassVar[str] = "OpenAI-compatible endpoint"
    model: str = "imsight"  # the name clients ask for (GET /v1/models lists it)
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)  # name -> key; the name shows in logs and history
    api_key: SecretStr | None = None  # one more key, named "default" (or IMSIGHT_OPENAI_API_KEY)
    allowed_image_hosts: list[str] = Field(default_factory=list)  # https image URLs only from these hosts

    def keys(self) -> dict[str, str]:
        keys = {name: key.get_secret_value() for name, key in self.api_keys.items()}
        if self.api_key is not None:
            keys.setdefault("default", self.api_key.get_secret_value())
        return keys

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        if not self.keys():
            yield "api_keys", "at least one key is needed (or IMSIGHT_OPENAI_API_KEY)"

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        yield Finding("ok", f"POST /v1/chat/completions serves {self.model!r} to {len(self.keys())} key(s)")

    def secret_values(self) -> list[str]:
        return [*super().secret_values(), *(key.get_secret_value() for key in self.api_keys.values())]

    def build(self, deployment: Deployment) -> Adapter:
        return OpenAIAdapter(self.keys(), model=self.model, allowed_image_hosts=self.allowed_image_hosts,
                             max_body_bytes=deployment.max_body_bytes, max_image_bytes=deployment.max_image_bytes)
