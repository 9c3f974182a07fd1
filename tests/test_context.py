"""Context resolution, one test per rule of DESIGN.md, on a real SQLite store."""

from __future__ import annotations

import itertools
import time

import pytest

from adapters.base import ImageRef, Incoming
from bot.context import NONE, OWN, RECENT, REPLY, THREAD, Resolution, resolve
from bot.store import Store
from bot.workers import ASK_FOR_IMAGE
from core.images import ImageLimits, inspect, sha256
from helpers import answer_and_send, b64, png, post

A, B, C = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))
WINDOW_S = 600
_ids = itertools.count()


@pytest.fixture
async def store(tmp_path):
    async with Store.open(tmp_path / "imsight.db") as s:
        yield s


class Chat:
    """Posts messages into one chat of the store the way the dispatcher does."""

    def __init__(self, store: Store, chat_id: str = "chat") -> None:
        self.store, self.chat_id = store, chat_id
        self.now = time.time() - 3600

    async def post(self, *, images=(), text="", reply_to=None, thread=None, sender="ann", minutes_later=1.0,
                   max_turns=6) -> tuple[str, Resolution | None]:
        self.now += minutes_later * 60
        incoming = Incoming(
            platform="test", chat_id=self.chat_id, message_id=f"m{next(_ids)}", event_id=f"e{next(_ids)}",
            thread_id=thread, reply_to=reply_to, sender_id=sender, sender_name=sender.title(), text=text,
            addressed=bool(text), images=tuple(ImageRef(data=i) for i in images), received_at=self.now,
        )
        infos = [inspect(i, ImageLimits()) for i in images]
        resolution = None
        if incoming.addressed:
            resolution = await resolve(self.store, incoming, tuple(i.sha256 for i in infos),
                                       window_s=WINDOW_S, max_turns=max_turns)
        accepted = await self.store.record(incoming, infos, resolution.as_job() if resolution else None)
        return accepted.message_id, resolution

    async def answer_all(self) -> list[str]:
        """Answer every queued job the way the workers record it; return the answers' message ids."""
        ids = []
        while (job := await self.store.claim_next()) is not None:
            ids.append(f"answer-{job.id}")
            await answer_and_send(self.store, job, f"answer to {job.question.text}", ids[-1])
        return ids


async def test_rule1_images_in_the_question_itself(store):
    chat = Chat(store)
    old, _ = await chat.post(images=[A])
    _, got = await chat.post(images=[B, C], text="What are these?", reply_to=old)
    assert got.rule == OWN
    assert got.images == (sha256(B), sha256(C))
    assert got.as_job().context.about is None  # no "About the image..." prefix for its own images


async def test_rule2_images_of_the_replied_to_message(store):
    chat = Chat(store)
    old, _ = await chat.post(images=[A], sender="ann")
    await chat.post(images=[B], sender="bob")
    _, got = await chat.post(text="And this one?", reply_to=old, sender="bob")
    assert (got.rule, got.images) == (REPLY, (sha256(A),))
    assert got.about.sender_name == "Ann"


async def test_rule2_reply_to_a_bot_answer_brings_its_images_and_the_thread_so_far(store):
    chat = Chat(store)
    await chat.post(images=[A], text="What is this?")
    (first_answer,) = await chat.answer_all()
    await chat.post(images=[B], sender="bob")  # a newer image elsewhere in the chat must not win
    _, second = await chat.post(text="Why?", reply_to=first_answer)
    assert (second.rule, second.images) == (REPLY, (sha256(A),))
    (second_answer,) = await chat.answer_all()
    _, third = await chat.post(text="And then?", reply_to=second_answer)
    turns = await store.messages_by_row(list(third.turns))
    assert [t.text for t in turns] == ["What is this?", "answer to What is this?", "Why?", "answer to Why?"]
    assert third.images == (sha256(A),)

    _, short = await chat.post(text="Once more?", reply_to=second_answer, max_turns=1)
    assert [t.text for t in await store.messages_by_row(list(short.turns))] == ["Why?", "answer to Why?"]


async def test_rule2_unknown_reply_target_falls_through(store):
    chat = Chat(store)
    await chat.post(images=[A])
    _, got = await chat.post(text="This?", reply_to="never-seen")
    assert (got.rule, got.images) == (RECENT, (sha256(A),))


async def test_rule3_images_posted_earlier_in_the_same_thread(store):
    chat = Chat(store)
    await chat.post(images=[A], thread="t1", minutes_later=0)
    await chat.post(images=[B], thread="t2")
    await chat.post(images=[C])  # newest in the chat, but outside the thread
    _, got = await chat.post(text="What broke?", thread="t1", minutes_later=60)  # long after: no window
    assert (got.rule, got.images) == (THREAD, (sha256(A),))


async def test_rule4_latest_image_of_the_same_sender_then_anyones_within_the_window(store):
    chat = Chat(store)
    await chat.post(images=[A], sender="ann")
    await chat.post(images=[B], sender="bob")
    _, mine = await chat.post(text="Mine?", sender="ann")
    _, carol = await chat.post(text="Anyone's?", sender="carol")
    assert (mine.rule, mine.images) == (RECENT, (sha256(A),))
    assert (carol.rule, carol.images) == (RECENT, (sha256(B),))
    assert carol.about.sender_name == "Bob"


async def test_rule4_earlier_questions_about_the_same_image_come_along(store):
    chat = Chat(store)
    await chat.post(images=[A], text="What is it?")
    await chat.answer_all()
    _, got = await chat.post(text="More?")
    assert [t.text for t in await store.messages_by_row(list(got.turns))] == ["What is it?", "answer to What is it?"]


async def test_rule5_nothing_within_the_window(store):
    chat = Chat(store)
    await chat.post(images=[A])
    _, got = await chat.post(text="What?", minutes_later=WINDOW_S / 60 + 1)
    assert (got.rule, got.images, got.turns) == (NONE, (), ())


async def test_rule5_other_chats_do_not_count(store):
    await Chat(store, "other").post(images=[A])
    _, got = await Chat(store, "mine").post(text="What?")
    assert got.rule == NONE


async def test_rule5_can_ask_for_an_image_instead_of_answering(daemon, http):
    async with daemon(context={"no_image": "ask"}) as d:
        _, asked = await post(http, d.url, {"conversation_id": "c1", "text": "What?", "wait": True})
        await post(http, d.url, {"conversation_id": "c1", "images": [{"data": b64(A)}]})
        _, answered = await post(http, d.url, {"conversation_id": "c1", "text": "Now?", "wait": True})
    assert asked["answer"] == ASK_FOR_IMAGE
    assert answered["images"] == [sha256(A)]
    assert answered["answer"] != ASK_FOR_IMAGE
