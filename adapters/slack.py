"""Slack: events over Socket Mode, images downloaded with the bot token, answers in the thread.

A Slack app with an app-level token (``xapp-``, Socket Mode) and a bot token (``xoxb-``, the Web
API through slack_sdk's ``AsyncWebClient``). Events: ``app_mention``, and ``message`` in channels
the bot is in (images shared without a question, kept for a later one) and in direct messages. A
message that mentions the bot comes twice (``message`` and ``app_mention``): the store keeps one,
by channel and ``ts``. Each envelope is acknowledged only once its event is stored; a retried one
(``retry_attempt``) is then a duplicate, answered once. PROTOCOLS.md §7.

Answers go into the question's thread: a placeholder posted at once and edited as the answer
grows (``chat.update``, paced below Slack's tier for it), Markdown turned into Slack's mrkdwn, long
answers split. A 429 becomes ``RateLimited`` with Slack's ``Retry-After``, for that channel only.
"""

from __future__ import annotations

import html
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

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
from adapters.outgoing import defanged
from adapters.reachability import Reachability
from adapters.slack_socket import SlackSocket
from core.errors import AdapterError, BadInput, RateLimited

__all__ = ["SlackAdapter", "SlackSettings", "mrkdwn"]

log = logging.getLogger(__name__)

_MAX_TEXT = 3_900  # characters a message: Slack shows up to 4,000 before "Show more" and cuts at 40,000
_EDIT_EVERY_S = 1.5  # at most one placeholder edit a channel this often ...
_EDITS_A_MINUTE = 40  # ... and this many in all: chat.update is Tier 3 (about 50 a minute)
_PLACEHOLDER = "…"  # what a thread shows until the first words of an answer
_THREADS_KEPT = 10_000  # threads whose follow-ups need no mention: the most recently answered
_KEPT_SUBTYPES = {None, "file_share", "thread_broadcast"}  # other subtypes are edits, joins, bots ...
_IMAGE_HOSTS = ("files.slack.com",)  # where file URLs may send the bot token (besides base_url's host)
# Slack's markup in received text: <@U1>, <#C1|general>, <!here>, <https://x|label>: the label, else the id
_SLACK_MARKUP = re.compile(r"<([@#!]|)([^>|]+)(\|([^>]*))?>")


