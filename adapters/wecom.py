"""WeCom (企业微信) intelligent robot in API mode, over its long connection (``wecom_connection``).

Messages come as ``aibot_msg_callback`` frames: in groups only those that @mention the robot, in a
1:1 chat every one. Text, images and mixed text+image messages are taken; a quoted message's images
come with the question that quotes it (that is how a follow-up names its screenshot). Images are
downloaded from the URL in the message and decrypted with its ``aeskey`` (AES-256-CBC, PKCS#7).
Each message is stored before anything else; WeCom's ``msgid`` makes a second delivery harmless.

Answers are the robot's ``stream`` message in reply to the callback (its ``req_id``), refreshed
with the whole answer so far as it is written (each refresh replaces the content) and closed with
``finish``; where that reply can no longer be made (WeCom answers errcode 846605 "invalid req_id"
after a restart, 846608 when the stream's update window has passed) the answer is pushed into the
chat with ``aibot_send_msg`` as Markdown.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import Field, SecretStr

from adapters.base import (
    Adapter,
    ConnectionState,
    Deployment,
    Finding,
    Host,
    ImageRef,
    Incoming,
    PlatformSettings,
    Reply,
)
from adapters.client_session import ClientSessionSlot
from adapters.outgoing import defanged
from adapters.wecom_connection import WeComConnection
from core.errors import AdapterError, BadInput, RateLimited

__all__ = ["WeComAdapter", "WeComSettings", "decrypt_media"]

log = logging.getLogger(__name__)

_MAX_BYTES = 20_000  # a stream's or a Markdown message's content: WeCom takes up to 20,480 bytes
_LEADING_MENTIONS = re.compile(r"^(\s*@\S+)+\s*")


def decrypt_media(data: bytes, aes_key: str) -> bytes:
    """A downloaded image or file, decrypted: AES-256-CBC, the key base64 without its ``=`` padding,
    the IV its first 16 bytes, PKCS#7 padding to 32-byte blocks."""
    key = base64.b64decode(aes_key + "=" * (-len(aes_key) % 4))
    if len(key) != 32 or not data or len(data) % 16:
        raise ValueError("not an AES-256 key, or not whole cipher blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    plain = decryptor.update(data) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= 32 or plain[-pad:] != bytes([pad]) * pad:
        raise ValueError("bad padding: the key does not fit the data")
    return plain[:-pad]


class WeComAdapter:
    name = "wecom"

    def __init__(
        self,
        bot_id: str,
        secret: str,
        *,
        ws_url: str = "wss://openws.work.weixin.qq.com",
        allowed_chats: Iterable[str] = (),
        admins: Iterable[str] = (),
        timeout_s: float = 10,
        ping_every_s: float = 30,
    ) -> None:
        self._bot_id = bot_id
        self.endpoint = ws_url  # named in start-up errors
        self._allowed = set(allowed_chats)
        self._admins = set(admins)
        self._http = ClientSessionSlot(timeout_s)
        self._host: Host | None = None
        self._link = WeComConnection(self._http, ws_url, bot_id, secret, self._take, ping_every_s=ping_every_s)

    def mount(self, app: web.Application) -> None:
        """The long connection needs no inbound route."""

    async def start(self, host: Host) -> None:
        self._host = host
        self._http.start()
        await self._link.start()  # a refused subscription stops the daemon now
        log.info("wecom robot %s started: long connection", self._bot_id)

    async def stop_intake(self) -> None:
        """``adapters.base.Pulling``: close the long connection."""
        await self._link.stop()

    async def stop(self) -> None:
        await self.stop_intake()
        await self._http.close()

    # ---- receiving ----------------------------------------------------------------------

    async def _take(self, frame: dict[str, Any]) -> None:
        body = frame.get("body")
        if not isinstance(body, dict):
            raise BadInput("message frame without a body object", code="invalid_message")
        try:
            incoming = self._incoming(str((frame.get("headers") or {}).get("req_id", "")), body)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise BadInput(f"message has an unexpected shape ({type(exc).__name__}: {exc})",
                           code="invalid_message") from None
        if incoming is not None and self._host is not None:
            await self._host.accept(incoming)

    def _incoming(self, req_id: str, body: dict[str, Any]) -> Incoming | None:
        sender = str((body.get("from") or {}).get("userid", ""))
        direct = body.get("chattype") == "single"
        chat_id = str(body.get("chatid") or (sender if direct else ""))
        message_id = str(body.get("msgid", ""))
        if not chat_id or not message_id or (self._allowed and chat_id not in self._allowed):
            return None
        text, images = _content(body)
        quote = body.get("quote")
        if isinstance(quote, dict):  # a follow-up names its screenshot by quoting it
            images += _content(quote)[1]
        return Incoming(
            platform=self.name,
            chat_id=chat_id,
            message_id=message_id,
            event_id=message_id,
            chat_kind="direct" if direct else "group",
            sender_id=sender,
            sender_is_admin=(direct or sender in self._admins),
            text=" ".join(_LEADING_MENTIONS.sub("", text).split()),
            addressed=True,  # WeCom delivers group messages only when they @mention the robot
            images=tuple(images),
            meta={"req_id": req_id, "chattype": str(body.get("chattype", ""))},
            received_at=time.time(),
        )

    # ---- images and replies ---------------------------------------------------------------

    async def download(self, image: ImageRef) -> bytes:
        aes_key, _, url = image.ref.partition(" ")
        if not url.startswith(("https://", "http://")):
            raise AdapterError(self.name, "an image without an http(s) URL", retryable=False)
        try:
            async with self._http().get(url) as resp:
                if resp.status != 200:
                    raise AdapterError(self.name, f"image download: HTTP {resp.status}", retryable=resp.status >= 500)
                data = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(self.name, f"image download: {exc}", retryable=True) from exc
        if not aes_key:
            return data
        try:
            return decrypt_media(data, aes_key)
        except ValueError as exc:
            raise AdapterError(self.name, f"image download: cannot decrypt ({exc})", retryable=False) from None

    async def draft(self, reply: Reply) -> str | None:
        """``Drafting``: the stream reply, refreshed with the whole answer so far."""
        req_id = reply.meta.get("req_id", "")
        if not req_id or reply.notice:
            return None
        stream = reply.draft_id or reply.job_id
        await self._link.request("aibot_respond_msg", _stream(stream, reply.text or "…", finish=False), req_id)
        return stream

    async def send(self, reply: Reply) -> str:
        pieces = _pieces(defanged(reply.text or "(empty answer)"))
        req_id = reply.meta.get("req_id", "")
        first = ""
        if req_id and not reply.notice:
            stream = reply.draft_id or reply.job_id
            try:
                await self._link.request("aibot_respond_msg", _stream(stream, pieces[0], finish=True), req_id)
                first, pieces = stream, pieces[1:]
            except RateLimited:
                raise
            except AdapterError as exc:  # the callback's reply window is gone: pushed into the chat instead
                if exc.retryable:
                    raise
                log.info("wecom: job %s: stream reply refused (%s); sending it as a message", reply.job_id, exc)
        for n, piece in enumerate(pieces):
            body = {"chatid": reply.chat_id, "msgtype": "markdown", "markdown": {"content": piece}}
            await self._link.request("aibot_send_msg", body)
            first = first or f"{reply.job_id}:{n}"  # WeCom's answer carries no message id
        return first

    @property
    def connected(self) -> bool:
        """``adapters.base.Connected``: the long connection is open."""
        return self._http.open and self._link.state.open

    @property
    def connection(self) -> ConnectionState | None:
        """``adapters.base.Pushed``."""
        return self._link.state

    async def credentials(self) -> str:
        """``adapters.base.Verifiable``: one subscription, closed again."""
        async with self._http.briefly():
            await self._link.probe()
        return "long connection opened, subscription accepted"


def _content(body: dict[str, Any]) -> tuple[str, list[ImageRef]]:
    """The text and the images (``aeskey url``) of a message or a quoted one."""
    kind = body.get("msgtype")
    items = (body.get("mixed") or {}).get("msg_item") or [] if kind == "mixed" else [body]
    words, images = [], []
    for item in items:
        item_kind = item.get("msgtype")
        if item_kind == "text":
            words.append(str((item.get("text") or {}).get("content", "")))
        elif item_kind == "image":
            image = item.get("image") or {}
            if image.get("url"):
                images.append(ImageRef(f"{image.get('aeskey', '')} {image['url']}"))
    return " ".join(words), images


def _stream(stream_id: str, content: str, *, finish: bool) -> dict[str, Any]:
    return {"msgtype": "stream", "stream": {"id": stream_id, "finish": finish, "content": content}}


def _pieces(text: str) -> list[str]:
    """At most ``_MAX_BYTES`` of UTF-8 each (Chinese text is 3 bytes a character)."""
    pieces, piece = [], ""
    for char in text:
        if len((piece + char).encode()) > _MAX_BYTES:
            pieces.append(piece)
            piece = ""
        piece += char
    return [*pieces, piece]


class WeComSettings(PlatformSettings):
    """``[adapters.wecom]``."""

    bot_id: str = ""  # the intelligent robot's Bot ID (API mode, long connection)
    secret: SecretStr | None = None  # its Secret; or IMSIGHT_WECOM_SECRET
    ws_url: str = "wss://openws.work.weixin.qq.com"  # WeCom's long-connection address (or an egress proxy's)
    allowed_chats: list[str] = Field(default_factory=list)  # chat ids (groups) and user ids (1:1); empty: all
    admins: list[str] = Field(default_factory=list)  # user ids that may /forget in groups (anyone in a 1:1 chat)
    online_fix: ClassVar[str] = "check bot_id and secret (the robot's API mode page, long connection)"

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        if not self.bot_id:
            yield "bot_id", "required when wecom is enabled"
        if self.secret is None or not self.secret.get_secret_value():
            yield "secret", "required when wecom is enabled (or IMSIGHT_WECOM_SECRET)"

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        yield Finding("ok", f"robot {self.bot_id}: long connection to {self.ws_url}, no inbound route needed" + (
            "" if self.admins else " (no admins: /forget only in 1:1 chats)"))

    def build(self, deployment: Deployment) -> Adapter:
        assert self.secret is not None
        return WeComAdapter(self.bot_id, self.secret.get_secret_value(), ws_url=self.ws_url,
                            allowed_chats=self.allowed_chats, admins=self.admins)
