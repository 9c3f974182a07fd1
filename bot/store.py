"""The history store: images, messages, the inbox and the job queue, in one SQLite file (WAL)."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from adapters.base import Accepted, HistoryEntry, ImageRef, Incoming, JobView, Reply
from bot.admission import Admission, busy, busy_reply
from bot.database import Database, conditions, conversation_key, split_shas
from bot.job_context import JobContext
from bot.store_retention import Purged, RetentionQueries
from core.engine import Turn
from core.errors import Conflict
from core.images import ImageInfo

__all__ = ["ChatSummary", "JobRecord", "NewJob", "OutgoingReply", "Purged", "QuestionView", "Store", "StoredMessage"]

# The SHA-256 digests of a message's (or a job's) images, in order, as one comma-separated column.
_MESSAGE_SHAS = ("(SELECT group_concat(sha256) FROM (SELECT sha256 FROM message_images "
                 "WHERE message = m.id ORDER BY position))")
_JOB_SHAS = "(SELECT group_concat(sha256) FROM (SELECT sha256 FROM job_images WHERE job = {} ORDER BY position))"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    row: int
    platform: str
    chat_id: str
    message_id: str
    thread_id: str | None
    reply_to: str | None
    sender_id: str
    sender_name: str
    role: str
    text: str
    created_at: float
    images: tuple[str, ...]
    job_id: str | None  # bot messages: the job they answer
    meta: dict[str, str]  # the adapter's own facts about the message (``Incoming.meta``)


@dataclass(frozen=True, slots=True)
class NewJob:
    """A question's resolved context, to be queued with it."""

    images: tuple[str, ...]
    context: JobContext = field(default_factory=JobContext)
    reply: str | None = None  # answered already (a chat command): goes straight to the outbox


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job with what answering and delivering it needs."""

    id: str
    status: str
    attempts: int
    question: StoredMessage
    images: tuple[str, ...]
    context: JobContext
    answer: str | None
    draft_id: str | None = None  # the placeholder the platform shows while it is answered
    usage: tuple[int, int] | None = None  # prompt and answer tokens, once answered (where counted)

    def reply(self, text: str, *, failed: bool = False, notice: bool = False) -> Reply:
        """``text`` as this job's reply to its question: the one way a ``Reply`` is made."""
        q = self.question
        return Reply(q.platform, q.chat_id, self.id, q.message_id, q.thread_id, text, self.images, failed=failed,
                     meta=q.meta, notice=notice, draft_id=None if notice else self.draft_id,
                     usage=None if notice else self.usage, retried=self.attempts > 1)


@dataclass(frozen=True, slots=True)
class ChatSummary:
    platform: str
    chat_id: str
    messages: int
    images: int
    last_at: float


@dataclass(frozen=True, slots=True)
class QuestionView:
    text: str
    asker: str
    asked_at: float
    status: str
    images: tuple[str, ...]  # what it was about
    answer: str | None  # as delivered
    error: str | None
    answered_at: float | None


@dataclass(frozen=True, slots=True)
class OutgoingReply:
    """A reply waiting in the outbox."""

    id: int
    kind: str  # 'answer' closes its job once sent; a 'notice' does not
    job: JobRecord
    text: str
    failed: bool
    attempts: int


