"""The OpenAI-compatible engine against a fake server on loopback that validates each request."""

from __future__ import annotations

import pytest
from fake_openai import KEY, MODEL, FakeOpenAI
from PIL import Image

from core.answer_text import CUT_NOTE
from core.engine import GenerationLimits, PreparedImage, Turn
from core.errors import EngineError
from core.openai_engine import OpenAIEngine
from helpers import b64, free_port, loopback, png, post

LIMITS = GenerationLimits(max_new_tokens=64)
IMAGE = PreparedImage("c" * 64, Image.new("RGB", (64, 48), (1, 2, 3)))


@pytest.fixture
async def server():
    fake = FakeOpenAI()
    async with loopback(fake.app()) as url:
        fake.url = f"{url}/v1"
        yield fake


@pytest.fixture
def make_engine(started):
    async def make(url: str, **options) -> OpenAIEngine:
        return await started(OpenAIEngine(url, **{"model": MODEL, "api_key": KEY, "retry_base_s": 0.01, **options}))

    return make


async def _answer(engine, images, turns, question) -> str:
    return "".join([c async for c in engine.answer(images, turns, question, LIMITS)])


async def test_the_answer_streams_back_with_the_image_sent_as_a_data_url(server, make_engine):
    engine = await make_engine(server.url)
    chunks = [c async for c in engine.answer([IMAGE], [], "What is this?", LIMITS)]
    assert len(chunks) > 1  # streamed, not in one piece
    assert "".join(chunks) == "I see 1 image(s) 64x48; turns 1; What is this?"
    parts = server.requests[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]  # image before the question


async def test_a_follow_up_resends_the_whole_conversation(server, make_engine):
    engine = await make_engine(server.url)
    turns = [Turn("user", "What is this?"), Turn("assistant", "A stack trace.")]
    answer = await _answer(engine, [IMAGE], turns, "Which line fails?")
    assert answer == "I see 1 image(s) 64x48; turns 3; Which line fails?"
    messages = server.requests[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][-1] == {"type": "text", "text": "What is this?"}
    assert messages[1]["content"] == "A stack trace."


async def test_busy_server_is_retried_with_backoff(server, make_engine):
    server.fail_next = [503, 429]
    engine = await make_engine(server.url, attempts=3)
    assert (await _answer(engine, [IMAGE], [], "Q")).endswith("; Q")
    assert len(server.requests) == 3


async def test_a_server_that_stays_busy_fails_with_its_status(server, make_engine):
    server.fail_next = [503, 503]
    engine = await make_engine(server.url, attempts=2)
    with pytest.raises(EngineError, match="answered 503"):
        await _answer(engine, [IMAGE], [], "Q")


async def test_a_rejected_request_is_not_retried(server, make_engine):
    engine = await make_engine(server.url, model="not-served")
    with pytest.raises(EngineError, match=r"answered 400.*unknown model"):
        await _answer(engine, [IMAGE], [], "Q")
    assert len(server.requests) == 1


async def test_a_wrong_key_says_which_setting_to_fix(server, make_engine):
    engine = await make_engine(server.url, api_key="sk-wrong")
    with pytest.raises(EngineError, match="IMSIGHT_ENGINE_API_KEY") as caught:
        await _answer(engine, [IMAGE], [], "Q")
    assert "sk-wrong" not in str(caught.value)


async def test_a_server_that_is_down_is_a_clear_error(make_engine, caplog):
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = await make_engine(url, attempts=2)  # starting is fine: the server may come up later
    assert "not reachable yet" in caplog.text
    with pytest.raises(EngineError, match=rf"cannot reach the model server at {url}.*after 2 tries"):
        await _answer(engine, [IMAGE], [], "Q")


async def test_reasoning_is_left_out_of_the_answer(server, make_engine):
    server.reply = "<think>The user wants the colour. It is dark.</think><answer>Nearly black.</answer>"
    engine = await make_engine(server.url)
    assert await _answer(engine, [IMAGE], [], "Colour?") == "Nearly black."


async def test_the_daemon_answers_through_a_model_server(server, daemon, http):
    async with daemon(engine={"kind": "openai", "base_url": server.url, "model": MODEL, "api_key": KEY}) as d:
        status, body = await post(http, d.url, {"conversation_id": "ops", "text": "What broke?", "wait": True,
                                                "images": [{"data": b64(png(size=(40, 30)))}]})
    assert status == 200, body
    assert body["answer"] == "I see 1 image(s) 40x30; turns 1; What broke?"


async def test_a_server_that_ignores_stream_still_answers(server, make_engine):
    server.plain_json = True
    engine = await make_engine(server.url)
    assert await _answer(engine, [IMAGE], [], "What?") == "I see 1 image(s) 64x48; turns 1; What?"


async def test_an_answer_cut_at_its_token_limit_says_so(server, make_engine):
    engine = await make_engine(server.url)
    server.cut = True
    assert (await _answer(engine, [IMAGE], [], "What?")).endswith(CUT_NOTE)
    server.plain_json = True
    assert (await _answer(engine, [IMAGE], [], "What?")).endswith(CUT_NOTE)
    server.cut = server.plain_json = False
    assert not (await _answer(engine, [IMAGE], [], "What?")).endswith(CUT_NOTE)


@pytest.mark.parametrize("junk", [b"data: 1\n\n", b"data: {\"choices\": 7}\n\n", b"data: not json\n\n"])
async def test_an_unreadable_chunk_is_named_not_an_internal_error(server, make_engine, junk):
    server.junk = junk
    engine = await make_engine(server.url)
    with pytest.raises(EngineError, match="the model server sent something unreadable"):
        await _answer(engine, [IMAGE], [], "What?")


@pytest.mark.parametrize("plain_json", [False, True])
async def test_the_server_s_token_counts_are_passed_on(server, make_engine, plain_json):
    from core.engine import Usage

    server.usage, server.plain_json = {"prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290}, plain_json
    engine = await make_engine(server.url)
    usage = Usage()
    assert "".join([c async for c in engine.answer([], [], "hi", GenerationLimits(20), usage)])
    assert (usage.prompt_tokens, usage.completion_tokens) == (1234, 56)
    server.usage = None  # a server that does not say: nothing is made up
    unknown = Usage()
    assert "".join([c async for c in engine.answer([], [], "hi", GenerationLimits(20), unknown)])
    assert (unknown.prompt_tokens, unknown.completion_tokens) == (0, 0)
