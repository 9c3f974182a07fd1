"""Telegram, through python-telegram-bot (v22): long polling, or a webhook on the daemon's server.

Each message becomes an ``Incoming``: photos (largest size) and image documents are named by
file id and downloaded by the daemon after the update is taken in. A reply to an image the bot
never saw (privacy mode hides group messages that do not address it) brings that image along: the
replied-to message is taken in first, then the question that replies to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr

from adapters.base import Adapter, Deployment, Finding, Host, ImageRef, Incoming, PlatformSettings, Reply
from adapters.http_body import EVENT_LIMIT, parse_json, read_limited
from adapters.outgoing import defanged
from adapters.reachability import Reachability
from core.errors import AdapterError, BadInput, Forbidden, RateLimited

__all__ = ["TelegramAdapter", "split_text"]

log = logging.getLogger(__name__)

# python-telegram-bot 22.2+ warns on every RetryAfter unless durations are opted in as timedeltas
# (the coming default); the code below reads either.
os.environ.setdefault("PTB_TIMEDELTA", "1")

MAX_TEXT = 4096  # characters per Telegram message
MAX_DOWNLOAD = 20 * 2**20  # the Bot API's download limit
WEBHOOK_PATH = "/telegram/webhook"
_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_T = TypeVar("_T")
_TYPING_LASTS_S = 4.0
_NOT_FOR_US = "(a command for another bot)"  # a chat action shows for 5 s at most: renew it before then


class TelegramAdapter:
    name = "telegram"

    def __init__(
        self,
        token: str,
        *,
        mode: Literal["polling", "webhook"] = "polling",
        webhook_url: str | None = None,
        secret_token: str | None = None,
        allowed_chats: Iterable[str] = (),
        base_url: str | None = None,
        base_file_url: str | None = None,
        poll_timeout_s: int = 10,
        album_wait_s: float = 1.0,
    ) -> None:
        if mode == "webhook" and not (webhook_url and secret_token):
            raise AdapterError(self.name, "webhook mode needs webhook_url and secret_token", retryable=False)
        if secret_token is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret_token):
            raise AdapterError(self.name, "secret_token must be 1-256 characters of A-Z, a-z, 0-9, _ and -",
                               retryable=False)
        self._token = token
        self._mode = mode
        self._webhook_url = webhook_url
        self._secret = secret_token
        self._allowed = {str(c) for c in allowed_chats}
        self._base_url = base_url
        self.endpoint = base_url or "https://api.telegram.org"  # named in start-up errors (no token in it)
        self._base_file_url = base_file_url or (default_file_url(base_url) if base_url else None)
        self._poll_timeout_s = poll_timeout_s
        self._album_wait_s = album_wait_s
        self._albums: dict[str, _Album] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._drafts: dict[str, _Draft] = {}  # job id -> the placeholder being edited
        self._app: Any = None
        self._poller: asyncio.Task[None] | None = None
        self._closing = False  # stop_intake was called: the poller ends at its next turn
        self._waiting = False  # the poller is waiting on Telegram or a pause (see _idle)
        self._polling = Reachability()  # getUpdates
        self._host: Host | None = None
        self._me: Any = None

    def mount(self, app: web.Application) -> None:
        if self._mode == "webhook":
            app.router.add_post(urlsplit(self._webhook_url or "").path or WEBHOOK_PATH, self._on_webhook)

    async def start(self, host: Host) -> None:
        from telegram.ext import ApplicationBuilder

        self._host = host
        builder = ApplicationBuilder().token(self._token).updater(None)  # updates: our own loop or server
        if self._base_url:
            builder = builder.base_url(self._base_url).base_file_url(self._base_file_url or "")
        self._app = builder.build()
        await self._app.initialize()  # getMe
        self._me = self._app.bot.bot
        if not self._me.can_read_all_group_messages:
            log.warning("telegram bot @%s has privacy mode on: in groups it sees only messages that mention "
                        "or reply to it (see the README to turn it off)", self._me.username)
        if self._mode == "polling":
            await self._app.bot.delete_webhook()  # getUpdates is refused while a webhook is set
            self._poller = asyncio.create_task(self._poll(), name="imsight-telegram-poll")
        else:
            await self._app.bot.set_webhook(self._webhook_url, secret_token=self._secret, allowed_updates=["message"])
        log.info("telegram bot @%s started (%s)", self._me.username, self._mode)

    @property
    def connected(self) -> bool:
        """``adapters.base.Connected``: started, and (polling) getUpdates not failing twice in a row."""
        return self._app is not None and self._polling.reachable

    async def _poll(self) -> None:
        """Long polling that confirms an update (asks for the next offset) only once it is taken in.

        PTB's own updater confirms updates as soon as it has fetched them: a crash before they are
        stored would lose them. Albums are held until complete, so their updates stay unconfirmed
        (and are skipped when they come again) until the album is taken in.
        """
        from telegram.error import RetryAfter, TelegramError

        assert self._app is not None
        bot = self._app.bot
        offset: int | None = None
        handled: set[int] = set()  # taken in this run, perhaps not confirmed yet
        while not self._closing:
            try:
                updates = await self._idle(bot.get_updates(
                    offset=offset, timeout=0 if self._albums else self._poll_timeout_s, allowed_updates=["message"],
                    read_timeout=self._poll_timeout_s + 10))
                self._polling.succeeded()
            except RetryAfter as exc:
                await self._idle(asyncio.sleep(_seconds(exc.retry_after)))
                continue
            except TelegramError as exc:  # network, server errors, another instance polling (Conflict)
                self._polling.failed()  # PTB raises its own errors, not AdapterError: counted here
                wait = min(30, 2**self._polling.failures)
                log.warning("telegram getUpdates failed (%s); again in %ds", exc, wait)
                await self._idle(asyncio.sleep(wait))
                continue
            failed: int | None = None
            for update in updates:
                if update.update_id in handled:
                    continue
                try:
                    await self._on_message(update, None)
                except Exception:
                    log.exception("telegram update %s not taken in; it is fetched again", update.update_id)
                    failed = update.update_id
                    break
                handled.add(update.update_id)
            offset = self._confirmable(offset, handled, failed)
            handled = {h for h in handled if offset is None or h >= offset}
            if failed is not None or self._albums:
                await self._idle(asyncio.sleep(1.0 if failed is not None else min(0.2, self._album_wait_s)))

    async def _idle(self, waiting: Awaitable[_T]) -> _T:
        """The poller waits on Telegram or a pause, holding nothing: ``stop_intake`` may cancel it here
        (never while it is taking an update in)."""
        self._waiting = True
        try:
            return await waiting
        finally:
            self._waiting = False

    async def stop_intake(self) -> None:
        """``adapters.base.Pulling``: no update is taken in after this returns. Fetched updates not yet
        confirmed come again after the restart (and are recognised); albums still gathering are taken
        in as they are."""
        self._closing = True
        if self._poller is not None:
            if self._waiting:
                self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for key in list(self._albums):
            album = self._albums[key]
            if album.timer is not None:
                album.timer.cancel()
            await self._take_album(key)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _confirmable(self, offset: int | None, handled: set[int], failed: int | None) -> int | None:
        """The next offset: past everything taken in, but not past a failed update or a gathering album."""
        held = [update_id for album in self._albums.values() for update_id, _ in album.items]
        if failed is not None:
            held.append(failed)
        if held:
            return min(held)
        return max(handled) + 1 if handled else offset

    async def stop(self) -> None:
        if self._app is None:
            return
        await self.stop_intake()  # done already when the daemon stops (first of all); here for a failed start
        await self._app.shutdown()
        self._app = None

    async def _on_webhook(self, request: web.Request) -> web.Response:
        given = request.headers.get(_SECRET_HEADER, "")
        if self._secret is None or not hmac.compare_digest(given.encode(), self._secret.encode()):
            raise Forbidden("wrong secret token")
        if self._app is None:
            raise web.HTTPServiceUnavailable(text="not started")
        from telegram import Update

        raw = await read_limited(request, EVENT_LIMIT)
        data = await parse_json(raw)
        try:
            update = Update.de_json(data, self._app.bot)
        except Exception as exc:  # PTB's parser raises whatever the junk leads it to
            raise BadInput(f"body is not a Telegram update: {type(exc).__name__}", code="invalid_update") from None
        # Called directly, not through the application's queue: the update is taken in (committed)
        # before Telegram hears 200, and a failure becomes a 5xx that Telegram delivers again.
        await self._on_message(update, None)
        return web.json_response({"ok": True})

    async def _on_message(self, update: Any, context: Any) -> None:
        message = update.message
        if message is None or self._host is None:
            return
        chat_id = str(message.chat.id)
        if self._allowed and chat_id not in self._allowed:
            log.info("telegram chat %s is not in allowed_chats: message ignored", chat_id)
            return
        command = self._command(message)
        if command == _NOT_FOR_US:
            return
        if command not in (None, "/ask"):  # the daemon answers every command (bot.commands)
            await self._host.accept(self._incoming(message, event_id=str(update.update_id), addressed=True))
            return
        if message.media_group_id:
            self._gather(str(message.media_group_id), update.update_id, message)
            return
        replied = _real_reply(message)
        if replied is not None and _images(replied):
            # Possibly never seen (privacy mode): take it in first; a message seen before is a duplicate.
            await self._host.accept(self._incoming(replied, event_id="", addressed=False))
        await self._host.accept(self._incoming(message, event_id=str(update.update_id)))

    def _gather(self, key: str, update_id: int, message: Any) -> None:
        """An album arrives as one message per image: wait until no more come, then take it in whole."""
        album = self._albums.setdefault(key, _Album())
        album.items.append((update_id, message))
        if album.timer is not None:
            album.timer.cancel()
        album.timer = asyncio.get_running_loop().call_later(self._album_wait_s, self._spawn_take, key)

    def _spawn_take(self, key: str) -> None:
        task = asyncio.create_task(self._take_album(key), name=f"imsight-telegram-album-{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take_album(self, key: str) -> None:
        """Each item as a message of its own; the one that asks (the caption) gets every image of the album."""
        album = self._albums.pop(key, None)
        if album is None or self._host is None:
            return
        items = sorted(album.items, key=lambda item: item[1].message_id)
        incomings = [self._incoming(message, event_id=str(update_id)) for update_id, message in items]
        every_image = tuple(ref for incoming in incomings for ref in incoming.images)
        try:
            for incoming in incomings:
                if incoming.addressed:
                    incoming = replace(incoming, images=every_image)
                await self._host.accept(incoming)
        except Exception:
            log.exception("telegram album %s: taking it in failed", key)

    def _incoming(self, message: Any, *, event_id: str, addressed: bool | None = None) -> Incoming:
        replied = _real_reply(message)
        text, mentioned = self._question(message)
        direct = message.chat.type == "private"
        to_bot = replied is not None and replied.from_user is not None and replied.from_user.id == self._me.id
        sender = message.from_user
        topic = message.is_topic_message and message.message_thread_id is not None
        return Incoming(
            platform=self.name,
            chat_id=str(message.chat.id),
            message_id=str(message.message_id),
            event_id=event_id,
            chat_kind="direct" if direct else "group",
            thread_id=str(message.message_thread_id) if topic else None,
            reply_to=str(replied.message_id) if replied is not None else None,
            sender_id=str(sender.id) if sender else str(getattr(message.sender_chat, "id", "")),
            sender_name=(sender.full_name if sender else getattr(message.sender_chat, "title", None)) or "",
            text=text,
            addressed=(direct or mentioned or to_bot) if addressed is None else addressed,
            command=command if (command := self._command(message)) not in (None, "/ask", _NOT_FOR_US) else "",
            images=_images(message),
            received_at=message.date.timestamp(),
        )

    def _question(self, message: Any) -> tuple[str, bool]:
        """The text without mentions of this bot or /ask, and whether it asks the bot (in text or caption)."""
        text = message.text or message.caption or ""
        entities = message.parse_entities() if message.text else message.parse_caption_entities()
        mentioned = False
        for entity, value in entities.items():
            if (entity.type == "mention" and self._is_me(value)) or (
                entity.type == "text_mention" and entity.user is not None and entity.user.id == self._me.id
            ) or (entity.type == "bot_command" and entity.offset == 0 and self._command(message) == "/ask"):
                mentioned = True
                text = text.replace(value, " ", 1)
        return " ".join(text.split()), mentioned

    def _command(self, message: Any) -> str | None:
        """``/name`` when the message starts with a command for this bot (``/name@otherbot`` is not)."""
        entities = message.parse_entities() if message.text else message.parse_caption_entities()
        for entity, value in entities.items():
            if entity.type == "bot_command" and entity.offset == 0:
                name, _, target = value.partition("@")
                return name.lower() if not target or self._is_me(target) else _NOT_FOR_US
        return None

    def _is_me(self, username: str) -> bool:
        return username.lstrip("@").lower() == (self._me.username or "").lower()

    async def is_admin(self, incoming: Incoming) -> bool:
        """``adapters.base.Moderated``: a group's creator and administrators; anyone in a private chat."""
        from telegram.error import TelegramError

        if incoming.chat_kind == "direct":
            return True
        if self._app is None or not incoming.sender_id:
            return False
        try:
            member = await self._app.bot.get_chat_member(incoming.chat_id, int(incoming.sender_id))
        except (TelegramError, ValueError) as exc:
            log.warning("telegram chat %s: cannot check admin rights: %s", incoming.chat_id, exc)
            return False
        return member.status in ("creator", "administrator")

    async def download(self, image: ImageRef) -> bytes:
        from telegram.error import TelegramError

        assert self._app is not None, "not started"
        try:
            file = await self._app.bot.get_file(image.ref)
            if file.file_size is not None and file.file_size > MAX_DOWNLOAD:
                raise AdapterError(self.name, f"image of {file.file_size} bytes is over the Bot API's 20 MB "
                                   "download limit", retryable=False)
            return bytes(await file.download_as_bytearray())
        except TelegramError as exc:
            raise _adapter_error("download", exc) from exc

    async def draft(self, reply: Reply) -> str | None:
        """A placeholder reply with a typing status, edited as the answer grows (callers pace it)."""
        from telegram.error import TelegramError

        try:
            return await self._draft(reply)
        except TelegramError as exc:  # a 429 becomes RateLimited: the chat's next call waits for it
            raise _adapter_error("draft", exc) from exc

    async def _draft(self, reply: Reply) -> str | None:
        from telegram.error import BadRequest

        assert self._app is not None, "not started"
        bot, now = self._app.bot, time.monotonic()
        chat, thread = int(reply.chat_id), int(reply.thread_id) if reply.thread_id else None
        state = self._placeholder(reply)
        if state is None or now - state.typing_at >= _TYPING_LASTS_S:
            await bot.send_chat_action(chat, "typing", message_thread_id=thread)
            if state is not None:
                state.typing_at = now
        if state is None:
            sent = await bot.send_message(chat, _preview(reply.text), message_thread_id=thread,
                                          reply_parameters=self._reply_to(reply))
            self._drafts[reply.job_id] = _Draft(sent.message_id, reply.text, now)
            return str(sent.message_id)
        if reply.text != state.text:
            state.text = reply.text
            with contextlib.suppress(BadRequest):  # "message is not modified"
                await bot.edit_message_text(_preview(reply.text), chat_id=chat, message_id=state.message_id)
        return str(state.message_id)

    def _placeholder(self, reply: Reply) -> _Draft | None:
        """This job's placeholder: in memory, or the one a run before a restart left (``reply.draft_id``)."""
        state = self._drafts.get(reply.job_id)
        if state is None and reply.draft_id and reply.draft_id.isdigit():
            state = self._drafts[reply.job_id] = _Draft(int(reply.draft_id), "\0", 0.0)  # text unknown: edit it
        return state

    async def send(self, reply: Reply) -> str:
        from telegram.error import BadRequest, TelegramError

        assert self._app is not None, "not started"
        bot = self._app.bot
        chat, thread = int(reply.chat_id), int(reply.thread_id) if reply.thread_id else None
        pieces = split_text(defanged(reply.text or "(empty answer)"))
        state = None if reply.notice else self._placeholder(reply)
        try:
            if state is not None:  # the placeholder becomes the answer's first piece
                with contextlib.suppress(BadRequest):  # "message is not modified"
                    await bot.edit_message_text(pieces[0], chat_id=chat, message_id=state.message_id)
                first, pieces = str(state.message_id), pieces[1:]
            else:
                first = ""
            for piece in pieces:
                # Plain text: the model's Markdown may be unbalanced, and a parse error would lose the answer.
                sent = await bot.send_message(chat, piece, message_thread_id=thread,
                                              reply_parameters=self._reply_to(reply))
                first = first or str(sent.message_id)
        except TelegramError as exc:  # a 429 becomes RateLimited: the outbox waits, not this call
            raise _adapter_error("send", exc) from exc
        if not reply.notice:
            self._drafts.pop(reply.job_id, None)
        return first

    @staticmethod
    def _reply_to(reply: Reply) -> Any:
        from telegram import ReplyParameters

        return ReplyParameters(message_id=int(reply.reply_to), allow_sending_without_reply=True)


