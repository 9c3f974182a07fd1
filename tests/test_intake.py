"""Platform events: acknowledged once in the inbox, images downloaded afterwards, resumed after a stop."""

from __future__ import annotations

import itertools

import pytest
from fake_platform import FakeChatAdapter, FakePlatform

from adapters.base import ImageRef, Incoming
from bot.daemon import Daemon
from core.images import sha256
from helpers import counts, eventually, png

SHOT = png((10, 120, 240))
_ids = itertools.count()


def event(*refs: str, text: str = "", message_id: str | None = None, event_id: str | None = None) -> Incoming:
    n = next(_ids)
    return Incoming(
        platform="fake", chat_id="group-1", message_id=message_id or f"m{n}", event_id=event_id or f"e{n}",
        sender_id="ann", sender_name="Ann", text=text, addressed=bool(text),
        images=tuple(ImageRef(ref=r) for r in refs),
    )


@pytest.fixture
async def platform(aiohttp_server):
    fake = FakePlatform()
    fake.files["shot"] = SHOT
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url(""))
    return fake


async def test_events_are_acknowledged_before_their_images_download(platform, make_config, data_dir):
    platform.open.clear()
    adapter = FakeChatAdapter(platform.url)
    async with Daemon(make_config(), adapters=[adapter]):
        accepted = await adapter.deliver(event("shot", text="Why red?"))
        assert accepted.pending and accepted.job_id is None
        rows = counts(data_dir)
        assert (rows["inbox"], rows["messages"]) == (1, 0)  # committed, acknowledged, not yet taken in
        platform.open.set()
        await eventually(lambda: platform.sent)
    (reply,) = platform.sent
    assert reply["images"] == [sha256(SHOT)]
    assert reply["reply_to"] == accepted.message_id


async def test_an_intake_cut_off_by_a_stop_resumes_at_the_next_start(platform, make_config, data_dir):
    platform.open.clear()
    first = FakeChatAdapter(platform.url)
    async with Daemon(make_config(), adapters=[first]):
        await first.deliver(event("shot", text="What is it?"))
        await eventually(lambda: platform.downloads)
    assert counts(data_dir)["messages"] == 0
    platform.open.set()
    async with Daemon(make_config(), adapters=[FakeChatAdapter(platform.url)]):
        await eventually(lambda: platform.sent)
    assert len(platform.sent) == 1
    assert platform.sent[0]["images"] == [sha256(SHOT)]
    assert counts(data_dir)["jobs"] == 1


async def test_a_redelivered_event_is_taken_in_once(platform, make_config, data_dir):
    platform.open.clear()
    adapter = FakeChatAdapter(platform.url)
    async with Daemon(make_config(), adapters=[adapter]):
        first = await adapter.deliver(event("shot", text="Q?", message_id="m-dup", event_id="e-dup"))
        again = await adapter.deliver(event("shot", text="Q?", message_id="m-dup", event_id="e-other"))
        assert again.duplicate and again.pending
        platform.open.set()
        await eventually(lambda: platform.sent)
        late = await adapter.deliver(event("shot", text="Q?", message_id="m-other", event_id="e-dup"))
    assert late.duplicate and late.job_id is not None and not late.pending
    assert first.message_id == again.message_id == late.message_id
    assert (counts(data_dir)["jobs"], len(platform.sent)) == (1, 1)


async def test_a_platform_hiccup_is_retried(platform, make_config):
    platform.unavailable = 1
    adapter = FakeChatAdapter(platform.url)
    async with Daemon(make_config(), adapters=[adapter]):
        await adapter.deliver(event("shot", text="Q?"))
        await eventually(lambda: platform.sent)
    assert platform.downloads == ["shot", "shot"]
    assert platform.sent[0]["images"] == [sha256(SHOT)]


async def test_a_lost_or_broken_image_leaves_the_question_answered_without_it(platform, make_config):
    platform.files["broken"] = SHOT[:40]
    adapter = FakeChatAdapter(platform.url)
    async with Daemon(make_config(), adapters=[adapter]):
        await adapter.deliver(event("expired", "broken", text="What is this?"))

        async def answered():
            # The answer is recorded once the platform has accepted it, a moment after it arrived there.
            history = await adapter.host.history("fake", "group-1", 10)
            return history if len(history) == 2 else None

        history = await eventually(answered)
    assert platform.sent[0]["images"] == []
    assert not platform.sent[0]["failed"]
    assert [m.text for m in history] == ["What is this?", platform.sent[0]["text"]]


async def test_a_chats_messages_are_taken_in_in_order(platform, make_config):
    platform.open.clear()
    adapter = FakeChatAdapter(platform.url)
    async with Daemon(make_config(), adapters=[adapter]):
        await adapter.deliver(event("shot"))  # a screenshot, still downloading ...
        question = await adapter.deliver(event(text="What does it say?"))
        assert question.pending  # acknowledged at once, taken in after the screenshot
        platform.open.set()
        await eventually(lambda: platform.sent)
    assert platform.sent[0]["images"] == [sha256(SHOT)]  # ... and the question after it waited for it

