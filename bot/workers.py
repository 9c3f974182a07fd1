"""Workers take jobs from the queue, ask the engine, and deliver the answer through the adapter."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from adapters.base import Adapter, Drafting
from bot.files import ImageFiles
from bot.job_context import JobContext
from bot.metrics import Metrics
from bot.outbox import Outbox
from bot.store import JobRecord, Store
from bot.watch import JobWatch
from core.engine import Engine, GenerationLimits, PreparedImage, Turn, Usage
from core.errors import EngineError, EngineOutOfMemory, EngineUnavailable, ImsightError, RateLimited
from core.images import FORMATS_NOTE, NOT_AN_IMAGE, ImageLimits, prepare

__all__ = ["Workers"]

log = logging.getLogger(__name__)

ASK_FOR_IMAGE = "Which image do you mean? Send it with your question, or reply to it."
ENGINE_AWAY = "The model server is not reachable at the moment. I'll answer as soon as it is back."
SORRY = "Sorry, I could not answer that. The model failed; please try again later."
ENGINE_GONE = "Sorry, the model server has been unreachable for too long. Please ask again later."
_IDLE_POLL_S = 5.0  # a backstop only: new jobs wake the workers at once


class Workers:
    """A fixed number of tasks answering jobs; each conversation's jobs in order.

    A worker's part ends when the reply is committed to the outbox, which sends it.
    """

    def __init__(
        self,
        store: Store,
        files: ImageFiles,
        engine: Engine,
        adapters: Mapping[str, Adapter],
        outbox: Outbox,
        watch: JobWatch,
        *,
        count: int,
        image_limits: ImageLimits,
        generation: GenerationLimits,
        ask_for_image: bool,
        job_timeout_s: float = 600.0,
        engine_retry_s: float = 1800.0,
        retry_base_s: float = 5.0,
        draft_every_s: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._store, self._files, self._engine = store, files, engine
        self._adapters, self._outbox, self._watch = adapters, outbox, watch
        self._count = count
        self._image_limits, self._generation = image_limits, generation
        self._ask_for_image = ask_for_image
        self._job_timeout_s, self._engine_retry_s, self._retry_base_s = job_timeout_s, engine_retry_s, retry_base_s
        self._draft_every_s = draft_every_s
        self._metrics = metrics or Metrics()
        self._wakeups: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        requeued = await self._store.requeue_running()
        if requeued:
            log.info("requeued %d job(s) that were running when the daemon last stopped", requeued)
        self._wakeups = [asyncio.Event() for _ in range(self._count)]
        self._outbox.on_sent.extend(self._wakeups)  # a sent answer frees its conversation's next job
        self._tasks = [
            asyncio.create_task(self._loop(wakeup), name=f"imsight-worker-{n}")
            for n, wakeup in enumerate(self._wakeups)
        ]

    @property
    def engine(self) -> Engine:
        return self._engine

    def wake(self) -> None:
        for wakeup in self._wakeups:
            wakeup.set()

    async def stop(self, grace_s: float) -> None:
        """Take no new job; give the jobs in flight ``grace_s`` to finish, then cancel them.

        A cancelled job stays 'running' in the store and runs again after the next start.
        """
        self._stopping = True
        self.wake()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if pending:
            log.warning("%d job(s) cut off by shutdown; they run again after the next start", len(pending))

    async def _loop(self, wakeup: asyncio.Event) -> None:
        while not self._stopping:
            wakeup.clear()  # before looking, so a wake() during the look is not lost
            try:
                job = await self._store.claim_next()
                wait = _IDLE_POLL_S
                if job is None and (until := await self._store.waiting_until()) is not None:
                    wait = min(_IDLE_POLL_S, max(0.05, until - time.time()))  # a job backing off
            except ImsightError:
                log.exception("cannot read the job queue; retrying")
                job, wait = None, _IDLE_POLL_S
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), wait)
                continue
            try:
                await self._process(job)
            except Exception:
                # A bug must not kill the worker, nor loop on the same job forever; the asker hears of it.
                log.exception("job %s: unexpected error", job.id)
                with contextlib.suppress(ImsightError):
                    await self._store.answered(job, SORRY, error="internal error")
                    self._outbox.wake()
            self.wake()  # the conversation's next job may run now

    async def _process(self, job: JobRecord) -> None:
        started = time.monotonic()
        q = job.question
        error = None
        usage = Usage()
        try:
            answer = job.answer
            if answer is None:
                async with asyncio.timeout(self._job_timeout_s):
                    answer = await self._ask(job, usage)
            text = _with_about(answer, job.context)
        except EngineUnavailable as exc:
            waited = time.time() - q.created_at
            if waited < self._engine_retry_s:
                delay = min(60.0, self._retry_base_s * 2 ** (job.attempts - 1))
                log.warning("job %s (%s chat %s): %s; trying again in %.0fs", job.id, q.platform, q.chat_id, exc, delay)
                await self._store.retry_later(job, delay, notice=ENGINE_AWAY)
                self._outbox.wake()
                return
            error, text = str(exc), ENGINE_GONE
        except TimeoutError:
            error = f"no answer within {self._job_timeout_s:g}s"
            text = (f"Sorry, answering took longer than {self._job_timeout_s:g} seconds, so I stopped. "
                    "Please try again, perhaps with a shorter question.")
        except EngineOutOfMemory as exc:
            error, text = str(exc), ("Sorry, the model ran out of GPU memory on this, even with the image "
                                     "scaled down. Please try a smaller image or fewer images.")
        except ImsightError as exc:
            error, text = str(exc), SORRY
        if error is not None:
            log.warning("job %s (%s chat %s message %s) failed: %s", job.id, q.platform, q.chat_id, q.message_id,
                        error)
        counted = (usage.prompt_tokens, usage.completion_tokens) if usage.prompt_tokens else None
        await self._store.answered(job, text, error=error, usage=counted)
        self._outbox.wake()
        log.info("job %s %s in %.2fs (%s chat %s; %d prompt + %d answer tokens%s)", job.id,
                 "failed" if error else "answered", time.monotonic() - started, q.platform, q.chat_id,
                 usage.prompt_tokens, usage.completion_tokens, _engine_timing(usage))

    async def _ask(self, job: JobRecord, usage: Usage) -> str:
        if problems := job.context.image_problems:
            if problems[0].startswith(NOT_AN_IMAGE):
                return f"I could not read the file you sent as an image. {FORMATS_NOTE}"
            return f"I could not take the image you sent ({problems[0]}). Please send it again."
        if not job.images and self._ask_for_image:
            return ASK_FOR_IMAGE
        images = await asyncio.to_thread(self._prepare, job.images)
        context = job.context
        if context.given:  # the turns the asker sent
            turns = [Turn("assistant" if role == "assistant" else "user", text) for role, text in context.given]
        else:
            turns = [Turn("assistant" if m.role == "bot" else "user", m.text)
                     for m in await self._store.messages_by_row(list(context.turns))]
        limits = self._generation
        if context.max_new_tokens:
            limits = GenerationLimits(min(context.max_new_tokens, limits.max_new_tokens))
        draft = self._drafter(job)
        chunks: list[str] = []
        started = shown = time.monotonic()
        await draft("")
        async for chunk in self._engine.answer(images, turns, job.question.text, limits, usage):
            if not chunks:
                self._metrics.first_token_seconds.observe(time.monotonic() - started)
            chunks.append(chunk)
            self._metrics.answer_chunks.inc()
            if time.monotonic() - shown >= self._draft_every_s:
                shown = time.monotonic()
                await draft("".join(chunks).strip())
        self._metrics.answer_seconds.observe(time.monotonic() - started)
        return "".join(chunks).strip() or "(the model gave an empty answer)"

    def _drafter(self, job: JobRecord) -> Callable[[str], Awaitable[None]]:
        """Shows the answer so far where the platform can (best effort: the final send still delivers)."""
        adapter = self._adapters.get(job.question.platform)
        q = job.question
        draft_id = job.draft_id

        async def draft(text: str) -> None:
            nonlocal draft_id
            if not isinstance(adapter, Drafting) or self._outbox.wait_s(q.platform, q.chat_id) > 0:
                return  # a draft is best effort: skipped while the platform asked this chat to wait
            try:
                shown = await adapter.draft(dataclasses.replace(job.reply(text), draft_id=draft_id))
                if shown is not None and shown != draft_id:
                    draft_id = shown
                    await self._store.drafted(job.id, shown)
            except RateLimited as exc:
                self._outbox.hold(q.platform, q.chat_id, exc.retry_after_s)
                log.info("job %s: draft not shown: %s", job.id, exc)
            except Exception as exc:
                log.info("job %s: draft not shown: %s", job.id, exc)

        return draft

    def _prepare(self, shas: tuple[str, ...]) -> list[PreparedImage]:
        try:
            return [PreparedImage(sha, prepare(self._files.read(sha), self._image_limits)) for sha in shas]
        except OSError as exc:
            raise EngineError(f"a stored image is missing: {exc}") from exc


def _with_about(answer: str, context: JobContext) -> str:
    """Say which image the answer is about when it was not in the question's own message."""
    if context.about is None:
        return answer
    when = time.strftime("%H:%M", time.localtime(context.about.created_at))
    return f"About the image {context.about.sender_name or 'someone'} posted at {when}: {answer}"


def _engine_timing(usage: Usage) -> str:
    """Where the engine says the answer's time went, for the job's log line ("" where it cannot tell):
    an answer that came slowly because others were prefilled first says so."""
    if not usage.first_token_s:
        return ""
    return (f"; first token after {usage.first_token_s:.2f}s, prefilled ({usage.prefill or 'unknown'}) "
            f"after waiting {usage.waited_s:.2f}s")
