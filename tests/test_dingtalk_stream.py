"""DingTalk Stream mode against a fake DingTalk on loopback that speaks its WebSocket frames: the
daemon connects out, takes robot messages, acknowledges each once stored, and reconnects."""

from __future__ import annotations

from typing import Any

import pytest
from fake_dingtalk import APP_KEY, APP_SECRET, FakeDingTalk, callback

import helpers
from core.images import sha256
from helpers import eventually, get, loopback, png

SHOT = png((200, 30, 30), (80, 60))


@pytest.fixture
async def fake():
    server = FakeDingTalk()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


def stream_config(fake: FakeDingTalk, **extra: Any) -> dict[str, Any]:
    return {"dingtalk": {"enabled": True, "mode": "stream", "app_key": APP_KEY, "app_secret": APP_SECRET,
                         "base_url": fake.url, "legacy_base_url": fake.url, **extra}}


async def answered(d, http, count: int, chat_id: str = "cidG1") -> list[dict[str, Any]]:
    return await helpers.answered(http, d.url, "dingtalk", chat_id, count)


async def acked(fake: FakeDingTalk, message_id: str) -> None:
    await eventually(lambda: any(a["headers"]["messageId"] == message_id for a in fake.acks) or None)


async def test_a_screenshot_question_and_a_follow_up_come_over_the_stream(fake, daemon, http):
    fake.pictures["dlc-1"] = SHOT
    async with daemon(adapters=stream_config(fake)) as d:
        await fake.connected(1)
        first = await fake.push(callback(fake, "m1", rich=("what does this error mean?", "dlc-1")))
        await acked(fake, first)
        await answered(d, http, 1)
        second = await fake.push(callback(fake, "m2", text="and how do I fix it?"))
        await acked(fake, second)
        done = await answered(d, http, 2)
        status, _ = await get(http, d.url, "/dingtalk/events")  # no callback route in stream mode
    assert [a["used_images"] for a in done] == [[sha256(SHOT)]] * 2
    assert [p["session"] for p in fake.webhook_posts] == ["s-m1", "s-m2"]
    assert all(a["code"] == 200 and a["message"] == "OK" for a in fake.acks)
    assert status in (404, 405)


async def test_a_lost_acknowledgement_and_a_dropped_connection_lose_nothing_and_answer_once(fake, daemon, http):
    fake.pictures["dlc-2"] = SHOT
    async with daemon(adapters=stream_config(fake)) as d:
        await fake.connected(1)
        fake.ignore_acks = 1  # the connection breaks before the acknowledgement arrives
        frame = await fake.push(callback(fake, "d1", rich=("why is this red?", "dlc-2")))
        await answered(d, http, 1)
        assert frame in fake.unacked
        assert fake.socket is not None
        await fake.socket.close()  # dropped: the client connects again, and DingTalk re-sends what it holds
        await fake.connected(2)
        await acked(fake, frame)
        # The same message again in a new frame (DingTalk's own retry): taken as a duplicate.
        again = await fake.push(callback(fake, "d1", rich=("why is this red?", "dlc-2")))
        await acked(fake, again)
        await eventually(lambda: not fake.unacked or None)
        status, body = await get(http, d.url, "/api/v1/history/dingtalk/cidG1")
    assert len(fake.webhook_posts) == 1  # answered once
    assert status == 200 and [m["text"] for m in body["messages"] if m["role"] == "user"] == ["why is this red?"]


async def test_pings_are_echoed_and_a_requested_reconnect_shows_in_metrics(fake, daemon, http):
    async with daemon(adapters=stream_config(fake)) as d:
        await fake.connected(1)
        await fake.system("ping", {"opaque": "p-1"})
        await eventually(lambda: any(a["data"] == '{"opaque": "p-1"}' for a in fake.acks) or None)
        await fake.system("disconnect", {"reason": "server maintenance"})
        await fake.connected(2)
        assert fake.tickets == ["(used)", "(used)"]  # a new ticket for the new connection
        status, ready = await get(http, d.url, "/readyz")
        async with http.get(f"{d.url}/metrics") as resp:
            metrics = await resp.text()
        message = await fake.push(callback(fake, "after", text="still there?"))
        await acked(fake, message)
        await answered(d, http, 1)
    assert status == 200 and ready["checks"]["dingtalk"] is True
    assert 'imsight_connection_open{platform="dingtalk"} 1.0' in metrics
    assert 'imsight_connection_reconnects_total{platform="dingtalk"} 1.0' in metrics


async def test_a_refused_connection_stops_the_start_with_what_dingtalk_said(fake, daemon):
    fake.stream_allowed = False
    with pytest.raises(Exception, match=r"connections/open answered HTTP 403 Forbidden\.AccessDenied"):
        async with daemon(adapters=stream_config(fake)):
            pass
    assert fake.connections == 0


async def test_doctor_online_opens_the_stream_once(fake):
    from adapters.dingtalk import DingTalkSettings

    settings = DingTalkSettings(enabled=True, mode="stream", app_key=APP_KEY, app_secret=APP_SECRET,
                                base_url=fake.url, legacy_base_url=fake.url)
    assert await settings.online() == "access token issued, stream connection opened"
    await eventually(lambda: fake.connections == 1 or None)  # opened, and closed again
    fake.stream_allowed = False
    with pytest.raises(Exception, match="HTTP 403"):
        await settings.online()


async def test_junk_frames_and_other_conversations_are_let_go_and_the_stream_goes_on(fake, daemon, http):
    async with daemon(adapters=stream_config(fake, allowed_conversations=["cidG1"])) as d:
        await fake.connected(1)
        assert fake.socket is not None
        await fake.socket.send_str("{not json")
        await fake.socket.send_bytes(b"\x00binary")
        broken = await fake.push(["not", "an", "object"])  # type: ignore[arg-type]
        elsewhere = await fake.push(callback(fake, "p1", text="hello?", group=False))  # cidP1: not allowed
        for message_id in (broken, elsewhere):  # acknowledged: delivering them again cannot help
            await acked(fake, message_id)
        fine = await fake.push(callback(fake, "ok1", text="still there?"))
        await acked(fake, fine)
        await answered(d, http, 1)
        status, _ = await get(http, d.url, "/api/v1/history/dingtalk/cidP1")
    assert fake.connections == 1
    assert [p["session"] for p in fake.webhook_posts] == ["s-ok1"]
    assert status == 404  # not stored
