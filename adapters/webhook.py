"""The generic HTTP API: other systems post images and questions, read jobs and history.

Routes (on the daemon's aiohttp app):
    POST /api/v1/messages                    store a message; ask a question
    GET  /api/v1/jobs/{job_id}               a job's status and answer
    GET  /api/v1/history/{platform}/{chat_id} a chat's stored messages, oldest first
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr

from adapters.base import Adapter, Deployment, Finding, Host, ImageRef, Incoming, JobView, PlatformSettings, Reply
from adapters.http_body import BODY_TIMEOUT, RequestTimeout, off_loop
from adapters.outbound import CallbackRefused, HostList, PinnedResolver, fetch_image
from adapters.signing import StandardWebhookSigner, Verification
from adapters.webhook_request import Body, decode_base64_image, refuse_unknown
from core.errors import AdapterError, BadInput, ConfigError, Forbidden, NotFound, TooLarge, Unauthorized

__all__ = ["WebhookAdapter"]

log = logging.getLogger(__name__)

PLATFORM = "api"
_CHUNK = 256 * 1024


class WebhookAdapter:
    """Adapter for the generic API; its platform name in the store is ``api``."""

    name = PLATFORM

    def __init__(
        self,
        *,
        token: str | None,
        secret: str | None,
        allowed_image_hosts: Sequence[str],
        allowed_callback_hosts: Sequence[str] = (),
        admin_token: str | None = None,
        max_body_bytes: int,
        max_image_bytes: int,
        fetch_timeout_s: float,
        wait_s: float,
    ) -> None:
        self._token = token
        self._admin_token = admin_token  # reads what came through other platforms (the API's own do not)
        self._signer = StandardWebhookSigner(secret) if secret else None
        self._image_hosts = HostList(allowed_image_hosts, "allowed_image_hosts")
        self._callback_hosts = HostList(allowed_callback_hosts, "[adapters.webhook] allowed_callback_hosts")
        self._max_body, self._max_image = max_body_bytes, max_image_bytes
        self._fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout_s)
        self._wait_s = wait_s
        self._host: Host | None = None
        self._session: aiohttp.ClientSession | None = None
        self._callbacks: aiohttp.ClientSession | None = None  # its connector reaches only checked addresses

    @property
    def open(self) -> bool:
        """No token and no secret: anyone who can reach the port may post."""
        return self._token is None and self._signer is None

    def mount(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/messages", self._post_message)
        app.router.add_get("/api/v1/jobs/{job_id}", self._get_job)
        app.router.add_get("/api/v1/history/{platform}/{chat_id}", self._get_history)

    async def start(self, host: Host) -> None:
        self._session = aiohttp.ClientSession()
        self._callbacks = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=PinnedResolver(self._callback_hosts), limit_per_host=8))
        self._host = host
        if self.open:
            log.warning("the generic API has no token and no secret: anyone who reaches it may use it")

    async def stop(self) -> None:
        self._host = None
        for session in (self._session, self._callbacks):
            if session is not None:
                await session.close()
        self._session = self._callbacks = None

    async def download(self, image: ImageRef) -> bytes:
        """Fetch an image URL, from an allowed host only, within the size limit and timeout."""
        assert self._session is not None
        return await fetch_image(self._session, image.ref, self._image_hosts, max_bytes=self._max_image,
                                 limits=self._fetch_timeout)

    async def send(self, reply: Reply) -> str:
        """POST the answer, signed, to the question's ``callback_url``; the id is ours either way."""
        # Stable: a retried callback carries the same webhook-id, the receiver's idempotency key.
        answer_id = f"{'ntc' if reply.notice else 'ans'}_{reply.job_id}"
        callback = reply.meta.get("callback_url")
        if not callback:
            return answer_id
        status = "queued" if reply.notice else "failed" if reply.failed else "done"
        body = json.dumps({
            "type": "job.notice" if reply.notice else f"job.{status}",
            "job_id": reply.job_id,
            "status": status,
            "conversation_id": reply.chat_id,
            "message_id": answer_id,
            "reply_to": reply.reply_to,
            "thread_id": reply.thread_id,
            "answer": reply.text if status == "done" else None,
            "error": reply.text if status == "failed" else None,
            "notice": reply.text if reply.notice else None,
            "images": list(reply.images),
        }, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        if self._signer is not None:
            headers |= self._signer.headers(answer_id, body)
        if self._callbacks is None:
            raise AdapterError(PLATFORM, "adapter is stopped")
        try:
            self._callback_hosts.check_url(callback)  # again: the config may have changed since it was stored
            # No redirects: a 307 from an allowed host must not lead anywhere else.
            async with self._callbacks.post(callback, data=body, headers=headers, allow_redirects=False,
                                            timeout=self._fetch_timeout) as resp:
                if resp.status >= 300:
                    # Client errors other than timeouts and rate limits will not heal on retry.
                    retryable = resp.status >= 500 or resp.status in {408, 429}
                    log.warning("job %s: callback to %s answered HTTP %d", reply.job_id, _origin(callback),
                                resp.status)
                    raise AdapterError(PLATFORM, "callback delivery failed", retryable=retryable)
        except BadInput as exc:
            log.warning("job %s: callback refused: %s", reply.job_id, exc)
            raise AdapterError(PLATFORM, "callback delivery failed", retryable=False) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # What failed stays in the log: told to the caller, it would map the internal network.
            log.warning("job %s: callback to %s failed: %s", reply.job_id, _origin(callback),
                        exc or type(exc).__name__)
            refused = isinstance(getattr(exc, "os_error", exc), CallbackRefused)
            raise AdapterError(PLATFORM, "callback delivery failed", retryable=not refused) from exc
        return answer_id

    # ---- handlers -----------------------------------------------------------------------

    async def _post_message(self, request: web.Request) -> web.Response:
        host = self._ready()
        refuse_unknown(request.query, (), "query parameter")
        body = Body(request.content_type, request.headers.get("Content-Type", ""))
        event_id, digest = await self._receive(request, body.feed)
        message, files = await body.message()
        if message.callback_url is not None:
            self._callback_hosts.check_url(str(message.callback_url))  # before anything is stored
        images = [ImageRef(ref="upload", data=data) for data in files]
        for image in message.images:
            if image.data is not None:
                data = await off_loop(len(image.data), decode_base64_image, image.data, self._max_image)
                images.append(ImageRef(ref="inline", data=data))
            else:
                url = str(image.url)
                images.append(ImageRef(ref=url, data=await self.download(ImageRef(ref=url))))
        text = message.text.strip()
        incoming = Incoming(
            platform=PLATFORM,
            event_id=event_id or f"evt_{uuid.uuid4().hex}",
            chat_id=message.conversation_id,
            chat_kind="direct",
            message_id=message.message_id or f"msg_{uuid.uuid4().hex}",
            thread_id=message.thread_id,
            reply_to=message.reply_to,
            sender_id=message.sender.id,
            sender_name=message.sender.name,
            text=text,
            addressed=bool(text),
            images=tuple(images),
            meta={"callback_url": str(message.callback_url)} if message.callback_url else {},
            fingerprint=digest,
        )
        accepted = await host.accept(incoming, refuse_when_busy=True)  # the caller is told 429 and retries
        if accepted.job_id is None:
            return _json(200, {"status": "stored", "message_id": accepted.message_id,
                               "images": list(accepted.images)})
        if message.wait:
            view = await host.wait_for_job(accepted.job_id, self._wait_s)
            if view.status in {"done", "failed"}:
                return _json(200, _job_json(view))
        return _json(202, {"job_id": accepted.job_id, "status": "queued", "question_id": accepted.message_id})

    async def _get_job(self, request: web.Request) -> web.Response:
        host = self._ready()
        admin = self._is_admin(request)
        if not admin:
            await self._authenticate(request)
        refuse_unknown(request.query, (), "query parameter")
        view = await host.job(request.match_info["job_id"])
        if view.platform != PLATFORM and not admin:
            raise NotFound(f"no job {view.job_id!r}")  # API credentials see only the API's jobs
        return _json(200, _job_json(view))

    async def _get_history(self, request: web.Request) -> web.Response:
        host = self._ready()
        platform, chat_id = request.match_info["platform"], request.match_info["chat_id"]
        if not self._is_admin(request):
            await self._authenticate(request)
            if platform != PLATFORM:
                raise Forbidden(f"{platform} chats are read with the admin token ([admin] token), not the API's")
        refuse_unknown(request.query, ("limit",), "query parameter")
        try:
            limit = int(request.query.get("limit", "200"))
        except ValueError:
            raise BadInput("limit must be an integer", code="invalid_field") from None
        if not 1 <= limit <= 1000:
            raise BadInput("limit must be between 1 and 1000", code="invalid_field")
        entries = await host.history(platform, chat_id, limit)
        if not entries:
            raise NotFound(f"no stored messages for {platform} chat {chat_id!r}")
        return _json(200, {"platform": platform, "chat_id": chat_id,
                           "messages": [_history_json(asdict(e)) for e in entries]})

    def _ready(self) -> Host:
        if self._host is None:
            raise web.HTTPServiceUnavailable(text="starting or stopping")
        return self._host

    async def _receive(self, request: web.Request, sink: Callable[[bytes], None]) -> tuple[str | None, str]:
        """Check credentials, then stream the body into ``sink`` within the size limit.

        Returns the ``webhook-id`` (verified when the request was signed) and, with an id, the body's
        SHA-256 ("" without).
        A bearer token is checked before a byte of the body is read; a signature covers the body,
        so it is checked as the body streams in, and nothing is used before it verifies.
        """
        # Refuse on the declared length before reading a byte; counted again for chunked bodies.
        if request.content_length is not None and request.content_length > self._max_body:
            raise TooLarge(f"body is over the {self._max_body}-byte limit")
        verification = self._credentials(request.headers)
        # The body's digest tells a redelivery from an id reused for another message: only ids need it.
        digest = hashlib.sha256() if request.headers.get("webhook-id") else None
        size = 0
        try:
            async with asyncio.timeout(request.app.get(BODY_TIMEOUT, 60.0)):
                async for chunk in request.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > self._max_body:
                        raise TooLarge(f"body is over the {self._max_body}-byte limit")
                    if digest is not None:
                        digest.update(chunk)
                    if verification is not None:
                        verification.update(chunk)
                    sink(chunk)
        except TimeoutError:
            raise RequestTimeout("the body did not arrive in time ([server] body_timeout_seconds)") from None
        fingerprint = digest.hexdigest() if digest is not None else ""
        if verification is not None:
            return verification.finish(), fingerprint
        return request.headers.get("webhook-id") or None, fingerprint

    def _is_admin(self, request: web.Request) -> bool:
        """The admin token reads every platform's chats; the API's own credentials only the API's."""
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        return bool(self._admin_token) and scheme.lower() == "bearer" and _equal(credential.strip(),
                                                                                 self._admin_token or "")

    async def _authenticate(self, request: web.Request) -> None:
        """For requests without a body (GET): a token, or a signature over the empty body."""
        verification = self._credentials(request.headers)
        if verification is not None:
            verification.finish()

    def _credentials(self, headers: Mapping[str, str]) -> Verification | None:
        """Check what the headers alone can prove; a signed request's check goes on over its body.

        A signed request must verify even when a bearer token is also configured: a bad signature
        is never rescued by something else.
        """
        if "webhook-signature" in headers:
            if self._signer is None:
                raise Unauthorized("signed request, but no secret is configured")
            return self._signer.verification(headers)
        if self.open:
            return None
        if self._token is not None:
            scheme, _, credential = headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and _equal(credential.strip(), self._token):
                return None
        raise Unauthorized("missing or wrong credentials: send Authorization: Bearer or a signature")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def _job_json(view: JobView) -> dict[str, Any]:
    return {
        "job_id": view.job_id,
        "status": view.status,
        "answer": view.answer,
        "message_id": view.answer_message_id,
        "question_id": view.question_id,
        "conversation_id": view.chat_id,
        "images": list(view.images),
        "error": view.error,
    }


def _history_json(entry: dict[str, Any]) -> dict[str, Any]:
    entry["images"] = list(entry["images"])
    entry["used_images"] = list(entry["used_images"])
    entry["sender"] = {"id": entry.pop("sender_id"), "name": entry.pop("sender_name")}
    return entry


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.json_response(payload, status=status)



class WebhookSettings(PlatformSettings):
    """``[adapters.webhook]``: the generic HTTP API."""

    enabled: bool = True
    token: SecretStr | None = None
    secret: SecretStr | None = None  # Standard Webhooks secret, "whsec_" + base64
    allowed_image_hosts: list[str] = Field(default_factory=list)
    allowed_callback_hosts: list[str] = Field(default_factory=list)  # empty: callback_url is refused
    open: bool = False  # no token and no secret on a non-loopback host: refused unless this says so
    fetch_timeout_seconds: float = Field(10, gt=0)
    wait_seconds: float = Field(60, ge=0)  # longest a `wait: true` request is held open
    doctor_label: ClassVar[str] = "api"

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        if self.secret is not None:
            try:
                StandardWebhookSigner(self.secret.get_secret_value())
            except ConfigError as exc:
                yield "secret", str(exc).removeprefix("adapters.webhook.secret: ")
        if self.enabled and self.token is None and self.secret is None and not self.open and not (
                deployment.loopback_only):
            yield "", (f"no token and no secret while [server] host = {deployment.server_host!r} is reachable from "
                       "other machines: set token (or IMSIGHT_WEBHOOK_TOKEN), or open = true to allow anyone who "
                       "reaches it")

    def build(self, deployment: Deployment) -> Adapter:
        return WebhookAdapter(
            token=self.token.get_secret_value() if self.token else None,
            secret=self.secret.get_secret_value() if self.secret else None,
            allowed_image_hosts=self.allowed_image_hosts, allowed_callback_hosts=self.allowed_callback_hosts,
            admin_token=deployment.admin_token, max_body_bytes=deployment.max_body_bytes,
            max_image_bytes=deployment.max_image_bytes, fetch_timeout_s=self.fetch_timeout_seconds,
            wait_s=self.wait_seconds,
        )

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        if self.token or self.secret:
            yield Finding("ok", "generic API: " + " and ".join(
                n for n, v in (("bearer token", self.token), ("signing secret", self.secret)) if v))
        else:
            # Off loopback, ``problems`` refuses this unless open = true says so.
            yield Finding("warn", f"generic API open to anyone who reaches {deployment.server_host}"
                          + (" (open = true)" if self.open else ""),
                          "set [adapters.webhook] token (or IMSIGHT_WEBHOOK_TOKEN)")
