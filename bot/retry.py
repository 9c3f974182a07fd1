"""Platform calls retried with exponential backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core.errors import AdapterError

__all__ = ["with_retries"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def with_retries(call: Callable[[], Awaitable[T]], *, attempts: int, base_s: float, what: str) -> T:
    """``await call()``, again after ``base_s``, ``2 * base_s``, ... while it raises a retryable ``AdapterError``."""
    for attempt in range(attempts - 1):
        try:
            return await call()
        except AdapterError as exc:
            if not exc.retryable:
                raise
            delay = base_s * 2**attempt
            log.info("%s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
    return await call()
