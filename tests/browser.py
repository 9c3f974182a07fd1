"""Headless Chromium driven over the DevTools protocol (aiohttp's WebSocket client; no driver to install).

Used to look at pages as a person would: fill and submit a form, measure what overflows, take a
screenshot. Debian's chromium is installed with apt when missing (as root); else the test is skipped.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                       timeout=600, check=False)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed here (apt-get install chromium)")
    return found


class Browser:
    """``async with Browser(profile_dir) as b:`` one page of a headless Chromium."""

    def __init__(self, profile: Path, size: tuple[int, int] = (1200, 1000)) -> None:
        self._profile, self._size = profile, size
        self._process: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Browser:
        self._profile.mkdir(parents=True, exist_ok=True)
        # The flags keep it off the network: this machine has none, and it would try at every start.
        self._process = await asyncio.create_subprocess_exec(
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
            f"--window-size={self._size[0]},{self._size[1]}", "--remote-debugging-port=0",
            f"--user-data-dir={self._profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        port_file = self._profile / "DevToolsActivePort"
        for _ in range(600):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            page = next(t for t in await resp.json() if t["type"] == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.call("Page.enable")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self._process is not None:
            self._process.kill()
            await self._process.wait()

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            data = message.json()
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif "method" in data:
                self._events.put_nowait(data)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        number = next(self._ids)
        self._waiting[number] = asyncio.get_running_loop().create_future()
        await self._ws.send_json({"id": number, "method": method, "params": params})
        answer = await asyncio.wait_for(self._waiting[number], 30)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    async def loaded(self) -> None:
        """Wait for the next page load to finish."""
        while (await asyncio.wait_for(self._events.get(), 30))["method"] != "Page.loadEventFired":
            pass

    async def goto(self, url: str) -> None:
        self._drain()
        await self.call("Page.navigate", url=url)
        await self.loaded()

    async def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page (DevTools is not bound by the page's no-script policy)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def submit(self, form_script: str) -> None:
        """Run a script that submits a form, and wait for the page it leads to."""
        self._drain()
        await self.evaluate(form_script)
        await self.loaded()

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))

    def _drain(self) -> None:
        while not self._events.empty():
            self._events.get_nowait()