@dataclass
class _Draft:
    message_id: int
    text: str
    typing_at: float


@dataclass
class _Album:
    items: list[tuple[int, Any]] = field(default_factory=list)  # (update id, message)
    timer: asyncio.TimerHandle | None = None


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """Pieces of at most ``limit`` characters, cut at a paragraph, line or word end where there is one."""
    pieces: list[str] = []
    while len(text) > limit:
        cut = max(text.rfind(sep, 0, limit) for sep in ("\n\n", "\n", " "))
        cut = cut if cut > limit // 2 else limit
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    pieces.append(text)
    return [p for p in pieces if p]


def default_file_url(base_url: str) -> str:
    """``http://host:8081/bot`` -> ``http://host:8081/file/bot``, as the Bot API lays its paths out."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/file/bot", "", ""))


def _real_reply(message: Any) -> Any:
    """The replied-to message; in forum topics every message "replies" to the topic's creation: not a reply."""
    replied = message.reply_to_message
    if replied is None or replied.forum_topic_created is not None:
        return None
    return replied


def _images(message: Any) -> tuple[ImageRef, ...]:
    if message.photo:
        largest = max(message.photo, key=lambda size: size.width * size.height)
        return (ImageRef(largest.file_id),)
    document = message.document
    if document is not None and (document.mime_type or "").startswith("image/"):
        return (ImageRef(document.file_id),)
    return ()