class SlackAdapter:
    name = "slack"

    def __init__(
        self,
        app_token: str,
        bot_token: str,
        *,
        base_url: str = "https://slack.com/api/",
        allowed_channels: Iterable[str] = (),
        admins: Iterable[str] = (),
        timeout_s: float = 10,
    ) -> None:
        self._bot_token = bot_token
        self._base = base_url if base_url.endswith("/") else base_url + "/"
        self.endpoint = self._base  # named in start-up errors
        self._allowed = set(allowed_channels)
        self._admins = set(admins)
        self._http = ClientSessionSlot(timeout_s)
        self._web: AsyncWebClient | None = None
        self._host: Host | None = None
        self.bot_user_id = ""
        self._reachability = Reachability()
        self._socket = SlackSocket(self._http, self._base, app_token, self._take)
        self._drafts: dict[str, tuple[str, str]] = {}  # job id -> (channel, placeholder ts)
        self._edited: dict[str, float] = {}  # channel -> when its last placeholder edit went out
        self._edits: deque[float] = deque()  # when each edit of the last minute went out
        # (channel, thread ts) the bot has answered in, the newest _THREADS_KEPT of them
        self._threads: OrderedDict[tuple[str, str], None] = OrderedDict()

    def mount(self, app: web.Application) -> None:
        """Socket Mode needs no inbound route."""

    async def start(self, host: Host) -> None:
        self._host = host
        self._web = AsyncWebClient(token=self._bot_token, base_url=self._base, session=self._http.start())
        who = await self._call("auth.test")  # a wrong bot token stops the daemon now
        self.bot_user_id = str(who.get("user_id", ""))
        await self._socket.start()
        log.info("slack bot %s (%s) started: Socket Mode", who.get("user", ""), self.bot_user_id)

    async def stop_intake(self) -> None:
        """``adapters.base.Pulling``: close the Socket Mode connection (unacknowledged events come again)."""
        await self._socket.stop()

    async def stop(self) -> None:
        await self.stop_intake()
        await self._http.close()

    # ---- receiving ----------------------------------------------------------------------

    async def _take(self, payload: Any, attempt: int) -> None:
        """An ``event_callback`` committed before Slack hears that it arrived; other events let go."""
        if not isinstance(payload, dict):
            raise BadInput("event is not a JSON object", code="invalid_json")
        event = payload.get("event")
        if payload.get("type") != "event_callback" or not isinstance(event, dict) or self._host is None:
            return
        try:
            incoming = self._incoming(str(payload.get("event_id", "")), event)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise BadInput(f"event has an unexpected shape ({type(exc).__name__}: {exc})",
                           code="invalid_event") from None
        if incoming is not None:
            if attempt:
                log.info("slack: event %s delivered again (attempt %d)", incoming.event_id, attempt)
            await self._host.accept(incoming)

    def _incoming(self, event_id: str, event: dict[str, Any]) -> Incoming | None:
        kind, subtype = event.get("type"), event.get("subtype")
        if kind not in ("message", "app_mention") or subtype not in _KEPT_SUBTYPES or event.get("bot_id"):
            return None
        channel, ts, user = str(event["channel"]), str(event["ts"]), str(event.get("user", ""))
        if user == self.bot_user_id or (self._allowed and channel not in self._allowed):
            return None
        text = str(event.get("text", ""))
        mention = re.compile(rf"<@{re.escape(self.bot_user_id)}(\|[^>]*)?>") if self.bot_user_id else None
        mentioned = kind == "app_mention" or bool(mention and mention.search(text))
        if mention:
            text = mention.sub(" ", text)
        text = html.unescape(_SLACK_MARKUP.sub(lambda m: m.group(4) or m.group(1) + m.group(2), text))
        thread = str(event["thread_ts"]) if event.get("thread_ts") and event.get("thread_ts") != ts else None
        direct = event.get("channel_type") == "im" or channel.startswith("D")
        # A follow-up in a thread the bot answered in is for the bot, mention or not (until a restart).
        followed = thread is not None and (channel, thread) in self._threads
        images = [f for f in event.get("files") or [] if str(f.get("mimetype", "")).startswith("image/")]
        return Incoming(
            platform=self.name,
            chat_id=channel,
            message_id=ts,
            event_id=event_id,
            chat_kind="direct" if direct else "group",
            thread_id=thread,
            reply_to=thread,  # the thread's first message: read back when never seen (``replied``)
            sender_id=user,
            sender_is_admin=(direct or user in self._admins) if self._admins or direct else False,
            text=" ".join(text.split()),
            addressed=direct or mentioned or followed,
            images=tuple(ImageRef(str(f.get("url_private_download") or f.get("url_private"))) for f in images),
            received_at=float(ts),
        )

    async def replied(self, incoming: Incoming) -> Replied | None:
        """``ReadsReplies``: a thread's first message, when the bot never saw it (posted before it joined,
        or before its events reached this daemon)."""
        if not incoming.reply_to:
            return None
        try:
            found = await self._call("conversations.replies", channel=incoming.chat_id, ts=incoming.reply_to,
                                     limit=1, inclusive=True)
        except AdapterError as exc:
            log.info("slack: cannot read thread %s: %s", incoming.reply_to, exc)
            return None
        first = next((m for m in found.get("messages") or [] if str(m.get("ts")) == incoming.reply_to), None)
        if first is None:
            return None
        files = [f for f in first.get("files") or [] if str(f.get("mimetype", "")).startswith("image/")]
        return Replied(
            Incoming(platform=self.name, chat_id=incoming.chat_id, message_id=incoming.reply_to,
                     sender_id=str(first.get("user", "")), text=str(first.get("text", "")),
                     images=tuple(ImageRef(str(f.get("url_private_download") or f.get("url_private")))
                                  for f in files),
                     received_at=float(incoming.reply_to)),
            by_bot=bool(first.get("bot_id")) or first.get("user") == self.bot_user_id,
        )

    # ---- images and replies ---------------------------------------------------------------

    async def download(self, image: ImageRef) -> bytes:
        host = urlsplit(image.ref).hostname or ""
        if host not in (*_IMAGE_HOSTS, urlsplit(self._base).hostname):
            # The bot token goes only to Slack's own file host.
            raise AdapterError(self.name, f"an image on {host or 'no host'}, not Slack's file host", retryable=False)
        try:
            async with self._http().get(image.ref, headers={"Authorization": f"Bearer {self._bot_token}"}) as resp:
                kind = resp.headers.get("Content-Type", "")
                if resp.status != 200:
                    raise AdapterError(self.name, f"image download: HTTP {resp.status}", retryable=resp.status >= 500)
                if kind.startswith("text/html"):  # Slack's sign-in page: the token was not accepted
                    raise AdapterError(self.name, "image download answered a sign-in page (is files:read granted?)",
                                       retryable=False)
                return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(self.name, f"image download: {exc}", retryable=True) from exc

    async def draft(self, reply: Reply) -> str | None:
        """``Drafting``: a placeholder in the thread, edited as the answer grows."""
        placeholder = self._placeholder(reply)
        if placeholder is None and reply.retried:
            placeholder = await self._left_over(reply)
            if placeholder is not None:
                log.info("slack: job %s: the placeholder an earlier attempt left is used again", reply.job_id)
                self._drafts[reply.job_id] = (reply.chat_id, placeholder)
        if placeholder is None:
            sent = await self._call("chat.postMessage", channel=reply.chat_id, thread_ts=_thread(reply),
                                    text=_PLACEHOLDER)
            self._drafts[reply.job_id] = (reply.chat_id, str(sent.get("ts", "")))
            return str(sent.get("ts", ""))
        if reply.text and self._may_edit(reply.chat_id):
            await self._call("chat.update", channel=reply.chat_id, ts=placeholder,
                             text=f"{mrkdwn(reply.text)} {_PLACEHOLDER}")
        return placeholder

    async def _left_over(self, reply: Reply) -> str | None:
        """A bare placeholder of ours in the answer's thread, after the question: what an earlier attempt
        posted before the daemon died without recording it (Slack has no idempotency key for posting)."""
        try:
            found = await self._call("conversations.replies", channel=reply.chat_id, ts=_thread(reply), limit=100)
        except AdapterError as exc:
            log.info("slack: cannot read thread %s for a placeholder: %s", _thread(reply), exc)
            return None
        ours = [str(m["ts"]) for m in found.get("messages") or []
                if m.get("text") == _PLACEHOLDER and float(m.get("ts", 0)) > float(reply.reply_to)
                and (m.get("user") == self.bot_user_id or m.get("bot_id"))]
        return ours[0] if ours else None

    def _placeholder(self, reply: Reply) -> str | None:
        kept = self._drafts.get(reply.job_id)
        return kept[1] if kept else reply.draft_id

    def _may_edit(self, channel: str) -> bool:
        now = time.monotonic()
        while self._edits and now - self._edits[0] > 60:
            self._edits.popleft()
        if now - self._edited.get(channel, -_EDIT_EVERY_S) < _EDIT_EVERY_S or len(self._edits) >= _EDITS_A_MINUTE:
            return False
        self._edited[channel] = now
        self._edits.append(now)
        return True

    async def send(self, reply: Reply) -> str:
        pieces = _pieces(mrkdwn(reply.text or "(empty answer)"))
        placeholder = None if reply.notice else self._placeholder(reply)
        first = ""
        if placeholder:  # the placeholder becomes the answer's first piece
            await self._call("chat.update", channel=reply.chat_id, ts=placeholder, text=pieces[0])
            first, pieces = placeholder, pieces[1:]
        for piece in pieces:
            sent = await self._call("chat.postMessage", channel=reply.chat_id, thread_ts=_thread(reply), text=piece)
            first = first or str(sent.get("ts", ""))
        if not reply.notice:
            self._drafts.pop(reply.job_id, None)
            self._threads[(reply.chat_id, _thread(reply))] = None
            self._threads.move_to_end((reply.chat_id, _thread(reply)))
            while len(self._threads) > _THREADS_KEPT:
                self._threads.popitem(last=False)
        return first

    # ---- the Web API ------------------------------------------------------------------------

    async def _call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._reachability.track(self._request(method, params))

    async def _request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._web is not None, "not started"
        get = method == "conversations.replies"  # a read: Slack takes its arguments in the query
        try:
            answer = await self._web.api_call(method, http_verb="GET" if get else "POST",
                                              params=params if get else None, json=None if get else params)
            return dict(answer.data) if isinstance(answer.data, dict) else {}
        except SlackApiError as exc:
            refused = exc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdapterError(self.name, f"{method}: {exc}", retryable=True) from exc
        # Raised outside the handler: our words (Slack's error code), not slack_sdk's, reach the start-up error.
        status, error = refused.response.status_code, _error(refused)
        if status == 429:
            wait = float(refused.response.headers.get("Retry-After", "1") or 1)
            raise RateLimited(self.name, f"{method}: rate limited, retry after {wait:g}s", retry_after_s=wait)
        raise AdapterError(self.name, f"{method}: {error or f'HTTP {status}'}",
                           retryable=status >= 500 or error in ("internal_error", "fatal_error"))

    @property
    def connected(self) -> bool:
        """``adapters.base.Connected``: the Web API did not fail twice in a row, and Socket Mode is open."""
        return self._http.open and self._reachability.reachable and self._socket.state.open

    @property
    def connection(self) -> ConnectionState | None:
        """``adapters.base.Pushed``."""
        return self._socket.state

    async def credentials(self) -> str:
        """``adapters.base.Verifiable``: ``auth.test`` with the bot token, and one Socket Mode connection."""
        async with self._http.briefly() as session:
            self._web = AsyncWebClient(token=self._bot_token, base_url=self._base, session=session)
            who = await self._call("auth.test")
            await self._socket.probe()
        return f"bot {who.get('user', '')} in {who.get('team', '')}, Socket Mode connection opened"


