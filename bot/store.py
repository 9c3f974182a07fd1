"""The history store: images, messages, the inbox and the job queue, in one SQLite file (WAL)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from bot.schema import MIGRATIONS
from core.errors import StoreUnavailable
from core.images import ImageInfo
from core.types import Accepted, HistoryEntry, ImageRef, Incoming, JobView

__all__ = ["JobRecord", "NewJob", "Store", "StoredMessage"]

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
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job with what answering and delivering it needs."""

    id: str
    status: str
    attempts: int
    question: StoredMessage
    images: tuple[str, ...]
    context: dict[str, Any]
    answer: str | None


class Store:
    """All SQL lives here. One connection; one lock keeps each call's statements together."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Store]:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        async with aiosqlite.connect(path, isolation_level=None) as conn:
            conn.row_factory = aiosqlite.Row
            await conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a message is acknowledged only once its commit is on disk.
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA busy_timeout = 5000")
            store = cls(conn)
            await store._migrate()
            yield store

    async def _migrate(self) -> None:
        await self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = list(await self._conn.execute_fetchall("SELECT version FROM schema_version"))
        version = rows[0][0] if rows else 0
        if version > len(MIGRATIONS):
            raise StoreUnavailable(f"the database is from a newer imsight (schema {version})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self._conn.executescript(
                f"BEGIN; {script}; DELETE FROM schema_version; "
                f"INSERT INTO schema_version VALUES ({number}); COMMIT;"
            )

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction: all of it is committed, or none of it."""
        async with self._lock:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"history store refuses writes: {exc}") from exc
            try:
                yield self._conn
                await self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:  # a failed COMMIT may have rolled back already
                    await self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):  # disk full, I/O error, locked
                    raise StoreUnavailable(f"history store refused a write: {exc}") from exc
                raise

    async def _rows(self, sql: str, *args: Any) -> list[aiosqlite.Row]:
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, args))

    # ---- intake -------------------------------------------------------------------------

    async def find_accepted(self, incoming: Incoming) -> Accepted | None:
        """What was made of this event or message when it first came, if it came before."""
        rows = await self._rows(
            f"SELECT i.message_id, i.processed_at, {_MESSAGE_SHAS} AS shas, "
            "(SELECT id FROM jobs WHERE question = m.id ORDER BY seq LIMIT 1) AS job_id "
            "FROM inbox i LEFT JOIN messages m ON m.platform = i.platform AND m.chat_id = i.chat_id "
            "AND m.message_id = i.message_id "
            "WHERE i.platform = ? AND (i.event_id = ? OR (i.chat_id = ? AND i.message_id = ?)) LIMIT 1",
            incoming.platform, _event_id(incoming), incoming.chat_id, incoming.message_id,
        )
        if not rows:
            return None
        r = rows[0]
        pending = r["processed_at"] is None
        return Accepted(r["message_id"], _split(r["shas"]), r["job_id"], duplicate=True, pending=pending)

    async def record_pending(self, incoming: Incoming) -> int | None:
        """Commit an event whose images are still to be downloaded; None if it came before."""
        payload = json.dumps(_incoming_json(incoming), ensure_ascii=False)
        try:
            async with self._write() as db:
                cursor = await db.execute(
                    "INSERT INTO inbox (platform, event_id, chat_id, message_id, payload, received_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (incoming.platform, _event_id(incoming), incoming.chat_id, incoming.message_id, payload,
                     incoming.received_at),
                )
                return cursor.lastrowid
        except sqlite3.IntegrityError:
            return None

    async def pending(self) -> list[tuple[int, Incoming]]:
        """Events acknowledged but not taken in yet (the daemon stopped mid-download)."""
        rows = await self._rows("SELECT id, payload FROM inbox WHERE processed_at IS NULL ORDER BY id")
        return [(r["id"], _incoming_from_json(json.loads(r["payload"]))) for r in rows]

    async def record(
        self, incoming: Incoming, images: Sequence[ImageInfo], job: NewJob | None, *, inbox_id: int | None = None
    ) -> Accepted:
        """Store an event, its images, its message and its job in one transaction.

        ``inbox_id`` names the event's row when it was committed earlier by ``record_pending``.
        """
        now = time.time()
        try:
            async with self._write() as db:
                if inbox_id is None:
                    payload = json.dumps(_incoming_json(incoming), ensure_ascii=False)
                    await db.execute(
                        "INSERT INTO inbox (platform, event_id, chat_id, message_id, payload, received_at, "
                        "processed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (incoming.platform, _event_id(incoming), incoming.chat_id, incoming.message_id, payload,
                         incoming.received_at, now),
                    )
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
                    job_id = uuid.uuid4().hex
                    await db.execute(
                        "INSERT INTO jobs (id, question, conversation, status, context, created_at) "
                        "VALUES (?, ?, ?, 'queued', ?, ?)",
                        (job_id, row, _conversation(incoming.platform, incoming.chat_id), json.dumps(job.context), now),
                    )
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
        return Accepted(incoming.message_id, tuple(i.sha256 for i in images), job_id)

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
        where = ["m.platform = ?", "m.chat_id = ?", "m.role = 'user'",
                 "EXISTS (SELECT 1 FROM message_images x WHERE x.message = m.id)"]
        args: list[Any] = [platform, chat_id]
        if thread_id is not None:
            where.append("m.thread_id = ?")
            args.append(thread_id)
        if between is not None:
            where.append("m.created_at BETWEEN ? AND ?")
            args.extend(between)
        if sender_id is not None:
            where.append("m.sender_id = ?")
            args.append(sender_id)
        # Newest first along an index, so the scan stops at the first match (or the window's edge).
        order = "m.created_at DESC, m.id DESC" if between is not None else "m.id DESC"
        found = await self._messages(" AND ".join(where) + f" ORDER BY {order} LIMIT 1", *args)
        return found[0] if found else None

    async def _messages(self, where: str, *args: Any) -> list[StoredMessage]:
        rows = await self._rows(
            f"SELECT m.*, {_MESSAGE_SHAS} AS shas FROM messages m WHERE " + where,
            *args,
        )
        return [
            StoredMessage(
                r["id"], r["platform"], r["chat_id"], r["message_id"], r["thread_id"], r["reply_to"],
                r["sender_id"], r["sender_name"], r["role"], r["text"], r["created_at"],
                _split(r["shas"]), r["job_id"], json.loads(r["meta"]),
            )
            for r in rows
        ]

    async def history(self, platform: str, chat_id: str, limit: int) -> list[HistoryEntry]:
        """The newest ``limit`` messages of a chat, oldest first; answers with what they answer."""
        rows = await self._rows(
            f"SELECT * FROM (SELECT m.*, q.message_id AS answers, {_MESSAGE_SHAS} AS shas, "
            f"{_JOB_SHAS.format('m.job_id')} AS used "
            "FROM messages m LEFT JOIN jobs j ON j.id = m.job_id LEFT JOIN messages q ON q.id = j.question "
            "WHERE m.platform = ? AND m.chat_id = ? ORDER BY m.id DESC LIMIT ?) ORDER BY id",
            platform, chat_id, limit,
        )
        return [
            HistoryEntry(
                r["message_id"], "bot" if r["role"] == "bot" else "user", r["thread_id"], r["reply_to"],
                r["sender_id"], r["sender_name"], r["text"], _split(r["shas"]), r["created_at"],
                r["answers"], _split(r["used"]),
            )
            for r in rows
        ]

    # ---- jobs ---------------------------------------------------------------------------

    async def job_of(self, message: StoredMessage) -> JobRecord | None:
        """The job a bot message answers, or the (latest) job a user message asked for."""
        if message.job_id is not None:
            return await self.job(message.job_id)
        rows = await self._rows("SELECT id FROM jobs WHERE question = ? ORDER BY seq DESC LIMIT 1", message.row)
        return await self.job(rows[0]["id"]) if rows else None

    async def latest_done_job(
        self, platform: str, chat_id: str, images: Sequence[str], thread_id: str | None
    ) -> JobRecord | None:
        """The newest answered question in this chat (and thread) about exactly these images."""
        rows = await self._rows(
            "SELECT j.id FROM jobs j JOIN messages q ON q.id = j.question "
            "WHERE j.conversation = ? AND j.status = 'done' AND (? IS NULL OR q.thread_id = ?) "
            f"AND {_JOB_SHAS.format('j.id')} = ? ORDER BY j.seq DESC LIMIT 1",
            _conversation(platform, chat_id), thread_id, thread_id, ",".join(images),
        )
        return await self.job(rows[0]["id"]) if rows else None

    async def answer_row(self, job_id: str) -> int | None:
        rows = await self._rows("SELECT id FROM messages WHERE job_id = ? AND role = 'bot'", job_id)
        return rows[0]["id"] if rows else None

    async def job(self, job_id: str) -> JobRecord | None:
        rows = await self._rows(f"SELECT *, {_JOB_SHAS.format('id')} AS shas FROM jobs WHERE id = ?", job_id)
        if not rows:
            return None
        j = rows[0]
        (question,) = await self.messages_by_row([j["question"]])
        return JobRecord(
            j["id"], j["status"], j["attempts"], question, _split(j["shas"]), json.loads(j["context"]), j["answer"]
        )

    async def job_view(self, job_id: str) -> JobView | None:
        rows = await self._rows(
            f"SELECT j.*, {_JOB_SHAS.format('j.id')} AS shas, q.platform, q.chat_id, q.message_id AS question_id "
            "FROM jobs j JOIN messages q ON q.id = j.question WHERE j.id = ?", job_id,
        )
        if not rows:
            return None
        j = rows[0]
        return JobView(
            j["id"], j["status"], j["platform"], j["chat_id"], j["question_id"], j["answer"],
            j["answer_message_id"], _split(j["shas"]), j["error"],
        )

    async def requeue_running(self) -> int:
        """After a restart, jobs that were running when the daemon stopped run again."""
        async with self._write() as db:
            cursor = await db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")
            return cursor.rowcount

    async def claim_next(self) -> JobRecord | None:
        """Mark the oldest runnable job running and return it.

        A job is runnable when it is the oldest queued job of its conversation and none of that
        conversation's jobs is running: each conversation's answers come in the order asked.
        """
        async with self._write() as db:
            cursor = await db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ? "
                "WHERE seq = (SELECT j.seq FROM jobs j WHERE j.status = 'queued' "
                "AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.conversation = j.conversation "
                "AND r.status = 'running') "
                "AND NOT EXISTS (SELECT 1 FROM jobs e WHERE e.conversation = j.conversation "
                "AND e.seq < j.seq AND e.status = 'queued') "
                "ORDER BY j.seq LIMIT 1) RETURNING id",
                (time.time(),),
            )
            row = await cursor.fetchone()
        return await self.job(row["id"]) if row else None

    async def save_answer(self, job_id: str, answer: str) -> None:
        """Keep the model's answer, so a crash before delivery does not run the model again."""
        async with self._write() as db:
            await db.execute("UPDATE jobs SET answer = ? WHERE id = ?", (answer, job_id))

    async def finish(
        self, job: JobRecord, *, text: str, answer_message_id: str, error: str | None = None
    ) -> None:
        """Record the delivered answer (or failure notice) as the bot's message, and close the job."""
        q = job.question
        async with self._write() as db:
            await self._insert_message(
                db, q.platform, q.chat_id, answer_message_id, q.thread_id, q.message_id, "", "", "bot",
                text, job.id, {}, time.time(), [],
            )
            await db.execute(
                "UPDATE jobs SET status = ?, answer = ?, error = ?, answer_message_id = ?, finished_at = ? "
                "WHERE id = ?",
                ("failed" if error else "done", None if error else text, error, answer_message_id,
                 time.time(), job.id),
            )

    async def fail_undelivered(self, job_id: str, error: str) -> None:
        """Close a job whose reply could not be delivered at all."""
        async with self._write() as db:
            await db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                (error, time.time(), job_id),
            )

    async def queue_counts(self) -> tuple[int, int]:
        """Jobs waiting and jobs being answered, over all chats."""
        rows = await self._rows("SELECT count(*) FILTER (WHERE status = 'queued'), "
                                "count(*) FILTER (WHERE status = 'running') FROM jobs")
        return int(rows[0][0]), int(rows[0][1])

    # ---- forgetting ---------------------------------------------------------------------

    async def forget_chat(self, platform: str, chat_id: str) -> tuple[int, list[str]] | None:
        """Delete a chat's messages, jobs and inbox entries; return how many messages, and the
        SHA-256 of images no other chat still refers to (their files are the caller's to delete).

        ``None``, and nothing deleted, while a job of the chat is queued or running: it still needs them.
        """
        chat = "SELECT id FROM messages WHERE platform = ? AND chat_id = ?"
        async with self._write() as conn:
            open_jobs = await conn.execute_fetchall(
                f"SELECT count(*) FROM jobs WHERE question IN ({chat}) AND status IN ('queued', 'running')",
                (platform, chat_id))
            if next(iter(open_jobs))[0]:
                return None
            shas = [r[0] for r in await conn.execute_fetchall(
                f"SELECT DISTINCT sha256 FROM message_images WHERE message IN ({chat}) "
                f"UNION SELECT DISTINCT ji.sha256 FROM job_images ji JOIN jobs j ON j.id = ji.job "
                f"WHERE j.question IN ({chat})", (platform, chat_id, platform, chat_id))]
            await conn.execute(f"DELETE FROM job_images WHERE job IN (SELECT id FROM jobs WHERE question IN ({chat}))",
                               (platform, chat_id))
            await conn.execute(f"DELETE FROM jobs WHERE question IN ({chat})", (platform, chat_id))
            cursor = await conn.execute("DELETE FROM messages WHERE platform = ? AND chat_id = ?", (platform, chat_id))
            forgotten = int(cursor.rowcount)
            await conn.execute("DELETE FROM inbox WHERE platform = ? AND chat_id = ?", (platform, chat_id))
            orphans = []
            for sha in shas:
                used = await conn.execute_fetchall(
                    "SELECT 1 FROM message_images WHERE sha256 = ? UNION ALL SELECT 1 FROM job_images WHERE sha256 = ?"
                    " LIMIT 1", (sha, sha))
                if not list(used):
                    await conn.execute("DELETE FROM images WHERE sha256 = ?", (sha,))
                    orphans.append(sha)
        return forgotten, orphans


