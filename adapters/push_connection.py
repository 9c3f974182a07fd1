"""An outbound WebSocket a platform pushes its events through, kept open: Feishu's long connection,
DingTalk's Stream mode (PROTOCOLS.md §7). The bot host needs no inbound route, only HTTPS out.

Why not the platforms' SDKs: lark-oapi's ``ws.Client`` binds an event loop at import and blocks in
``start()``; dingtalk-stream posts with blocking ``requests`` inside its coroutines and fires a task
per frame that nothing awaits. Both protocols are small, so each adapter speaks its own over
aiohttp's WebSocket client, and this module keeps the connection: the first one opened at start
(wrong credentials stop the daemon there), each frame handled in a task of its own (an event is
acknowledged only after it is stored, and a slow store must not hold up pings), reconnects after a
drop or when the server asks, with jittered exponential backoff, and a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp

from adapters.base import ConnectionState
from core.errors import AdapterError

__all__ = ["PushConnection", "Reconnect", "Superseded"]

log = logging.getLogger(__name__)


class Reconnect(Exception):
    """Raised by ``serve`` when the server asks the client to connect again."""


class Superseded(Exception):
    """Raised by ``serve`` when the platform says a newer connection with the same credentials took over
    (a second daemon): connecting again would only take it back, and back again, in a loop."""


class PushConnection(ABC):
    """Opens, reads and reopens one platform's event connection until stopped."""

    platform: str = ""

    def __init__(self, *, first_wait_s: float = 1.0, longest_wait_s: float = 60.0) -> None:
        self.first_wait_s, self.longest_wait_s = first_wait_s, longest_wait_s
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._runner: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._last: dict[str, asyncio.Task[None]] = {}  # a chat's newest event task (``handle``'s order)
        self._stopping = False
        self._reconnects = 0

    # ---- what a platform supplies -----------------------------------------------------------

    @abstractmethod
    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        """Ask the platform where to connect (credentials, ticket) and open the WebSocket.

        Raises ``AdapterError`` (``retryable=False`` when the credentials are refused)."""

    @abstractmethod
    async def serve(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        """Read frames until the socket closes (return) or the server asks to reconnect (``Reconnect``);
        hand events to ``handle`` so the reading goes on while they are stored."""

    async def json_frames(self, socket: aiohttp.ClientWebSocketResponse) -> AsyncIterator[dict[str, Any]]:
        """The socket's JSON-object frames until it closes (for ``serve``); others are logged and skipped."""
        async for message in socket:
            if message.type == aiohttp.WSMsgType.ERROR:
                raise aiohttp.ClientError(f"WebSocket error: {socket.exception()}")
            if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                continue
            try:
                frame = json.loads(message.data)
            except ValueError:
                frame = None
            if isinstance(frame, dict):
                yield frame
            else:
                log.warning("%s: a frame that is not a JSON object, ignored", self.platform)

    # ---- running ------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return ConnectionState(self.platform, self._socket is not None and not self._socket.closed, self._reconnects)

    async def probe(self) -> None:
        """Open a connection and close it again (``imsight doctor --online``); raises as ``connect`` does."""
        socket = await self.connect()
        await socket.close()

    async def start(self) -> None:
        """Open the first connection now (errors stop the daemon's start), then keep it in the background."""
        self._stopping = False
        self._opened(await self.connect())
        self._runner = asyncio.create_task(self._run(), name=f"{self.platform} connection")

    async def stop(self) -> None:
        """Close the connection; events being stored finish (and are acknowledged) first, briefly."""
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        for task in self._handlers:
            task.cancel()
        if self._socket is not None:
            await self._socket.close()
            self._socket = None

    def handle(self, work: Coroutine[Any, Any, None], *, after: str = "") -> None:
        """Run ``work`` as its own task, kept until done, so a stop can wait for it.

        Events with the same ``after`` key (a chat) are taken in the order they came: an image and the
        question after it, pushed a moment apart, must reach the store in that order (each chat's
        events wait for its previous one; other chats' do not)."""
        previous = self._last.get(after) if after else None
        task = asyncio.create_task(self._in_turn(previous, work))
        self._handlers.add(task)
        if after:
            self._last[after] = task
        task.add_done_callback(self._handled)

    @staticmethod
    async def _in_turn(previous: asyncio.Task[None] | None, work: Coroutine[Any, Any, None]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await work

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        for key in [key for key, last in self._last.items() if last is task]:
            del self._last[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: an event failed: %s", self.platform, task.exception())

    def _opened(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        log.info("%s: connection open", self.platform)

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            socket = self._socket
            if socket is not None:
                try:
                    await self.serve(socket)
                    reason = "closed by the server"
                except Reconnect as asked:
                    reason = f"the server asked to reconnect ({asked})"
                    failures = 0
                except Superseded as why:
                    await socket.close()
                    self._socket = None
                    log.error("%s: another connection with these credentials took over (%s); not connecting "
                              "again: stop the other daemon, then restart this one", self.platform, why)
                    return
                except Exception as exc:  # whatever broke the reading, the connection is opened again
                    reason = f"{type(exc).__name__}: {exc}"
                await socket.close()
                self._socket = None
                log.warning("%s: connection lost (%s); connecting again", self.platform, reason)
            # Jittered, growing waits: many daemons (or one in a crash loop) do not reconnect in step.
            wait = min(self.longest_wait_s, self.first_wait_s * 2 ** failures) * random.uniform(0.5, 1.0)
            await asyncio.sleep(wait if failures or socket is None else random.uniform(0, self.first_wait_s))
            try:
                self._opened(await self.connect())
                self._reconnects += 1
                failures = 0
            except (AdapterError, aiohttp.ClientError, OSError) as exc:
                failures = min(failures + 1, 16)
                log.warning("%s: cannot connect (%s); trying again", self.platform, exc)
