"""The daemon's side of every adapter: take messages in, answer questions about jobs and history."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from adapters.base import (
    Accepted,
    Adapter,
    HistoryEntry,
    ImageRef,
    Incoming,
    JobView,
    Moderated,
    ReadsReplies,
    Status,
)
from bot.admission import Admission, busy
from bot.commands import HELP as COMMANDS_HELP
from bot.commands import Command, Commands, status_text
from bot.commands import parse as parse_command
from bot.context import NONE, OWN, resolve
from bot.files import ImageFiles
from bot.job_context import JobContext
from bot.metrics import Metrics
from bot.outbox import Outbox
from bot.retry import with_retries
from bot.store import NewJob, Store
from bot.watch import JobWatch
from bot.workers import Workers
from core.errors import AdapterError, BadInput, Busy, ImsightError, NotFound, ShuttingDown
from core.images import ImageInfo, ImageLimits, inspect

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"done", "failed"})
API = "api"  # the generic API: its callers have the history API, not chat commands
_REFUSAL_MEMORY_S = 0.5


class Dispatcher:
    """Implements ``adapters.base.Host`` for the adapters.

    Two ways in. Images that came inline (the generic API) are checked before anything is written,
    then the message, its images and its job are written in one transaction: a refused message
    leaves no trace. Images a platform only names are downloaded after the event is committed to
    the inbox and acknowledged, since platforms re-deliver events that are not acknowledged within
    seconds; an intake cut off by a stop resumes from the inbox at the next start.
    """

    def __init__(
        self,
        store: Store,
        files: ImageFiles,
        workers: Workers,
        outbox: Outbox,
        watch: JobWatch,
        adapters: Mapping[str, Adapter],
        *,
        image_limits: ImageLimits,
        window_s: float,
        history_turns: int,
        admission: Admission | None = None,
        metrics: Metrics | None = None,
        log_text: bool = False,
        download_attempts: int = 3,
        retry_base_s: float = 1.0,
        acknowledge_images: bool = True,
    ) -> None:
        self._store, self._files, self._workers, self._outbox, self._watch = store, files, workers, outbox, watch
        self._adapters = adapters
        self._image_limits = image_limits
        self._window_s, self._history_turns = window_s, history_turns
        self._admission = admission
        self._commands = Commands(store)
        self._log_text = log_text  # what people write stays out of the log unless the operator says so
        self._metrics = metrics or Metrics()
        self._refused: dict[str, float] = {}  # what was refused (queue, chat, sender) -> until when, monotonic
        self._download_attempts, self._retry_base_s = download_attempts, retry_base_s
        self._acknowledge_images = acknowledge_images
        self._intakes: set[asyncio.Task[None]] = set()
        self._chat_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._deferred: dict[tuple[str, str], int] = {}  # intakes in flight per chat
        self._closed = False  # close_intake: nothing more is taken in

    async def start(self) -> None:
        """Resume the intake of events acknowledged before the last stop."""
        pending = await self._store.pending()
        if pending:
            log.info("resuming the intake of %d event(s) received before the last stop", len(pending))
        for inbox_id, incoming in pending:
            self._intake_later(inbox_id, incoming)

    def close_intake(self) -> None:
        """Take nothing more in (the first step of stopping): a late ``accept`` is refused with 503,
        so its sender delivers it again, rather than half-taken in while everything stops."""
        self._closed = True

    async def stop(self) -> None:
        """Cut off intakes in flight; their events stay in the inbox for the next start."""
        self._closed = True
        for task in self._intakes:
            task.cancel()
        await asyncio.gather(*self._intakes, return_exceptions=True)

    async def accept(self, incoming: Incoming, *, refuse_when_busy: bool = False) -> Accepted:
        """Take a message in; queue a job when it asks the bot something (``adapters.base.Host``)."""
        if self._closed:
            raise ShuttingDown("imsight is stopping; deliver this again in a minute")
        started = time.monotonic()
        try:
            accepted = await self._accept(incoming, refuse_when_busy=refuse_when_busy)
        except Busy:
            self._metrics.events.labels(incoming.platform, "refused").inc()
            self._metrics.jobs.labels("refused").inc()
            raise
        outcome = "duplicate" if accepted.duplicate else "refused" if accepted.refused else "stored"
        self._metrics.events.labels(incoming.platform, outcome).inc()
        if accepted.refused:
            self._metrics.jobs.labels("refused").inc()
        self._metrics.ack_seconds.labels(incoming.platform).observe(time.monotonic() - started)
        return accepted

    async def _accept(self, incoming: Incoming, *, refuse_when_busy: bool) -> Accepted:
        seen = await self._store.find_accepted(incoming)
        if seen is not None:
            log.info("duplicate %s event %s (chat %s message %s) ignored", incoming.platform,
                     incoming.event_id, incoming.chat_id, incoming.message_id)
            return seen
        unknown_parent = False
        if incoming.reply_to:
            replied = await self._store.message(incoming.platform, incoming.chat_id, incoming.reply_to)
            if replied is None and incoming.platform == API:
                # A caller names the message it means; a guess (the latest image) would answer about another.
                raise NotFound(f"reply_to: no message {incoming.reply_to!r} in conversation {incoming.chat_id!r}",
                               code="unknown_message")
            if replied is not None and replied.role == "bot" and not incoming.addressed:
                incoming = dataclasses.replace(incoming, addressed=True)  # a reply to the bot asks it
            unknown_parent = replied is None and isinstance(self._adapters.get(incoming.platform), ReadsReplies)
        key = (incoming.platform, incoming.chat_id)
        inline = [image.data for image in incoming.images if image.data is not None]
        # Defer what must be downloaded or read back from the platform, and what must wait its turn
        # behind that in its chat: the platform gets its acknowledgement now either way.
        if (len(inline) < len(incoming.images) or (self._deferred.get(key) and not inline) or unknown_parent
                or self._asks_platform(incoming)):
            inbox_id = await self._store.record_pending(incoming)
            if inbox_id is None:  # the same event raced in twice
                return await self._store.find_accepted(incoming) or Accepted(
                    incoming.message_id, (), None, duplicate=True, pending=True)
            self._intake_later(inbox_id, incoming)
            return Accepted(incoming.message_id, (), None, pending=True)
        # Checked before any image is written: a refused question leaves no trace.
        if refuse_when_busy and (incoming.addressed or incoming.images) and (refused := await self._refusal(incoming)):
            raise busy(refused)
        async with self._chat(incoming.platform, incoming.chat_id):
            images = await asyncio.to_thread(self._check_and_keep, inline) if inline else []
            return await self._take_in(incoming, images, refuse_when_busy=refuse_when_busy)

    async def _refusal(self, incoming: Incoming) -> str | None:
        """Why the question would be turned away. A refusal is remembered briefly, so that a flood of
        retries is refused without a query each (measured: 2,500 retries/s held the store's lock
        and cut throughput to a fifth). ``Store.record`` still decides, in its transaction."""
        if self._admission is None:
            return None
        now = time.monotonic()
        keys = {"queue_full": "*", "conversation_full": f"c:{incoming.platform}:{incoming.chat_id}",
                "rate_limited": f"s:{incoming.platform}:{incoming.sender_id}"}
        for reason, key in keys.items():
            if reason != "rate_limited" and not incoming.addressed:
                continue  # a message that only stores images is held to the sender's rate alone
            until = self._refused.get(key, 0.0)
            if until > now:
                return reason
        refused = await self._store.refusal(self._admission, incoming)
        if refused is not None:
            if len(self._refused) > 10_000:
                self._refused = {k: t for k, t in self._refused.items() if t > now}
            self._refused[keys[refused]] = now + _REFUSAL_MEMORY_S
        return refused

    def _intake_later(self, inbox_id: int, incoming: Incoming) -> None:
        key = (incoming.platform, incoming.chat_id)
        self._deferred[key] = self._deferred.get(key, 0) + 1

        def done(task: asyncio.Task[None]) -> None:
            self._intakes.discard(task)
            if self._deferred[key] == 1:
                del self._deferred[key]
            else:
                self._deferred[key] -= 1

        task = asyncio.create_task(self._intake(inbox_id, incoming), name=f"imsight-intake-{inbox_id}")
        self._intakes.add(task)
        task.add_done_callback(done)

    async def _intake(self, inbox_id: int, incoming: Incoming) -> None:
        # The chat's lock is asked for first thing, so a chat's messages are taken in in the order
        # they came, even when a later one has no image to wait for.
        async with self._chat(incoming.platform, incoming.chat_id):
            try:
                incoming = await self._take_in_parent(incoming)
                images, problems = await self._fetch_images(incoming)
                await self._take_in(incoming, images, inbox_id=inbox_id, problems=problems)
            except ImsightError as exc:
                log.error("%s chat %s message %s: intake failed, retried at the next start: %s",
                          incoming.platform, incoming.chat_id, incoming.message_id, exc)

    async def _fetch_images(self, incoming: Incoming) -> tuple[list[ImageInfo], list[str]]:
        """The message's images, downloaded where they did not come inline, checked and kept; and why
        any was left out (the message still counts: its text, its question)."""
        images: list[ImageInfo] = []
        problems = []
        for ref in incoming.images:
            try:
                data = ref.data if ref.data is not None else await self._download(incoming.platform, ref)
                images.extend(await asyncio.to_thread(self._check_and_keep, [data]))
            except (AdapterError, BadInput) as exc:
                log.warning("%s chat %s message %s: image %r left out: %s", incoming.platform,
                            incoming.chat_id, incoming.message_id, ref.ref, exc)
                problems.append(str(exc))
        return images, problems

    async def _take_in_parent(self, incoming: Incoming) -> Incoming:
        """A reply to a message never stored here: that message read back from the platform (now,
        after the acknowledgement), its images kept first; ``incoming`` as addressed when it replies to
        the bot. Unreadable, it is a plain message."""
        adapter = self._adapters.get(incoming.platform)
        if (not incoming.reply_to or not isinstance(adapter, ReadsReplies)
                or await self._store.message(incoming.platform, incoming.chat_id, incoming.reply_to) is not None):
            return incoming
        try:
            replied = await adapter.replied(incoming)
        except AdapterError as exc:
            log.info("%s chat %s: cannot read replied-to message %s: %s", incoming.platform, incoming.chat_id,
                     incoming.reply_to, exc)
            return incoming
        if replied is None:
            return incoming
        if replied.by_bot:
            return dataclasses.replace(incoming, addressed=True)
        if replied.message.images:
            images, _ = await self._fetch_images(replied.message)
            await self._take_in(replied.message, images)
        return incoming

    async def _download(self, platform: str, ref: ImageRef) -> bytes:
        adapter = self._adapters.get(platform)
        if adapter is None:
            raise AdapterError(platform, "adapter is not enabled", retryable=False)
        return await with_retries(lambda: adapter.download(ref), attempts=self._download_attempts,
                                  base_s=self._retry_base_s, what=f"{platform} download of {ref.ref!r}")

    async def _take_in(self, incoming: Incoming, images: Sequence[ImageInfo], *, inbox_id: int | None = None,
                       problems: Sequence[str] = (), refuse_when_busy: bool = False) -> Accepted:
        command = self._parsed(incoming)
        if command is not None:
            return await self._command(incoming, images, command, inbox_id)
        if images and self._alone(incoming):
            return await self._acknowledged(incoming, images, inbox_id)
        job = None
        if incoming.addressed and problems and not images:
            # The asker sent images and none could be taken: say so, rather than answer about another one.
            job = NewJob((), JobContext(rule=OWN, image_problems=tuple(problems)))
        elif incoming.addressed and incoming.conversation is not None:
            # The asker sent the conversation itself (stateless, as OpenAI's API): nothing is looked up.
            shas = tuple(i.sha256 for i in images)
            job = NewJob(shas, JobContext(rule=OWN if shas else NONE, max_new_tokens=incoming.max_new_tokens,
                                          given=tuple((turn.role, turn.text) for turn in incoming.conversation)))
        elif incoming.addressed:
            resolution = await resolve(
                self._store, incoming, tuple(i.sha256 for i in images),
                window_s=self._window_s, max_turns=self._history_turns,
            )
            job = resolution.as_job()
        accepted = await self._store.record(incoming, images, job, inbox_id=inbox_id, admission=self._admission,
                                            refuse_when_busy=refuse_when_busy)
        log.info("%s chat %s message %s stored (%d image(s))%s%s", incoming.platform, incoming.chat_id,
                 incoming.message_id, len(images),
                 f", job {accepted.job_id}" + (f" refused ({accepted.refused})" if accepted.refused else "")
                 if accepted.job_id else "",
                 f": {incoming.text[:200]!r}" if self._log_text and incoming.text else "")
        if accepted.refused:
            self._outbox.wake()  # the busy reply
        elif accepted.job_id and not accepted.duplicate:
            self._workers.wake()
        return accepted

    async def _command(self, incoming: Incoming, images: Sequence[ImageInfo], command: Command,
                       inbox_id: int | None) -> Accepted:
        """A chat command, answered at once; the caller holds the chat's lock."""
        name, argument = command.name, command.argument
        if name == "/images":
            reply = await self._commands.images(incoming)
        elif name == "/use":
            reply, chosen = await self._commands.chosen(incoming, argument)
            # The command carries the chosen image, so "the latest image here" is that one from now on.
            # Its row exists already: the zero sizes are never written (INSERT OR IGNORE).
            images = [*images, *(ImageInfo(sha, "", 0, 0, 0) for sha in chosen)]
        elif name == "/forget" and not await self._may_administer(incoming):
            # Checked here, for every form a command can take (/forget, @bot /forget, /forget@bot, a
            # reply to the bot, a caption): there is no other way in to the command.
            reply = "Only the group's admins can make me forget this chat."
        elif name == "/forget" and self._commands.forget_confirmed(incoming, argument):
            forgotten = await self._forget_unlocked(incoming.platform, incoming.chat_id)
            reply = ("A question here is still being answered; send /forget again when it is done."
                     if forgotten is None else f"Done: I forgot {forgotten} message(s) of this chat and their images.")
        elif name == "/forget":
            reply = ("This deletes everything I stored for this chat: its messages, images and my answers. "
                     "Send /forget yes within 5 minutes to confirm.")
        elif name == "/status":
            reply = status_text(await self.status())
        elif name in ("/help", "/start"):
            reply = COMMANDS_HELP
        else:  # a command the platform marked, that imsight does not have
            reply = f"I don't know {name}. /help says what I understand."
        return await self._reply_at_once(incoming, images, name, reply, inbox_id, f"command {name} answered")

    def _alone(self, incoming: Incoming) -> bool:
        """An image sent on its own in a direct chat, with nothing asked: kept for the question to come."""
        return (self._acknowledge_images and incoming.chat_kind == "direct" and not incoming.text.strip()
                and incoming.platform != API and incoming.conversation is None)

    async def _acknowledged(self, incoming: Incoming, images: Sequence[ImageInfo], inbox_id: int | None) -> Accepted:
        """The images kept, and one line back that invites the question (no model answer nobody asked for)."""
        count = len(images)
        reply = (f"Got {'it' if count == 1 else f'{count} images'}. What would you like to know? "
                 "Ask in your next message.")
        return await self._reply_at_once(incoming, images, "image", reply, inbox_id,
                                         f"{count} image(s) kept, the question invited")

    async def _reply_at_once(self, incoming: Incoming, images: Sequence[ImageInfo], kind: str, reply: str,
                             inbox_id: int | None, what: str) -> Accepted:
        """The message and its images stored with a reply that needs no model (``kind``: the job's
        command), handed to the outbox."""
        job = NewJob((), JobContext(command=kind), reply=reply)
        accepted = await self._store.record(incoming, images, job, inbox_id=inbox_id)
        log.info("%s chat %s message %s: %s", incoming.platform, incoming.chat_id, incoming.message_id, what)
        self._outbox.wake()
        return accepted

    async def _may_administer(self, incoming: Incoming) -> bool:
        if incoming.sender_is_admin is not None:  # the event (or the configured admins) said
            return incoming.sender_is_admin
        adapter = self._adapters.get(incoming.platform)
        if isinstance(adapter, Moderated):  # asked in intake, after the acknowledgement (see _accept)
            return await adapter.is_admin(incoming)
        return True  # nobody names admins here: /forget still asks for a confirmation

    def _asks_platform(self, incoming: Incoming) -> bool:
        """An admin command whose sender's rights only the platform can tell: a call to make after the ack."""
        command = self._parsed(incoming)
        return (command is not None and command.name == "/forget" and incoming.sender_is_admin is None
                and isinstance(self._adapters.get(incoming.platform), Moderated))

    @staticmethod
    def _parsed(incoming: Incoming) -> Command | None:
        if not incoming.addressed or incoming.platform == API or incoming.conversation is not None:
            return None  # the APIs take no chat commands
        return parse_command(incoming.text, incoming.command)

    def _check_and_keep(self, blobs: list[bytes]) -> list[ImageInfo]:
        """Decode every image (CPU work, so on a thread), then write them: all or, if one is bad, none."""
        infos = [inspect(data, self._image_limits) for data in blobs]
        for info, data in zip(infos, blobs, strict=True):
            self._files.put(info.sha256, data)
        return infos

    @asynccontextmanager
    async def _chat(self, platform: str, chat_id: str) -> AsyncIterator[None]:
        """One intake at a time per chat, first come first served; the lock goes when unused."""
        key = (platform, chat_id)
        lock, users = self._chat_locks.get(key, (asyncio.Lock(), 0))
        self._chat_locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._chat_locks[key]
            if users == 1:
                del self._chat_locks[key]
            else:
                self._chat_locks[key] = (lock, users - 1)

    async def job(self, job_id: str) -> JobView:
        view = await self._store.job_view(job_id)
        if view is None:
            raise NotFound(f"no job {job_id!r}")
        return view

    async def wait_for_job(self, job_id: str, timeout_s: float) -> JobView:
        """The job once it is done or failed, or as it is after ``timeout_s`` seconds."""
        ended = self._watch.subscribe(job_id)  # before the first look, so no ending is missed
        try:
            async with asyncio.timeout(timeout_s):
                while (await self.job(job_id)).status not in _TERMINAL and not self._watch.closed:
                    await ended.wait()
                    ended.clear()
        except TimeoutError:
            pass
        finally:
            self._watch.unsubscribe(job_id, ended)
        return await self.job(job_id)

    async def history(self, platform: str, chat_id: str, limit: int) -> Sequence[HistoryEntry]:
        return await self._store.history(platform, chat_id, limit)

    async def forget(self, platform: str, chat_id: str) -> int | None:
        """Delete everything stored for one chat; ``None`` while one of its questions is being answered."""
        async with self._chat(platform, chat_id):  # no intake of this chat meanwhile
            return await self._forget_unlocked(platform, chat_id)

    async def _forget_unlocked(self, platform: str, chat_id: str) -> int | None:
        result = await self._store.retention.forget_chat(platform, chat_id)
        if result is None:
            return None
        await asyncio.to_thread(self._delete_files, result.orphans)
        log.info("%s chat %s forgotten: %d message(s), %d image file(s)", platform, chat_id, result.messages,
                 len(result.orphans))
        return result.messages

    def _delete_files(self, shas: Sequence[str]) -> None:
        for sha in shas:
            self._files.delete(sha)

    async def status(self) -> Status:
        queued, running = await self._store.queue_counts()
        engine = self._workers.engine
        return Status(engine=engine.name, model=engine.model, queued=queued, running=running)
