"""WeCom's intelligent robot against a fake long connection on loopback (plain ws://) with real
image encryption: group questions with screenshots, follow-ups quoting them, streamed answers,
re-deliveries, throttling, a dropped connection, a newer connection taking over, and commands."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import pytest
from fake_wecom import BOT_ID, SECRET, FakeWeCom, encrypt_media, message

import helpers
from adapters.wecom import WeComSettings, decrypt_media
from core.images import sha256
from helpers import eventually, get, loopback, png

SHOT = png((20, 90, 220), (80, 60))
OTHER = png((220, 200, 20), (64, 48))


@pytest.fixture
async def fake():
    server = FakeWeCom()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


def wecom_config(fake: FakeWeCom, **extra: Any) -> dict[str, Any]:
    return {"wecom": {"enabled": True, "bot_id": BOT_ID, "secret": SECRET, "ws_url": fake.ws_url, **extra}}


async def answered(d, http, count: int, chat: str = "wrGroup1") -> list[dict[str, Any]]:
    return await helpers.answered(http, d.url, "wecom", chat, count)


async def finished(fake: FakeWeCom, req_id: str) -> dict[str, Any]:
    """The closing frame of the stream answering ``req_id``."""
    return await eventually(lambda: next((s for s in fake.streams(req_id) if s["finish"]), None))


def test_media_decrypts_as_wecom_encrypts_it():
    key = os.urandom(32)
    for size in (0, 1, 31, 32, 1000):
        data = os.urandom(size) or b"x"
        unpadded_key = base64.b64encode(key).decode().rstrip("=")
        assert decrypt_media(encrypt_media(data, key), unpadded_key) == data
    # A wrong key: random plaintext, whose last bytes happen to look like padding 1 time in ~250 (so a
    # fixed key here, not a random one: the test was flaky).
    wrong = base64.b64encode(bytes(range(100, 132))).decode()
    with pytest.raises(ValueError, match="padding"):
        decrypt_media(encrypt_media(b"picture", bytes(range(32))), wrong)


async def test_a_screenshot_question_in_a_group_and_a_follow_up_quoting_it(fake, daemon, http):
    shot = fake.image(SHOT)
    async with daemon(adapters=wecom_config(fake)) as d:
        await fake.connected(1)
        first = await fake.push(message("m1", text="@VQA what does this error mean?", image=shot))
        await answered(d, http, 1)
        closing = await finished(fake, first)
        quote = {"msgtype": "mixed", "mixed": {"msg_item": [{"msgtype": "image", "image": shot}]}}
        second = await fake.push(message("m2", text="@VQA and how do I fix it?", quote=quote))
        done = await answered(d, http, 2)
        await finished(fake, second)
        status, history = await get(http, d.url, "/api/v1/history/wecom/wrGroup1")
    assert [a["used_images"] for a in done] == [[sha256(SHOT)]] * 2
    streams = fake.streams(first)
    assert len({s["id"] for s in streams}) == 1 and streams[-1] is closing  # one stream, closed last
    assert closing["content"] == done[0]["text"]
    questions = [m["text"] for m in history["messages"] if m["role"] == "user"]
    assert status == 200 and questions == ["what does this error mean?", "and how do I fix it?"]
    assert fake.sent == []  # everything went as stream replies


async def test_an_image_alone_is_acknowledged_and_the_question_after_it_is_about_it(fake, daemon, http):
    picture = fake.image(OTHER)
    async with daemon(adapters=wecom_config(fake)) as d:
        await fake.connected(1)
        shared = await fake.push(message("p1", image=picture, chat=None))
        said = (await finished(fake, shared))["content"]
        asked = await fake.push(message("p2", text="what is in the picture?", chat=None))
        await finished(fake, asked)
        done = await answered(d, http, 2, chat="zhangsan")
    assert said.startswith("Got it. What would you like to know?")  # one line, not a model answer
    assert [a["used_images"] for a in done] == [[], [sha256(OTHER)]]


async def test_an_image_alone_is_described_at_once_when_so_configured(fake, daemon, http):
    async with daemon(adapters=wecom_config(fake), context={"image_alone": "answer"}) as d:
        await fake.connected(1)
        shared = await fake.push(message("q1", image=fake.image(OTHER), chat=None))
        said = (await finished(fake, shared))["content"]
        done = await answered(d, http, 1, chat="zhangsan")
    assert not said.startswith("Got it") and done[0]["used_images"] == [sha256(OTHER)]


async def test_a_message_delivered_twice_is_answered_once(fake, daemon, http):
    shot = fake.image(SHOT)
    async with daemon(adapters=wecom_config(fake)) as d:
        await fake.connected(1)
        first = await fake.push(message("r1", text="@VQA is this bad?", image=shot))
        await answered(d, http, 1)
        await finished(fake, first)
        again = await fake.push(message("r1", text="@VQA is this bad?", image=shot))  # WeCom's retry
        later = await fake.push(message("r2", text="@VQA one more?"))
        await answered(d, http, 2)
        await finished(fake, later)
    assert fake.streams(again) == []


async def test_a_dropped_connection_is_resumed_and_a_newer_one_is_left_alone(fake, daemon, http):
    async with daemon(adapters=wecom_config(fake)) as d:
        await fake.connected(1)
        assert fake.socket is not None
        await fake.socket.close()  # dropped: the daemon connects and subscribes again
        await fake.connected(2)
        asked = await fake.push(message("c1", text="@VQA still there?"))
        await answered(d, http, 1)
        await finished(fake, asked)
        async with http.get(f"{d.url}/metrics") as resp:
            metrics = await resp.text()
        await fake.event("disconnected_event")  # another daemon with the same robot took over
        await eventually(lambda: (fake.socket is not None and fake.socket.closed) or None)
        await asyncio.sleep(1.5)  # longer than a reconnect takes after a drop (within 1 s): none comes
        status, ready = await get(http, d.url, "/readyz")
    assert fake.subscriptions == 2 and fake.connections == 2  # and no third: it did not take the link back
    assert 'imsight_connection_reconnects_total{platform="wecom"} 1.0' in metrics
    assert status == 503 and ready["checks"]["wecom"] is False


async def test_throttling_is_waited_out_and_an_expired_reply_window_becomes_a_message(fake, daemon, http):
    async with daemon(adapters=wecom_config(fake)) as d:
        await fake.connected(1)
        fake.throttle["aibot_respond_msg"] = 1  # the placeholder's frame is refused: the chat waits
        throttled = await fake.push(message("t1", text="@VQA first?"))
        await answered(d, http, 1)
        await finished(fake, throttled)
        fake.expired.add("cb-late")
        await fake.push(message("t2", text="@VQA second?"), req_id="cb-late")
        done = await answered(d, http, 2)
        await eventually(lambda: fake.sent or None)
    assert fake.throttled == ["aibot_respond_msg"]
    assert fake.sent == [{"chatid": "wrGroup1", "msgtype": "markdown", "markdown": {"content": done[1]["text"]}}]


async def test_chat_commands_in_a_1_to_1_chat(fake, daemon, http):
    async with daemon(adapters=wecom_config(fake)) as d:
        await fake.connected(1)
        await fake.push(message("k1", image=fake.image(SHOT), chat=None))
        await fake.push(message("k2", image=fake.image(OTHER), chat=None))
        listing = await fake.push(message("k3", text="/images", chat=None))
        helping = await fake.push(message("k4", text="/help", chat=None))
        texts = [(await finished(fake, req))["content"] for req in (listing, helping)]
        await answered(d, http, 2, chat="zhangsan")  # the images' replies are out: nothing is being answered
        for n in range(5, 30, 2):  # as a person would: again while the chat's last replies are still going out
            await finished(fake, await fake.push(message(f"k{n}", text="/forget", chat=None)))
            said = (await finished(fake, await fake.push(message(f"k{n + 1}", text="/forget yes", chat=None))))[
                "content"]
            if not said.startswith("A question here is still being answered"):
                break
            await asyncio.sleep(0.2)
        status, history = await get(http, d.url, "/api/v1/history/wecom/zhangsan")
    assert "1." in texts[0] and "2." in texts[0]
    assert "/use" in texts[1] and "/forget" in texts[1]
    assert said.startswith("Done: I forgot")
    assert status == 200 and not [m for m in history["messages"] if m["images"]]


async def test_a_refused_secret_stops_the_start_and_doctor_says_so(fake, daemon):
    fake.secret = "another"
    with pytest.raises(Exception, match="refused the bot's credentials"):
        async with daemon(adapters=wecom_config(fake)):
            pass
    settings = WeComSettings(enabled=True, bot_id=BOT_ID, secret=SECRET, ws_url=fake.ws_url)
    with pytest.raises(Exception, match="subscribe refused: 40001"):
        await settings.online()
    fake.secret = SECRET
    assert await settings.online() == "long connection opened, subscription accepted"


async def test_a_chat_not_allowed_is_not_stored(fake, daemon, http):
    async with daemon(adapters=wecom_config(fake, allowed_chats=["wrGroup1"])) as d:
        await fake.connected(1)
        await fake.push(message("x1", text="@VQA hello?", chat="wrOther"))
        asked = await fake.push(message("x2", text="@VQA hello?"))
        await answered(d, http, 1)
        await finished(fake, asked)
        status, _ = await get(http, d.url, "/api/v1/history/wecom/wrOther")
    assert status == 404 and len({r["headers"]["req_id"] for r in fake.responses}) == 1
