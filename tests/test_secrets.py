"""No secret reaches a log line, at any level, whatever happens: forged requests, failures, answers."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
from fake_dingtalk import APP_KEY, FakeDingTalk
from fake_feishu import APP_ID, FakeFeishu
from fake_telegram import TOKEN, FakeTelegram

from adapters.dingtalk import sign
from helpers import eventually, free_port, loopback, post

SECRETS = {
    "api_token": "tok-SECRET-api-1234",
    "api_secret": "whsec_" + base64.b64encode(b"SECRET-webhook-signing-key!").decode(),
    "engine_key": "sk-SECRET-engine-5678",
    "feishu_secret": "SECRET-feishu-app",
    "feishu_token": "SECRET-feishu-verify",
    "feishu_encrypt": "SECRET-feishu-encrypt",
    "dingtalk_secret": "SECRET-dingtalk-app",
}


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_secrets_never_reach_the_log(level, daemon, http, caplog):
    caplog.set_level(level)
    telegram, feishu, dingtalk = FakeTelegram(), FakeFeishu(), FakeDingTalk()
    feishu.app_secret, dingtalk.app_secret = SECRETS["feishu_secret"], SECRETS["dingtalk_secret"]
    async with loopback(telegram.app()) as tg, loopback(feishu.app()) as fs, loopback(dingtalk.app()) as dt:
        telegram.url = tg
        adapters = {
            "webhook": {"token": SECRETS["api_token"], "secret": SECRETS["api_secret"]},
            "telegram": {"enabled": True, "token": TOKEN, "base_url": f"{tg}/bot"},
            "feishu": {"enabled": True, "app_id": APP_ID, "app_secret": SECRETS["feishu_secret"],
                       "verification_token": SECRETS["feishu_token"], "encrypt_key": SECRETS["feishu_encrypt"],
                       "base_url": fs},
            "dingtalk": {"enabled": True, "app_key": APP_KEY, "app_secret": SECRETS["dingtalk_secret"],
                         "base_url": dt, "legacy_base_url": dt},
        }
        engine = {"kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": SECRETS["engine_key"],
                  "connect_attempts": 1}
        async with daemon(adapters=adapters, engine=engine, limits={"engine_retry_minutes": 0}) as d:
            for auth in ({"Authorization": "Bearer wrong"}, {"webhook-id": "x", "webhook-timestamp": "1",
                                                               "webhook-signature": "v1,AAAA"}):
                status, _ = await post(http, d.url, {"conversation_id": "a", "text": "hi"}, headers=auth)
                assert status == 401
            status, body = await post(http, d.url, {"conversation_id": "a", "text": "hi", "wait": True},
                                      headers={"Authorization": f"Bearer {SECRETS['api_token']}"})
            assert body["status"] == "failed"  # the model server is down: its key is in every request
            async with http.post(f"{d.url}/feishu/events", json={"token": "wrong", "type": "url_verification"}) as r:
                assert r.status in (400, 401)
            stamp = str(int(time.time() * 1000))
            async with http.post(f"{d.url}/dingtalk/events", data=json.dumps({"msgId": "m"}),
                                 headers={"timestamp": stamp, "sign": sign(stamp, "wrong")}) as r:
                assert r.status == 401
            telegram.push({"message_id": 1, "date": 0, "chat": {"id": 5, "type": "private"}, "text": "hello",
                           "from": {"id": 5, "is_bot": False, "first_name": "Ann"}})
            await eventually(lambda: telegram.sent)  # polled, answered (with the failure notice)
    text = caplog.text
    assert "Traceback" in text or "refused" in text or "failed" in text  # the log did record the trouble
    leaked = [name for name, value in {**SECRETS, "telegram_token": TOKEN}.items() if value in text]
    assert leaked == [], leaked


def test_a_secret_in_an_exception_s_message_is_scrubbed_too(caplog):
    from bot.redaction import redact_in_logs

    redact_in_logs(["SECRET-in-a-traceback"])
    log = logging.getLogger("imsight.test")
    try:
        raise ValueError("cannot reach https://api.example/botSECRET-in-a-traceback/getMe")
    except ValueError:
        log.exception("call failed for %s", "SECRET-in-a-traceback")
    assert "SECRET-in-a-traceback" not in caplog.text
    assert "ValueError: cannot reach https://api.example/bot<redacted>/getMe" in caplog.text


@pytest.mark.parametrize("shown", [False, True])
async def test_message_text_stays_out_of_the_log_unless_configured(shown, daemon, http, caplog):
    caplog.set_level(logging.INFO)
    async with daemon(logging={"message_text": shown}) as d:
        await post(http, d.url, {"conversation_id": "t", "text": "the launch code is 0000", "wait": True})
    stored = [r.getMessage() for r in caplog.records if "api chat t message" in r.getMessage()]
    assert stored  # the event's line is there, with its ids
    assert any("the launch code is 0000" in line for line in stored) is shown
    assert ("the launch code is 0000" in caplog.text) is shown  # nowhere else either
