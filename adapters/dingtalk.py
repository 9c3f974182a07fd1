"""DingTalk internal-app robot: HTTP callbacks, pictures by download code, replies by session webhook.

DingTalk signs only a timestamp with the app secret (not the body), so a captured header pair can
be replayed for an hour: the sign and its freshness are checked, `allowed_ips` is enforced when
set, and messages are deduplicated by `msgId`. Replies go through the message's `sessionWebhook`
while it is valid, else through the robot send API. PROTOCOLS.md §2.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
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
    Reply,
)
from adapters.client_session import ClientSessionSlot
from adapters.dingtalk_stream import DingTalkStream
from adapters.http_body import EVENT_LIMIT, client_address, parse_json, read_limited
from adapters.outgoing import defanged
from adapters.reachability import Reachability
from adapters.token_cache import TokenCache
from core.errors import AdapterError, BadInput, RateLimited, Unauthorized

__all__ = ["DingTalkAdapter", "sign"]

log = logging.getLogger(__name__)

_FRESH_MS = 3600 * 1000  # DingTalk's own validity window for a sign
_WEBHOOK_MARGIN_MS = 30_000  # a session webhook this close to expiry is not used
_MAX_TEXT = 4_000  # characters per markdown message (the API allows 15000 bytes of parameters)
_THROTTLED_S = {410100: 600.0, 90002: 1.0}  # a robot over 20 messages a minute is throttled 10 minutes
_LEADING_MENTION = re.compile(r"^\s*@\S+\s*")


def sign(timestamp_ms: str, app_secret: str) -> str:
    digest = hmac.new(app_secret.encode(), f"{timestamp_ms}\n{app_secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class DingTalkAdapter:
    name = "dingtalk"

    def __init__(
        self,
        app_key: str,
        app_secret: str,
        robot_code: str,
        *,
        base_url: str = "https://api.dingtalk.com",
        legacy_base_url: str = "https://oapi.dingtalk.com",
        path: str = "/dingtalk/events",
        mode: str = "webhook",
        allowed_conversations: Iterable[str] = (),
        allowed_ips: Iterable[str] = (),
        admins: Iterable[str] = (),
        timeout_s: float = 10,
    ) -> None:
        self._app_key, self._app_secret, self._robot_code = app_key, app_secret, robot_code
        self._admins = set(admins)
        self._base = base_url.rstrip("/")
        self.endpoint = self._base  # named in start-up errors
        self._legacy = legacy_base_url.rstrip("/")
        self._path = path
        self._allowed = set(allowed_conversations)
        self._allowed_ips = set(allowed_ips)
        self._http = ClientSessionSlot(timeout_s)
        self._host: Host | None = None
        self._tokens = TokenCache(self._fetch_token)
        self._reachability = Reachability()
        self._stream = DingTalkStream(self._http, self._base, app_key, app_secret, self._take) if (
            mode == "stream") else None

    def mount(self, app: web.Application) -> None:
        if self._stream is None:
            app.router.add_post(self._path, self._on_callback)

    async def start(self, host: Host) -> None:
        self._host = host
        self._http.start()
        await self._tokens.get()  # wrong credentials stop the daemon now, not at the first question
        if self._stream is not None:
            await self._stream.start()
        log.info("dingtalk robot %s started (%s)", self._robot_code,
                 "stream mode" if self._stream is not None else f"callbacks on {self._path}")

    async def stop_intake(self) -> None:
        """``adapters.base.Pulling``: in stream mode, close the connection (unacknowledged messages come again)."""
        if self._stream is not None:
            await self._stream.stop()

    async def stop(self) -> None:
        await self.stop_intake()
        await self._http.close()

    # ---- receiving ----------------------------------------------------------------------

    async def _on_callback(self, request: web.Request) -> web.Response:
        caller = client_address(request)
        if self._allowed_ips and caller not in self._allowed_ips:
            raise Unauthorized(f"{caller} is not in allowed_ips")
        timestamp, given = request.headers.get("timestamp", ""), request.headers.get("sign", "")
        if not timestamp.isdigit() or abs(time.time() * 1000 - int(timestamp)) > _FRESH_MS:
            raise Unauthorized("timestamp missing or more than an hour away")
        if not hmac.compare_digest(given.encode(), sign(timestamp, self._app_secret).encode()):
            raise Unauthorized("sign does not match")
        await self._take(await parse_json(await read_limited(request, EVENT_LIMIT)))  # read only once signed
        return web.json_response({"msgtype": "empty"})

    async def _take(self, payload: Any) -> None:
        """A robot message (a callback's body, a stream frame's data) committed, deduplicated by msgId,
        before DingTalk hears that it arrived."""
        if not isinstance(payload, dict):
            raise BadInput("robot message is not a JSON object", code="invalid_json")
        try:
            incoming = self._incoming(payload)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            # From DingTalk, but not the shape its documentation gives: refused, not guessed at.
            raise BadInput(f"message has an unexpected shape ({type(exc).__name__}: {exc})",
                           code="invalid_message") from None
        if incoming is not None and self._host is not None:
            await self._host.accept(incoming)

    def _incoming(self, payload: dict[str, Any]) -> Incoming | None:
        chat_id = str(payload.get("conversationId", ""))
        message_id = str(payload.get("msgId", ""))
        if not chat_id or not message_id or (self._allowed and chat_id not in self._allowed):
            return None
        if payload.get("errorCode"):
            log.warning("dingtalk message %s came without content: %s", message_id, payload.get("errorMessage"))
            return None
        text, codes = _content(payload)
        direct = str(payload.get("conversationType")) == "1"
        mentioned = bool(payload.get("isInAtList"))
        if mentioned:
            text = _LEADING_MENTION.sub("", text)  # the robot's name, left in rich text
        replied = (payload.get("text") or {}).get("repliedMsg") or {}
        meta = {key: str(payload[key]) for key in ("sessionWebhook", "sessionWebhookExpiredTime", "senderStaffId",
                                                   "conversationType") if payload.get(key)}
        sender = str(payload.get("senderStaffId") or payload.get("senderId") or "")
        # The callback says whether the sender administers the group (isAdmin); configured admins too.
        admin = (sender in self._admins or payload.get("isAdmin") is True or direct) if (
            self._admins or "isAdmin" in payload or direct) else None
        return Incoming(
            platform=self.name,
            chat_id=chat_id,
            message_id=message_id,
            event_id=message_id,
            chat_kind="direct" if direct else "group",
            reply_to=str(replied.get("msgId") or payload.get("originalMsgId") or "") or None,
            sender_id=sender,
            sender_name=str(payload.get("senderNick", "")),
            sender_is_admin=admin,
            text=" ".join(text.split()),
            addressed=direct or mentioned,
            images=tuple(ImageRef(code) for code in codes),
            meta=meta,
            received_at=float(payload.get("createAt") or time.time() * 1000) / 1000,
        )

    # ---- pictures and replies -------------------------------------------------------------

    async def download(self, image: ImageRef) -> bytes:
        found = await self._api("/v1.0/robot/messageFiles/download",
                                {"downloadCode": image.ref, "robotCode": self._robot_code})
        url = str(found.get("downloadUrl", ""))
        if not url:
            raise AdapterError(self.name, "no downloadUrl for a picture", retryable=False)
        try:
            async with self._http().get(url) as resp:
                if resp.status != 200:
                    raise AdapterError(self.name, f"picture download: HTTP {resp.status}", retryable=resp.status >= 500)
                return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(self.name, f"picture download: {exc}", retryable=True) from exc

    async def send(self, reply: Reply) -> str:
        meta = reply.meta
        staff = meta.get("senderStaffId", "")
        group = meta.get("conversationType") != "1"
        webhook = meta.get("sessionWebhook", "")
        expires = int(meta.get("sessionWebhookExpiredTime", "0") or 0)
        # Only DingTalk's own host: the URL came in a request, and the daemon must not post answers elsewhere.
        ours = webhook.startswith(self._legacy + "/")
        usable = ours and expires - _WEBHOOK_MARGIN_MS > time.time() * 1000
        first = ""
        for n, piece in enumerate(_pieces(defanged(reply.text or "(empty answer)"))):
            if usable:
                # The asker is mentioned in groups; DingTalk renders the @ only when the id is in the text too.
                text = f"@{staff} {piece}" if group and staff and n == 0 else piece
                body: dict[str, Any] = {"msgtype": "markdown", "markdown": {"title": _title(piece), "text": text}}
                if group and staff:
                    body["at"] = {"atUserIds": [staff], "isAtAll": False}
                await self._post(webhook, body, token=None)
                first = first or f"{reply.job_id}:{n}"  # webhook sends return no message id
            else:  # the session webhook expired (a long job, or one resumed after a restart)
                param = json.dumps({"title": _title(piece), "text": piece}, ensure_ascii=False)
                if group:
                    sent = await self._api("/v1.0/robot/groupMessages/send", {
                        "robotCode": self._robot_code, "openConversationId": reply.chat_id,
                        "msgKey": "sampleMarkdown", "msgParam": param})
                else:
                    sent = await self._api("/v1.0/robot/oToMessages/batchSend", {
                        "robotCode": self._robot_code, "userIds": [staff], "msgKey": "sampleMarkdown",
                        "msgParam": param})
                first = first or str(sent.get("processQueryKey", f"{reply.job_id}:{n}"))
        return first

    # ---- the API ----------------------------------------------------------------------------

    async def _api(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post(self._base + path, body, token=await self._tokens.get())

    @property
    def connected(self) -> bool:
        """``adapters.base.Connected``: DingTalk's API did not fail (network, 5xx, 429) twice in a row, and
        in stream mode the connection is open."""
        stream_open = self._stream is None or self._stream.state.open
        return self._http.open and self._reachability.reachable and stream_open

    @property
    def connection(self) -> ConnectionState | None:
        """``adapters.base.Pushed``: the stream connection's state (``None`` with callbacks)."""
        return self._stream.state if self._stream is not None else None

    async def _post(self, url: str, body: dict[str, Any], *, token: str | None) -> dict[str, Any]:
        return await self._reachability.track(self._request(url, body, token=token))

    async def _request(self, url: str, body: dict[str, Any], *, token: str | None) -> dict[str, Any]:
        headers = {"x-acs-dingtalk-access-token": token} if token else {}
        try:
            async with self._http().post(url, json=body, headers=headers) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After", "")
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdapterError(self.name, f"POST {url.split('?')[0]}: {exc}", retryable=True) from exc
        if not isinstance(answer, dict):
            raise AdapterError(self.name, f"POST {url.split('?')[0]}: HTTP {status}, not JSON", retryable=status >= 500)
        errcode = int(answer.get("errcode", 0) or 0)
        if status == 200 and errcode == 0 and answer.get("status") != 1111:
            return answer
        detail = answer.get("errmsg") or answer.get("message") or answer.get("code") or ""
        if wait := _rate_limit_wait(status, errcode, answer, retry_after):
            raise RateLimited(self.name, f"POST {url.split('?')[0]}: rate limited ({errcode or status} {detail}), "
                              f"retry after {wait:g}s", retry_after_s=wait)
        retryable = status >= 500
        raise AdapterError(self.name, f"POST {url.split('?')[0]}: HTTP {status} {errcode or ''} {detail}".strip(),
                           retryable=retryable)

    async def credentials(self) -> str:
        """``adapters.base.Verifiable``: the app's credentials tried as ``start`` does, nothing started."""
        async with self._http.briefly():
            await self._fetch_token()
            if self._stream is not None:
                await self._stream.probe()
        return "access token issued" + (", stream connection opened" if self._stream is not None else "")

    async def _fetch_token(self) -> tuple[str, float]:
        answer = await self._post(f"{self._base}/v1.0/oauth2/accessToken",
                                  {"appKey": self._app_key, "appSecret": self._app_secret}, token=None)
        if not answer.get("accessToken"):
            raise AdapterError(self.name, "access token refused (check app_key and app_secret)", retryable=False)
        return str(answer["accessToken"]), float(answer.get("expireIn", 7200))

