"""Slack against a fake Slack on loopback that speaks Socket Mode and the Web API: questions with
screenshots in a channel, follow-ups in the thread, re-delivered events, 429s, dropped connections
and the chat commands, through the whole daemon."""

from __future__ import annotations

from typing import Any

import pytest
from fake_slack import APP_TOKEN, BOT_TOKEN, BOT_USER, FakeSlack, message

import helpers
from adapters.slack import SlackSettings, mrkdwn
from core.images import sha256
from helpers import eventually, get, loopback, png

SHOT = png((30, 200, 30), (80, 60))
OTHER = png((200, 30, 200), (64, 64))


@pytest.fixture
async def fake():
    server = FakeSlack()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


def slack_config(fake: FakeSlack, **extra: Any) -> dict[str, Any]:
    return {"slack": {"enabled": True, "app_token": APP_TOKEN, "bot_token": BOT_TOKEN,
                      "base_url": f"{fake.url}/api/", **extra}}


async def answered(d, http, count: int, channel: str = "C1") -> list[dict[str, Any]]:
    return await helpers.answered(http, d.url, "slack", channel, count)


async def acked(fake: FakeSlack, envelope: str) -> None:
    await eventually(lambda: envelope in fake.acks or None)


def final_texts(fake: FakeSlack, thread_ts: str) -> list[str]:
    """What the thread shows once done: each placeholder's last edit, and the messages posted in it."""
    shown = []
    for post in fake.posts:
        if post.get("thread_ts") != thread_ts:
            continue
        edits = [u["text"] for u in fake.updates if u["ts"] == post["ts"]]
        shown.append(edits[-1] if edits else post["text"])
    return shown


async def test_a_screenshot_question_and_a_follow_up_in_its_thread(fake, daemon, http):
    shot = fake.file("F1", SHOT)
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        asked = f"<@{BOT_USER}> what does this error mean?"
        # Slack sends a mention twice: as a channel message and as app_mention, same ts.
        first = await fake.push(message(asked, ts="100.000001", files=[shot]))
        twice = await fake.push(message(asked, ts="100.000001", files=[shot], kind="app_mention"))
        for envelope in (first, twice):
            await acked(fake, envelope)
        await answered(d, http, 1)
        # A follow-up in the answer's thread, no mention: the bot answered there, so it is for the bot.
        follow = await fake.push(message("and how do I fix it?", ts="100.000050", thread_ts="100.000001"))
        await acked(fake, follow)
        done = await answered(d, http, 2)
        status, history = await get(http, d.url, "/api/v1/history/slack/C1")
    assert [a["used_images"] for a in done] == [[sha256(SHOT)]] * 2
    assert len(final_texts(fake, "100.000001")) == 2  # both answers in the question's thread, nothing else
    assert all(p["channel"] == "C1" for p in fake.posts)
    questions = [m["text"] for m in history["messages"] if m["role"] == "user"]
    assert status == 200 and questions == ["what does this error mean?", "and how do I fix it?"]


async def test_an_image_shared_without_a_question_is_kept_for_the_next_one(fake, daemon, http):
    shot = fake.file("F2", OTHER)
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        silent = await fake.push(message("", ts="200.000001", files=[shot]))
        await acked(fake, silent)
        asked = await fake.push(message(f"<@{BOT_USER}> what is in the picture I posted?", ts="200.000002",
                                        kind="app_mention"))
        await acked(fake, asked)
        done = await answered(d, http, 1)
    assert done[0]["used_images"] == [sha256(OTHER)]
    assert {p["thread_ts"] for p in fake.posts} == {"200.000002"}  # nothing said about the silent image


async def test_a_question_in_a_thread_the_bot_never_saw_reads_its_first_message(fake, daemon, http):
    shot = fake.file("F3", SHOT)
    fake.threads["300.000001"] = [{"type": "message", "user": "U2", "text": "build log", "ts": "300.000001",
                                   "files": [shot]}]
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        asked = await fake.push(message(f"<@{BOT_USER}> why did it fail?", ts="300.000009", thread_ts="300.000001",
                                        kind="app_mention"))
        await acked(fake, asked)
        done = await answered(d, http, 1)
    assert done[0]["used_images"] == [sha256(SHOT)]


