"""Forgetting on schedule: messages older than ``retention_days``, images over ``max_bytes``.

Never what an open question needs (``Store.purge`` keeps it). Also ``imsight history purge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bot.files import ImageFiles
from bot.store import Purged, Store
from core.errors import ImsightError

__all__ = ["Retention", "Swept", "purge", "sweep_stray_files"]

log = logging.getLogger(__name__)

_DAY_S = 86_400.0
_TOMBSTONE_DAYS = 7  # a purged event's ids are kept this long, so a replay of it stays a duplicate
_BUDGET_ROUNDS = 5  # shared images make each round's estimate high; a few rounds get under the budget


@dataclass(frozen=True, slots=True)
class Swept:
    messages: int
    images: int
    kept: int


async def purge(
    store: Store, files: ImageFiles, *, platform: str | None = None, chat_id: str | None = None,
    before: float | None = None,
) -> Purged:
    """Delete what the filters match (see ``Store.purge``) and the image files nothing uses any more."""
    purged = await store.retention.purge(platform=platform, chat_id=chat_id, before=before)
    await asyncio.to_thread(_delete, files, purged.orphans)
    return purged


def _delete(files: ImageFiles, shas: list[str]) -> None:
    for sha in shas:
        files.delete(sha)


async def sweep_stray_files(store: Store, files: ImageFiles, *, age_s: float = 3600) -> int:
    """Delete image files no image row names: written for a message whose commit then failed (disk
    full) or never came (a crash), and temporary files of cut-off writes. Only files older than
    ``age_s``, so a message being taken in now keeps its file."""
    stray = 0
    batch: list[tuple[str | None, Path]] = []

    async def settle() -> None:
        nonlocal stray
        known = await store.retention.known_images([sha for sha, _ in batch if sha is not None])
        doomed = [path for sha, path in batch if sha not in known]
        await asyncio.to_thread(_unlink, doomed)
        stray += len(doomed)
        batch.clear()

    for item in await asyncio.to_thread(lambda: list(files.older_than(age_s))):
        batch.append(item)
        if len(batch) >= 500:
            await settle()
    await settle()
    return stray


def _unlink(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class Retention:
    """Runs ``sweep`` now and every ``every_s``; stray files are swept even when no limit is set."""

    def __init__(self, store: Store, files: ImageFiles, *, days: float, max_bytes: int, every_s: float = 3600) -> None:
        self._store, self._files = store, files
        self._days, self._max_bytes, self._every_s = days, max_bytes, every_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="imsight-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                swept = await self.sweep()
                if swept.messages or swept.images:
                    log.info("retention: deleted %d message(s) and %d image file(s)%s", swept.messages,
                             swept.images, f"; kept {swept.kept} an open question needs" if swept.kept else "")
                await self._store.retention.drop_tombstones(time.time() - _TOMBSTONE_DAYS * _DAY_S)
                if stray := await sweep_stray_files(self._store, self._files):
                    log.info("deleted %d stray image file(s) (writes whose message was never stored)", stray)
            except ImsightError:
                log.exception("retention sweep failed; trying again later")
            await asyncio.sleep(self._every_s)

    async def sweep(self) -> Swept:
        messages = images = kept = 0
        if self._days:
            purged = await purge(self._store, self._files, before=time.time() - self._days * _DAY_S)
            messages, images, kept = purged.messages, len(purged.orphans), purged.kept
        for _ in range(_BUDGET_ROUNDS if self._max_bytes else 0):
            excess = await self._store.retention.image_bytes() - self._max_bytes
            cutoff = await self._store.retention.cutoff_for(excess) if excess > 0 else None
            if cutoff is None:
                break
            purged = await purge(self._store, self._files, before=cutoff + 1e-3)
            messages, images, kept = messages + purged.messages, images + len(purged.orphans), purged.kept
            if not purged.orphans:
                break  # what is left over the budget is needed by open questions
        return Swept(messages, images, kept)
