"""Whether a platform's API answers: failures in a row, reset by the next success (for ``/readyz``)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from core.errors import AdapterError

__all__ = ["Reachability"]

T = TypeVar("T")

_UNREACHABLE_AFTER = 2  # one failure may be a blip; two in a row say the platform is away


class Reachability:
    def __init__(self) -> None:
        self.failures = 0

    @property
    def reachable(self) -> bool:
        return self.failures < _UNREACHABLE_AFTER

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1

    async def track(self, call: Awaitable[T]) -> T:
        """Await ``call``; a retryable ``AdapterError`` (network, 5xx, rate limit) counts as a failure."""
        try:
            result = await call
        except AdapterError as exc:
            if exc.retryable:
                self.failed()
            raise
        self.succeeded()
        return result