def _preview(text: str) -> str:
    """The answer so far, marked unfinished, within one message."""
    return defanged(text[: MAX_TEXT - 2] + " …") if text else "…"


def _seconds(value: int | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _adapter_error(what: str, exc: Exception) -> AdapterError:
    from telegram.error import BadRequest, Forbidden, InvalidToken, RetryAfter

    if isinstance(exc, RetryAfter):
        wait = _seconds(exc.retry_after)
        return RateLimited("telegram", f"{what}: rate limited, retry after {wait:g}s", retry_after_s=wait)
    permanent = isinstance(exc, BadRequest | Forbidden | InvalidToken)
    return AdapterError("telegram", f"{what}: {exc}", retryable=not permanent)


_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_BOT_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]{20,}")


class TelegramSettings(PlatformSettings):
    """``[adapters.telegram]``."""

    token: SecretStr | None = None  # from @BotFather
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None  # public https URL whose path routes to this daemon
    secret_token: SecretStr | None = None  # webhook mode: 1-256 of A-Z a-z 0-9 _ -
    allowed_chats: list[str] = Field(default_factory=list)  # chat ids; empty: every chat the bot is in
    base_url: str | None = None  # a self-hosted Bot API server, e.g. "http://127.0.0.1:8081/bot"
    base_file_url: str | None = None  # default: /file/bot on the host of base_url
    album_wait_seconds: float = Field(1.0, gt=0, le=30)  # an album is complete once no item came this long
    online_fix: ClassVar[str] = "copy the token again from @BotFather"

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        if self.token is None:
            yield "token", "required when telegram is enabled (or IMSIGHT_TELEGRAM_TOKEN)"
        if self.mode == "webhook" and not (self.webhook_url and self.secret_token):
            yield "", "mode = \"webhook\" needs webhook_url and secret_token (or IMSIGHT_TELEGRAM_SECRET_TOKEN)"
        if self.secret_token and not _SECRET_TOKEN.fullmatch(self.secret_token.get_secret_value()):
            yield "secret_token", "must be 1-256 characters of A-Z, a-z, 0-9, _ and -"

    def build(self, deployment: Deployment) -> Adapter:
        assert self.token is not None  # ``problems`` said so otherwise
        return TelegramAdapter(
            self.token.get_secret_value(), mode=self.mode, webhook_url=self.webhook_url,
            secret_token=self.secret_token.get_secret_value() if self.secret_token else None,
            allowed_chats=self.allowed_chats, base_url=self.base_url, base_file_url=self.base_file_url,
            album_wait_s=self.album_wait_seconds,
        )

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        if self.token is None:
            return
        if not _BOT_TOKEN.fullmatch(self.token.get_secret_value()):
            yield Finding("fail", "token does not look like a Bot API token (digits:letters)",
                          "copy it again from @BotFather")
        else:
            yield Finding("ok", f"token set, {self.mode}")

    async def online(self) -> str | None:
        if self.token is None:
            return None
        url = f"{self.base_url or 'https://api.telegram.org/bot'}{self.token.get_secret_value()}/getMe"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                http.post(url, json={}) as resp:
            body = await resp.json(content_type=None)
        if not isinstance(body, dict) or not body.get("ok"):
            said = body.get("description") if isinstance(body, dict) else f"HTTP {resp.status}"
            raise AdapterError("telegram", f"Telegram said: {said}")
        return f"@{body['result']['username']}"
