"""Wake request handlers that wait for a job to end."""

from __future__ import annotations

import asyncio
from collections import defaultdict

__all__ = ["JobWatch"]


class JobWatch:
    """In-memory only: the job's state lives in the store; this just says 'look again'."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def subscribe(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        if self._closed:
            event.set()
        self._waiters[job_id].add(event)
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[job_id]

    def notify(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def close(self) -> None:
        """Release every waiter: the daemon is stopping and will not answer them now."""
        self._closed = True
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()
