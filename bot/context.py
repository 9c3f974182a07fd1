"""Which images a question is about, and which earlier turns go with it (DESIGN.md's five rules)."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.base import Incoming
from bot.job_context import About, JobContext
from bot.store import JobRecord, NewJob, Store, StoredMessage

__all__ = ["Resolution", "resolve"]

OWN, REPLY, THREAD, RECENT, NONE = 1, 2, 3, 4, 5


@dataclass(frozen=True, slots=True)
class Resolution:
    rule: int
    images: tuple[str, ...]
    turns: tuple[int, ...]  # message rows of earlier questions and answers, oldest first
    # Who posted the images and when, when that was not the question's own message.
    about: About | None = None

    def as_job(self) -> NewJob:
        return NewJob(self.images, JobContext(rule=self.rule, turns=self.turns, about=self.about))


def _about(message: StoredMessage) -> About:
    return About(message.sender_name or message.sender_id, message.created_at)


async def resolve(
    store: Store, incoming: Incoming, own_images: tuple[str, ...], *, window_s: float, max_turns: int
) -> Resolution:
    """First match wins: own images, the replied-to message, the thread, recent images, none."""
    keep = 2 * max_turns  # a turn is a question and its answer

    def turns_after(job: JobRecord | None, answer_row: int | None) -> tuple[int, ...]:
        if job is None or answer_row is None or keep == 0:
            return ()
        earlier = job.context.turns
        return (*earlier, job.question.row, answer_row)[-keep:]

    async def with_history(rule: int, images: tuple[str, ...], source: StoredMessage | None) -> Resolution:
        # Earlier questions about the same images in the same place become the conversation so far.
        previous = await store.latest_done_job(incoming.platform, incoming.chat_id, images, incoming.thread_id)
        answer = await store.answer_row(previous.id) if previous else None
        return Resolution(rule, images, turns_after(previous, answer), _about(source) if source else None)

    # 1. Images in the question's own message.
    if own_images:
        return await with_history(OWN, own_images, None)

    # 2. The message it replies to; a bot answer brings its images and its thread of turns.
    if incoming.reply_to:
        replied = await store.message(incoming.platform, incoming.chat_id, incoming.reply_to)
        if replied is not None:
            job = await store.job_of(replied)
            if replied.role == "bot" and job is not None and job.images:
                about = job.context.about or _about(job.question)
                return Resolution(REPLY, job.images, turns_after(job, replied.row), about)
            if replied.images:
                answer = await store.answer_row(job.id) if job else None
                return Resolution(REPLY, replied.images, turns_after(job, answer), _about(replied))
            if job is not None and job.images:
                answer = await store.answer_row(job.id)
                about = job.context.about or _about(job.question)
                return Resolution(REPLY, job.images, turns_after(job, answer), about)

    # 3. Images posted earlier in the same thread or topic.
    now = incoming.received_at
    if incoming.thread_id:
        found = await store.latest_with_images(incoming.platform, incoming.chat_id, thread_id=incoming.thread_id)
        if found is not None:
            return await with_history(THREAD, found.images, found)

    # 4. The latest image in the chat within the window: the asker's own first, then anyone's.
    window = (now - window_s, now)
    for sender in ([incoming.sender_id, None] if incoming.sender_id else [None]):
        found = await store.latest_with_images(incoming.platform, incoming.chat_id, between=window, sender_id=sender)
        if found is not None:
            return await with_history(RECENT, found.images, found)

    # 5. Nothing to look at.
    return Resolution(NONE, (), ())
