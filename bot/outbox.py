"""The outbox: replies are committed first, then sent, each conversation's in order.

A failed send is retried with backoff on its own schedule, so a platform that is down holds up
only its own conversations. A reply is marked sent, with the platform's message id, right after
the platform accepts it; a crash between the two sends it once more on the next start (adapters
pass the reply's stable id as an idempotency key where the platform takes one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Mapping

from adapters.base import Adapter
from bot.metrics import Metrics
from bot.store import OutgoingReply, Store
from bot.watch import JobWatch
from core.errors import AdapterError, ImsightError, RateLimited

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

_IDLE_POLL_S = 5.0  # a backstop only: new replies wake the sender at once


class Outbox:
    def __init__(
        self,
        store: Store,
        adapters: Mapping[str, Adapter],
        watch: JobWatch,
        *,
        attempts: int,
        retry_base_s: float = 1.0,
        retry_max_s: float = 300.0,
        concurrency: int = 16,
        metrics: Metrics | None = None,
    ) -> None:
        self._store, self._adapters, self._watch = store, adapters, watch
        self._attempts, self._retry_base_s, self._retry_max_s = attempts, retry_base_s, retry_max_s
        self._concurrency = concurrency
        self._metrics = metrics or Metrics()
        self._wakeup = asyncio.Event()
        self._sending: dict[int, tuple[str, asyncio.Task[None]]] = {}  # reply id -> (platform, its send)
        self._ended = 0  # sends ended so far
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.on_sent: list[asyncio.Event] = []  # set after each answer is sent (workers: next job may run)
        # (platform, chat) -> monotonic time before which the platform asked not to be called for it
        self._not_before: dict[tuple[str, str], float] = {}

    def hold(self, platform: str, chat_id: str, seconds: float) -> None:
        """The platform said "too many requests" for this chat: no call to it before ``seconds`` from now."""
        until = time.monotonic() + seconds
        key = (platform, chat_id)
        self._not_before[key] = max(until, self._not_before.get(key, 0.0))
        if len(self._not_before) > 10_000:
            now = time.monotonic()
            self._not_before = {k: t for k, t in self._not_before.items() if t > now}

    def wait_s(self, platform: str, chat_id: str) -> float:
        """How long calls for this chat must still wait (0: call now)."""
        return max(0.0, self._not_before.get((platform, chat_id), 0.0) - time.monotonic())

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="imsight-outbox")

    def wake(self) -> None:
        self._wakeup.set()

    async def stop(self, grace_s: float) -> None:
        """Send nothing new; give sends in flight ``grace_s``. Unsent replies wait for the next start."""
        self._stopping = True
        self.wake()
        if self._loop_task is not None:
            await self._loop_task
        if self._sending:
            _, pending = await asyncio.wait([task for _, task in self._sending.values()], timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            self._wakeup.clear()  # before looking, so a wake() during the look is not lost
            try:
                ended = self._ended
                # Slots are per platform: callbacks that hang, or a platform that is down, cannot hold
                # up the answers of another.
                per_platform = Counter(p for p, _ in self._sending.values())
                full = [p for p, n in per_platform.items() if n >= self._concurrency]
                due_now = await self._store.due_replies(self._concurrency * 4, skip=list(self._sending), full=full)
                if ended != self._ended:
                    continue  # a send ended during the look: what was read may be sent already
                for reply in due_now:
                    platform = reply.job.question.platform
                    if reply.id not in self._sending and per_platform[platform] < self._concurrency:
                        per_platform[platform] += 1
                        task = asyncio.create_task(self._send(reply), name=f"imsight-send-{reply.id}")
                        self._sending[reply.id] = (platform, task)
                        task.add_done_callback(self._done)
                due = await self._store.next_reply_at()
            except ImsightError:
                log.exception("cannot read the outbox; retrying")
                due = None
            # A head that is due now is being sent: its end wakes the loop.
            wait = _IDLE_POLL_S if due is None or due <= time.time() else min(_IDLE_POLL_S, due - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._sending = {rid: sent for rid, sent in self._sending.items() if sent[1] is not task}
        self._ended += 1
        self.wake()  # the conversation's next reply may go now

    async def _send(self, reply: OutgoingReply) -> None:
        job, q = reply.job, reply.job.question
        notice = reply.kind != "answer"
        out = job.reply(reply.text, failed=reply.failed, notice=notice)
        try:
            adapter = self._adapters.get(q.platform)
            if adapter is None:
                raise AdapterError(q.platform, "adapter is not enabled", retryable=False)
            if (wait := self.wait_s(q.platform, q.chat_id)) > 0:
                await asyncio.sleep(wait)  # a 429 on this chat (a draft's, say) still holds: ours, not the platform's
            sent_id = await adapter.send(out)
        except RateLimited as exc:
            self.hold(q.platform, q.chat_id, exc.retry_after_s)
            await self._failed(reply, exc, retryable=True, at_least_s=exc.retry_after_s)
            return
        except AdapterError as exc:
            await self._failed(reply, exc, retryable=exc.retryable)
            return
        except Exception as exc:  # a bug in an adapter must not stop the outbox
            log.exception("job %s: sending the reply failed unexpectedly", job.id)
            await self._failed(reply, exc, retryable=False)
            return
        try:
            await self._store.reply_sent(reply, sent_id)
        except ImsightError:
            # Sent but not recorded: it goes again after a restart (the one duplicate allowed).
            log.exception("job %s: reply sent as %s but not recorded", job.id, sent_id)
            return
        if reply.kind == "answer":
            if job.status != "failed":  # a refusal was counted when it was refused
                self._metrics.jobs.labels("failed" if reply.failed else "done").inc()
            log.info("job %s reply sent as %s (%s chat %s)", job.id, sent_id, q.platform, q.chat_id)
            self._watch.notify(job.id)
            for event in self.on_sent:
                event.set()

    async def _failed(self, reply: OutgoingReply, exc: Exception, *, retryable: bool, at_least_s: float = 0.0
                      ) -> None:
        job = reply.job
        tries = reply.attempts + 1
        retry_at = None
        if retryable and tries < self._attempts:
            delay = max(at_least_s, min(self._retry_max_s, self._retry_base_s * 2 ** (tries - 1)))
            retry_at = time.time() + delay
            log.info("job %s: send failed (%s); try %d of %d in %.1fs", job.id, exc, tries + 1, self._attempts, delay)
        else:
            log.warning("job %s: reply not delivered after %d tries: %s", job.id, tries, exc)
        try:
            await self._store.reply_failed(reply, str(exc), retry_at=retry_at)
        except ImsightError:
            log.exception("job %s: cannot record the failed send; it is tried again", job.id)
            return
        if retry_at is None and reply.kind == "answer":
            if job.status != "failed":
                self._metrics.jobs.labels("failed").inc()
            self._watch.notify(job.id)
            for event in self.on_sent:
                event.set()