def _event_id(incoming: Incoming) -> str:
    """The event's id, or, for a message that came without one, an id made from the message's own.

    Event ids are unique per platform: two id-less messages must not count as one event.
    """
    return incoming.event_id or f"message:{incoming.chat_id}:{incoming.message_id}"


def _incoming_json(incoming: Incoming) -> dict[str, Any]:
    """The event as the inbox keeps it: everything but image bytes, which are in files or still remote."""
    return {
        "platform": incoming.platform, "chat_id": incoming.chat_id, "message_id": incoming.message_id,
        "event_id": incoming.event_id, "chat_kind": incoming.chat_kind, "thread_id": incoming.thread_id,
        "reply_to": incoming.reply_to, "sender_id": incoming.sender_id, "sender_name": incoming.sender_name,
        "text": incoming.text, "addressed": incoming.addressed, "meta": dict(incoming.meta),
        "image_refs": [image.ref for image in incoming.images], "received_at": incoming.received_at,
    }


def _incoming_from_json(raw: dict[str, Any]) -> Incoming:
    refs = tuple(ImageRef(ref=ref) for ref in raw.pop("image_refs"))
    return Incoming(**raw, images=refs)


def _split(shas: str | None) -> tuple[str, ...]:
    return tuple(shas.split(",")) if shas else ()


def _conversation(platform: str, chat_id: str) -> str:
    return f"{platform}\x1f{chat_id}"  # a separator no platform id contains