class Store:
    """All SQL lives here (what deletes: ``retention``, in ``bot.store_retention``), on one ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.retention = RetentionQueries(db)

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, lock_timeout_s: float = 5.0) -> AsyncIterator[Store]:
        async with Database.open(path, lock_timeout_s=lock_timeout_s) as db:
            yield cls(db)

    # ---- intake -------------------------------------------------------------------------

    async def find_accepted(self, incoming: Incoming) -> Accepted | None:
        """What was made of this event or message when it first came, if it came before."""
        rows = await self._db.rows(
            "SELECT i.message_id, i.processed_at, i.event_id, "
            f"json_extract(i.payload, '$.fingerprint') AS fingerprint, {_MESSAGE_SHAS} AS shas, "
            "(SELECT id FROM jobs WHERE question = m.id ORDER BY seq LIMIT 1) AS job_id "
            "FROM inbox i LEFT JOIN messages m ON m.platform = i.platform AND m.chat_id = i.chat_id "
            "AND m.message_id = i.message_id "
            "WHERE i.platform = ? AND (i.event_id = ? OR (i.chat_id = ? AND i.message_id = ?)) LIMIT 1",
            incoming.platform, _event_id(incoming), incoming.chat_id, incoming.message_id,
        )
        if not rows:
            return None
        r = rows[0]
        reused = incoming.fingerprint and r["event_id"] == incoming.event_id
        if reused and r["fingerprint"] not in (None, incoming.fingerprint):
            raise Conflict(f"event id {incoming.event_id!r} was used before for another message: "
                           "send a new id for a new message")
        pending = r["processed_at"] is None
        return Accepted(r["message_id"], split_shas(r["shas"]), r["job_id"], duplicate=True, pending=pending)

    async def refusal(self, admission: Admission, incoming: Incoming) -> str | None:
        """Why a question would be turned away now (``record`` decides again, in its transaction)."""
        async with self._db.reading() as conn:
            return await admission.refusal(conn, conversation_key(incoming.platform, incoming.chat_id),
                                           incoming.platform, incoming.sender_id, question=incoming.addressed)

    async def record_pending(self, incoming: Incoming) -> int | None:
        """Commit an event whose images are still to be downloaded; None if it came before."""
        try:
            async with self._db.write() as db:
                return await _insert_inbox(db, incoming, processed_at=None)
        except sqlite3.IntegrityError:
            return None

    async def pending(self) -> list[tuple[int, Incoming]]:
        """Events acknowledged but not taken in yet (the daemon stopped mid-download)."""
        rows = await self._db.rows("SELECT id, payload FROM inbox WHERE processed_at IS NULL ORDER BY id")
        return [(r["id"], _incoming_from_json(json.loads(r["payload"]))) for r in rows]

    async def record(
        self, incoming: Incoming, images: Sequence[ImageInfo], job: NewJob | None, *, inbox_id: int | None = None,
        admission: Admission | None = None, refuse_when_busy: bool = False,
    ) -> Accepted:
        """Store an event, its images, its message and its job in one transaction.

        ``inbox_id`` names the event's row when it was committed earlier by ``record_pending``.
        A job that ``admission`` turns away is stored as refused, with its busy reply in the
        outbox; with ``refuse_when_busy``, ``Busy`` is raised instead and nothing is stored.
        """
        now = time.time()
        conversation = conversation_key(incoming.platform, incoming.chat_id)
        refused = None
        try:
            async with self._db.write() as db:
                if inbox_id is None:
                    await _insert_inbox(db, incoming, processed_at=now)
                else:
                    await db.execute("UPDATE inbox SET processed_at = ? WHERE id = ?", (now, inbox_id))
                if images:
                    await db.executemany(
                        "INSERT OR IGNORE INTO images (sha256, mime, width, height, size, first_seen) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [(i.sha256, i.mime, i.width, i.height, i.size, now) for i in images],
                    )
                row = await self._insert_message(
                    db, incoming.platform, incoming.chat_id, incoming.message_id, incoming.thread_id,
                    incoming.reply_to, incoming.sender_id, incoming.sender_name, "user", incoming.text,
                    None, dict(incoming.meta), incoming.received_at, [i.sha256 for i in images],
                )
                job_id = None
                if job is not None:
                    if admission is not None and job.reply is None:
                        refused = await admission.refusal(db, conversation, incoming.platform, incoming.sender_id,
                                                          itself=row)
                    if refused and refuse_when_busy:
                        raise busy(refused)
                    job_id = uuid.uuid4().hex
                    # Refused: closed now; answered already: running until its reply is sent; else queued.
                    status = "failed" if refused else "running" if job.reply is not None else "queued"
                    await db.execute(
                        "INSERT INTO jobs (id, question, conversation, status, context, created_at, refused, error, "
                        "answer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, row, conversation, status, job.context.to_json(), now,
                         refused, f"refused: {refused}" if refused else None, job.reply),
                    )
                    if refused or job.reply is not None:
                        reply = busy_reply(refused) if refused else str(job.reply)
                        await self._queue_reply(db, job_id, "answer", conversation, reply, failed=bool(refused))
                    if job.images:
                        await db.executemany(
                            "INSERT INTO job_images (job, position, sha256) VALUES (?, ?, ?)",
                            [(job_id, n, sha) for n, sha in enumerate(job.images)],
                        )
        except sqlite3.IntegrityError:
            # The same event or message raced in twice; the first one won.
            again = await self.find_accepted(incoming)
            if again is None:
                raise
            return again
        return Accepted(incoming.message_id, tuple(i.sha256 for i in images), job_id, refused=refused)

    async def _insert_message(
        self, db: aiosqlite.Connection, platform: str, chat_id: str, message_id: str,
        thread_id: str | None, reply_to: str | None, sender_id: str, sender_name: str, role: str,
        text: str, job_id: str | None, meta: dict[str, str], created_at: float, images: Sequence[str],
    ) -> int:
        cursor = await db.execute(
            "INSERT INTO messages (platform, chat_id, message_id, thread_id, reply_to, sender_id, "
            "sender_name, role, text, job_id, meta, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (platform, chat_id, message_id, thread_id, reply_to, sender_id, sender_name, role, text, job_id,
             json.dumps(meta, ensure_ascii=False), created_at),
        )
        row = cursor.lastrowid
        assert row is not None
        if images:
            await db.executemany(
                "INSERT INTO message_images (message, position, sha256) VALUES (?, ?, ?)",
                [(row, n, sha) for n, sha in enumerate(images)],
            )
        return row

    # ---- messages -----------------------------------------------------------------------

    async def message(self, platform: str, chat_id: str, message_id: str) -> StoredMessage | None:
        found = await self._messages("m.platform = ? AND m.chat_id = ? AND m.message_id = ?",
                                     platform, chat_id, message_id)
        return found[0] if found else None

    async def messages_by_row(self, rows: Sequence[int]) -> list[StoredMessage]:
        if not rows:
            return []
        marks = ",".join("?" * len(rows))
        by_row = {m.row: m for m in await self._messages(f"m.id IN ({marks})", *rows)}
        return [by_row[r] for r in rows if r in by_row]

    async def latest_with_images(
        self, platform: str, chat_id: str, *, thread_id: str | None = None,
        between: tuple[float, float] | None = None, sender_id: str | None = None,
    ) -> StoredMessage | None:
        """The newest user message with images in a chat, in a thread or a time window."""
        where, args = conditions(
            ("m.platform = ?", platform), ("m.chat_id = ?", chat_id), ("m.role = 'user'", ()),
            ("EXISTS (SELECT 1 FROM message_images x WHERE x.message = m.id)", ()),
            ("m.thread_id = ?", thread_id), ("m.created_at BETWEEN ? AND ?", between), ("m.sender_id = ?", sender_id),
        )
        # Newest first along an index, so the scan stops at the first match (or the window's edge).
        order = "m.created_at DESC, m.id DESC" if between is not None else "m.id DESC"
        found = await self._messages(f"{where} ORDER BY {order} LIMIT 1", *args)
        return found[0] if found else None

    async def _messages(self, where: str, *args: Any) -> list[StoredMessage]:
        rows = await self._db.rows(
            f"SELECT m.*, {_MESSAGE_SHAS} AS shas FROM messages m WHERE " + where,
            *args,
        )
        return [
            StoredMessage(
                r["id"], r["platform"], r["chat_id"], r["message_id"], r["thread_id"], r["reply_to"],
                r["sender_id"], r["sender_name"], r["role"], r["text"], r["created_at"],
                split_shas(r["shas"]), r["job_id"], json.loads(r["meta"]),
            )
            for r in rows
        ]

    async def recent_images(
        self, platform: str, chat_id: str, thread_id: str | None, limit: int
    ) -> list[tuple[str, StoredMessage]]:
        """The chat's (or thread's) distinct images from its newest ``limit`` messages with images, oldest
        first, each with the message that brought it first among those."""
        where, args = conditions(("m.platform = ?", platform), ("m.chat_id = ?", chat_id), ("m.role = 'user'", ()),
                                 ("m.thread_id = ?", thread_id),
                                 ("EXISTS (SELECT 1 FROM message_images x WHERE x.message = m.id)", ()))
        newest = await self._messages(f"{where} ORDER BY m.id DESC LIMIT ?", *args, limit)
        seen: dict[str, StoredMessage] = {}
        for message in reversed(newest):
            for sha in message.images:
                seen.setdefault(sha, message)
        return list(seen.items())

    async def chats(self, limit: int) -> list[ChatSummary]:
        """The chats with stored messages, most recently active first."""
        rows = await self._db.rows(
            "SELECT m.platform, m.chat_id, count(DISTINCT m.id) AS messages, count(DISTINCT mi.sha256) AS images, "
            "max(m.created_at) AS last FROM messages m LEFT JOIN message_images mi ON mi.message = m.id "
            "GROUP BY m.platform, m.chat_id ORDER BY last DESC LIMIT ?", limit)
        return [ChatSummary(r["platform"], r["chat_id"], r["messages"], r["images"], r["last"]) for r in rows]

    async def questions(self, platform: str, chat_id: str, limit: int) -> list[QuestionView]:
        """A chat's newest ``limit`` questions, oldest first: what was asked, about which images, and the answer."""
        rows = await self._db.rows(
            f"SELECT * FROM (SELECT q.text, q.sender_name, q.sender_id, q.created_at, j.status, j.error, "
            f"j.finished_at, a.text AS answer, {_JOB_SHAS.format('j.id')} AS used, j.seq "
            "FROM jobs j JOIN messages q ON q.id = j.question "
            "LEFT JOIN messages a ON a.job_id = j.id AND a.role = 'bot' "
            "WHERE q.platform = ? AND q.chat_id = ? ORDER BY j.seq DESC LIMIT ?) ORDER BY seq",
            platform, chat_id, limit)
        return [QuestionView(r["text"], r["sender_name"] or r["sender_id"], r["created_at"], r["status"],
                             split_shas(r["used"]), r["answer"], r["error"], r["finished_at"]) for r in rows]

    async def has_chat(self, chat_id: str, platform: str | None = None) -> bool:
        """Whether anything is stored for this chat (of any platform, unless one is named)."""
        where, args = conditions(("chat_id = ?", chat_id), ("platform = ?", platform))
        return bool(await self._db.rows(f"SELECT 1 FROM messages WHERE {where} LIMIT 1", *args))

    async def history(self, platform: str, chat_id: str, limit: int) -> list[HistoryEntry]:
        """The newest ``limit`` messages of a chat, oldest first; answers with what they answer."""
        rows = await self._db.rows(
            f"SELECT * FROM (SELECT m.*, q.message_id AS answers, {_MESSAGE_SHAS} AS shas, "
            f"{_JOB_SHAS.format('m.job_id')} AS used "
            "FROM messages m LEFT JOIN jobs j ON j.id = m.job_id LEFT JOIN messages q ON q.id = j.question "
            "WHERE m.platform = ? AND m.chat_id = ? ORDER BY m.id DESC LIMIT ?) ORDER BY id",
            platform, chat_id, limit,
        )
        return [
            HistoryEntry(
                r["message_id"], "bot" if r["role"] == "bot" else "user", r["thread_id"], r["reply_to"],
                r["sender_id"], r["sender_name"], r["text"], split_shas(r["shas"]), r["created_at"],
                r["answers"], split_shas(r["used"]),
            )
            for r in rows
        ]

    # ---- jobs ---------------------------------------------------------------------------

    async def job_of(self, message: StoredMessage) -> JobRecord | None:
        """The job a bot message answers, or the (latest) job a user message asked for."""
        if message.job_id is not None:
            return await self.job(message.job_id)
        rows = await self._db.rows("SELECT id FROM jobs WHERE question = ? ORDER BY seq DESC LIMIT 1", message.row)
        return await self.job(rows[0]["id"]) if rows else None

    async def latest_done_job(
        self, platform: str, chat_id: str, images: Sequence[str], thread_id: str | None
    ) -> JobRecord | None:
        """The newest answered question in this chat (and thread) about exactly these images."""
        rows = await self._db.rows(
            "SELECT j.id FROM jobs j JOIN messages q ON q.id = j.question "
            "WHERE j.conversation = ? AND j.status = 'done' AND (? IS NULL OR q.thread_id = ?) "
            f"AND {_JOB_SHAS.format('j.id')} = ? ORDER BY j.seq DESC LIMIT 1",
            conversation_key(platform, chat_id), thread_id, thread_id, ",".join(images),
        )
        return await self.job(rows[0]["id"]) if rows else None

    async def answer_row(self, job_id: str) -> int | None:
        rows = await self._db.rows("SELECT id FROM messages WHERE job_id = ? AND role = 'bot'", job_id)
        return rows[0]["id"] if rows else None

    async def job(self, job_id: str) -> JobRecord | None:
        rows = await self._db.rows(f"SELECT *, {_JOB_SHAS.format('id')} AS shas FROM jobs WHERE id = ?", job_id)
        if not rows:
            return None
        j = rows[0]
        (question,) = await self.messages_by_row([j["question"]])
        usage = json.loads(j["usage"]) if j["usage"] else None
        return JobRecord(
            j["id"], j["status"], j["attempts"], question, split_shas(j["shas"]), JobContext.from_json(j["context"]),
            j["answer"], j["draft_message_id"], (int(usage[0]), int(usage[1])) if usage else None,
        )

    async def job_view(self, job_id: str) -> JobView | None:
        rows = await self._db.rows(
            f"SELECT j.*, {_JOB_SHAS.format('j.id')} AS shas, q.platform, q.chat_id, q.message_id AS question_id "
            "FROM jobs j JOIN messages q ON q.id = j.question WHERE j.id = ?", job_id,
        )
        if not rows:
            return None
        j = rows[0]
        return JobView(
            j["id"], j["status"], j["platform"], j["chat_id"], j["question_id"], j["answer"],
            j["answer_message_id"], split_shas(j["shas"]), j["error"],
        )

    async def requeue_running(self) -> int:
        """After a restart, jobs that were running when the daemon stopped run again.

        Not those already answered: their reply is in the outbox and is sent from there.
        """
        async with self._db.write() as db:
            cursor = await db.execute(
                "UPDATE jobs SET status = 'queued' WHERE status = 'running' "
                "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job = jobs.id AND o.kind = 'answer')"
            )
            return cursor.rowcount

    async def claim_next(self) -> JobRecord | None:
        """Mark the next runnable job running and return it.

        Runnable: the oldest queued job of its conversation, none of whose jobs is running (each
        conversation's answers come in the order asked), and not backing off. Among conversations,
        the one served least recently goes first, so a chatty one cannot starve the others.
        """
        now = time.time()
        async with self._db.write() as db:
            rows = list(await db.execute_fetchall(
                "WITH heads AS (SELECT conversation, min(seq) AS seq FROM jobs WHERE status = 'queued' "
                "GROUP BY conversation) "
                "SELECT h.seq, h.conversation FROM heads h JOIN jobs j ON j.seq = h.seq "
                "LEFT JOIN conversations c ON c.conversation = h.conversation "
                "WHERE coalesce(j.not_before, 0) <= ? AND NOT EXISTS "
                "(SELECT 1 FROM jobs r WHERE r.conversation = h.conversation AND r.status = 'running') "
                "ORDER BY coalesce(c.last_served, 0), h.seq LIMIT 1",
                (now,),
            ))
            if not rows:
                return None
            seq, conversation = rows[0]
            cursor = await db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ? "
                "WHERE seq = ? RETURNING id",
                (now, seq),
            )
            (job_id,) = await cursor.fetchone() or (None,)
            await db.execute(
                "INSERT INTO conversations (conversation, last_served) "
                "VALUES (?, (SELECT coalesce(max(last_served), 0) + 1 FROM conversations)) "
                "ON CONFLICT (conversation) DO UPDATE SET last_served = excluded.last_served",
                (conversation,),
            )
        return await self.job(job_id) if job_id else None

    async def waiting_until(self) -> float | None:
        """When the earliest job that is backing off may run again."""
        rows = await self._db.rows(
            "SELECT min(not_before) FROM jobs WHERE status = 'queued' AND not_before IS NOT NULL")
        return rows[0][0] if rows else None

    async def answered(self, job: JobRecord, text: str, *, error: str | None = None,
                       usage: tuple[int, int] | None = None) -> None:
        """Keep the reply (the answer or why there is none) in the outbox, from where it is sent;
        ``usage``: what the answer cost in prompt and answer tokens.

        The job stays running until the reply is sent: the conversation's next question waits,
        and a crash in between does not run the model again.
        """
        async with self._db.write() as db:
            await db.execute("UPDATE jobs SET answer = ?, error = ?, usage = ? WHERE id = ?",
                             (None if error else text, error, json.dumps(usage) if usage else None, job.id))
            await self._queue_reply(db, job.id, "answer", conversation_key(job.question.platform, job.question.chat_id),
                                    text, failed=error is not None)

    async def retry_later(self, job: JobRecord, delay_s: float, *, notice: str | None) -> None:
        """Put a job back in the queue, not to run for ``delay_s``; tell the asker ``notice`` once."""
        async with self._db.write() as db:
            await db.execute("UPDATE jobs SET status = 'queued', not_before = ? WHERE id = ?",
                             (time.time() + delay_s, job.id))
            if notice is not None:
                await self._queue_reply(db, job.id, "notice",
                                        conversation_key(job.question.platform, job.question.chat_id), notice,
                                        failed=False)

    async def drafted(self, job_id: str, message_id: str) -> None:
        """Keep the id of the placeholder shown while the job is answered."""
        async with self._db.write() as db:
            await db.execute("UPDATE jobs SET draft_message_id = ? WHERE id = ?", (message_id, job_id))

    # ---- outbox -------------------------------------------------------------------------

    async def _queue_reply(
        self, db: aiosqlite.Connection, job_id: str, kind: str, conversation: str, text: str, *, failed: bool
    ) -> None:
        # OR IGNORE: a notice is sent once per job however often the job is put back.
        await db.execute(
            "INSERT OR IGNORE INTO outbox (job, kind, conversation, text, failed, status, next_at, created_at) "
            "VALUES (?, ?, ?, ?, ?, 'pending', 0, ?)",
            (job_id, kind, conversation, text, int(failed), time.time()),
        )

    async def due_replies(self, limit: int, *, skip: Collection[int] = (), full: Collection[str] = ()
                          ) -> list[OutgoingReply]:
        """Replies to send now: the oldest pending one of each conversation, if it is due.

        ``skip``: replies being sent already; ``full``: platforms with no free sending slot.
        """
        skipped = ", ".join("?" * len(skip))
        platforms = " AND ".join("substr(o.conversation, 1, ?) != ?" for _ in full)
        rows = await self._db.rows(
            "SELECT o.* FROM outbox o WHERE o.status = 'pending' AND o.next_at <= ? AND o.id = "
            "(SELECT min(p.id) FROM outbox p WHERE p.conversation = o.conversation AND p.status = 'pending') "
            + (f"AND o.id NOT IN ({skipped}) " if skip else "") + (f"AND {platforms} " if full else "")
            + "ORDER BY o.id LIMIT ?",
            time.time(), *skip, *[x for platform in full for x in (len(platform) + 1, f"{platform}\x1f")], limit,
        )
        replies = []
        for r in rows:
            job = await self.job(r["job"])
            if job is not None:
                replies.append(OutgoingReply(r["id"], r["kind"], job, r["text"], bool(r["failed"]), r["attempts"]))
        return replies

    async def next_reply_at(self) -> float | None:
        """When the earliest conversation's next reply is due."""
        rows = await self._db.rows(
            "SELECT min(o.next_at) FROM outbox o WHERE o.status = 'pending' AND o.id = "
            "(SELECT min(p.id) FROM outbox p WHERE p.conversation = o.conversation AND p.status = 'pending')")
        return rows[0][0] if rows else None

    async def reply_sent(self, reply: OutgoingReply, message_id: str) -> None:
        """Record the platform's id for a sent reply; an answer also closes its job, as the bot's message."""
        job, now = reply.job, time.time()
        q = job.question
        async with self._db.write() as db:
            await db.execute("UPDATE outbox SET status = 'sent', sent_message_id = ?, sent_at = ?, "
                             "attempts = attempts + 1 WHERE id = ?", (message_id, now, reply.id))
            if reply.kind != "answer":
                return
            await self._insert_message(
                db, q.platform, q.chat_id, message_id, q.thread_id, q.message_id, "", "", "bot",
                reply.text, job.id, {}, now, [],
            )
            await db.execute(
                "UPDATE jobs SET status = ?, answer_message_id = ?, finished_at = ? WHERE id = ?",
                ("failed" if reply.failed else "done", message_id, now, job.id),
            )

    async def reply_failed(self, reply: OutgoingReply, error: str, *, retry_at: float | None) -> None:
        """A send failed: try again at ``retry_at``, or give up (None) and close an answer's job as failed."""
        async with self._db.write() as db:
            if retry_at is not None:
                await db.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ?, error = ? WHERE id = ?",
                                 (retry_at, error, reply.id))
                return
            await db.execute("UPDATE outbox SET status = 'dead', attempts = attempts + 1, error = ? WHERE id = ?",
                             (error, reply.id))
            if reply.kind == "answer":
                await db.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                    (f"reply not delivered: {error}", time.time(), reply.job.id),
                )

    async def queue_counts(self) -> tuple[int, int]:
        """Jobs waiting and jobs being answered, over all chats."""
        rows = await self._db.rows("SELECT count(*) FILTER (WHERE status = 'queued'), "
                                "count(*) FILTER (WHERE status = 'running') FROM jobs")
        return int(rows[0][0]), int(rows[0][1])



