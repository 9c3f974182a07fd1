"""The store's deleting side: forgetting a chat, retention by age or size, stray image files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.database import Database, conditions

__all__ = ["Purged", "RetentionQueries"]

# Jobs still to be answered or whose reply is not sent yet.
_OPEN_JOBS = ("SELECT id FROM jobs WHERE status IN ('queued', 'running') "
              "UNION SELECT job FROM outbox WHERE status = 'pending'")


@dataclass(frozen=True, slots=True)
class Purged:
    messages: int  # deleted
    kept: int  # matched, but an open question needs them
    orphans: list[str]  # SHA-256 of images no message or job refers to any more: delete their files


class RetentionQueries:
    """What ``Store`` deletes (``Store.retention``). Nothing an open question needs: its message,
    images and earlier turns."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def forget_chat(self, platform: str, chat_id: str) -> Purged | None:
        """Delete a chat's messages, jobs, replies and inbox entries (``purge``).

        ``None``, and nothing deleted, while a question of the chat is open: it still needs them.
        """
        open_jobs = await self._db.rows(
            f"SELECT count(*) FROM ({_OPEN_JOBS}) o JOIN jobs j ON j.id = o.id JOIN messages q ON q.id = j.question "
            "WHERE q.platform = ? AND q.chat_id = ?", platform, chat_id)
        if open_jobs[0][0]:
            return None
        return await self.purge(platform=platform, chat_id=chat_id)

    async def purge(
        self, *, platform: str | None = None, chat_id: str | None = None, before: float | None = None
    ) -> Purged:
        """Delete the messages of a chat and/or older than ``before``, with their jobs, replies and
        inbox entries, and the answers to deleted questions; return the SHA-256 of images nothing
        refers to any more (their files are the caller's to delete).

        What an open question needs is kept: its message, its images and its earlier turns.
        """
        where, args = conditions(("m.platform = ?", platform), ("m.chat_id = ?", chat_id),
                                 ("m.created_at < ?", before))
        async with self._db.write() as db:
            await db.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (id INTEGER PRIMARY KEY)")
            await db.execute("CREATE TEMP TABLE IF NOT EXISTS doomed_jobs (id TEXT PRIMARY KEY)")
            await db.execute("DELETE FROM doomed")
            await db.execute("DELETE FROM doomed_jobs")
            cursor = await db.execute(f"SELECT count(*) FROM messages m WHERE {where}", args)
            (matched,) = await cursor.fetchone() or (0,)
            await db.execute(
                f"WITH open AS ({_OPEN_JOBS}), needed AS ("
                "SELECT j.question AS id FROM jobs j JOIN open o ON o.id = j.id "
                "UNION SELECT CAST(t.value AS INTEGER) FROM jobs j JOIN open o ON o.id = j.id, "
                "json_each(j.context, '$.turns') t) "
                f"INSERT INTO doomed SELECT m.id FROM messages m WHERE {where} AND m.id NOT IN needed", args)
            cursor = await db.execute("SELECT count(*) FROM doomed")
            (doomed,) = await cursor.fetchone() or (0,)
            kept_count = int(matched) - int(doomed)
            await db.execute("INSERT INTO doomed_jobs SELECT id FROM jobs WHERE question IN doomed")
            await db.execute("INSERT OR IGNORE INTO doomed SELECT id FROM messages WHERE job_id IN doomed_jobs")
            shas = [r[0] for r in await db.execute_fetchall(
                "SELECT sha256 FROM message_images WHERE message IN doomed "
                "UNION SELECT sha256 FROM job_images WHERE job IN doomed_jobs")]
            await db.execute("DELETE FROM outbox WHERE job IN doomed_jobs")
            await db.execute("DELETE FROM job_images WHERE job IN doomed_jobs")
            await db.execute("DELETE FROM jobs WHERE id IN doomed_jobs")
            # The inbox keeps the event's ids, not its content: a replayed event stays a duplicate.
            await db.execute("UPDATE inbox SET payload = '{}' WHERE id IN (SELECT i.id FROM inbox i JOIN messages m "
                             "ON m.platform = i.platform AND m.chat_id = i.chat_id AND m.message_id = i.message_id "
                             "WHERE m.id IN doomed)")
            cursor = await db.execute("DELETE FROM messages WHERE id IN doomed")  # message_images cascade
            forgotten = int(cursor.rowcount)
            if chat_id is not None and before is None:  # events of the chat that never became messages
                await db.execute("UPDATE inbox SET payload = '{}' WHERE chat_id = ? AND (? IS NULL OR platform = ?) "
                                 "AND processed_at IS NOT NULL", (chat_id, platform, platform))
            orphans = []
            for sha in shas:
                used = await db.execute_fetchall(
                    "SELECT 1 FROM message_images WHERE sha256 = ? UNION ALL SELECT 1 FROM job_images WHERE sha256 = ?"
                    " LIMIT 1", (sha, sha))
                if not list(used):
                    await db.execute("DELETE FROM images WHERE sha256 = ?", (sha,))
                    orphans.append(sha)
        return Purged(forgotten, int(kept_count), orphans)

    async def known_images(self, shas: Sequence[str]) -> set[str]:
        """Which of these digests the store has an image row for."""
        if not shas:
            return set()
        marks = ",".join("?" * len(shas))
        return {r[0] for r in await self._db.rows(f"SELECT sha256 FROM images WHERE sha256 IN ({marks})", *shas)}

    async def drop_tombstones(self, before: float) -> int:
        """Forget the ids of purged events received before ``before`` (platforms redeliver for hours, not days)."""
        async with self._db.write() as db:
            cursor = await db.execute("DELETE FROM inbox WHERE payload = '{}' AND received_at < ?", (before,))
            return int(cursor.rowcount)

    async def image_stats(self) -> tuple[int, int]:
        """How many distinct images are stored, and their bytes."""
        rows = await self._db.rows("SELECT count(*), coalesce(sum(size), 0) FROM images")
        return int(rows[0][0]), int(rows[0][1])

    async def image_bytes(self) -> int:
        rows = await self._db.rows("SELECT coalesce(sum(size), 0) FROM images")
        return int(rows[0][0])

    async def cutoff_for(self, excess: int) -> float | None:
        """The time before which the oldest messages' images add up to ``excess`` bytes (shared images
        counted at each message: an overestimate of what deleting them frees)."""
        rows = await self._db.rows(
            "SELECT created_at FROM (SELECT m.created_at, sum(i.size) OVER (ORDER BY m.created_at, m.id) AS total "
            "FROM message_images mi JOIN messages m ON m.id = mi.message JOIN images i ON i.sha256 = mi.sha256) "
            "WHERE total >= ? ORDER BY created_at LIMIT 1", excess)
        return float(rows[0][0]) if rows else None
