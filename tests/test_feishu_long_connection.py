"""Feishu's long connection against a fake Feishu on loopback whose WebSocket speaks protobuf frames
built with lark-oapi's own schema: the daemon connects out, takes events (split ones too), answers
each only once stored, pings, follows the server's settings, and connects again after a drop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fake_feishu import APP_ID, APP_SECRET, FakeFeishu, event

import helpers
from core.images import sha256
from helpers import eventually, get, loopback, png

SHOT = png((200, 30, 30), (80, 60))


@pytest.fixture
async def fake():
    server = FakeFeishu()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


def long_connection_config(fake: FakeFeishu) -> dict[str, Any]:
    # No verification_token: the long connection needs none.
    return {"feishu": {"enabled": True, "mode": "long_connection", "app_id": APP_ID, "app_secret": APP_SECRET,
                       "base_url": fake.url}}


async def answered(d, http, count: int, chat_id: str = "oc_g1") -> list[dict[str, Any]]:
    return await helpers.answered(http, d.url, "feishu", chat_id, count)


async def acked(fake: FakeFeishu, message_id: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        return next((payload for headers, payload in fake.acks if headers["message_id"] == message_id), None)
    return await eventually(found)


async def test_a_screenshot_question_then_a_follow_up_in_the_thread(fake, daemon, http):
    fake.files[("om_1", "img_1")] = SHOT
    async with daemon(adapters=long_connection_config(fake)) as d:
        await fake.connected(1)
        first = await fake.push(event("om_1", post=("what does this error mean?", "img_1"), mention_bot=True,
                                      thread="omt_1"))
        assert await acked(fake, first) == {"code": 200, "headers": None, "data": None}
        await answered(d, http, 1)
        # The follow-up comes split over three frames (sum/seq), as Feishu splits large events.
        second = await fake.push(event("om_2", text="and how do I fix it?", mention_bot=True, thread="omt_1"),
                                 parts=3)
        await acked(fake, second)
        done = await answered(d, http, 2)
        status, _ = await get(http, d.url, "/feishu/events")  # no callback route in this mode
    assert [a["used_images"] for a in done] == [[sha256(SHOT)]] * 2
    assert [r["parent_id"] for r in fake.replies] == ["om_1", "om_2"]
    assert all("biz_rt" in headers for headers, _ in fake.acks)
    assert fake.pings and fake.pings[0]["type"] == "ping"
    assert status in (404, 405)


async def test_a_lost_answer_and_a_dropped_connection_lose_nothing_and_answer_once(fake, daemon, http):
    fake.files[("om_5", "img_5")] = SHOT
    async with daemon(adapters=long_connection_config(fake)) as d:
        await fake.connected(1)
        fake.ignore_acks = 1  # the connection breaks before the answer arrives
        first = await fake.push(event("om_5", post=("why is this red?", "img_5"), mention_bot=True))
        await answered(d, http, 1)
        assert first in fake.unacked
        assert fake.socket is not None
        await fake.socket.close()  # dropped (or closed by Feishu): the client fetches the endpoint again
        await fake.connected(2)
        await acked(fake, first)  # delivered again on the new connection: a duplicate, answered as handled
        # The same message as a new event (Feishu's retry with another event id): a duplicate too.
        again = await fake.push(event("om_5", post=("why is this red?", "img_5"), mention_bot=True,
                                      event_id="ev-retry"))
        await acked(fake, again)
        async with http.get(f"{d.url}/metrics") as resp:
            metrics = await resp.text()
    assert [r["parent_id"] for r in fake.replies] == ["om_5"]  # answered once
    assert fake.endpoint_calls == 2
    assert 'imsight_connection_reconnects_total{platform="feishu"} 1.0' in metrics
    assert 'imsight_connection_open{platform="feishu"} 1.0' in metrics


async def test_the_server_s_settings_set_the_ping_interval(fake, daemon):
    fake.ping_interval = 1  # seconds, in the endpoint's ClientConfig
    async with daemon(adapters=long_connection_config(fake)):
        await fake.connected(1)
        await eventually(lambda: len(fake.pings) >= 2 or None, timeout_s=5)
        await fake.pong({"PingInterval": 120})  # a pong may change it
        count = len(fake.pings)
        await eventually(lambda: len(fake.pings) >= count + 1 or None, timeout_s=5)  # the ping already waiting
        settled = len(fake.pings)
        await asyncio.sleep(2.5)
        assert len(fake.pings) == settled


async def test_a_refused_endpoint_stops_the_start_with_what_feishu_said(fake, daemon):
    fake.refuse_connections = True
    with pytest.raises(Exception, match="endpoint answered HTTP 200, code 514: auth failed"):
        async with daemon(adapters=long_connection_config(fake)):
            pass
    assert fake.connections == 0


async def test_doctor_online_opens_the_connection_once(fake):
    from adapters.feishu import FeishuSettings

    settings = FeishuSettings(enabled=True, mode="long_connection", app_id=APP_ID, app_secret=APP_SECRET,
                              base_url=fake.url)
    assert await settings.online() == "tenant token issued, long connection opened"
    await eventually(lambda: fake.connections == 1 or None)
    fake.refuse_connections = True
    with pytest.raises(Exception, match="code 514"):
        await settings.online()


async def test_junk_frames_and_other_chats_are_let_go_and_the_connection_goes_on(fake, daemon, http):
    config = long_connection_config(fake)
    config["feishu"]["allowed_chats"] = ["oc_g1"]
    async with daemon(adapters=config) as d:
        await fake.connected(1)
        assert fake.socket is not None
        await fake.socket.send_bytes(b"\xff\x00 not a frame")
        await fake.socket.send_str("not even binary")
        broken = await fake.push({"schema": "2.0", "header": {"event_type": "im.message.receive_v1"},
                                  "event": {"message": "not an object"}})
        elsewhere = await fake.push(event("om_x", chat_id="oc_other", text="hello?", mention_bot=True))
        for message_id in (broken, elsewhere):  # answered as handled: sending them again cannot help
            assert await acked(fake, message_id) == {"code": 200, "headers": None, "data": None}
        fine = await fake.push(event("om_ok", text="still there?", mention_bot=True))
        await acked(fake, fine)
        await answered(d, http, 1)
        status, body = await get(http, d.url, "/api/v1/history/feishu/oc_other")
    assert fake.connections == 1
    assert [r["parent_id"] for r in fake.replies] == ["om_ok"]
    assert status == 404, body  # the other chat's message was not stored


async def test_a_busy_endpoint_is_tried_again_with_backoff(fake, daemon, http):
    async with daemon(adapters=long_connection_config(fake)):
        await fake.connected(1)
        fake.busy = 2
        assert fake.socket is not None
        await fake.socket.close()
        await fake.connected(2)  # after two "system busy" answers
    assert fake.endpoint_calls == 4
