"""Feishu / Lark: event callbacks on the daemon's server, images from the message-resource API, replies.

Callbacks are checked (verification token always; with an Encrypt Key, the AES body and the
``X-Lark-Signature``), taken in (committed to the inbox) and acknowledged at once; images are
downloaded after that, so Feishu hears 200 well within its 3 s. Re-deliveries are recognised by
event id and by message id. PROTOCOLS.md §1.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import aiohttp
from aiohttp import web
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
    Replied,
    Reply,
)
from adapters.client_session import ClientSessionSlot
from adapters.feishu_crypto import decrypt, verify_signature
from adapters.feishu_long_connection import FeishuLongConnection
from adapters.http_body import EVENT_LIMIT, parse_json, read_limited
from adapters.outgoing import defanged
from adapters.reachability import Reachability
from adapters.token_cache import TokenCache
from core.errors import AdapterError, BadInput, RateLimited, Unauthorized

__all__ = ["FeishuAdapter"]

log = logging.getLogger(__name__)

_TOKEN_EXPIRED = 99991663
_RATE_LIMITED = {99991400, 230020}
_MAX_TEXT = 9_000  # characters per reply: a post may be 30 KB, and a CJK character is 3 bytes
_DRAFT_EDITS = 18  # Feishu allows 20 edits per message; the last one is the answer
_FRESH_S = 3600  # signed callbacks older (or newer) than this are refused


class FeishuAdapter:
    name = "feishu"

    def __init__(
        self,
        app_id: str,
        app_secret: str,
        verification_token: str,
        *,
        encrypt_key: str | None = None,
        base_url: str = "https://open.feishu.cn",
        path: str = "/feishu/events",
        mode: str = "webhook",
        allowed_chats: Iterable[str] = (),
        admins: Iterable[str] = (),
        timeout_s: float = 10,
    ) -> None:
        self._app_id, self._app_secret = app_id, app_secret
        self._admins = set(admins)  # open_ids that may /forget: the events do not say who administers a group
        self._verification_token = verification_token
        self._encrypt_key = encrypt_key or None
        self._base = base_url.rstrip("/")
        self.endpoint = self._base  # named in start-up errors
        self._path = path
        self._allowed = set(allowed_chats)
        self._http = ClientSessionSlot(timeout_s)
        self._host: Host | None = None
        self._tokens = TokenCache(self._fetch_token)
        self._reachability = Reachability()
        self.bot_open_id = ""
        self._drafts: dict[str, _Draft] = {}  # job id -> the placeholder being edited
        self._connection = FeishuLongConnection(self._http, self._base, app_id, app_secret, self._take) if (
            mode == "long_connection") else None

    def mount(self, app: web.Application) -> None:
        if self._connection is None:
            app.router.add_post(self._path, self._on_callback)

    async def start(self, host: Host) -> None:
        self._host = host
        self._http.start()
        info = await self._api("GET", "/open-apis/bot/v3/info")
        self.bot_open_id = str(info.get("bot", {}).get("open_id", ""))
        if self._connection is not None:
            await self._connection.start()
        log.info("feishu bot %s (%s) started (%s)", info.get("bot", {}).get("app_name", "?"), self.bot_open_id,
                 "long connection" if self._connection is not None else f"callbacks on {self._path}")

    async def stop_intake(self) -> None:
        """``adapters.base.Pulling``: with the long connection, close it (unanswered events come again)."""
        if self._connection is not None:
            await self._connection.stop()

    async def stop(self) -> None:
        await self.stop_intake()
        await self._http.close()

    # ---- receiving ----------------------------------------------------------------------

    async def _on_callback(self, request: web.Request) -> web.Response:
        stamp = request.headers.get("X-Lark-Request-Timestamp", "")
        signed = self._encrypt_key is not None and "X-Lark-Signature" in request.headers
        if signed and not (stamp.isdigit() and abs(time.time() - int(stamp)) <= _FRESH_S):
            # Checked before the body is read. Feishu documents no window; an hour allows for clock skew
            # and its retries, each of which is signed anew.
            raise Unauthorized("X-Lark-Request-Timestamp missing or more than an hour away")
        raw = await read_limited(request, EVENT_LIMIT)
        if signed and self._encrypt_key is not None:  # before the body is parsed or decrypted
            verify_signature(stamp, request.headers.get("X-Lark-Request-Nonce", ""),
                             request.headers.get("X-Lark-Signature", ""), self._encrypt_key, raw)
        body = await parse_json(raw)
        try:
            if isinstance(body, dict) and "encrypt" in body:
                if self._encrypt_key is None:
                    raise BadInput("encrypted callback, but no encrypt_key is configured", code="not_encrypted")
                body = await parse_json(decrypt(self._encrypt_key, str(body["encrypt"])))
        except (ValueError, TypeError) as exc:
            raise BadInput(f"callback body cannot be decrypted: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadInput("callback body is not a JSON object", code="invalid_json")
        try:
            header = body.get("header") or {}
            token = str(body.get("token") or header.get("token") or "")
        except AttributeError:
            raise BadInput("callback body is not a Feishu event", code="invalid_event") from None
        if not hmac.compare_digest(token.encode(), self._verification_token.encode()):
            raise Unauthorized("verification token does not match")
        if body.get("type") == "url_verification":
            return web.json_response({"challenge": body.get("challenge", "")})
        if self._encrypt_key is not None and not signed:  # only the URL check may come unsigned
            raise Unauthorized("X-Lark-Signature missing: events must be signed when encrypt_key is set")
        await self._take(body)
        return web.json_response({"msg": "success"})

    async def _take(self, body: Any) -> None:
        """An event (a callback's checked body, or the long connection's) committed before Feishu hears
        that it arrived; events other than messages are let go."""
        if not isinstance(body, dict):
            raise BadInput("event is not a JSON object", code="invalid_json")
        header = body.get("header") or {}
        if not isinstance(header, dict):
            raise BadInput("event header is not a JSON object", code="invalid_event")
        if header.get("event_type") == "im.message.receive_v1" and self._host is not None:
            try:
                incoming = self._incoming(str(header.get("event_id", "")), body.get("event") or {})
            except (AttributeError, TypeError, ValueError, KeyError) as exc:
                # From Feishu, but not the shape its documentation gives: refused, not guessed at.
                raise BadInput(f"event has an unexpected shape ({type(exc).__name__}: {exc})",
                               code="invalid_event") from None
            if incoming is not None:
                await self._host.accept(incoming)

    def _incoming(self, event_id: str, event: dict[str, Any]) -> Incoming | None:
        message = event.get("message") or {}
        chat_id = str(message.get("chat_id", ""))
        if not chat_id or (self._allowed and chat_id not in self._allowed):
            return None
        message_id = str(message.get("message_id") or "")
        if not message_id:
            raise ValueError("message without a message_id")
        text, image_keys = _content(str(message.get("message_type", "")), message.get("content") or "{}")
        mentions = message.get("mentions") or []
        mentioned = False
        for mention in mentions:
            key = str(mention.get("key", ""))
            if (mention.get("id") or {}).get("open_id") == self.bot_open_id:
                mentioned = True
                text = text.replace(key, " ")
            else:
                text = text.replace(key, "@" + str(mention.get("name", "")))
        parent = message.get("parent_id") or None  # read back after the acknowledgement (``replied``)
        sender = (event.get("sender") or {}).get("sender_id") or {}
        direct = message.get("chat_type") == "p2p"
        sender_id = str(sender.get("open_id", ""))
        return Incoming(
            platform=self.name,
            chat_id=chat_id,
            message_id=message_id,
            event_id=event_id,
            chat_kind="direct" if direct else "group",
            thread_id=message.get("thread_id") or None,
            reply_to=parent,
            sender_id=sender_id,
            sender_is_admin=(direct or sender_id in self._admins) if self._admins or direct else None,
            text=" ".join(text.split()),
            addressed=direct or mentioned,
            images=tuple(ImageRef(f"{message_id}/{key}") for key in image_keys),
            received_at=int(message.get("create_time") or time.time() * 1000) / 1000,
        )

    async def _message(self, message_id: str) -> dict[str, Any] | None:
        """A message as the API returns it (``None`` when it cannot be read: deleted, hidden)."""
        try:
            found = await self._api("GET", f"/open-apis/im/v1/messages/{message_id}")
        except AdapterError as exc:
            log.info("feishu: cannot read replied-to message %s: %s", message_id, exc)
            return None
        items = (found.get("data") or {}).get("items") or []
        return dict(items[0]) if items else None

    async def replied(self, incoming: Incoming) -> Replied | None:
        """The replied-to message (``ReadsReplies``): the daemon asks after the 200, in its intake."""
        if not incoming.reply_to:
            return None
        replied = await self._message(incoming.reply_to)
        if replied is None:
            return None
        message_id = str(replied.get("message_id") or incoming.reply_to)
        _, keys = _content(str(replied.get("msg_type", "")), (replied.get("body") or {}).get("content") or "{}")
        sender = replied.get("sender") or {}
        return Replied(
            Incoming(platform=self.name, chat_id=incoming.chat_id, message_id=message_id,
                     sender_id=str(sender.get("id", "")),
                     images=tuple(ImageRef(f"{message_id}/{key}") for key in keys), addressed=False,
                     received_at=int(replied.get("create_time") or time.time() * 1000) / 1000),
            by_bot=sender.get("id_type") == "app_id" and sender.get("id") == self._app_id,
        )

    # ---- images and replies ---------------------------------------------------------------

    async def download(self, image: ImageRef) -> bytes:
        message_id, _, key = image.ref.partition("/")
        data = await self._call("GET", f"/open-apis/im/v1/messages/{message_id}/resources/{key}",
                                params={"type": "image"}, raw=True)
        if not isinstance(data, bytes):
            raise AdapterError(self.name, f"image {key}: the API answered JSON, not the image", retryable=False)
        return data

    async def draft(self, reply: Reply) -> str | None:
        """A placeholder reply, edited as the answer grows (Feishu allows 20 edits of a message)."""
        state = self._placeholder(reply)
        if state is None:
            sent = await self._reply(reply, _post("…"), uuid=f"{reply.job_id}-draft")
            state = self._drafts[reply.job_id] = _Draft(sent)
        elif reply.text and state.edits < _DRAFT_EDITS:
            state.edits += 1
            await self._api("PUT", f"/open-apis/im/v1/messages/{state.message_id}", json_body=_post(reply.text + " …"))
        return state.message_id

    def _placeholder(self, reply: Reply) -> _Draft | None:
        """This job's placeholder: in memory, or the one a run before a restart left (``reply.draft_id``)."""
        state = self._drafts.get(reply.job_id)
        if state is None and reply.draft_id:
            # Its edits before the restart are unknown: leave room for the final one.
            state = self._drafts[reply.job_id] = _Draft(reply.draft_id, edits=_DRAFT_EDITS - 1)
        return state

    async def send(self, reply: Reply) -> str:
        pieces = _pieces(reply.text or "(empty answer)")
        state = None if reply.notice else self._placeholder(reply)
        kind = "notice" if reply.notice else "answer"
        first = ""
        if state is not None:  # the placeholder becomes the answer's first piece
            await self._api("PUT", f"/open-apis/im/v1/messages/{state.message_id}", json_body=_post(pieces[0]))
            first, pieces = state.message_id, pieces[1:]
        for n, piece in enumerate(pieces):
            sent = await self._reply(reply, _post(piece), uuid=f"{reply.job_id}-{kind}-{n}")
            first = first or sent
        if not reply.notice:
            self._drafts.pop(reply.job_id, None)
        return first

    async def _reply(self, reply: Reply, content: dict[str, str], *, uuid: str) -> str:
        body = {**content, "reply_in_thread": reply.thread_id is not None,
                "uuid": uuid[:50]}  # Feishu keeps one success per uuid: a retried reply cannot post twice
        sent = await self._api("POST", f"/open-apis/im/v1/messages/{reply.reply_to}/reply", json_body=body)
        return str((sent.get("data") or {}).get("message_id", ""))

    # ---- the Open API -----------------------------------------------------------------------

    async def _api(self, method: str, path: str, *, json_body: dict[str, Any] | None = None) -> dict[str, Any]:
        result = await self._call(method, path, json_body=json_body)
        assert isinstance(result, dict)
        return result

    @property
    def connected(self) -> bool:
        """``adapters.base.Connected``: the Open API did not fail (network, 5xx, 429) twice in a row, and
        the long connection (where used) is open."""
        connection_open = self._connection is None or self._connection.state.open
        return self._http.open and self._reachability.reachable and connection_open

    @property
    def connection(self) -> ConnectionState | None:
        """``adapters.base.Pushed``: the long connection's state (``None`` with callbacks)."""
        return self._connection.state if self._connection is not None else None

    async def _call(self, method: str, path: str, *, json_body: dict[str, Any] | None = None,
                    params: dict[str, str] | None = None, raw: bool = False) -> Any:
        return await self._reachability.track(self._request(method, path, json_body=json_body, params=params, raw=raw))

    async def _request(self, method: str, path: str, *, json_body: dict[str, Any] | None,
                       params: dict[str, str] | None, raw: bool) -> Any:
        for attempt in (1, 2):
            token = await self._tokens.get(refresh=attempt == 2)
            try:
                async with self._http().request(method, self._base + path, json=json_body, params=params,
                                              headers={"Authorization": f"Bearer {token}"}) as resp:
                    if raw and resp.status == 200 and not resp.content_type.endswith("json"):
                        return await resp.read()
                    body = await resp.json(content_type=None)
                    status = resp.status
                    reset = resp.headers.get("x-ogw-ratelimit-reset", "")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise AdapterError(self.name, f"{method} {path}: {exc or type(exc).__name__}", retryable=True) from exc
            code = int(body.get("code", 0)) if isinstance(body, dict) else -1
            if code == _TOKEN_EXPIRED and attempt == 1:
                continue  # the token ran out early: get a new one, once
            if status == 200 and code == 0:
                return body
            message = body.get("msg", "") if isinstance(body, dict) else ""
            if status == 429 or code in _RATE_LIMITED:  # PROTOCOLS.md §1: wait x-ogw-ratelimit-reset seconds
                wait = float(reset) if reset.replace(".", "", 1).isdigit() else 1.0
                raise RateLimited(self.name, f"{method} {path}: rate limited ({message}), retry after {wait:g}s",
                                  retry_after_s=wait)
            retryable = status >= 500
            raise AdapterError(self.name, f"{method} {path}: HTTP {status}, code {code}: {message}",
                               retryable=retryable)
        raise AdapterError(self.name, f"{method} {path}: token refused twice", retryable=False)

    async def credentials(self) -> str:
        """``adapters.base.Verifiable``: the app's credentials tried as ``start`` does, nothing started."""
        async with self._http.briefly():
            await self._fetch_token()
            if self._connection is not None:
                await self._connection.probe()
        return "tenant token issued" + (", long connection opened" if self._connection is not None else "")

    async def _fetch_token(self) -> tuple[str, float]:
        try:
            async with self._http().post(f"{self._base}/open-apis/auth/v3/tenant_access_token/internal",
                                       json={"app_id": self._app_id, "app_secret": self._app_secret}) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdapterError(self.name, f"tenant token: {exc or type(exc).__name__}", retryable=True) from exc
        if not isinstance(body, dict) or body.get("code") != 0 or not body.get("tenant_access_token"):
            message = body.get("msg", "") if isinstance(body, dict) else ""
            raise AdapterError(self.name, f"tenant token refused: {message} (check app_id and app_secret)",
                               retryable=False)
        return str(body["tenant_access_token"]), float(body.get("expire", 7200))

