"""The in-process transformers engine on the tiny real model: loading, generation, failures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from PIL import Image

from core.engine import GenerationLimits, PreparedImage, Turn
from core.errors import ModelUnavailable
from core.model_files import resolve
from core.prompt_inputs import chat_messages
from core.transformers_engine import TransformersEngine

LIMITS = GenerationLimits(max_new_tokens=12)


def _image(color: tuple[int, int, int]) -> PreparedImage:
    return PreparedImage(f"{color}", Image.new("RGB", (64, 48), color))


@pytest.fixture
async def engine(tiny_model):
    engine = TransformersEngine(resolve("unused/hub-id", tiny_model, allow_download=False), device="cpu")
    await engine.start()
    yield engine
    await engine.stop()


async def test_images_come_before_the_question_and_no_file_name_reaches_the_prompt(engine, tmp_path):
    path = tmp_path / "secret-name-4711.png"
    Image.new("RGB", (64, 48), (5, 6, 7)).save(path)
    opened = Image.open(path)  # carries its file name, as an image read from disk does
    image = PreparedImage("f" * 64, opened)
    inputs = engine._inputs([image], [], "Where is the bug?")
    ids = inputs["input_ids"][0].tolist()
    tokenizer = engine.loaded.processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    question = tokenizer.encode("Where is the bug?", add_special_tokens=False)
    starts = [i for i in range(len(ids)) if ids[i:i + len(question)] == question]
    image_positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(starts) == 1 and len(image_positions) == 16
    assert max(image_positions) < starts[0]
    text = tokenizer.decode(ids)
    assert text.index("<|user|>") < text.index("<image>")
    assert "secret-name-4711" not in text and str(tmp_path) not in text and "f" * 64 not in text


async def _answer(engine, images, turns, question, limits=LIMITS) -> str:
    return "".join([c async for c in engine.answer(images, turns, question, limits)])


async def test_the_answer_depends_on_the_pixels_and_is_deterministic(engine):
    red = await _answer(engine, [_image((255, 0, 0))], [], "Colour?")
    blue = await _answer(engine, [_image((0, 0, 255))], [], "Colour?")
    again = await _answer(engine, [_image((255, 0, 0))], [], "Colour?")
    assert red and blue
    assert red != blue  # the image reached the model
    assert red == again


async def test_earlier_turns_change_the_answer(engine):
    plain = await _answer(engine, [_image((255, 0, 0))], [], "Why?")
    with_history = await _answer(engine, [_image((255, 0, 0))], [Turn("user", "What?"), Turn("assistant", "A")], "Why?")
    assert plain != with_history


def test_images_go_first_in_the_first_user_turn():
    image = _image((1, 2, 3))
    messages = chat_messages([image], [Turn("user", "q1"), Turn("assistant", "a1")], "q2")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert [c["type"] for c in messages[0]["content"]] == ["image", "text"]
    assert messages[2]["content"] == [{"type": "text", "text": "q2"}]


async def test_an_abandoned_answer_stops_generating(engine):
    stream = engine.answer([_image((9, 9, 9))], [], "Go on", GenerationLimits(max_new_tokens=100_000))
    first = await anext(stream)
    await stream.aclose()  # the consumer went away
    # The owner thread is free again soon: another answer comes through.
    assert first
    assert await asyncio.wait_for(_answer(engine, [_image((9, 9, 9))], [], "Hi"), 30)


def test_missing_model_directory_says_how_to_fix(tmp_path):
    with pytest.raises(ModelUnavailable) as caught:
        resolve("zai-org/GLM-4.6V-Flash", tmp_path / "nope", allow_download=False)
    assert "is not a directory" in str(caught.value)
    assert "imsight demo" in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match=r"no config\.json"):
        resolve("x", tmp_path / "empty", allow_download=False)


def test_hub_model_not_in_the_cache_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    # The environment is read at import: check in a fresh interpreter, as `imsight run` would see it.
    code = (
        "from core.model_files import resolve\n"
        "from core.errors import ModelUnavailable\n"
        "try:\n    resolve('zai-org/GLM-4.6V-Flash', None, allow_download=False)\n"
        "except ModelUnavailable as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "not in the local Hugging Face cache" in out.stdout
    assert "hf download zai-org/GLM-4.6V-Flash" in out.stdout


def test_model_in_the_hub_cache_is_found_offline(tiny_model, tmp_path):
    # Lay the tiny model out as the hub cache does (models--org--name/snapshots/<rev>/...).
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_model.iterdir():
        (snapshot / f.name).symlink_to(f)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    code = (
        "import asyncio\n"
        "from core.model_files import resolve\n"
        "from core.transformers_engine import TransformersEngine\n"
        "source = resolve('acme/tiny', None, allow_download=False)\n"
        "engine = TransformersEngine(source, device='cpu')\n"
        "asyncio.run(engine.start())\n"
        "print(source.local_files_only, type(engine.loaded.model).__name__)\n"
    )
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.split() == ["True", "LlavaForConditionalGeneration"], out.stderr


def test_imsight_ask_answers_from_the_command_line(tiny_model, tmp_path):
    image = tmp_path / "shot.png"
    Image.new("RGB", (40, 30), (0, 200, 0)).save(image)
    config = tmp_path / "c.toml"
    config.write_text(f'[engine]\nmodel_path = "{tiny_model}"\nmax_new_tokens = 6\n')
    out = subprocess.run(
        [sys.executable, "-m", "bot.cli", "ask", "--config", str(config), str(image), "-q", "What is it?"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    direct = subprocess.run(  # no config: the model directory on the command line, and no warm-up answer
        [sys.executable, "-m", "bot.cli", "-v", "ask", "--model-path", str(tiny_model), str(image), "-q", "What?"],
        capture_output=True, text=True, timeout=120,
    )
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.strip() and "warm" not in direct.stderr.lower()


def test_imsight_run_without_the_model_exits_with_the_fix(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[engine]\nmodel_path = "{tmp_path / "none"}"\n')
    out = subprocess.run([sys.executable, "-m", "bot.cli", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "is not a directory" in out.stderr
    assert "hf download" in out.stderr
    assert not (tmp_path / "data").exists()  # nothing was created for a daemon that never started


def test_tiny_model_is_labelled(tiny_model):
    assert json.loads((tiny_model / "config.json").read_text())["imsight_test_model"] is True
    assert "noise" in (tiny_model / "README.txt").read_text()


def test_reasoning_is_dropped_from_the_streamed_answer():
    from core.answer_text import ThinkingFilter

    text = "<think>They ask about the log. Line 3 fails.</think>\n<answer>Line 3 fails: <b>missing</b> file.</answer>"
    for size in (1, 2, 3, 7, len(text)):  # tags cut anywhere between chunks
        f = ThinkingFilter()
        out = "".join(f.feed(text[i:i + size]) for i in range(0, len(text), size)) + f.flush()
        assert out == "Line 3 fails: <b>missing</b> file.", size
    plain = ThinkingFilter()
    assert plain.feed("No thinking <here>") + plain.flush() == "No thinking <here>"
    unfinished = ThinkingFilter()
    assert unfinished.feed("<think>still thinking when the tokens ran out") + unfinished.flush() == ""


def test_hf_hub_offline_wins_over_allow_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set") as caught:
        resolve("acme/none", None, allow_download=True, cache_dir=tmp_path)
    assert str(tmp_path) in str(caught.value) and "imsight download-model acme/none" in str(caught.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve("acme/none", None, allow_download=True, cache_dir=tmp_path).local_files_only is False


async def test_a_prompt_that_cannot_be_prepared_fails_alone(engine):
    """An image the processor cannot take (zero pixels) fails its own question with a clear error, on
    the render thread; a question asked at the same time is answered, and so are later ones."""
    from core.errors import EngineError

    broken = PreparedImage("empty", Image.new("RGB", (0, 0)))
    results = await asyncio.gather(_answer(engine, [broken], [], "What is it?"),
                                   _answer(engine, [_image((1, 2, 3))], [], "What is it?"), return_exceptions=True)
    assert isinstance(results[0], EngineError)
    assert "cannot prepare the prompt" in str(results[0])
    assert isinstance(results[1], str) and results[1]
    assert await _answer(engine, [_image((1, 2, 3))], [], "What is it?") == results[1]


async def test_questions_asked_while_the_engine_stops_end_with_an_error(tiny_model):
    """Stopping while questions are being rendered, waiting or answered: each ends, answered or with an
    EngineError; none is left waiting for an answer that will never come."""
    from core.errors import EngineError

    engine = TransformersEngine(resolve("x", tiny_model, allow_download=False), device="cpu", warmup=False)
    await engine.start()
    long = GenerationLimits(max_new_tokens=100_000)
    asks = [asyncio.create_task(_answer(engine, [_image((i, i, i))], [], "Go on", long)) for i in range(6)]
    await asyncio.sleep(0.05)  # some rendered and queued, some still on the render thread
    await engine.stop()
    results = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 60)
    assert all(isinstance(result, EngineError | str) for result in results), results
    assert any(isinstance(result, EngineError) for result in results)  # 100,000 tokens were not all said
    with pytest.raises(EngineError, match="not started"):
        await _answer(engine, [_image((7, 7, 7))], [], "Hi")
