"""An access token fetched once and reused until shortly before it expires (Feishu, DingTalk)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["TokenCache"]


class TokenCache:
    """``fetch`` returns a token and its lifetime in seconds; concurrent callers share one fetch."""

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]], *, margin_s: float = 300.0) -> None:
        self._fetch = fetch
        self._margin_s = margin_s
        self._token: tuple[str, float] | None = None  # (token, monotonic time to renew it)
        self._lock = asyncio.Lock()

    async def get(self, *, refresh: bool = False) -> str:
        """The current token; ``refresh`` when the platform called it expired before its time."""
        async with self._lock:
            if self._token is None or refresh or time.monotonic() >= self._token[1]:
                token, lifetime = await self._fetch()
                self._token = (token, time.monotonic() + max(0.0, lifetime - self._margin_s))
            return self._token[0]