def _content(message_type: str, content: str) -> tuple[str, list[str]]:
    """The text and the image keys of a received message's ``content`` (a JSON string)."""
    try:
        data = json.loads(content)
    except ValueError:
        return "", []
    if not isinstance(data, dict):
        return "", []
    if message_type == "text":
        return str(data.get("text", "")), []
    if message_type == "image":
        return "", [str(data["image_key"])] if data.get("image_key") else []
    if message_type == "post":
        body = data
        if "content" not in body:  # the send form wraps it in a locale: accept both
            body = next((v for v in data.values() if isinstance(v, dict)), {})
        words: list[str] = [str(body.get("title", ""))]
        keys: list[str] = []
        for paragraph in body.get("content") or []:
            for element in paragraph or []:
                tag = element.get("tag")
                if tag in ("text", "a"):
                    words.append(str(element.get("text", "")))
                elif tag == "at":
                    words.append(str(element.get("user_id", "")))
                elif tag == "img" and element.get("image_key"):
                    keys.append(str(element["image_key"]))
        return " ".join(words), keys
    return "", []


@dataclass
class _Draft:
    message_id: str
    edits: int = 0


def _post(markdown: str) -> dict[str, str]:
    """A rich-text message whose one element is Markdown, which Feishu renders (headings, lists, code)."""
    content = {"zh_cn": {"title": "", "content": [[{"tag": "md", "text": defanged(markdown)}]]}}
    return {"msg_type": "post", "content": json.dumps(content, ensure_ascii=False)}