def _event_id(incoming: Incoming) -> str:
    """The event's id, or, for a message that came without one, an id made from the message's own.

    Event ids are unique per platform: two id-less messages must not count as one event.
    """
    return incoming.event_id or f"message:{incoming.chat_id}:{incoming.message_id}"


async def _insert_inbox(db: aiosqlite.Connection, incoming: Incoming, *, processed_at: float | None) -> int | None:
    """The event's inbox row (a duplicate event id raises IntegrityError); ``processed_at`` None: pending."""
    cursor = await db.execute(
        "INSERT INTO inbox (platform, event_id, chat_id, message_id, payload, received_at, processed_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (incoming.platform, _event_id(incoming), incoming.chat_id, incoming.message_id,
         json.dumps(_incoming_json(incoming), ensure_ascii=False), incoming.received_at, processed_at),
    )
    return cursor.lastrowid


def _incoming_json(incoming: Incoming) -> dict[str, Any]:
    """The event as the inbox keeps it: everything but image bytes, which are in files or still remote."""
    return {
        "platform": incoming.platform, "chat_id": incoming.chat_id, "message_id": incoming.message_id,
        "event_id": incoming.event_id, "chat_kind": incoming.chat_kind, "thread_id": incoming.thread_id,
        "reply_to": incoming.reply_to, "sender_id": incoming.sender_id, "sender_name": incoming.sender_name,
        "text": incoming.text, "addressed": incoming.addressed, "meta": dict(incoming.meta),
        "image_refs": [image.ref for image in incoming.images], "received_at": incoming.received_at,
        "fingerprint": incoming.fingerprint, "command": incoming.command, "sender_is_admin": incoming.sender_is_admin,
        "conversation": None if incoming.conversation is None else [
            [turn.role, turn.text] for turn in incoming.conversation],
        "max_new_tokens": incoming.max_new_tokens,
    }


def _incoming_from_json(raw: dict[str, Any]) -> Incoming:
    refs = tuple(ImageRef(ref=ref) for ref in raw.pop("image_refs"))
    turns = raw.pop("conversation", None)  # absent from rows written before it existed
    conversation = None if turns is None else tuple(Turn(role, text) for role, text in turns)
    return Incoming(**raw, images=refs, conversation=conversation)
