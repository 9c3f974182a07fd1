"""The store's queue rules and durability settings, on a real SQLite file."""

from __future__ import annotations

import sqlite3
import time

import pytest

from adapters.base import Accepted, Incoming
from bot.admission import Admission
from bot.schema import MIGRATIONS
from bot.store import NewJob, Store
from core.errors import Busy, StoreUnavailable
from helpers import answer_and_send

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
    await answer_and_send(store, first[0], "x", "ans-a1")
    assert (await store.claim_next()).id == a2
    assert await store.claim_next() is None  # a3 waits for a2
    assert (await store.job(a3)).status == "queued"


async def test_an_answer_in_the_outbox_is_sent_after_a_crash_not_asked_again(store):
    job_id = await _ask(store, "a")
    claimed = await store.claim_next()
    await store.answered(claimed, "the answer")
    assert await store.requeue_running() == 0  # as after a crash before delivery: not run again
    assert await store.claim_next() is None
    (reply,) = await store.due_replies(10)
    assert (reply.job.id, reply.text, reply.kind) == (job_id, "the answer", "answer")
    await store.reply_sent(reply, "sent-1")
    view = await store.job_view(job_id)
    assert (view.status, view.answer, view.answer_message_id) == ("done", "the answer", "sent-1")
    assert await store.due_replies(10) == []


async def test_a_job_cut_off_before_its_answer_runs_again(store):
    job_id = await _ask(store, "a")
    await store.claim_next()
    assert await store.requeue_running() == 1
    again = await store.claim_next()
    assert (again.id, again.attempts) == (job_id, 2)


async def test_a_chatty_conversation_does_not_starve_the_others(store):
    chatty = [await _ask(store, "chatty") for _ in range(5)]
    quiet = await _ask(store, "quiet")
    order = []
    while (job := await store.claim_next()) is not None:  # one worker
        order.append(job.id)
        await answer_and_send(store, job, "x", f"sent-{job.id}")
    assert order.index(quiet) == 1  # right after the chatty one's first, not after all five
    assert [j for j in order if j != quiet] == chatty  # each conversation still in the order asked


async def test_a_job_backing_off_holds_its_conversation_only_and_notices_go_once(store):
    a1, a2, b1 = await _ask(store, "a"), await _ask(store, "a"), await _ask(store, "b")
    job = await store.claim_next()
    assert job.id == a1
    await store.retry_later(job, 60, notice="model away")
    assert (await store.claim_next()).id == b1  # a2 waits behind a1, which waits
    assert await store.claim_next() is None
    assert await store.waiting_until() > time.time() + 50
    await store.retry_later(await store.job(a1), 60, notice="model away")  # put back again: no second notice
    replies = await store.due_replies(10)
    assert [(r.job.id, r.kind, r.text) for r in replies] == [(a1, "notice", "model away")]
    assert (await store.job(a2)).status == "queued"


async def test_a_failing_send_holds_back_its_conversation_only_and_can_give_up(store):
    a1, a2, b1 = await _ask(store, "a"), await _ask(store, "a"), await _ask(store, "b")
    for job_id in (a1, b1):
        job = await store.claim_next()
        assert job.id == job_id
        await store.answered(job, f"answer {job_id}")
    first, _ = await store.due_replies(10)
    await store.reply_failed(first, "platform down", retry_at=time.time() + 60)
    assert [r.job.id for r in await store.due_replies(10)] == [b1]  # a's reply waits; b's goes
    await store.reply_failed(first, "platform gone", retry_at=None)
    view = await store.job_view(a1)
    assert (view.status, view.error) == ("failed", "reply not delivered: platform gone")
    assert (await store.claim_next()).id == a2  # the conversation moves on


async def test_admission_refuses_inside_the_transaction(store):
    admission = Admission(max_queued=3, max_per_conversation=2, sender_per_minute=0)

    async def ask(chat: str, *, refuse: bool = False) -> Accepted:
        n = next(_n)
        incoming = Incoming(platform="test", chat_id=chat, message_id=f"m{n}", event_id=f"e{n}", text="q",
                            sender_id=f"s{n}", addressed=True)
        return await store.record(incoming, [], NewJob(()), admission=admission, refuse_when_busy=refuse)

    results = [await ask(c) for c in ("a", "a", "a", "b", "c")]
    assert [r.refused for r in results] == [None, None, "conversation_full", None, "queue_full"]
    busy = await store.job_view(results[2].job_id)
    assert (busy.status, busy.error) == ("failed", "refused: conversation_full")
    assert [r.job.id for r in await store.due_replies(10)] == [results[2].job_id, results[4].job_id]
    before = await store.history("test", "d", 10)
    with pytest.raises(Busy):
        await ask("d", refuse=True)
    assert await store.history("test", "d", 10) == before == []  # refused with nothing stored


async def test_a_sender_over_the_rate_is_told_so(store):
    admission = Admission(sender_per_minute=2)
    refused = []
    for n in range(4):
        incoming = Incoming(platform="test", chat_id=f"c{n}", message_id=f"r{n}", text="q", sender_id="ann",
                            addressed=True)
        refused.append((await store.record(incoming, [], NewJob(()), admission=admission)).refused)
    assert refused == [None, None, "rate_limited", "rate_limited"]


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
    assert await store.retention.forget_chat("test", "gone") is None  # its question is still queued
    claimed = await store.claim_next()
    await answer_and_send(store, claimed, "a", "g2")
    assert claimed.id == job
    purged = await store.retention.forget_chat("test", "gone")
    # the question and the answer; the shared image stays
    assert purged.messages == 2 and purged.orphans == [own.sha256]
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


async def test_a_replayed_event_stays_a_duplicate_after_its_chat_was_forgotten(store, tmp_path):
    incoming = Incoming(platform="test", chat_id="c", message_id="m1", event_id="e1", text="q", addressed=True)
    first = await store.record(incoming, [], NewJob(()))
    await answer_and_send(store, await store.claim_next(), "a", "a1")
    assert (await store.retention.forget_chat("test", "c")).messages == 2
    again = await store.record(incoming, [], NewJob(()))  # the same signed event, captured and sent again
    assert again.duplicate and again.job_id is None and first.job_id
    assert await store.history("test", "c", 10) == []
    with sqlite3.connect(tmp_path / "imsight.db") as db:  # only ids are left of it
        assert db.execute("SELECT payload FROM inbox").fetchall() == [("{}",)]
    assert await store.retention.drop_tombstones(time.time() + 1) == 1


def test_a_job_context_round_trips_and_reads_rows_written_before_its_fields():
    from bot.job_context import About, JobContext

    context = JobContext(rule=2, turns=(4, 5), about=About("Ann", 1700000000.0), image_problems=("too big",))
    assert JobContext.from_json(context.to_json()) == context
    assert JobContext.from_json('{"rule": 1, "turns": []}') == JobContext(rule=1)  # an older row
    assert JobContext.from_json('{"command": "/help"}').command == "/help"
    assert '"turns": []' in JobContext(command="/help").to_json()  # retention's json_each reads it