async def test_a_lost_acknowledgement_and_a_dropped_connection_lose_nothing_and_answer_once(fake, daemon, http):
    shot = fake.file("F4", SHOT)
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        fake.ignore_acks = 1  # the connection breaks before the acknowledgement arrives
        envelope = await fake.push(message(f"<@{BOT_USER}> is this bad?", ts="400.000001", files=[shot],
                                           kind="app_mention"))
        await answered(d, http, 1)
        assert envelope in fake.unacked
        assert fake.socket is not None
        await fake.socket.close()  # dropped: the client connects again; Slack retries (retry_attempt 1)
        await fake.connected(2)
        await acked(fake, envelope)
        after = await fake.push(message(f"<@{BOT_USER}> still there?", ts="400.000002", kind="app_mention"))
        await acked(fake, after)
        await answered(d, http, 2)
        async with http.get(f"{d.url}/metrics") as resp:
            metrics = await resp.text()
    assert [p["thread_ts"] for p in fake.posts].count("400.000001") == 1  # answered once
    assert 'imsight_connection_reconnects_total{platform="slack"} 1.0' in metrics


async def test_a_429_is_honoured_for_its_channel(fake, daemon, http):
    fake.limited["chat.postMessage"] = 1
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        asked = await fake.push(message("what is slack?", ts="500.000001", channel="D1"))
        await acked(fake, asked)
        await answered(d, http, 1, channel="D1")
    (method, refused_at), = fake.refused
    assert method == "chat.postMessage"
    assert len(fake.posts) == 1 and fake.posts[0]["at"] - refused_at >= 0.9  # Retry-After: 1


async def test_a_requested_reconnect_shows_in_readyz_and_metrics(fake, daemon, http):
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        await fake.disconnect("refresh_requested")
        await fake.connected(2)
        status, ready = await get(http, d.url, "/readyz")
        async with http.get(f"{d.url}/metrics") as resp:
            metrics = await resp.text()
        assert fake.socket is not None
        await fake.socket.send_str("{not json")
        fine = await fake.push(message("hello?", ts="600.000001", channel="D2"))
        await acked(fake, fine)
        await answered(d, http, 1, channel="D2")
    assert status == 200 and ready["checks"]["slack"] is True
    assert 'imsight_connection_open{platform="slack"} 1.0' in metrics
    assert 'imsight_connection_reconnects_total{platform="slack"} 1.0' in metrics


async def test_chat_commands_as_text_addressed_to_the_bot(fake, daemon, http):
    shot, other = fake.file("F5", SHOT), fake.file("F6", OTHER)
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        for n, event in enumerate([
            message("", ts="700.000001", channel="D3", files=[shot]),
            message("", ts="700.000002", channel="D3", files=[other]),
            message("/images", ts="700.000003", channel="D3"),
            message("/use 1", ts="700.000004", channel="D3"),
            message("/help", ts="700.000005", channel="D3"),
        ]):
            await acked(fake, await fake.push(event))
            await eventually(lambda n=n: len(fake.posts) >= n + 1 or None)
        for n, text in ((6, "/forget"), (7, "/forget yes")):
            await acked(fake, await fake.push(message(text, ts=f"700.00000{n}", channel="D3")))
            await eventually(lambda n=n: len(fake.posts) >= n or None)
        status, history = await get(http, d.url, "/api/v1/history/slack/D3")
    texts = [final_texts(fake, f"700.00000{n}")[0] for n in range(3, 8)]
    assert "1." in texts[0] and "2." in texts[0]  # /images lists both
    assert "/use" in texts[2] and "/forget" in texts[2]  # /help
    assert status == 200 and not [m for m in history["messages"] if m["images"]]  # forgotten


async def test_a_refused_app_token_stops_the_start_with_what_slack_said(fake, daemon):
    fake.app_token_ok = False
    with pytest.raises(Exception, match=r"apps\.connections\.open: invalid_auth"):
        async with daemon(adapters=slack_config(fake)):
            pass
    assert fake.connections == 0


