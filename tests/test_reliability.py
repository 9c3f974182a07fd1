"""Faults and load, through a whole daemon: busy, timeouts, a model server that goes away, a platform
that fails, a full disk, a locked database; and the data dir's permissions."""

from __future__ import annotations

import sqlite3
import stat
from typing import Any

import pytest
from aiohttp import web
from fake_openai import KEY, MODEL, FakeOpenAI
from fake_telegram import TOKEN, FakeTelegram

from bot.workers import ENGINE_AWAY, ENGINE_GONE
from helpers import b64, counts, eventually, free_port, get, loopback, png, post

GROUP = {"id": -100777, "type": "supergroup", "title": "Ops"}


@pytest.fixture
async def model() -> Any:
    server = FakeOpenAI()
    async with loopback(server.app()) as url:
        server.url = f"{url}/v1"
        yield server


def openai(url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": url, "model": MODEL, "api_key": KEY, "connect_attempts": 1, **extra}


async def job_when_ended(http: Any, url: str, job_id: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        _, job = await get(http, url, f"/api/v1/jobs/{job_id}")
        return job if job["status"] in ("done", "failed") else None

    return await eventually(ended)  # type: ignore[no-any-return]


async def test_a_full_chat_is_told_busy_at_once_and_the_first_question_still_answered(model, daemon, http):
    model.delay_s = 1.0
    telegram = FakeTelegram()
    async with loopback(telegram.app()) as tg_url:
        telegram.url = tg_url
        adapters = {"telegram": {"enabled": True, "token": TOKEN, "base_url": f"{tg_url}/bot"}}
        async with daemon(engine=openai(model.url), limits={"max_queued_per_chat": 1}, adapters=adapters):
            for mid in (1, 2, 3):
                telegram.push({"message_id": mid, "date": 0, "chat": GROUP, "text": f"/ask question {mid}",
                               "entities": [{"type": "bot_command", "offset": 0, "length": 4}],
                               "from": {"id": 7, "is_bot": False, "first_name": "Ann"}})

            def replies_to(mid: int) -> list[str]:  # as they read now, after edits
                return [telegram.text_of(n) for n, m in enumerate(telegram.sent)
                        if m["reply_parameters"]["message_id"] == mid]

            busy = await eventually(lambda: replies_to(2) and replies_to(3), timeout_s=10)
            assert "earlier questions in this chat" in busy[0]
            assert not any("question 1" in text for text in replies_to(1))  # the model is still on it
            answer = await eventually(lambda: [t for t in replies_to(1) if "question 1" in t], timeout_s=10)
    assert len(answer) == 1 and len(replies_to(2)) == len(replies_to(3)) == 1


async def test_a_full_queue_is_429_on_the_api_and_stores_nothing(model, daemon, http, data_dir):
    model.delay_s = 1.0
    async with daemon(engine=openai(model.url, workers=1), limits={"max_queued": 1}) as d:
        first = [(await post(http, d.url, {"conversation_id": c, "text": "Q?"}))[0] for c in ("a", "b")]
        assert first == [202, 202]  # one running, one waiting
        before = counts(data_dir)
        async with http.post(f"{d.url}/api/v1/messages", json={"conversation_id": "c", "text": "Q?",
                                                               "images": [{"data": b64(png())}]}) as resp:
            status, body, retry = resp.status, await resp.json(), resp.headers.get("Retry-After")
        assert (status, body["error"]["code"], retry) == (429, "busy", "10")
        assert counts(data_dir) == before


async def test_a_sender_over_the_rate_is_refused(model, daemon, http):
    async with daemon(engine=openai(model.url), limits={"questions_per_sender_per_minute": 2}) as d:
        statuses = [(await post(http, d.url, {"conversation_id": f"c{n}", "text": "Q?",
                                              "sender": {"id": "bo", "name": "Bo"}}))[0] for n in range(3)]
        other, _ = await post(http, d.url, {"conversation_id": "c9", "text": "Q?", "sender": {"id": "cy"}})
    assert statuses == [202, 202, 429] and other == 202


async def test_an_answer_over_the_time_limit_fails_clearly_and_the_next_one_works(model, daemon, http):
    model.delay_s = 5.0
    async with daemon(engine=openai(model.url), limits={"job_timeout_seconds": 0.5}) as d:
        _, slow = await post(http, d.url, {"conversation_id": "a", "text": "Slow?"})
        job = await job_when_ended(http, d.url, slow["job_id"])
        assert (job["status"], job["error"]) == ("failed", "no answer within 0.5s")
        model.delay_s = 0
        _, fast = await post(http, d.url, {"conversation_id": "a", "text": "Fast?", "wait": True})
    assert fast["status"] == "done"


async def test_a_model_server_that_goes_away_is_waited_for_and_the_asker_told_once(daemon, http):
    model, port = FakeOpenAI(), free_port()
    callbacks: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        callbacks.append(await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with loopback(app) as hook_url, daemon(engine=openai(f"http://127.0.0.1:{port}/v1")) as d:
        _, queued = await post(http, d.url, {"conversation_id": "a", "text": "Still there?",
                                             "callback_url": f"{hook_url}/hook"})
        notice = await eventually(lambda: callbacks, timeout_s=10)
        assert [(c["type"], c["notice"]) for c in notice] == [("job.notice", ENGINE_AWAY)]
        async with loopback(model.app(), port):  # the server is back; the job's back-off is 5 s
            job = await job_when_ended(http, d.url, queued["job_id"])
    assert job["status"] == "done" and "Still there?" in job["answer"]
    assert [c["type"] for c in callbacks] == ["job.notice", "job.done"]


async def test_a_model_server_gone_too_long_gets_a_clear_failure(daemon, http):
    async with daemon(engine=openai(f"http://127.0.0.1:{free_port()}/v1"), limits={"engine_retry_minutes": 0}) as d:
        _, body = await post(http, d.url, {"conversation_id": "a", "text": "Hello?", "wait": True})
        _, history = await get(http, d.url, "/api/v1/history/api/a")
    assert body["status"] == "failed" and "cannot reach the model server" in body["error"]  # the cause, for the API
    assert [m["text"] for m in history["messages"] if m["role"] == "bot"] == [ENGINE_GONE]  # what the asker reads


async def test_a_failing_platform_holds_up_only_its_own_conversation(model, daemon, http):
    calls: dict[str, int] = {"/down": 0, "/up": 0}

    async def down(request: web.Request) -> web.Response:
        calls["/down"] += 1
        return web.Response(status=503)

    async def up(request: web.Request) -> web.Response:
        calls["/up"] += 1
        return web.Response()

    app = web.Application()
    app.router.add_post("/down", down)
    app.router.add_post("/up", up)
    async with loopback(app) as hook_url, daemon(engine=openai(model.url, workers=1)) as d:
        _, stuck = await post(http, d.url, {"conversation_id": "a", "text": "Q1", "callback_url": f"{hook_url}/down"})
        _, behind = await post(http, d.url, {"conversation_id": "a", "text": "Q2"})
        _, other = await post(http, d.url, {"conversation_id": "b", "text": "Q3", "callback_url": f"{hook_url}/up"})
        assert (await job_when_ended(http, d.url, other["job_id"]))["status"] == "done"
        _, first = await get(http, d.url, f"/api/v1/jobs/{stuck['job_id']}")
        _, second = await get(http, d.url, f"/api/v1/jobs/{behind['job_id']}")
    assert first["status"] == "running" and calls["/down"] >= 1  # answered, its reply being retried
    assert second["status"] == "queued"  # a conversation's answers stay in order
    assert calls["/up"] == 1


async def test_a_full_database_refuses_with_503_and_keeps_nothing_half_written(daemon, http, data_dir):
    async with daemon() as d:
        status, _ = await post(http, d.url, {"conversation_id": "a", "text": "", "images": [{"data": b64(png())}]})
        assert status == 200
        before = counts(data_dir)
        conn = d.store._db._conn  # the daemon's own connection: SQLite's page cap is set per connection
        (pages,) = await (await conn.execute("PRAGMA page_count")).fetchone()
        await conn.execute(f"PRAGMA max_page_count = {pages}")
        question = {"conversation_id": "a", "text": "Why? " * 6000, "message_id": "m-full",  # 30 KB: new pages
                    "images": [{"data": b64(png((1, 2, 3)))}]}
        status, body = await post(http, d.url, question)
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert "full" in body["error"]["message"]
        after = counts(data_dir)
        assert {k: v for k, v in after.items() if k != "files"} == {k: v for k, v in before.items() if k != "files"}
        await conn.execute("PRAGMA max_page_count = 1073741823")
        status, body = await post(http, d.url, question)
        assert status == 202, body  # the same message, taken once there is room


async def test_a_locked_database_refuses_with_503_then_recovers(daemon, http, data_dir):
    async with daemon(storage={"lock_timeout_seconds": 0.2}) as d:
        other = sqlite3.connect(data_dir / "imsight.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            status, body = await post(http, d.url, {"conversation_id": "a", "text": "", "message_id": "m1"})
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert "locked" in body["error"]["message"]
        status, _ = await post(http, d.url, {"conversation_id": "a", "text": "", "message_id": "m1"})
        assert status == 200


async def test_the_data_dir_and_its_files_are_private(daemon, http, data_dir):
    async with daemon() as d:
        await post(http, d.url, {"conversation_id": "a", "text": "", "images": [{"data": b64(png())}]})
        modes = {p.relative_to(data_dir.parent).as_posix(): stat.S_IMODE(p.stat().st_mode)
                 for p in [data_dir, *data_dir.rglob("*")]}  # while running: the -wal and -shm files too
    assert modes and all(mode == (0o700 if (data_dir.parent / name).is_dir() else 0o600)
                         for name, mode in modes.items()), {k: oct(v) for k, v in modes.items()}
    assert any(name.endswith("imsight.db-wal") for name in modes)
