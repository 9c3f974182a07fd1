"""Who may queue a question now: the global queue bound, a per-conversation bound, a per-sender rate.

The check runs inside the transaction that would queue the job, so concurrent questions cannot
overshoot a bound together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiosqlite

from core.errors import Busy

__all__ = ["Admission", "busy", "busy_reply"]

@dataclass(frozen=True, slots=True)
class Admission:
    """The bounds; 0 turns one off."""

    max_queued: int = 0
    max_per_conversation: int = 0
    sender_per_minute: int = 0

    async def refusal(self, db: aiosqlite.Connection, conversation: str, platform: str, sender_id: str, *,
                      question: bool = True, itself: int | None = None) -> str | None:
        """Why a new question (or, ``question`` False, a message that only stores images) must be turned
        away now, or None when it may be taken. Stored images count toward the sender's rate too: each
        one costs disk. ``itself``: the question's own message row, when it is already written (it does
        not count against itself)."""
        if question and self.max_queued and await _count(
                db, "SELECT count(*) FROM jobs WHERE status = 'queued'") >= self.max_queued:
            return "queue_full"
        if question and self.max_per_conversation and await _count(
            db, "SELECT count(*) FROM jobs WHERE conversation = ? AND status IN ('queued', 'running')", conversation,
        ) >= self.max_per_conversation:
            return "conversation_full"
        if self.sender_per_minute and sender_id and await _count(
            db,
            "SELECT count(*) FROM messages m WHERE m.platform = ? AND m.sender_id = ? AND m.created_at > ? "
            "AND m.id IS NOT ? AND (EXISTS (SELECT 1 FROM jobs j WHERE j.question = m.id AND j.refused IS NULL) OR "
            "EXISTS (SELECT 1 FROM message_images i WHERE i.message = m.id))",
            platform, sender_id, time.time() - 60, itself,
        ) >= self.sender_per_minute:
            return "rate_limited"
        return None


_REPLIES = {
    "queue_full": "I'm busy right now with many questions. Please try again in a minute.",
    "conversation_full": "I'm still working on earlier questions in this chat. Please try again in a minute.",
    "rate_limited": "You're asking faster than I can answer. Please try again in a minute.",
}


# When to ask again (HTTP Retry-After): a full queue drains in seconds at GPU speed; the rate is per minute.
_RETRY_AFTER_S = {"queue_full": 10, "conversation_full": 10, "rate_limited": 60}


def busy_reply(reason: str) -> str:
    """What the asker is told when a question is turned away."""
    return _REPLIES.get(reason, _REPLIES["queue_full"])


def busy(reason: str) -> Busy:
    """The refusal for a caller that can be answered at once (HTTP 429)."""
    return Busy(busy_reply(reason), retry_after_s=_RETRY_AFTER_S.get(reason, 60))


async def _count(db: aiosqlite.Connection, sql: str, *args: object) -> int:
    rows = list(await db.execute_fetchall(sql, args))
    return int(rows[0][0])
