"""The Feishu adapter against a fake Open API on loopback, with events encrypted and signed as Feishu does."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from fake_feishu import APP_ID, APP_SECRET, ENCRYPT_KEY, VERIFICATION_TOKEN, FakeFeishu, event, sealed, text_of

import helpers
from core.images import sha256
from helpers import eventually, get, loopback, png

SHOT, OTHER = png((200, 30, 30), (80, 60)), png((20, 30, 200), (60, 80))


@pytest.fixture
async def fake():
    server = FakeFeishu()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


def feishu_config(fake: FakeFeishu, *, encrypted: bool = True) -> dict[str, Any]:
    config = {"enabled": True, "app_id": APP_ID, "app_secret": APP_SECRET, "verification_token": VERIFICATION_TOKEN,
              "base_url": fake.url}
    if encrypted:
        config["encrypt_key"] = ENCRYPT_KEY
    return {"feishu": config}


async def deliver(http, d, payload: dict[str, Any], *, encrypted: bool = True) -> tuple[int, Any]:
    if encrypted:
        body, headers = sealed(payload)
    else:
        body, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
    async with http.post(f"{d.url}/feishu/events", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def answered(d, http, count: int, chat_id: str = "oc_g1") -> list[dict[str, Any]]:
    return await helpers.answered(http, d.url, "feishu", chat_id, count)


@pytest.mark.parametrize("encrypted", [False, True])
async def test_url_verification_echoes_the_challenge(fake, daemon, http, encrypted):
    challenge = {"challenge": "c-0123456789", "token": VERIFICATION_TOKEN, "type": "url_verification"}
    async with daemon(adapters=feishu_config(fake, encrypted=encrypted)) as d:
        assert await deliver(http, d, challenge, encrypted=encrypted) == (200, {"challenge": "c-0123456789"})
        status, _ = await deliver(http, d, {**challenge, "token": "wrong"}, encrypted=encrypted)
        assert status == 401


async def test_an_image_then_a_mention_replying_to_it_then_a_thread_follow_up(fake, daemon, http):
    fake.files[("om_1", "img_1")] = SHOT
    fake.messages["om_1"] = {"message_id": "om_1", "sender": {"id": "ou_ann", "id_type": "open_id"}}
    async with daemon(adapters=feishu_config(fake)) as d:
        assert (await deliver(http, d, event("om_1", image="img_1")))[0] == 200  # not addressed: stored only
        await deliver(http, d, event("om_2", text="what is this?", parent="om_1", mention_bot=True))
        done = await answered(d, http, 1)
        assert fake.replies[0]["parent_id"] == "om_2" and text_of(fake.replies[0]) == done[0]["text"]
        assert fake.replies[0]["msg_type"] == "post"  # Markdown, rendered by Feishu
        # A colleague replies to the bot's answer in the thread, without a mention.
        await deliver(http, d, event("om_3", text="and the price?", parent=fake.replies[0]["message_id"],
                                     thread="omt_1"))
        done = await answered(d, http, 2)
    assert [a["used_images"] for a in done] == [[sha256(SHOT)], [sha256(SHOT)]]
    assert fake.replies[1]["parent_id"] == "om_3" and fake.replies[1]["reply_in_thread"] is True
    # Each answer: a placeholder reply, then that same message edited into the answer.
    assert len(fake.replies) == 2 and len(fake.edits) >= 2 and text_of(fake.replies[1]) == done[1]["text"]


async def test_a_mention_replying_to_an_image_the_bot_was_never_sent(fake, daemon, http):
    fake.files[("om_old", "img_old")] = OTHER  # posted without a mention: Feishu did not push it
    fake.messages["om_old"] = {"message_id": "om_old", "msg_type": "image", "create_time": "1700000000000",
                               "sender": {"id": "ou_ann", "id_type": "open_id"},
                               "body": {"content": json.dumps({"image_key": "img_old"})}}
    async with daemon(adapters=feishu_config(fake)) as d:
        await deliver(http, d, event("om_q", text="what's the total?", parent="om_old", mention_bot=True))
        done = await answered(d, http, 1)
    assert done[0]["used_images"] == [sha256(OTHER)]


async def test_the_callback_is_answered_before_the_replied_to_message_is_read(fake, daemon, http):
    """Feishu redelivers what is not acknowledged within 3 s: reading a reply's parent back (up to a
    10 s timeout) must come after the 200, not before it."""
    fake.files[("om_old", "img_old")] = OTHER
    fake.messages["om_old"] = {"message_id": "om_old", "msg_type": "image", "create_time": "1700000000000",
                               "sender": {"id": "ou_ann", "id_type": "open_id"},
                               "body": {"content": json.dumps({"image_key": "img_old"})}}
    fake.held = asyncio.Event()  # the Open API does not answer the read until told to
    async with daemon(adapters=feishu_config(fake)) as d:
        question = event("om_q", text="what's the total?", parent="om_old", mention_bot=True)
        assert await asyncio.wait_for(deliver(http, d, question), 2) == (200, {"msg": "success"})
        await eventually(lambda: fake.reads == ["om_old"])  # read in intake, after the acknowledgement
        assert fake.replies == []
        fake.held.set()
        done = await answered(d, http, 1)
        # A redelivery while it was being read changes nothing.
        assert (await deliver(http, d, question))[0] == 200
        await answered(d, http, 1)
    assert done[0]["used_images"] == [sha256(OTHER)] and len(fake.replies) == 1 and fake.reads == ["om_old"]


async def test_a_rich_text_post_with_an_image_and_a_mention_is_answered(fake, daemon, http):
    fake.files[("om_p", "img_p")] = OTHER
    async with daemon(adapters=feishu_config(fake, encrypted=False)) as d:
        await deliver(http, d, event("om_p", post=(" what is this?", "img_p"), mention_bot=True), encrypted=False)
        done = await answered(d, http, 1)
        status, body = await get(http, d.url, "/api/v1/history/feishu/oc_g1")
    assert done[0]["used_images"] == [sha256(OTHER)]
    assert status == 200 and body["messages"][0]["text"] == "what is this?"  # the mention placeholder removed


async def test_the_same_event_three_times_gets_one_reply(fake, daemon, http):
    fake.files[("om_d", "img_d")] = SHOT
    payload = event("om_d", post=("why?", "img_d"), mention_bot=True)
    async with daemon(adapters=feishu_config(fake)) as d:
        for _ in range(3):
            assert (await deliver(http, d, payload))[0] == 200
        await answered(d, http, 1)
        # Feishu also re-sends a message under a new event id: still the same message.
        again = event("om_d", post=("why?", "img_d"), mention_bot=True, event_id="ev-other")
        assert (await deliver(http, d, again))[0] == 200
        await answered(d, http, 1)
    assert len(fake.replies) == 1


async def test_a_wrong_signature_or_token_is_rejected_and_nothing_stored(fake, daemon, http):
    fake.files[("om_x", "img_x")] = SHOT
    payload = event("om_x", post=("why?", "img_x"), mention_bot=True)
    async with daemon(adapters=feishu_config(fake)) as d:
        body, headers = sealed(payload)
        async with http.post(f"{d.url}/feishu/events", data=body,
                             headers={**headers, "X-Lark-Signature": "0" * 64}) as resp:
            assert resp.status == 401
        bad_token = event("om_x", post=("why?", "img_x"), mention_bot=True)
        bad_token["header"]["token"] = "forged"
        assert (await deliver(http, d, bad_token))[0] == 401
        body, headers = sealed(payload, key="another-key")  # encrypted with a key that is not ours
        async with http.post(f"{d.url}/feishu/events", data=body, headers=headers) as resp:
            assert resp.status == 401
        status, _ = await get(http, d.url, "/api/v1/history/feishu/oc_g1")
    assert status == 404 and fake.replies == []


async def test_an_expired_token_is_refreshed_and_the_reply_goes_once(fake, daemon, http):
    fake.files[("om_e", "img_e")] = SHOT
    async with daemon(adapters=feishu_config(fake)) as d:
        fake.expire_token = True  # the next call (the image download) is refused
        await deliver(http, d, event("om_e", post=("why?", "img_e"), mention_bot=True))
        done = await answered(d, http, 1)
    assert fake.tokens_issued == 2 and len(fake.replies) == 1
    assert done[0]["used_images"] == [sha256(SHOT)]


async def test_a_follow_up_after_a_restart(fake, daemon, http):
    fake.files[("om_r", "img_r")] = SHOT
    async with daemon(adapters=feishu_config(fake)) as d:
        await deliver(http, d, event("om_r", post=("what is it?", "img_r"), mention_bot=True))
        await answered(d, http, 1)
    fake.files.clear()  # the stored copy must do
    async with daemon(adapters=feishu_config(fake)) as d:
        await deliver(http, d, event("om_r2", text="and why?", parent=fake.replies[0]["message_id"]))
        done = await answered(d, http, 2)
    assert [a["used_images"] for a in done] == [[sha256(SHOT)], [sha256(SHOT)]]


async def test_chats_outside_allowed_chats_store_nothing(fake, daemon, http, data_dir):
    fake.files[("om_x", "img_x")] = SHOT
    config = feishu_config(fake)
    config["feishu"]["allowed_chats"] = ["oc_g1"]
    async with daemon(adapters=config) as d:
        assert (await deliver(http, d, event("om_x", "oc_other", image="img_x")))[0] == 200
        assert (await deliver(http, d, event("om_y", "oc_other", text="what?", mention_bot=True)))[0] == 200
        assert (await deliver(http, d, event("om_z", text="hello", mention_bot=True)))[0] == 200
        await answered(d, http, 1)
    stored = helpers.counts(data_dir)
    # om_z and its answer only
    assert (stored["inbox"], stored["messages"], stored["images"], stored["files"]) == (1, 2, 0, 0)
    assert len(fake.replies) == 1


async def test_chat_commands_list_images_and_forget_after_confirmation(fake, daemon, http, data_dir):
    fake.files[("om_i", "img_i")] = SHOT
    async with daemon(adapters=feishu_config(fake)) as d:
        await deliver(http, d, event("om_i", image="img_i"))  # stored, not addressed
        await deliver(http, d, event("om_c1", text="/images", mention_bot=True))
        await answered(d, http, 1)
        await deliver(http, d, event("om_c2", text="/help", mention_bot=True))
        await answered(d, http, 2)
        await deliver(http, d, event("om_c3", text="/forget", mention_bot=True))
        await answered(d, http, 3)
        await deliver(http, d, event("om_c4", text="/forget yes", mention_bot=True))
        await eventually(lambda: len(fake.replies) == 4)
        _, history = await get(http, d.url, "/api/v1/history/feishu/oc_g1")
    texts = [text_of(r) for r in fake.replies]
    assert texts[0].startswith("Images I remember here") and "1. " in texts[0]
    assert "/use N" in texts[1] and "Send /forget yes" in texts[2]
    assert texts[3].startswith("Done: I forgot 7 message(s)")  # 1 image, 3 commands and their 3 replies
    assert [m["text"] for m in history["messages"]] == ["/forget yes", texts[3]]  # all that is left
    assert helpers.counts(data_dir)["files"] == 0


async def test_forget_is_for_the_configured_admins_when_there_are_some(fake, daemon, http):
    config = feishu_config(fake)
    config["feishu"]["admins"] = ["ou_boss"]
    async with daemon(adapters=config) as d:
        await deliver(http, d, event("om_f1", text="/forget", mention_bot=True))  # from ou_ann
        await answered(d, http, 1)
    assert "Only the group's admins" in text_of(fake.replies[0])


async def test_a_429_holds_that_chat_for_x_ogw_ratelimit_reset_and_no_other(fake, daemon, http):
    fake.files[("om_a", "img_a")] = SHOT
    fake.limited = [2]  # the first reply (chat A's placeholder) is refused: wait 2 s
    async with daemon(adapters=feishu_config(fake)) as d:
        await deliver(http, d, event("om_a", post=("why?", "img_a"), mention_bot=True))
        await eventually(lambda: any(status == 429 for *_, status in fake.log))
        refused_at = next(t for t, _, status in fake.log if status == 429)
        await deliver(http, d, event("om_b", "oc_g2", text="and you?", mention_bot=True))
        await answered(d, http, 1, "oc_g2")
        await answered(d, http, 1)
    chat_a = [t for t, parent, status in fake.log if parent == "om_a" and t > refused_at]
    chat_b = [t for t, parent, status in fake.log if parent == "om_b"]
    assert chat_a and min(chat_a) - refused_at >= 2  # chat A waited as Feishu said
    assert chat_b and min(chat_b) - refused_at < 2  # chat B did not wait
    assert len([r for r in fake.replies if r["parent_id"] == "om_a"]) == 1  # one answer, no lost or doubled reply


async def test_readyz_reports_feishu_while_its_api_fails(fake, daemon, http):
    async with daemon(adapters=feishu_config(fake)) as d:
        assert (await get(http, d.url, "/readyz"))[1]["checks"]["feishu"] is True
        fake.down = True
        await deliver(http, d, event("om_r", text="still up?", mention_bot=True))  # its reply cannot go out

        async def readiness(status: int) -> Any:
            got, body = await get(http, d.url, "/readyz")
            return body if got == status else None

        down = await eventually(lambda: readiness(503), timeout_s=15)
        fake.down = False
        up = await eventually(lambda: readiness(200), timeout_s=15)  # the outbox's next try gets through
        await answered(d, http, 1, "oc_g1")
    assert down["checks"]["feishu"] is False and up["checks"]["feishu"] is True


async def test_mass_mentions_and_remote_images_are_defanged_in_what_the_bot_posts(fake, daemon, http):
    async with daemon(adapters=feishu_config(fake)) as d:
        await deliver(http, d, event("om_m1", text='/use <at user_id="all"></at> @all ![x](http://evil.example/p.png)',
                                     mention_bot=True))
        await eventually(lambda: fake.replies)
    posted = json.dumps(fake.replies)
    text = text_of(fake.replies[0])
    assert '<at user_id=\\"all\\">' not in posted and "<at" not in text.replace("<\u200bat", "")
    assert "@all" not in text and "![x]" not in text
    assert "[image: x] (http://evil.example/p.png)" in text  # still readable, not loaded


async def test_a_signed_event_from_over_an_hour_ago_is_refused(fake, daemon, http):
    from fake_feishu import ENCRYPT_KEY, sealed

    from adapters.feishu_crypto import signature

    body, headers = sealed(event("om_old", text="replayed?", mention_bot=True))
    stamp = str(int(time.time()) - 2 * 3600)
    headers |= {"X-Lark-Request-Timestamp": stamp,
                "X-Lark-Signature": signature(stamp, headers["X-Lark-Request-Nonce"], ENCRYPT_KEY, body)}
    async with daemon(adapters=feishu_config(fake)) as d:
        async with http.post(f"{d.url}/feishu/events", data=body, headers=headers) as resp:
            assert resp.status == 401
        unsigned = {"Content-Type": "application/json"}  # an event without its signature, encrypt_key set
        async with http.post(f"{d.url}/feishu/events", data=body, headers=unsigned) as resp:
            assert resp.status == 401
    assert fake.replies == []


async def test_stopping_during_a_burst_of_callbacks_loses_none(fake, daemon, http):
    """Callbacks keep coming while the daemon stops: each one either heard 200 (then it is answered,
    after the restart if need be) or did not (then Feishu delivers it again). None is lost or doubled,
    and no task is left behind."""
    import asyncio

    import aiohttp

    heard: dict[int, int] = {}

    async def post(d, n: int) -> None:
        try:
            heard[n] = (await deliver(http, d, event(f"om_s{n}", text=f"question {n}?", mention_bot=True)))[0]
        except aiohttp.ClientError:
            heard[n] = 0  # the server had stopped listening

    async with daemon(adapters=feishu_config(fake)) as d:
        posts = []
        for n in range(30):
            posts.append(asyncio.create_task(post(d, n)))
            await asyncio.sleep(0.01)
            if n == 15:
                stopping = asyncio.create_task(d.stop())
        await asyncio.gather(*posts)
        await stopping
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("imsight")] == []
    assert 200 in heard.values() and set(heard.values()) - {200}  # the stop came in the middle of the burst
    async with daemon(adapters=feishu_config(fake)) as d:
        for n, status in heard.items():
            if status != 200:  # Feishu's redelivery of what was not acknowledged
                assert (await deliver(http, d, event(f"om_s{n}", text=f"question {n}?", mention_bot=True)))[0] == 200
        done = await answered(d, http, 30)
    assert sorted(a["answers"] for a in done) == sorted(f"om_s{n}" for n in range(30))
    assert sorted(r["parent_id"] for r in fake.replies) == sorted(f"om_s{n}" for n in range(30))  # one reply each
