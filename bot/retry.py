"""Platform calls retried with exponential backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core.errors import AdapterError, RateLimited

__all__ = ["with_retries"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def with_retries(call: Callable[[], Awaitable[T]], *, attempts: int, base_s: float, what: str) -> T:
    """``await call()``, again after ``base_s``, ``2 * base_s``, ... while it raises a retryable ``AdapterError``;
    never sooner than a ``RateLimited``'s platform said."""
    for attempt in range(attempts - 1):
        try:
            return await call()
        except AdapterError as exc:
            if not exc.retryable:
                raise
            delay = max(base_s * 2**attempt, exc.retry_after_s if isinstance(exc, RateLimited) else 0.0)
            log.info("%s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
    return await call()
