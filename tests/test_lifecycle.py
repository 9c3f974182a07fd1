"""Lifecycle: restarts keep history and queued work; shutdown is graceful; start-up fails clearly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

from bot.daemon import Daemon
from core.errors import ImsightError
from core.images import sha256
from helpers import b64, eventually, get, png, post

RED = png((200, 30, 30))


async def test_follow_up_after_a_full_restart_uses_the_first_image(make_config, http, caplog):
    config = make_config()
    async with Daemon(config) as first:
        with caplog.at_level("INFO", logger="bot.workers"):
            _, asked = await post(http, first.url, {
                "conversation_id": "c1", "text": "What?", "wait": True, "images": [{"data": b64(RED)}],
            })
    # The job's log line says where the engine's time went (a slow answer: waiting, or its prefill).
    answered = [r.getMessage() for r in caplog.records if " answered in " in r.getMessage()]
    assert len(answered) == 1 and re.search(r"first token after \d+\.\d\ds, prefilled \(.+\) after waiting "
                                             r"\d+\.\d\ds\)$", answered[0]), answered
    async with Daemon(config) as second:
        status, follow = await post(http, second.url, {"conversation_id": "c1", "text": "Why?", "wait": True})
        _, history = await get(http, second.url, "/api/v1/history/api/c1")
    assert status == 200
    assert follow["images"] == asked["images"] == [sha256(RED)]
    assert [m["role"] for m in history["messages"]] == ["user", "bot", "user", "bot"]


class DaemonProcess:
    """``imsight run`` in a child process, as an operator starts it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.log: list[str] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "run", "--config", str(self.config),
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert self.proc.stderr is not None
        async with asyncio.timeout(60):
            while line := (await self.proc.stderr.readline()).decode():
                self.log.append(line)
                if found := re.search(r"listening on (http://\S+)", line):
                    self.url = found.group(1)
                    break
        assert self.url, "".join(self.log)
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := (await self.proc.stderr.readline()).decode():
            self.log.append(line)

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        async with asyncio.timeout(60):
            return await self.proc.wait()


def _write_config(tmp_path: Path, data_dir: Path, model: Path, tokens: int) -> Path:
    path = tmp_path / "imsight.toml"
    path.write_text(
        f'[server]\nport = 0\nshutdown_grace_seconds = 30\n[storage]\ndata_dir = "{data_dir}"\n'
        f'[engine]\nmodel_path = "{model}"\nmax_new_tokens = {tokens}\n'
    )
    return path


def _statuses(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "imsight.db") as db:
        return dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_queued_jobs_are_answered_once_after_a_restart(sig, tmp_path, data_dir, tiny_model, make_config, http):
    process = DaemonProcess(_write_config(tmp_path, data_dir, tiny_model, tokens=300))
    await process.start()
    await post(http, process.url, {"conversation_id": "c1", "images": [{"data": b64(RED)}]})
    jobs = []
    for n in range(5):  # one conversation: answered one after another, so most wait in the queue
        status, body = await post(http, process.url, {"conversation_id": "c1", "text": f"Question {n}?"})
        assert status == 202
        jobs.append(body["job_id"])
    code = await process.signal(sig)

    before = _statuses(data_dir)
    if sig == signal.SIGTERM:
        assert code == 0, "".join(process.log)
        assert "running" not in before  # the answer in progress was allowed to finish
    assert before.get("queued", 0) >= 1, before  # and the rest were left for the next start

    async with Daemon(make_config()) as again:
        for job in jobs:
            await _done(http, again.url, job)
        _, history = await get(http, again.url, "/api/v1/history/api/c1")
    answers = [m["answers"] for m in history["messages"] if m["role"] == "bot"]
    questions = [m["message_id"] for m in history["messages"] if m["role"] == "user" and m["text"]]
    assert answers == questions  # every question answered exactly once, in the order asked
    assert _statuses(data_dir) == {"done": 5}


async def test_shutdown_answers_waiting_requests_202_and_keeps_their_jobs(make_config, http, data_dir):
    config = make_config(engine={"max_new_tokens": 2000}, server={"shutdown_grace_seconds": 0})
    daemon = Daemon(config)
    await daemon.start()
    waiting = asyncio.create_task(post(http, daemon.url, {
        "conversation_id": "c1", "text": "Long answer?", "wait": True, "images": [{"data": b64(RED)}],
    }))
    await eventually(lambda: _statuses(data_dir).get("running"))
    await daemon.stop()
    status, body = await asyncio.wait_for(waiting, 10)
    assert status == 202
    assert _statuses(data_dir) == {"running": 1}  # cut off: it runs again after the next start
    async with Daemon(make_config(engine={"max_new_tokens": 4})) as again:
        await _done(http, again.url, body["job_id"])


async def _done(http, url: str, job_id: str) -> dict:
    async def check():
        _, job = await get(http, url, f"/api/v1/jobs/{job_id}")
        return job if job["status"] == "done" else None

    return await eventually(check)


async def test_a_port_in_use_is_a_clear_error(make_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ImsightError, match=f"cannot listen on 127.0.0.1:{port}"):
            await Daemon(make_config(server={"port": port})).start()