def _error(exc: SlackApiError) -> str:
    data = exc.response.data
    return str(data.get("error", "")) if isinstance(data, dict) else ""


def _thread(reply: Reply) -> str:
    """The thread an answer goes into: the question's own, or the one it starts under the question."""
    return reply.thread_id or reply.reply_to


_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")
_STRIKE = re.compile(r"~~(.+?)~~")


def mrkdwn(markdown: str) -> str:
    """Markdown as Slack's mrkdwn: bold, headings, links and strike-through; ``&``, ``<``, ``>`` escaped
    (so nothing in an answer becomes a mention or a broadcast); code spans and blocks as they are."""
    text = defanged(markdown).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _HEADING.sub(r"*\1*", text)
    text = _BOLD.sub(lambda m: f"*{m.group(1) or m.group(2)}*", text)
    text = _STRIKE.sub(r"~\1~", text)
    return _LINK.sub(lambda m: f"<{m.group(2)}|{m.group(1)}>", text)


def _pieces(text: str) -> list[str]:
    """At most ``_MAX_TEXT`` characters each, cut at a line break where there is one."""
    pieces = []
    while len(text) > _MAX_TEXT:
        cut = text.rfind("\n", 0, _MAX_TEXT)
        cut = cut if cut > _MAX_TEXT // 2 else _MAX_TEXT
        pieces.append(text[:cut])
        text = text[cut:].lstrip("\n")
    return [*pieces, text]


