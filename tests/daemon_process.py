"""``imsight run`` as a child process, for the kill -9 tests: started until it answers, killed, restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
from fake_openai import KEY, MODEL

ROOT = Path(__file__).resolve().parents[1]


def model_server_engine(model_url: str, extra: str = "") -> str:
    """The ``[engine]`` section for the fake OpenAI-compatible model server at ``model_url``."""
    return (f'[engine]\nkind = "openai"\nbase_url = "{model_url}/v1"\nmodel = "{MODEL}"\napi_key = "{KEY}"\n'
            f"{extra}")


class DaemonProcess:
    """The daemon with ``config`` on ``port``; each run logs to its own file under ``logs``.

    ``start`` returns once ``probe`` answers 200 (``/healthz``: serving; ``/readyz``: connected too)."""

    def __init__(self, config: Path, port: int, logs: Path, *, probe: str = "/readyz") -> None:
        self.config, self.port, self.logs, self.probe = config, port, logs, probe
        self.proc: asyncio.subprocess.Process | None = None
        self.runs = 0

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.runs += 1
        log = os.open(self.logs / f"daemon-{self.runs}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "run", "--config", str(self.config), cwd=ROOT, stdout=log, stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        os.close(log)
        for _ in range(600):
            try:
                async with http.get(f"http://127.0.0.1:{self.port}{self.probe}") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert self.proc.returncode is None, self.tail()
            await asyncio.sleep(0.05)
        raise AssertionError("daemon did not start\n" + self.tail())

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 30)

    def tail(self) -> str:
        """The end of every run's log, oldest first."""
        return "".join((self.logs / f"daemon-{run}.log").read_text(errors="replace")
                       for run in range(1, self.runs + 1))[-3000:]
