"""The one aiohttp client session a platform adapter calls its platform with.

Opened at ``start`` (or for the length of a doctor check), closed at ``stop``; until then and
after, calls fail with "not started" rather than open a session nobody would close.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp

__all__ = ["ClientSessionSlot"]


class ClientSessionSlot:
    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        """The open session."""
        assert self._session is not None, "not started"
        return self._session

    @property
    def open(self) -> bool:
        return self._session is not None

    def start(self) -> aiohttp.ClientSession:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def briefly(self) -> AsyncIterator[aiohttp.ClientSession]:
        """Open for the block only (``imsight doctor --online``: credentials tried, nothing started)."""
        try:
            yield self.start()
        finally:
            await self.close()