class SlackSettings(PlatformSettings):
    """``[adapters.slack]``."""

    app_token: SecretStr | None = None  # xapp-...: Socket Mode (Basic Information > App-Level Tokens)
    bot_token: SecretStr | None = None  # xoxb-...: the Web API (OAuth & Permissions)
    base_url: str = "https://slack.com/api/"
    allowed_channels: list[str] = Field(default_factory=list)  # C.../G.../D... ids; empty: every channel it is in
    admins: list[str] = Field(default_factory=list)  # user ids that may /forget in channels (anyone in a DM)
    online_fix: ClassVar[str] = "check bot_token and app_token, and that Socket Mode is on (api.slack.com/apps)"

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        for key, prefix in (("app_token", "xapp-"), ("bot_token", "xoxb-")):
            value = getattr(self, key)
            if value is None or not value.get_secret_value():
                yield key, f"required when slack is enabled (or IMSIGHT_SLACK_{key.upper()})"
            elif not value.get_secret_value().startswith(prefix):
                yield key, f"a Slack {key.replace('_', ' ')} starts with {prefix}"

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        yield Finding("ok", "tokens set; Socket Mode: connects out to Slack, no inbound route needed" + (
            "" if self.admins else " (no admins: /forget only in direct messages)"))

    def build(self, deployment: Deployment) -> Adapter:
        assert self.app_token is not None
        assert self.bot_token is not None
        return SlackAdapter(self.app_token.get_secret_value(), self.bot_token.get_secret_value(),
                            base_url=self.base_url, allowed_channels=self.allowed_channels, admins=self.admins)
