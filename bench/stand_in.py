"""A stand-in for the model, so that a benchmark measures the daemon around it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from core.engine import GenerationLimits, PreparedImage, Turn, Usage

__all__ = ["StandInEngine"]


class StandInEngine:
    """Takes ``delay_s`` per answer (0: at once), ``max_batch`` answers at a time, like a busy GPU."""

    name = "stand-in"
    model = "stand-in"
    supports_images = True

    def __init__(self, delay_s: float = 0.0, max_batch: int = 1) -> None:
        self.max_batch = max_batch
        self._delay_s = delay_s
        self._slots = asyncio.Semaphore(max_batch)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def answer(
        self, images: Sequence[PreparedImage], turns: Sequence[Turn], question: str, limits: GenerationLimits,
        usage: Usage | None = None,
    ) -> AsyncIterator[str]:
        if self._delay_s:
            async with self._slots:
                await asyncio.sleep(self._delay_s)
        yield f"{len(images)} image(s); answer to {question}"
