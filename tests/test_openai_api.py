"""The OpenAI-compatible endpoint, driven by the real ``openai`` package as its client, against a whole
daemon on loopback with the tiny real model: answers, streaming, usage, follow-ups, errors."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from typing import Any

import openai
import pytest

from helpers import png

KEY, OTHER_KEY = "sk-imsight-test-1", "sk-imsight-test-2"
SHOT = png((200, 30, 30), (80, 60))
DATA_URL = "data:image/png;base64," + base64.b64encode(SHOT).decode()


def api_config(**extra: Any) -> dict[str, Any]:
    return {"openai": {"enabled": True, "model": "vqa", "api_keys": {"ci-tools": KEY, "wiki-bot": OTHER_KEY},
                       **extra}}


def client(d: Any, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key=key, max_retries=0, timeout=60)


def question(text: str = "What is on this screenshot?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": DATA_URL}}]}]


async def test_the_model_is_listed_and_answers_with_real_usage(daemon, data_dir):
    async with daemon(adapters=api_config()) as d, client(d) as api:
        models = await api.models.list()
        answer = await api.chat.completions.create(model="vqa", messages=question(), max_tokens=4)
    assert [m.id for m in models.data] == ["vqa"]
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > 16  # the image's tokens count
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    if choice.finish_reason == "length":
        assert answer.usage.completion_tokens == 4
    else:
        assert choice.finish_reason == "stop" and 1 <= answer.usage.completion_tokens <= 4
    assert "cut" not in choice.message.content.lower()  # the chats' "answer cut" note is not in it
    with sqlite3.connect(data_dir / "imsight.db") as db:  # kept in the history, as the key's conversation
        rows = db.execute("SELECT role, text FROM messages WHERE platform = 'openai' AND chat_id = 'ci-tools' "
                          "ORDER BY id").fetchall()
    assert [role for role, _ in rows] == ["user", "bot"] and rows[0][1] == "What is on this screenshot?"


async def test_streamed_the_same_answer_comes_in_chunks_with_usage_last(daemon):
    async with daemon(adapters=api_config()) as d, client(d) as api:
        whole = await api.chat.completions.create(model="vqa", messages=question("Read it."), max_tokens=6)
        stream = await api.chat.completions.create(model="vqa", messages=question("Read it."), max_tokens=6,
                                                   stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_a_resent_conversation_is_answered_from_the_cached_image(daemon, http):
    async with daemon(adapters=api_config()) as d:
        async with client(d) as api:
            first = await api.chat.completions.create(model="vqa", messages=question(), max_tokens=5)
            # LangChain-style: the conversation resent, the new question in parts of its own.
            follow_up = [*question(), {"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": [{"type": "text", "text": "And"},
                                                      {"type": "text", "text": "why?"}]}]
            again = await api.chat.completions.create(model="vqa", messages=follow_up, max_tokens=5)
        async with http.get(f"{d.url}/metrics") as resp:
            metrics = await resp.text()
    assert again.choices[0].message.content
    assert again.usage is not None and first.usage is not None
    assert again.usage.prompt_tokens > first.usage.prompt_tokens  # the whole conversation was the prompt
    assert 'imsight_engine{name="prefix_hits"} 1.0' in metrics  # and its start came from the cache
    assert 'imsight_api_key_requests_total{key="ci-tools",platform="openai"} 2.0' in metrics  # the key's name


async def test_errors_come_as_the_sdk_s_exceptions(daemon):
    async with daemon(adapters=api_config(), limits={"questions_per_sender_per_minute": 1}) as d:
        async with client(d, "sk-wrong") as stranger:
            with pytest.raises(openai.AuthenticationError):
                await stranger.chat.completions.create(model="vqa", messages=question())
        async with client(d) as api:
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                await api.chat.completions.create(model="gpt-4o", messages=question())
            with pytest.raises(openai.BadRequestError, match="last message"):
                await api.chat.completions.create(model="vqa", messages=[{"role": "assistant", "content": "hi"}])
            with pytest.raises(openai.BadRequestError, match="https"):
                await api.chat.completions.create(model="vqa", messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}}]}])
            await api.chat.completions.create(model="vqa", messages=question(), max_tokens=2)
            with pytest.raises(openai.RateLimitError) as limited:  # the same limits as every chat's senders
                await api.chat.completions.create(model="vqa", messages=question(), max_tokens=2)
        assert int(limited.value.response.headers["Retry-After"]) > 0
        async with client(d, OTHER_KEY) as other:  # another key is another sender
            assert (await other.chat.completions.create(model="vqa", messages=question(), max_tokens=2)).choices


async def test_a_request_that_reaches_a_stopping_daemon_is_a_503_to_send_again(daemon, data_dir):
    async with daemon(adapters=api_config()) as d, client(d) as api:
        d.dispatcher.close_intake()  # stopping's first step, which a request still in flight can meet
        with pytest.raises(openai.InternalServerError) as refused:
            await api.chat.completions.create(model="vqa", messages=question(), max_tokens=2)
    assert refused.value.status_code == 503
    assert refused.value.code == "shutting_down" and "stopping" in refused.value.message
    with sqlite3.connect(data_dir / "imsight.db") as db:  # nothing half-taken in
        assert db.execute("SELECT COUNT(*) FROM messages WHERE platform = 'openai'").fetchone() == (0,)


def test_every_key_is_a_secret_kept_out_of_logs(make_config):
    from bot.config import configured_secrets

    config = make_config(adapters=api_config(api_key="sk-default-key"))
    assert {KEY, OTHER_KEY, "sk-default-key"} <= set(configured_secrets(config))
    assert config.adapters.platform("openai").keys() == {"ci-tools": KEY, "wiki-bot": OTHER_KEY,
                                                         "default": "sk-default-key"}


async def test_each_user_of_a_key_is_a_conversation_of_its_own(daemon, data_dir):
    async with daemon(adapters=api_config()) as d, client(d) as api:
        answers = await asyncio.gather(*[
            api.chat.completions.create(model="vqa", messages=question(f"Question from {who}"), max_tokens=3,
                                        user=who) for who in ("ann", "bo")])
    assert all(a.choices[0].message.content for a in answers)
    with sqlite3.connect(data_dir / "imsight.db") as db:
        chats = db.execute("SELECT DISTINCT chat_id, sender_id FROM messages "
                           "WHERE platform = 'openai' AND role = 'user' ORDER BY chat_id").fetchall()
    assert chats == [("ci-tools:ann", "ann"), ("ci-tools:bo", "bo")]


async def test_in_front_of_a_model_server_the_server_s_counts_come_through(daemon):
    from fake_openai import KEY as SERVER_KEY
    from fake_openai import MODEL, FakeOpenAI

    from helpers import loopback

    server = FakeOpenAI(usage={"prompt_tokens": 1500, "completion_tokens": 42, "total_tokens": 1542})
    async with loopback(server.app()) as url:
        engine = {"kind": "openai", "base_url": f"{url}/v1", "model": MODEL, "api_key": SERVER_KEY,
                  "connect_attempts": 1}
        async with daemon(engine=engine, adapters=api_config()) as d, client(d) as api:
            answer = await api.chat.completions.create(model="vqa", messages=question("Why?"), max_tokens=50)
    assert answer.choices[0].message.content.startswith("I see 1 image(s)")  # what the server was sent
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (1500, 42)
    assert server.requests[0]["max_tokens"] == 8  # capped by [engine] max_new_tokens (the tests' 8)


async def test_system_messages_are_not_passed_on_to_the_model(daemon):
    from fake_openai import KEY as SERVER_KEY
    from fake_openai import MODEL, FakeOpenAI

    from helpers import loopback

    server = FakeOpenAI()
    rule = "Always answer in French."
    async with loopback(server.app()) as url:
        engine = {"kind": "openai", "base_url": f"{url}/v1", "model": MODEL, "api_key": SERVER_KEY,
                  "connect_attempts": 1}
        async with daemon(engine=engine, adapters=api_config()) as d, client(d) as api:
            with_rule = await api.chat.completions.create(
                model="vqa", messages=[{"role": "system", "content": rule}, *question("Why?")], max_tokens=5)
            without = await api.chat.completions.create(model="vqa", messages=question("Why?"), max_tokens=5)
    sent = [str(request["messages"]) for request in server.requests]
    assert len(sent) == 2 and rule not in sent[0] and "Why?" in sent[0]
    assert sent[0] == sent[1] and with_rule.choices[0].message.content == without.choices[0].message.content


async def test_too_large_a_body_is_413_in_openai_s_shape(daemon):
    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(2 * 2**20)).decode()
    async with daemon(adapters=api_config(), server={"max_body_mb": 1}) as d, client(d) as api:
        with pytest.raises(openai.APIStatusError) as refused:
            await api.chat.completions.create(model="vqa", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": big}}]}])
    assert refused.value.status_code == 413
    assert refused.value.body["code"] == "request_too_large"  # type: ignore[index]


async def test_junk_bodies_and_images_are_400_in_openai_s_shape(daemon, http):
    async with daemon(adapters=api_config()) as d:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        async with http.post(f"{d.url}/v1/chat/completions", data="[" * 100_000, headers=headers) as resp:
            nested = (resp.status, await resp.json())
        async with client(d) as api:
            with pytest.raises(openai.BadRequestError, match="not valid base64"):
                await api.chat.completions.create(model="vqa", messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}]}])
    assert nested[0] == 400 and nested[1]["error"]["type"] == "invalid_request_error"