def _content(payload: dict[str, Any]) -> tuple[str, list[str]]:
    """The text and the picture download codes of a robot message."""
    kind = payload.get("msgtype")
    content = payload.get("content") or {}
    if kind == "text":
        return str((payload.get("text") or {}).get("content", "")), []
    if kind == "picture":
        code = content.get("downloadCode") or content.get("pictureDownloadCode")
        return "", [str(code)] if code else []
    if kind == "richText":
        words, codes = [], []
        for item in content.get("richText") or []:
            if item.get("type") == "picture":
                code = item.get("downloadCode") or item.get("pictureDownloadCode")
                if code:
                    codes.append(str(code))
            elif "text" in item:
                words.append(str(item["text"]))
        return " ".join(words), codes
    return "", []


def _title(text: str) -> str:
    """The line DingTalk shows in the conversation list for a markdown message."""
    first = next((line.strip("# ").strip() for line in text.splitlines() if line.strip()), "")
    return (first[:30] or "Answer")


def _pieces(text: str) -> list[str]:
    return [text[i:i + _MAX_TEXT] for i in range(0, len(text), _MAX_TEXT)] or [text]


class DingTalkSettings(PlatformSettings):
    """``[adapters.dingtalk]``."""

    app_key: str = ""  # the app's Client ID (AppKey)
    app_secret: SecretStr | None = None  # Client Secret (AppSecret): also signs the callbacks
    robot_code: str = ""  # usually the same as app_key
    base_url: str = "https://api.dingtalk.com"
    legacy_base_url: str = "https://oapi.dingtalk.com"  # where session webhooks live; only those are posted to
    # "stream": the daemon connects out to DingTalk (no inbound route needed); "webhook": DingTalk posts to `path`
    mode: Literal["webhook", "stream"] = "webhook"
    path: str = "/dingtalk/events"  # webhook mode: the robot's message receiving address on this server
    allowed_conversations: list[str] = Field(default_factory=list)  # cid... ids; empty: all
    allowed_ips: list[str] = Field(default_factory=list)  # callers allowed to post callbacks; empty: any
    admins: list[str] = Field(default_factory=list)  # staff ids that may /forget, besides the group's admins
    online_fix: ClassVar[str] = "check app_key and app_secret in the developer console"

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        for key in ("app_key", "app_secret"):
            if not getattr(self, key):
                env = " (or IMSIGHT_DINGTALK_APP_SECRET)" if key == "app_secret" else ""
                yield key, f"required when dingtalk is enabled{env}"

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        if self.mode == "stream":
            yield Finding("ok", "app credentials set; stream mode: connects out to DingTalk, no inbound route needed")
            return
        yield Finding("ok", "app credentials set; callbacks on " + self.path + (
            "" if self.allowed_ips else " (no allowed_ips: anyone with a captured sign may post)"))

    def build(self, deployment: Deployment) -> Adapter:
        assert self.app_secret is not None
        return DingTalkAdapter(
            self.app_key, self.app_secret.get_secret_value(), self.robot_code or self.app_key,
            base_url=self.base_url, legacy_base_url=self.legacy_base_url, path=self.path, mode=self.mode,
            allowed_conversations=self.allowed_conversations, allowed_ips=self.allowed_ips, admins=self.admins,
        )


def _rate_limit_wait(status: int, errcode: int, answer: dict[str, Any], retry_after: str) -> float:
    """Seconds DingTalk asks to wait (PROTOCOLS.md §2.8-2.9), or 0 when this is no rate limit."""
    if errcode in _THROTTLED_S:
        return _THROTTLED_S[errcode]
    if answer.get("status") == 1111:  # the per-address block: {"status": 1111, "wait": minutes}
        return float(answer.get("wait") or 5) * 60
    if status == 429:
        return float(retry_after) if retry_after.isdigit() else 1.0
    return 0.0
