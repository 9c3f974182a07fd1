"""The store's queue rules and durability settings, on a real SQLite file."""

from __future__ import annotations

import sqlite3

import pytest

from bot.schema import MIGRATIONS
from bot.store import NewJob, Store
from core.errors import StoreUnavailable
from core.types import Incoming

_n = iter(range(10**6))


async def _ask(store: Store, chat: str) -> str:
    n = next(_n)
    incoming = Incoming(platform="test", chat_id=chat, message_id=f"m{n}", event_id=f"e{n}", text="q", addressed=True)
    accepted = await store.record(incoming, [], NewJob(()))
    assert accepted.job_id
    return accepted.job_id


@pytest.fixture
async def store(tmp_path):
    async with Store.open(tmp_path / "imsight.db") as s:
        yield s


async def test_one_job_per_conversation_runs_at_a_time_in_order(store):
    a1, a2, b1, a3 = [await _ask(store, c) for c in ("a", "a", "b", "a")]
    first = [await store.claim_next() for _ in range(3)]  # three idle workers
    assert [j.id if j else None for j in first] == [a1, b1, None]
    await store.finish(first[0], text="x", answer_message_id="ans-a1")
    assert (await store.claim_next()).id == a2
    assert await store.claim_next() is None  # a3 waits for a2
    assert (await store.job(a3)).status == "queued"


async def test_a_saved_answer_is_delivered_without_asking_again(store):
    job_id = await _ask(store, "a")
    claimed = await store.claim_next()
    await store.save_answer(claimed.id, "the answer")
    assert await store.requeue_running() == 1  # as after a crash before delivery
    again = await store.claim_next()
    assert (again.id, again.answer, again.attempts) == (job_id, "the answer", 2)


async def test_files_are_durable_and_the_schema_is_versioned(tmp_path):
    path = tmp_path / "imsight.db"
    async with Store.open(path):
        pass
    async with Store.open(path):  # opening again migrates nothing twice
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]


async def test_a_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "imsight.db"
    async with Store.open(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreUnavailable, match="newer imsight"):
        async with Store.open(path):
            pass


async def test_forgetting_a_chat_keeps_what_other_chats_still_use(store):
    from core.images import ImageInfo

    shared, own = (ImageInfo(c * 64, "image/png", 1, 1, 10) for c in "ab")

    async def post(chat: str, message_id: str, images: list[ImageInfo], *, ask: bool) -> str | None:
        incoming = Incoming(platform="test", chat_id=chat, message_id=message_id, text="q", addressed=ask)
        accepted = await store.record(incoming, images, NewJob(tuple(i.sha256 for i in images)) if ask else None)
        return accepted.job_id

    await post("keep", "k1", [shared], ask=False)
    job = await post("gone", "g1", [shared, own], ask=True)
    assert await store.forget_chat("test", "gone") is None  # its question is still queued
    claimed = await store.claim_next()
    await store.finish(claimed, text="a", answer_message_id="g2")
    assert claimed.id == job
    forgotten, orphans = await store.forget_chat("test", "gone")
    assert forgotten == 2 and orphans == [own.sha256]  # the question and the answer; the shared image stays
    assert await store.history("test", "gone", 10) == []
    assert [e.images for e in await store.history("test", "keep", 10)] == [(shared.sha256,)]
    assert await store.job(job) is None


async def test_messages_without_an_event_id_are_not_one_event(store):
    for n in (1, 2):
        accepted = await store.record(Incoming(platform="test", chat_id="c", message_id=f"m{n}"), [], None)
        assert not accepted.duplicate
    again = await store.record(Incoming(platform="test", chat_id="c", message_id="m2"), [], None)
    assert again.duplicate  # the same message twice is still recognised
    assert [e.message_id for e in await store.history("test", "c", 10)] == ["m1", "m2"]
