"""The daemon's side of every adapter: accept messages, answer questions about jobs and history."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from bot.context import resolve
from bot.files import ImageFiles
from bot.store import Store
from bot.watch import JobWatch
from bot.workers import Workers
from core.errors import BadInput, NotFound
from core.images import ImageInfo, ImageLimits, inspect
from core.types import Accepted, HistoryEntry, Incoming, JobView

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"done", "failed"})


class Dispatcher:
    """Implements ``core.types.Host`` for the adapters."""

    def __init__(
        self,
        store: Store,
        files: ImageFiles,
        workers: Workers,
        watch: JobWatch,
        *,
        image_limits: ImageLimits,
        window_s: float,
        history_turns: int,
    ) -> None:
        self._store, self._files, self._workers, self._watch = store, files, workers, watch
        self._image_limits = image_limits
        self._window_s, self._history_turns = window_s, history_turns

    async def accept(self, incoming: Incoming) -> Accepted:
        """Validate and store a message with its images; queue a job when it asks the bot something.

        Everything is checked before anything is written, and then written in one transaction:
        a refused message leaves no trace, an accepted one is complete.
        """
        seen = await self._store.find_accepted(incoming)
        if seen is not None:
            log.info("duplicate %s event %s (chat %s message %s) ignored", incoming.platform,
                     incoming.event_id, incoming.chat_id, incoming.message_id)
            return seen
        images = await self._store_images(incoming)
        job = None
        if incoming.addressed:
            resolution = await resolve(
                self._store, incoming, tuple(i.sha256 for i in images),
                window_s=self._window_s, max_turns=self._history_turns,
            )
            job = resolution.as_job()
        accepted = await self._store.record(incoming, images, job)
        log.info("%s chat %s message %s stored (%d image(s))%s", incoming.platform, incoming.chat_id,
                 incoming.message_id, len(images), f", job {accepted.job_id}" if accepted.job_id else "")
        if accepted.job_id and not accepted.duplicate:
            self._workers.wake()
        return accepted

    async def _store_images(self, incoming: Incoming) -> list[ImageInfo]:
        blobs = []
        for ref in incoming.images:
            if ref.data is None:
                raise BadInput(f"image {ref.ref!r} was not downloaded", code="image_missing")
            blobs.append(ref.data)
        if not blobs:
            return []
        return await asyncio.to_thread(self._check_and_keep, blobs)

    def _check_and_keep(self, blobs: list[bytes]) -> list[ImageInfo]:
        """Decode every image (CPU work, so on a thread), then write them: all or, if one is bad, none."""
        infos = [inspect(data, self._image_limits) for data in blobs]
        for info, data in zip(infos, blobs, strict=True):
            self._files.put(info.sha256, data)
        return infos

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
