"""The Telegram adapter with python-telegram-bot against a fake Bot API server on loopback."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest
from fake_telegram import BOT, TOKEN, FakeTelegram

import helpers
from core.images import sha256
from helpers import eventually, get, loopback, png

GROUP = {"id": -1001234567890, "type": "supergroup", "title": "QA", "is_forum": True}
ANN = {"id": 5001, "is_bot": False, "first_name": "Ann", "username": "ann"}
MENTION = "@" + BOT["username"]
SHOT, OTHER = png((200, 30, 30), (80, 60)), png((20, 30, 200), (60, 80))


@pytest.fixture
async def fake():
    server = FakeTelegram()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


def telegram_config(fake: FakeTelegram, **extra: Any) -> dict[str, Any]:
    return {"telegram": {"enabled": True, "token": TOKEN, "base_url": f"{fake.url}/bot", "album_wait_seconds": 0.3,
                         **extra}}


def message(mid: int, *, text: str | None = None, caption: str | None = None, photo: str | None = None,
            document: str | None = None, reply_to: dict[str, Any] | None = None, topic: int | None = None,
            chat: dict[str, Any] = GROUP, sender: dict[str, Any] = ANN) -> dict[str, Any]:
    m: dict[str, Any] = {"message_id": mid, "date": int(time.time()), "chat": chat, "from": sender}
    for key, value in (("text", text), ("caption", caption)):
        if value is not None:
            m[key] = value
            if value.startswith(MENTION):
                m["entities" if key == "text" else "caption_entities"] = [
                    {"type": "mention", "offset": 0, "length": len(MENTION)}]
    if photo:
        m["photo"] = [{"file_id": f"{photo}-small", "file_unique_id": "s", "width": 90, "height": 67},
                      {"file_id": photo, "file_unique_id": "l", "width": 1280, "height": 960}]
    if document:
        m["document"] = {"file_id": document, "file_unique_id": "d", "file_name": "shot.png",
                         "mime_type": "image/png"}
    if reply_to is not None:
        m["reply_to_message"] = reply_to
    if topic is not None:
        m["message_thread_id"] = topic
        m["is_topic_message"] = True
    return m


def command(mid: int, text: str) -> dict[str, Any]:
    """A message that starts with a bot command, as Telegram marks it."""
    m = message(mid, text=text)
    m["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return m


async def answers(d, http, chat_id: int = GROUP["id"]) -> list[dict[str, Any]]:
    return await helpers.bot_answers(http, d.url, "telegram", str(chat_id))


async def answered(d, http, count: int, chat_id: int = GROUP["id"]) -> list[dict[str, Any]]:
    return await helpers.answered(http, d.url, "telegram", str(chat_id), count)


async def test_a_mentioned_screenshot_is_answered_as_a_reply_and_followed_up(fake, daemon, http):
    fake.add_file("shot", SHOT)
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(311, photo="shot", caption=f"{MENTION} why does this build fail?"))
        await answered(d, http, 1)
        first = fake.sent[0]
        assert int(first["chat_id"]) == GROUP["id"]
        assert first["reply_parameters"]["message_id"] == 311
        assert "message_thread_id" not in first  # not a topic message
        # A colleague replies to the bot's answer, without an image and without a mention.
        fake.push(message(315, text="and how do I fix it?", reply_to=fake.results[0],
                          sender={"id": 5002, "is_bot": False, "first_name": "Bo"}))
        done = await answered(d, http, 2)
        assert fake.sent[1]["reply_parameters"]["message_id"] == 315
    assert [a["used_images"] for a in done] == [[sha256(SHOT)], [sha256(SHOT)]]
    assert "getMe" in fake.calls and "getUpdates" in fake.calls
    # Each answer: "typing", a placeholder reply, then that same message edited into the answer.
    assert len(fake.results) == 2 and len(fake.actions) >= 2 and {a["action"] for a in fake.actions} == {"typing"}
    assert [fake.text_of(i) for i in (0, 1)] == [a["text"] for a in done]
    assert [a["message_id"] for a in done] == [str(m["message_id"]) for m in fake.results]


async def test_a_follow_up_after_a_restart_and_expired_file_links(fake, daemon, http):
    fake.add_file("shot", SHOT)
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(50, photo="shot", caption=f"{MENTION} what is this?"))
        await answered(d, http, 1)
    fake.files.clear()  # Telegram's links have expired: the stored copy must do
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(51, text="and the error code?", reply_to=fake.results[0]))
        done = await answered(d, http, 2)
    assert [a["used_images"] for a in done] == [[sha256(SHOT)], [sha256(SHOT)]]


async def test_a_reply_to_an_old_image_the_bot_never_saw_is_about_that_image(fake, daemon, http):
    fake.add_file("old", OTHER)
    old = message(200, photo="old")  # posted before, never delivered to the bot (privacy mode)
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(400, text=f"{MENTION} what's the total on this invoice?", reply_to=old))
        await answered(d, http, 1)
        assert fake.sent[0]["reply_parameters"]["message_id"] == 400
        done = await answers(d, http)
    assert done[0]["used_images"] == [sha256(OTHER)]


async def test_forum_topics_keep_their_own_images_and_answers(fake, daemon, http):
    fake.add_file("a", SHOT)
    fake.add_file("b", OTHER)
    topic_created = {"message_id": 1, "date": int(time.time()), "chat": GROUP,
                     "forum_topic_created": {"name": "builds", "icon_color": 7322096}}
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(10, photo="a", caption=f"{MENTION} what is this?", topic=1, reply_to=topic_created))
        await answered(d, http, 1)
        fake.push(message(20, photo="b", caption=f"{MENTION} and this?", topic=2))
        await answered(d, http, 2)
        # No image, no reply: in topic 1 the question is about topic 1's image, not the newer one.
        fake.push(message(11, text=f"{MENTION} which line fails?", topic=1, reply_to=topic_created))
        done = await answered(d, http, 3)
    assert [int(s["message_thread_id"]) for s in fake.sent] == [1, 2, 1]
    assert [a["used_images"] for a in done] == [[sha256(SHOT)], [sha256(OTHER)], [sha256(SHOT)]]
    assert [a["thread_id"] for a in done] == ["1", "2", "1"]


async def test_an_album_and_its_caption_are_one_question_about_every_image(fake, daemon, http):
    fake.add_file("p1", SHOT)
    fake.add_file("p2", OTHER)
    async with daemon(adapters=telegram_config(fake)) as d:
        for item in (message(61, photo="p1", caption=f"{MENTION} compare these two"), message(62, photo="p2")):
            fake.push({**item, "media_group_id": "13579"})
        done = await answered(d, http, 1)
        status, body = await get(http, d.url, f"/api/v1/history/telegram/{GROUP['id']}")
    assert status == 200
    assert fake.sent[0]["reply_parameters"]["message_id"] == 61
    assert done[0]["used_images"] == [sha256(SHOT), sha256(OTHER)]
    assert [m["message_id"] for m in body["messages"] if m["role"] == "user"] == ["61", "62"]  # both kept


async def test_an_image_sent_as_a_file_is_an_image(fake, daemon, http):
    fake.add_file("doc", SHOT)
    private = {"id": 5001, "type": "private", "first_name": "Ann"}
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(5, document="doc", caption="what is this?", chat=private))  # private: no mention needed
        done = await answered(d, http, 1, private["id"])
    assert done[0]["used_images"] == [sha256(SHOT)]


async def test_a_heic_file_gets_told_which_formats_work(fake, daemon, http):
    fake.add_file("heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    private = {"id": 5002, "type": "private", "first_name": "Ann"}
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(6, document="heic", caption="what is this?", chat=private))
        await answered(d, http, 1, private["id"])
    text = fake.text_of(0)
    assert "PNG, JPEG, WebP, GIF and BMP" in text and "HEIC" in text, text
    assert "send it again" not in text


async def test_an_image_over_the_download_limit_gets_a_clear_reply(fake, daemon, http):
    fake.add_file("huge", SHOT)
    fake.sizes["huge"] = 25 * 2**20
    fake.add_file("earlier", OTHER)
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(70, photo="earlier"))  # a recent image the answer must not silently fall back to
        fake.push(message(71, photo="huge", caption=f"{MENTION} what is this?"))
        done = await answered(d, http, 1)
    assert "20 MB" in fake.text_of(0) and "send it again" in fake.text_of(0)
    assert done[0]["used_images"] == []


async def test_a_rate_limited_placeholder_still_leaves_one_reply(fake, daemon, http):
    fake.add_file("shot", SHOT)
    fake.fail_next["sendMessage"] = [(429, {"retry_after": 1})]  # the placeholder
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(7, photo="shot", caption=f"{MENTION} why?"))
        done = await answered(d, http, 1)
    assert fake.calls.count("sendMessage") == 2 and len(fake.results) == 1
    assert fake.text_of(0) == done[0]["text"] and done[0]["used_images"] == [sha256(SHOT)]


async def test_a_rate_limited_answer_is_sent_again_after_the_wait(fake, daemon, http):
    fake.add_file("shot", SHOT)
    fake.fail_next["editMessageText"] = [(429, {"retry_after": 1})]  # the placeholder becoming the answer
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(8, photo="shot", caption=f"{MENTION} why?"))
        started = time.monotonic()
        done = await answered(d, http, 1)
    assert time.monotonic() - started >= 1  # retry_after was honoured
    assert fake.calls.count("editMessageText") == 2 and len(fake.results) == 1
    assert fake.text_of(0) == done[0]["text"]


async def test_webhook_mode_checks_the_secret_token(fake, daemon, http):
    fake.add_file("shot", SHOT)
    config = telegram_config(fake, mode="webhook", webhook_url="https://bot.example.com/telegram/webhook",
                             secret_token="s3cret-token")
    async with daemon(adapters=config) as d:
        assert fake.webhook is not None and fake.webhook["secret_token"] == "s3cret-token"
        update = {"update_id": 1, "message": message(31, photo="shot", caption=f"{MENTION} why?")}
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
            async with http.post(f"{d.url}/telegram/webhook", json=update, headers=headers) as resp:
                assert resp.status == 403
        good = {"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"}
        for body in (b"{not json", b"{}"):
            async with http.post(f"{d.url}/telegram/webhook", data=body, headers=good) as resp:
                assert resp.status == 400
        status, _ = await get(http, d.url, f"/api/v1/history/telegram/{GROUP['id']}")
        assert status == 404  # nothing stored for this chat
        async with http.post(f"{d.url}/telegram/webhook", json=update,
                             headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"}) as resp:
            assert resp.status == 200
        await answered(d, http, 1)
    assert "getUpdates" not in fake.calls


def test_telegram_settings_are_checked_before_anything_starts():
    from bot.config import parse
    from bot.daemon import build_adapters
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="IMSIGHT_TELEGRAM_TOKEN"):
        build_adapters(parse({"adapters": {"telegram": {"enabled": True}}}, environ={}))
    webhook = {"enabled": True, "mode": "webhook", "webhook_url": "https://x.example/telegram/webhook"}
    with pytest.raises(ConfigError, match="needs webhook_url and secret_token"):
        build_adapters(parse({"adapters": {"telegram": webhook}}, environ={"IMSIGHT_TELEGRAM_TOKEN": TOKEN}))
    with pytest.raises(ConfigError, match="secret_token: must be") as caught:
        build_adapters(parse({"adapters": {"telegram": {**webhook, "secret_token": "has spaces!"}}},
                             environ={"IMSIGHT_TELEGRAM_TOKEN": TOKEN}))
    assert "has spaces" not in str(caught.value) and TOKEN not in str(caught.value)
    names = [a.name for a in build_adapters(parse(
        {"adapters": {"telegram": {"enabled": True}}}, environ={"IMSIGHT_TELEGRAM_TOKEN": TOKEN}))]
    assert names == ["api", "telegram"]


async def test_commands_help_ask_and_commands_for_other_bots(fake, daemon, http):
    fake.add_file("shot", SHOT)

    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(command(1, f"/help@{BOT['username']}"))
        await eventually(lambda: len(fake.sent) == 1)
        assert "I answer questions about images" in fake.text_of(0)
        assert fake.sent[0]["reply_parameters"]["message_id"] == 1
        fake.push(command(2, "/ask@other_bot what is this?"))  # another bot's command: not for us
        fake.push(command(3, "/frobnicate"))
        await eventually(lambda: len(fake.sent) == 2)
        assert "/frobnicate" in fake.text_of(1)
        fake.push(command(6, "/status"))
        await eventually(lambda: len(fake.sent) == 3)
        model = d.config.engine.model_path
        assert fake.text_of(2) == f"Model: {model} (transformers). Questions being answered: 0; waiting: 0."
        fake.push(message(4, photo="shot"))  # posted without a question (privacy mode off)
        fake.push(command(5, "/ask what is on the screenshot?"))
        done = await answered(d, http, 4)  # the three commands' replies (they are the daemon's now), and this
        status, body = await get(http, d.url, f"/api/v1/history/telegram/{GROUP['id']}")
    asked = next(a for a in done if a["answers"] == "5")
    assert status == 200 and asked["used_images"] == [sha256(SHOT)]
    questions = [m for m in body["messages"] if m["message_id"] == "5"]
    assert questions[0]["text"] == "what is on the screenshot?"
    assert "2" not in [m["message_id"] for m in body["messages"]] and len(fake.sent) == 4


async def test_forget_needs_an_admin_and_a_confirmation_then_deletes_the_chat(fake, daemon, http, data_dir):
    fake.add_file("shot", SHOT)

    def forget(mid: int, text: str, sender: dict[str, Any] = ANN) -> dict[str, Any]:
        m = message(mid, text=text, sender=sender)
        m["entities"] = [{"type": "bot_command", "offset": 0, "length": len("/forget")}]
        return m

    image_file = data_dir / "images" / sha256(SHOT)[:2] / sha256(SHOT)
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(1, photo="shot", caption=f"{MENTION} what is this?"))
        await answered(d, http, 1)
        assert image_file.exists()
        fake.push(forget(2, "/forget"))  # Ann is not an admin
        await eventually(lambda: len(fake.results) == 2)
        assert "Only the group's admins" in fake.text_of(1)
        fake.admins.add(ANN["id"])
        fake.push(forget(3, "/forget yes"))  # "yes" before being asked is not a confirmation
        await eventually(lambda: len(fake.results) == 3)
        assert "Send /forget yes" in fake.text_of(2)
        assert any(a["reply_to"] == "1" for a in await answers(d, http))  # the answer is still there
        fake.push(forget(4, "/forget yes"))
        await eventually(lambda: len(fake.results) == 4)
        assert "Done: I forgot" in fake.text_of(3) and "message(s) of this chat" in fake.text_of(3)
        _, body = await get(http, d.url, f"/api/v1/history/telegram/{GROUP['id']}")
    assert [m["text"] for m in body["messages"] if m["role"] == "user"] == ["/forget yes"]  # only the command itself
    assert not image_file.exists()  # no other chat used it


def _addressed_forms(mid: int, words: str, bot_answer: dict[str, Any]) -> list[dict[str, Any]]:
    """One command in every form that reaches the bot: plain, @bot /cmd, /cmd@bot, a reply to the bot, a caption."""
    name, _, rest = words.partition(" ")
    plain = command(mid, words)
    mention = message(mid + 1, text=f"{MENTION} {words}")
    targeted = message(mid + 2, text=f"{name}@{BOT['username']} {rest}".strip())
    targeted["entities"] = [{"type": "bot_command", "offset": 0, "length": len(f"{name}@{BOT['username']}")}]
    reply = command(mid + 3, words)
    reply["reply_to_message"] = bot_answer
    caption = message(mid + 4, caption=words, photo="shot")
    caption["caption_entities"] = [{"type": "bot_command", "offset": 0, "length": len(name)}]
    return [plain, mention, targeted, reply, caption]


async def test_every_form_of_a_command_checks_the_same_permission(fake, daemon, http):
    fake.add_file("shot", SHOT)
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(1, photo="shot", caption=f"{MENTION} what is this?"))
        await answered(d, http, 1)
        bot_answer = fake.results[-1]
        forms = _addressed_forms(10, "/forget", bot_answer) + _addressed_forms(20, "/forget yes", bot_answer)
        for form in forms:
            fake.push(form)
        await eventually(lambda: len(fake.results) == 1 + len(forms))
        refused = [fake.text_of(n) for n in range(1, 1 + len(forms))]
        assert all("Only the group's admins" in text for text in refused), refused
        assert len(await answers(d, http)) >= 1  # nothing was forgotten
        for form in _addressed_forms(30, "/images", bot_answer):
            fake.push(form)
        await eventually(lambda: len(fake.results) == 1 + len(forms) + 5)
        listed = [fake.text_of(n) for n in range(1 + len(forms), 1 + len(forms) + 5)]
        assert all("Images I remember here" in text for text in listed), listed


def test_long_answers_are_split_at_paragraphs_and_within_the_limit():
    from adapters.telegram import split_text

    paragraph = "word " * 300  # 1500 characters
    text = "\n\n".join([paragraph.strip()] * 6)  # ~9000 characters
    pieces = split_text(text)
    assert len(pieces) == 3 and all(len(p) <= 4096 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())  # nothing lost but whitespace
    assert all(p.endswith("word") for p in pieces)  # cut at a paragraph end, not mid-word
    assert split_text("x" * 5000) == ["x" * 4096, "x" * 904]  # no space at all: cut hard


async def test_chats_outside_allowed_chats_are_ignored(fake, daemon, http):
    fake.add_file("shot", SHOT)
    other = {"id": -100999, "type": "supergroup", "title": "elsewhere"}
    async with daemon(adapters=telegram_config(fake, allowed_chats=[str(GROUP["id"])])) as d:
        fake.push(message(1, photo="shot", caption=f"{MENTION} what is this?", chat=other))
        fake.push(message(2, photo="shot", caption=f"{MENTION} what is this?"))
        await answered(d, http, 1)
        status, _ = await get(http, d.url, f"/api/v1/history/telegram/{other['id']}")
    assert status == 404 and len(fake.results) == 1 and int(fake.sent[0]["chat_id"]) == GROUP["id"]


async def test_a_placeholder_cut_off_by_a_restart_becomes_the_answer(fake, daemon, http, data_dir):
    from fake_openai import KEY, MODEL, FakeOpenAI

    model = FakeOpenAI(delay_s=3)  # the first run is stopped before the answer comes
    async with loopback(model.app()) as model_url:
        engine = {"kind": "openai", "base_url": f"{model_url}/v1", "model": MODEL, "api_key": KEY}
        async with daemon(adapters=telegram_config(fake), engine=engine, server={"shutdown_grace_seconds": 0}):
            fake.push(message(401, text=f"{MENTION} still there?"))

            def placeholder_kept() -> bool:  # sent, and its id stored with the job
                with sqlite3.connect(data_dir / "imsight.db") as db:
                    return bool(db.execute("SELECT 1 FROM jobs WHERE draft_message_id IS NOT NULL").fetchall())

            await eventually(placeholder_kept)
        model.delay_s = 0
        async with daemon(adapters=telegram_config(fake), engine=engine) as d:
            await answered(d, http, 1)
    assert len(fake.sent) == 1  # no second placeholder, no new message: the first one was edited
    assert fake.text_of(0).endswith("still there?")


async def test_polling_confirms_an_update_only_once_it_is_stored(fake, daemon, http, data_dir):
    async with daemon(adapters=telegram_config(fake), storage={"lock_timeout_seconds": 0.1}) as d:
        other = sqlite3.connect(data_dir / "imsight.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # the store cannot take writes: as if the disk were full
        try:
            update_id = fake.push(message(501, text=f"{MENTION} are you there?"))["update_id"]
            await eventually(lambda: fake.calls.count("getUpdates") >= 4)  # fetched, failed, fetched again
            assert [u["update_id"] for u in fake.updates] == [update_id]  # still not confirmed
        finally:
            other.execute("ROLLBACK")
            other.close()
        done = await answered(d, http, 1)
        await eventually(lambda: not fake.updates)  # confirmed once stored
    assert done[0]["answers"] == "501" and len(fake.sent) == 1


async def test_images_lists_what_is_remembered_and_use_picks_one(fake, daemon, http):
    fake.add_file("first", SHOT)
    fake.add_file("second", OTHER)

    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(601, photo="first"))
        fake.push(message(602, photo="second"))
        await eventually(lambda: helpers.counts(d.config.storage.data_dir)["message_images"] == 2)
        fake.push(command(603, "/images"))
        await answered(d, http, 1)
        listing = fake.text_of(0)
        fake.push(command(604, "/use 1"))
        await answered(d, http, 2)
        fake.push(command(605, "/use 7"))
        await answered(d, http, 3)
        fake.push(message(606, text=f"{MENTION} what is this?"))
        done = await answered(d, http, 4)
    assert listing.startswith("Images I remember here") and "1. " in listing and "2. " in listing
    assert fake.text_of(1).startswith("OK: the next questions here are about image 1")
    assert fake.text_of(2).startswith("There is no image 7")
    assert done[-1]["used_images"] == [sha256(SHOT)]  # not the later one: /use 1 chose the first


async def test_readyz_reports_telegram_while_polling_fails(fake, daemon, http):
    async with daemon(adapters=telegram_config(fake)) as d:
        status, body = await get(http, d.url, "/readyz")
        assert status == 200 and body["checks"]["telegram"] is True
        fake.fail_next["getUpdates"] = [(502, {}), (502, {})]  # Telegram unreachable for a while

        async def readiness() -> tuple[int, Any]:
            return await get(http, d.url, "/readyz")

        down = await eventually(lambda: _when(readiness, 503), timeout_s=15)
        up = await eventually(lambda: _when(readiness, 200), timeout_s=15)  # polling recovers by itself
    assert down["checks"]["telegram"] is False and down["status"] == "not ready"
    assert up["checks"]["telegram"] is True


async def _when(probe: Any, status: int) -> Any:
    got, body = await probe()
    return body if got == status else None


async def test_mass_mentions_are_defanged_in_what_the_bot_posts(fake, daemon, http):
    async with daemon(adapters=telegram_config(fake)):
        fake.push(command(1, "/use @everyone @all"))
        await eventually(lambda: fake.results)
    text = fake.text_of(0)
    assert "@everyone" not in text and "@all" not in text and "@\u200beveryone" in text


async def test_a_429_holds_that_chat_only_for_as_long_as_telegram_says(fake, daemon, http):
    fake.add_file("shot", SHOT)
    other = {"id": 5003, "type": "private", "first_name": "Bo"}
    fake.fail_next["sendMessage"] = [(429, {"retry_after": 2})]  # the first placeholder (chat A's draft)
    async with daemon(adapters=telegram_config(fake)) as d:
        fake.push(message(20, photo="shot", caption=f"{MENTION} why?"))
        await eventually(lambda: any(status == 429 for *_, status in fake.log))
        refused_at = next(t for t, _, _, status in fake.log if status == 429)
        fake.push(message(21, text="and you?", chat=other, sender={**ANN, "id": 5003}))
        await answered(d, http, 1, other["id"])
        await answered(d, http, 1)
    group_calls = [t for t, _, chat, _ in fake.log
                   if chat == str(GROUP["id"]) and t > refused_at]
    other_calls = [t for t, _, chat, _ in fake.log if chat == str(other["id"])]
    assert group_calls and min(group_calls) - refused_at >= 2  # the chat waited as Telegram said
    assert other_calls and min(other_calls) - refused_at < 2  # the other chat did not wait


async def test_stopping_during_a_burst_loses_nothing_and_leaves_no_task_behind(fake, daemon, http):
    """The daemon stops while questions keep arriving and an album is still gathering: polling stops
    first (the album is taken in then, while the daemon still takes things in), answers drain, then
    delivery closes. No task is left running; after the restart every question is answered exactly
    once (unconfirmed updates come again and are recognised)."""
    import asyncio

    fake.add_file("p1", SHOT)
    fake.add_file("p2", OTHER)
    asked: list[int] = []

    async def burst() -> None:
        for n in range(40):
            asked.append(fake.push(message(700 + n, text=f"{MENTION} question {n}?"))["message"]["message_id"])
            await asyncio.sleep(0.01)

    async with daemon(adapters=telegram_config(fake, album_wait_seconds=30)) as d:
        pusher = asyncio.create_task(burst())
        await eventually(lambda: len(asked) >= 15)
        await answered(d, http, 1)
        for item in (message(61, photo="p1", caption=f"{MENTION} compare these two"), message(62, photo="p2")):
            fake.push({**item, "media_group_id": "13579"})
        polls = fake.calls.count("getUpdates")
        await eventually(lambda: fake.calls.count("getUpdates") >= polls + 2)  # the album is gathering
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("imsight")]
    assert left == []
    await pusher
    asked.append(61)
    async with daemon(adapters=telegram_config(fake)) as d:
        done = await answered(d, http, len(asked))
        await eventually(lambda: not fake.updates)  # every update confirmed
    assert sorted(int(a["answers"]) for a in done) == sorted(asked)  # each question once, none lost
    album = next(a for a in done if a["answers"] == "61")
    assert album["used_images"] == [sha256(SHOT), sha256(OTHER)]


async def test_polling_stops_before_answers_drain(fake, daemon, http):
    """While a long answer gets its shutdown grace, nothing new is fetched: a message sent meanwhile
    stays unconfirmed at Telegram and is answered after the restart."""
    import asyncio

    sections = {"adapters": telegram_config(fake), "engine": {"max_new_tokens": 100_000},
                "server": {"shutdown_grace_seconds": 2}}
    async with daemon(**sections) as d:
        fake.push(message(801, text=f"{MENTION} a long answer, please"))
        await eventually(lambda: fake.edits)  # being answered
        stopping = asyncio.create_task(d.stop())
        await asyncio.sleep(0.3)  # the drain has begun
        late = fake.push(message(802, text=f"{MENTION} and this?"))
        await stopping
        assert late in fake.updates  # never fetched, or fetched and not confirmed: Telegram keeps it
    sections["engine"] = {"max_new_tokens": 8}
    async with daemon(**sections) as d:
        done = await answered(d, http, 2)
    assert sorted(a["answers"] for a in done) == ["801", "802"]


async def test_admin_rights_are_asked_of_telegram_after_the_webhook_is_answered(fake, daemon, http):
    """Who administers a group is a getChatMember call: made in intake, after Telegram heard 200."""
    import asyncio

    config = telegram_config(fake, mode="webhook", webhook_url="https://bot.example.com/telegram/webhook",
                             secret_token="s3cret-token")
    fake.members_held = asyncio.Event()
    async with daemon(adapters=config) as d:
        m = message(41, text="/forget")
        m["entities"] = [{"type": "bot_command", "offset": 0, "length": len("/forget")}]

        async def post() -> int:
            async with http.post(f"{d.url}/telegram/webhook", json={"update_id": 7, "message": m},
                                 headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"}) as resp:
                return resp.status

        assert await asyncio.wait_for(post(), 2) == 200
        await eventually(lambda: "getChatMember" in fake.calls)
        assert fake.sent == []
        fake.members_held.set()
        await eventually(lambda: fake.results)
    assert "Only the group's admins" in fake.text_of(0)
