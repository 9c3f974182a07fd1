"""The SQLite connection the store's queries share: its settings, migrations and transactions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import aiosqlite

from bot.schema import MIGRATIONS
from core.errors import StoreUnavailable

__all__ = ["Database", "conditions", "conversation_key", "split_shas"]


class Database:
    """One connection; one lock keeps each call's statements together."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, lock_timeout_s: float = 5.0) -> AsyncIterator[Self]:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created private before SQLite opens it; its -wal and -shm files take the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        async with aiosqlite.connect(path, isolation_level=None) as conn:
            conn.row_factory = aiosqlite.Row
            await conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a message is acknowledged only once its commit is on disk.
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute(f"PRAGMA busy_timeout = {int(lock_timeout_s * 1000)}")
            db = cls(conn)
            await db._migrate()
            yield db

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
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction: all of it is committed, or none of it.

        BEGIN, COMMIT and ROLLBACK run to the end even when the task is cancelled meanwhile (a stop
        cancels the retention sweep mid-write): the statement runs on aiosqlite's thread either way,
        and a cancelled await would leave the connection's state unknown to the next writer.
        """
        async with self._lock:
            try:
                await _settled(self._conn.execute("BEGIN IMMEDIATE"))
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"history store refuses writes: {exc}") from exc
            except asyncio.CancelledError:
                if self._conn.in_transaction:
                    await _settled(self._conn.execute("ROLLBACK"))
                raise
            try:
                yield self._conn
                await _settled(self._conn.execute("COMMIT"))
            except BaseException as exc:
                if self._conn.in_transaction:  # a failed COMMIT may have rolled back already
                    await _settled(self._conn.execute("ROLLBACK"))
                if isinstance(exc, sqlite3.OperationalError):  # disk full, I/O error, locked
                    raise StoreUnavailable(f"history store refused a write: {exc}") from exc
                raise

    async def rows(self, sql: str, *args: Any) -> list[aiosqlite.Row]:
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, args))

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection for several reads in a row, no write in between (no transaction)."""
        async with self._lock:
            yield self._conn



async def _settled(statement: Awaitable[Any]) -> Any:
    """Await ``statement`` to its end even if cancelled meanwhile; then pass the cancellation on."""
    task = asyncio.ensure_future(statement)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def conditions(*clauses: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A ``WHERE`` text and its arguments from (condition, value) pairs.

    A pair whose value is None is left out; a tuple fills several ``?`` (``()``: a condition without any).
    """
    text: list[str] = []
    args: list[Any] = []
    for condition, value in clauses:
        if value is None:
            continue
        text.append(condition)
        args.extend(value if isinstance(value, tuple) else (value,))
    return " AND ".join(text) or "1", args


def split_shas(shas: str | None) -> tuple[str, ...]:
    """A ``group_concat`` of SHA-256 digests, back as a tuple."""
    return tuple(shas.split(",")) if shas else ()


def conversation_key(platform: str, chat_id: str) -> str:
    return f"{platform}\x1f{chat_id}"  # a separator no platform id contains
