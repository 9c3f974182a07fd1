"""The DingTalk adapter against a fake DingTalk server on loopback, with callbacks signed as DingTalk signs them."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fake_dingtalk import APP_KEY, APP_SECRET, FakeDingTalk, callback, signed_headers

import helpers
from adapters.dingtalk import sign
from core.images import sha256
from helpers import eventually, get, loopback, png

SHOT, OTHER = png((200, 30, 30), (80, 60)), png((20, 30, 200), (60, 80))


@pytest.fixture
async def fake():
    server = FakeDingTalk()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


def dingtalk_config(fake: FakeDingTalk) -> dict[str, Any]:
    return {"dingtalk": {"enabled": True, "app_key": APP_KEY, "app_secret": APP_SECRET, "base_url": fake.url,
                         "legacy_base_url": fake.url}}


async def deliver(http, d, payload: dict[str, Any], headers: dict[str, str] | None = None) -> int:
    async with http.post(f"{d.url}/dingtalk/events", json=payload, headers=headers or signed_headers()) as resp:
        return resp.status


async def answered(d, http, count: int, chat_id: str = "cidG1") -> list[dict[str, Any]]:
    return await helpers.answered(http, d.url, "dingtalk", chat_id, count)


def test_the_sign_matches_protocols_vectors():
    assert sign("1577262236757", "this is a secret") == "DJrE6qdyVGCQz9z5r2MDuNcNAhwYnuAkyj13cx169CA="
    assert sign("1700000000000", "demo-app-secret") == "35L+VaeC+auo+F48xgwE2nbemVgZgGadfVKR4DtTTo4="


async def test_a_picture_then_a_question_then_a_follow_up(fake, daemon, http):
    fake.pictures["dlc-1"] = SHOT
    async with daemon(adapters=dingtalk_config(fake)) as d:
        # 1:1: everything is addressed to the robot; a picture alone is kept, and the question invited.
        assert await deliver(http, d, callback(fake, "m1", picture="dlc-1", group=False)) == 200
        await answered(d, http, 1, "cidP1")
        await deliver(http, d, callback(fake, "m2", text="what is this?", group=False))
        await answered(d, http, 2, "cidP1")
        await deliver(http, d, callback(fake, "m3", text="and how do I fix it?", group=False))
        done = await answered(d, http, 3, "cidP1")
    assert [a["used_images"] for a in done] == [[], [sha256(SHOT)], [sha256(SHOT)]]
    assert fake.webhook_posts[0]["markdown"]["text"].startswith("Got it. What would you like to know?")
    assert [p["session"] for p in fake.webhook_posts] == ["s-m1", "s-m2", "s-m3"]
    assert fake.webhook_posts[1]["msgtype"] == "markdown" and "at" not in fake.webhook_posts[1]  # 1:1: no @


async def test_rich_text_with_a_picture_and_a_mention_in_a_group(fake, daemon, http):
    fake.pictures["dlc-2"] = OTHER
    async with daemon(adapters=dingtalk_config(fake)) as d:
        await deliver(http, d, callback(fake, "r1", rich=("what is on this label?", "dlc-2")))
        done = await answered(d, http, 1)
        status, body = await get(http, d.url, "/api/v1/history/dingtalk/cidG1")
    assert done[0]["used_images"] == [sha256(OTHER)]
    assert status == 200 and body["messages"][0]["text"] == "what is on this label?"  # @VQA removed
    post = fake.webhook_posts[0]
    assert post["at"] == {"atUserIds": ["user01"], "isAtAll": False}
    assert post["markdown"]["text"].startswith("@user01 ")  # DingTalk renders the @ only with the id in the text


async def test_a_stale_or_forged_sign_is_refused_and_nothing_stored(fake, daemon, http):
    fake.pictures["dlc-3"] = SHOT
    payload = callback(fake, "x1", rich=("why?", "dlc-3"))
    async with daemon(adapters=dingtalk_config(fake)) as d:
        stale = signed_headers(int(time.time() * 1000) - 2 * 3600 * 1000)
        forged = signed_headers(secret="not-the-secret")
        for headers in (stale, forged, {"Content-Type": "application/json"}):
            assert await deliver(http, d, payload, headers) == 401
        status, _ = await get(http, d.url, "/api/v1/history/dingtalk/cidG1")
    assert status == 404 and fake.webhook_posts == [] and fake.api_sends == []


async def test_the_same_message_twice_gets_one_reply(fake, daemon, http):
    fake.pictures["dlc-4"] = SHOT
    payload = callback(fake, "dup", rich=("why?", "dlc-4"))
    async with daemon(adapters=dingtalk_config(fake)) as d:
        assert await deliver(http, d, payload) == 200
        assert await deliver(http, d, payload) == 200
        await answered(d, http, 1)
        await deliver(http, d, callback(fake, "later", text="and then?"))  # a later question, answered after
        await answered(d, http, 2)
    assert [p["session"] for p in fake.webhook_posts] == ["s-dup", "s-later"]


async def test_an_expired_session_webhook_sends_through_the_robot_api_once(fake, daemon, http):
    fake.pictures["dlc-5"] = SHOT
    expired = int(time.time() * 1000) - 1000  # as for a job resumed long after its question
    async with daemon(adapters=dingtalk_config(fake)) as d:
        await deliver(http, d, callback(fake, "e1", rich=("why?", "dlc-5"), webhook_expires_ms=expired))
        done = await answered(d, http, 1)
    assert fake.webhook_posts == [] and len(fake.api_sends) == 1
    sent = fake.api_sends[0]
    assert sent["path"] == "/v1.0/robot/groupMessages/send" and sent["openConversationId"] == "cidG1"
    assert done[0]["message_id"] == "pqk-1"


async def test_a_webhook_url_on_another_host_is_never_posted_to(fake, daemon, http):
    fake.pictures["dlc-6"] = SHOT
    payload = callback(fake, "h1", rich=("why?", "dlc-6"))
    payload["sessionWebhook"] = "http://127.0.0.1:9/steal?session=x"  # not DingTalk's host
    async with daemon(adapters=dingtalk_config(fake)) as d:
        await deliver(http, d, payload)
        await answered(d, http, 1)
    assert fake.webhook_posts == [] and len(fake.api_sends) == 1


async def test_conversations_and_callers_outside_the_allowlists_store_nothing(fake, daemon, http, data_dir):
    fake.pictures["dlc-9"] = SHOT
    allowed = {**dingtalk_config(fake)["dingtalk"], "allowed_conversations": ["cidG1"]}
    async with daemon(adapters={"dingtalk": allowed}) as d:
        assert await deliver(http, d, callback(fake, "p1", rich=("why?", "dlc-9"), group=False)) == 200  # cidP1
        assert await deliver(http, d, callback(fake, "g1", text="hello")) == 200
        await answered(d, http, 1)
        status, _ = await get(http, d.url, "/api/v1/history/dingtalk/cidP1")
        assert status == 404 and len(fake.webhook_posts) == 1
    only_other_ip = {**dingtalk_config(fake)["dingtalk"], "allowed_ips": ["10.9.8.7"]}
    async with daemon(adapters={"dingtalk": only_other_ip}) as d:
        assert await deliver(http, d, callback(fake, "g2", text="hello again")) == 401  # we call from 127.0.0.1
    assert helpers.counts(data_dir)["messages"] == 2  # g1 and its answer; nothing from p1 or g2


async def test_images_and_use_commands(fake, daemon, http):
    fake.pictures["dlc-a"], fake.pictures["dlc-b"] = SHOT, OTHER
    async with daemon(adapters=dingtalk_config(fake)) as d:
        for msg_id, code in (("a1", "dlc-a"), ("a2", "dlc-b")):
            assert await deliver(http, d, callback(fake, msg_id, picture=code, group=False)) == 200
        await answered(d, http, 2, "cidP1")  # a picture alone in a 1:1 chat is described
        await deliver(http, d, callback(fake, "a3", text="/images", group=False))
        await answered(d, http, 3, "cidP1")
        await deliver(http, d, callback(fake, "a4", text="/use 1", group=False))
        await answered(d, http, 4, "cidP1")
        await deliver(http, d, callback(fake, "a5", text="and this one?", group=False))
        done = await answered(d, http, 5, "cidP1")
    texts = [p["markdown"]["text"] for p in fake.webhook_posts]
    assert "1. " in texts[2] and "2. " in texts[2]
    assert texts[3].startswith("OK: the next questions here are about image 1")
    assert done[-1]["used_images"] == [sha256(SHOT)]


async def test_forget_follows_what_dingtalk_says_of_the_sender_and_the_configured_admins(fake, daemon, http):
    config = dingtalk_config(fake)
    config["dingtalk"]["admins"] = ["boss01"]
    async with daemon(adapters=config) as d:
        await deliver(http, d, callback(fake, "f1", text="/forget", admin=False))  # a member, says DingTalk
        await answered(d, http, 1)
        await deliver(http, d, callback(fake, "f2", text="/forget", admin=True))  # the group's admin
        await answered(d, http, 2)
        boss = callback(fake, "f3", text="/forget")  # no isAdmin, but a configured admin
        boss["senderStaffId"] = "boss01"
        await deliver(http, d, boss)
        await answered(d, http, 3)
    texts = [p["markdown"]["text"] for p in fake.webhook_posts]
    assert "Only the group's admins" in texts[0]
    assert "Send /forget yes" in texts[1] and "Send /forget yes" in texts[2]


async def test_readyz_reports_dingtalk_while_its_api_fails(fake, daemon, http):
    async with daemon(adapters=dingtalk_config(fake)) as d:
        assert (await get(http, d.url, "/readyz"))[1]["checks"]["dingtalk"] is True
        fake.down = True
        await deliver(http, d, callback(fake, "r1", text="still up?"))  # its reply cannot go out

        async def readiness(status: int) -> Any:
            got, body = await get(http, d.url, "/readyz")
            return body if got == status else None

        down = await eventually(lambda: readiness(503), timeout_s=15)
        fake.down = False
        up = await eventually(lambda: readiness(200), timeout_s=15)
        await answered(d, http, 1)
    assert down["checks"]["dingtalk"] is False and up["checks"]["dingtalk"] is True


async def test_mass_mentions_and_remote_images_are_defanged_in_what_the_bot_posts(fake, daemon, http):
    async with daemon(adapters=dingtalk_config(fake)) as d:
        await deliver(http, d, callback(fake, "m1", text="/use @all @所有人 ![x](http://evil.example/p.png)",
                                        group=False))
        await eventually(lambda: fake.webhook_posts)
    text = fake.webhook_posts[0]["markdown"]["text"]
    assert "@all" not in text and "@所有人" not in text and "![x](" not in text
    assert "[image: x] (http://evil.example/p.png)" in text


async def test_allowed_ips_behind_a_trusted_proxy_use_its_forwarded_address(fake, daemon, http):
    only = {**dingtalk_config(fake)["dingtalk"], "allowed_ips": ["10.9.8.7"]}
    forwarded = {**signed_headers(), "X-Forwarded-For": "203.0.113.9, 10.9.8.7"}
    async with daemon(adapters={"dingtalk": only}) as d:
        assert await deliver(http, d, callback(fake, "x1", text="hi"), forwarded) == 401  # not from a trusted proxy
    async with daemon(adapters={"dingtalk": only}, server={"trusted_proxies": ["127.0.0.1"]}) as d:
        assert await deliver(http, d, callback(fake, "x2", text="hi"), forwarded) == 200
        spoofed = {**signed_headers(), "X-Forwarded-For": "10.9.8.7, 203.0.113.9"}  # the client's own claim first
        assert await deliver(http, d, callback(fake, "x3", text="hi"), spoofed) == 401


def test_rate_limits_say_how_long_to_wait_as_dingtalk_documents():
    from adapters.dingtalk import _rate_limit_wait

    assert _rate_limit_wait(200, 410100, {}, "") == 600  # a robot over 20 messages a minute: 10 minutes
    assert _rate_limit_wait(200, 0, {"status": 1111, "wait": 5}, "") == 300  # the per-address block
    assert _rate_limit_wait(429, 0, {}, "7") == 7
    assert _rate_limit_wait(400, 300001, {}, "") == 0  # not a rate limit


async def test_retries_wait_at_least_as_long_as_a_rate_limit_says():
    import time

    from bot.retry import with_retries
    from core.errors import RateLimited

    calls: list[float] = []

    async def call() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RateLimited("dingtalk", "slow down", retry_after_s=0.5)
        return "ok"

    assert await with_retries(call, attempts=3, base_s=0.01, what="test") == "ok"
    assert calls[1] - calls[0] >= 0.5