def _pieces(text: str) -> list[str]:
    return [text[i:i + _MAX_TEXT] for i in range(0, len(text), _MAX_TEXT)] or [text]


class FeishuSettings(PlatformSettings):
    """``[adapters.feishu]`` (Lark too: another ``base_url``)."""

    app_id: str = ""  # cli_...
    app_secret: SecretStr | None = None
    # "long_connection": the daemon connects out to Feishu (no inbound route needed); "webhook": Feishu posts to `path`
    mode: Literal["webhook", "long_connection"] = "webhook"
    verification_token: SecretStr | None = None  # webhook mode; console: Events & Callbacks > Encryption strategy
    encrypt_key: SecretStr | None = None  # webhook mode, optional; set it, and bodies are encrypted and signed
    base_url: str = "https://open.feishu.cn"  # Lark: "https://open.larksuite.com"
    path: str = "/feishu/events"  # webhook mode: where the event subscription's request URL points on this server
    allowed_chats: list[str] = Field(default_factory=list)  # oc_... ids; empty: every chat the bot is in
    admins: list[str] = Field(default_factory=list)  # open_ids that may /forget; empty: anyone (it asks first)
    online_fix: ClassVar[str] = "check app_id and app_secret in the developer console"

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        needed = ("app_id", "app_secret") if self.mode == "long_connection" else ("app_id", "app_secret",
                                                                                 "verification_token")
        for key in needed:
            if not getattr(self, key):
                env = f" (or IMSIGHT_FEISHU_{key.upper()})" if key != "app_id" else ""
                yield key, f"required when feishu is enabled{env}"

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        if self.mode == "long_connection":
            yield Finding("ok", "app credentials set; long connection: connects out to Feishu, no inbound route "
                          "needed")
            return
        yield Finding("ok", "app credentials set; callbacks on " + self.path + (
            ", bodies encrypted" if self.encrypt_key else " (no encrypt_key: bodies in plain text)"))

    def build(self, deployment: Deployment) -> Adapter:
        assert self.app_secret is not None
        return FeishuAdapter(
            self.app_id, self.app_secret.get_secret_value(),
            self.verification_token.get_secret_value() if self.verification_token else "",
            encrypt_key=self.encrypt_key.get_secret_value() if self.encrypt_key else None,
            base_url=self.base_url, path=self.path, mode=self.mode, allowed_chats=self.allowed_chats,
            admins=self.admins,
        )