async def test_doctor_online_checks_both_tokens(fake):
    settings = SlackSettings(enabled=True, app_token=APP_TOKEN, bot_token=BOT_TOKEN, base_url=f"{fake.url}/api/")
    assert await settings.online() == "bot vqa in Acme, Socket Mode connection opened"
    fake.app_token_ok = False
    with pytest.raises(Exception, match="invalid_auth"):
        await settings.online()
    wrong = SlackSettings(enabled=True, app_token="xoxb-swapped", bot_token=BOT_TOKEN)
    assert dict(wrong.problems(None))["app_token"] == "a Slack app token starts with xapp-"  # type: ignore[arg-type]


def test_markdown_becomes_mrkdwn_and_nothing_becomes_a_mention():
    text = mrkdwn("# Fix\n**Install** `libssl-dev` ~~now~~, see [the docs](https://example.com/a). <!channel> & co")
    assert text.startswith("*Fix*\n*Install* `libssl-dev` ~now~, see <https://example.com/a|the docs>.")
    assert "<!channel>" not in text and "&lt;" in text and "&amp; co" in text


async def test_an_image_elsewhere_never_gets_the_bot_token(fake, daemon, http):
    async with daemon(adapters=slack_config(fake)) as d:
        await fake.connected(1)
        stray = {"id": "F9", "mimetype": "image/png", "url_private_download": "http://localhost:9/x.png"}
        asked = await fake.push(message(f"<@{BOT_USER}> look", ts="800.000001", files=[stray], kind="app_mention"))
        await acked(fake, asked)
        await eventually(lambda: fake.posts or None)
        status, history = await get(http, d.url, "/api/v1/history/slack/C1")
    assert status == 200 and history["messages"][0]["images"] == []


async def test_other_channels_edits_and_the_bots_own_messages_are_let_go(fake, daemon, http):
    async with daemon(adapters=slack_config(fake, allowed_channels=["C1"])) as d:
        await fake.connected(1)
        elsewhere = await fake.push(message(f"<@{BOT_USER}> hi", ts="900.000001", channel="C9", kind="app_mention"))
        own = await fake.push(message("an answer", ts="900.000002", user=BOT_USER))
        edited = message("edited", ts="900.000003")
        edited["subtype"] = "message_changed"
        changed = await fake.push(edited)
        for envelope in (elsewhere, own, changed):  # acknowledged, so Slack does not retry them
            await acked(fake, envelope)
        fine = await fake.push(message(f"<@{BOT_USER}> still there?", ts="900.000004", kind="app_mention"))
        await acked(fake, fine)
        await answered(d, http, 1)
        other, _ = await get(http, d.url, "/api/v1/history/slack/C9")
        status, history = await get(http, d.url, "/api/v1/history/slack/C1")
    assert other == 404
    assert status == 200 and [m["message_id"] for m in history["messages"] if m["role"] == "user"] == ["900.000004"]


def test_long_answers_are_split_at_line_breaks_within_slacks_limit():
    from adapters.slack import _MAX_TEXT, _pieces

    text = "\n".join(f"line {n}: " + "x" * 90 for n in range(200))  # ~20,000 characters
    pieces = _pieces(text)
    assert len(pieces) > 4 and all(len(p) <= _MAX_TEXT for p in pieces)
    assert "\n".join(pieces) == text  # nothing lost, nothing repeated
    assert all(p.startswith("line ") for p in pieces)  # each cut at a line break


def test_placeholder_edits_are_paced_per_channel_and_in_all():
    from adapters.slack import _EDITS_A_MINUTE, SlackAdapter

    adapter = SlackAdapter(APP_TOKEN, BOT_TOKEN)
    assert adapter._may_edit("C1")
    assert not adapter._may_edit("C1")  # the same channel again at once: skipped (the final send still goes out)
    assert adapter._may_edit("C2")
    allowed = sum(adapter._may_edit(f"C{n}") for n in range(3, 100))
    assert allowed == _EDITS_A_MINUTE - 2  # chat.update is Tier 3: at most this many a minute, all channels
