"""A platform joins through ``adapters.registry`` alone: its section is validated (unknown keys, what
it lacks, its secret from the environment), doctor lists it, its secret never reaches the log, and
questions and commands work end to end."""

from __future__ import annotations

import logging

import pytest
from fake_platform import FakeChatSettings, FakePlatform

from adapters import registry
from bot.config import parse
from bot.daemon import Daemon
from bot.doctor import diagnose
from core.errors import ConfigError
from helpers import eventually, loopback, png

TOKEN = "fakechat-SECRET-token-42"


@pytest.fixture
def fakechat():
    registry.register("fakechat", FakeChatSettings)
    yield
    registry.unregister("fakechat")


@pytest.fixture
async def platform():
    fake = FakePlatform()
    fake.files["shot"] = png((10, 120, 240))
    async with loopback(fake.app) as url:
        fake.url = url
        yield fake


def test_its_section_is_checked_like_the_others(fakechat):
    with pytest.raises(ConfigError) as refused:
        parse({"adapters": {"fakechat": {"enabled": True, "colour": "blue", "token": 42}}}, environ={})
    problems = str(refused.value)
    assert "adapters.fakechat.colour: unknown key" in problems
    assert "adapters.fakechat.base_url: required when fakechat is enabled" in problems
    assert "42" not in problems  # a secret field's value is never echoed, even a wrong one
    config = parse({"adapters": {"fakechat": {"enabled": True, "base_url": "http://x"}}},
                   environ={"IMSIGHT_FAKECHAT_TOKEN": TOKEN})
    assert config.adapters.platform("fakechat").token.get_secret_value() == TOKEN


def test_without_it_registered_the_section_is_unknown():
    with pytest.raises(ConfigError, match=r"adapters\.fakechat: unknown key"):
        parse({"adapters": {"fakechat": {"enabled": True}}}, environ={})


async def test_doctor_lists_it(fakechat, tmp_path, tiny_model):
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[engine]\nmodel_path = "{tiny_model}"\n'
                      f'[adapters.fakechat]\nenabled = true\nbase_url = "http://127.0.0.1:9"\ntoken = "{TOKEN}"\n')
    checks = {check.name: check for check in diagnose(config)}
    assert checks["fakechat"].status == "ok" and "127.0.0.1:9" in checks["fakechat"].detail


async def test_it_answers_questions_and_commands_and_keeps_its_secret(fakechat, platform, make_config, http, caplog):
    caplog.set_level(logging.INFO)
    config = make_config(adapters={"fakechat": {"enabled": True, "base_url": platform.url, "token": TOKEN}})
    async with Daemon(config) as d:
        async def say(event: dict[str, object]) -> None:
            async with http.post(f"{d.url}/fakechat/events", json={"chat": "c1", **event}) as resp:
                assert resp.status == 200, await resp.text()

        await say({"id": "m1", "images": ["shot"]})
        await say({"id": "m2", "text": "what is on it?"})
        await say({"id": "m3", "text": "/help"})
        await eventually(lambda: {"m1", "m2", "m3"} <= {sent["reply_to"] for sent in platform.sent})
    replies = {sent["reply_to"]: sent for sent in platform.sent}
    assert replies["m1"]["text"].startswith("Got it.") and not replies["m1"]["images"]  # kept; the question invited
    assert replies["m2"]["images"] and not replies["m2"]["failed"]  # about the image posted before
    assert "/forget" in replies["m3"]["text"]  # the help text: commands work on a new platform
    assert "fakechat: connecting" in caplog.text and TOKEN not in caplog.text
