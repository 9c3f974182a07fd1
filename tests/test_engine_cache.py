"""Follow-ups from a cached prefix, and batching, on the tiny real model: same greedy output, less work."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from core.engine import GenerationLimits, PreparedImage, Turn
from core.model_files import resolve
from core.prefix_cache import Prefix, PrefixCache, common_prefix
from core.transformers_engine import TransformersEngine
from helpers import eventually

LIMITS = GenerationLimits(max_new_tokens=12)
IMAGE_TOKENS = 16  # the tiny model's tokens per image


def _image(n: int) -> PreparedImage:
    return PreparedImage(f"sha-{n}", Image.new("RGB", (64, 48), (40 * n % 256, 90, 200 - n)))


async def _answer(engine, images, turns, question, limits=LIMITS) -> str:
    return "".join([c async for c in engine.answer(images, turns, question, limits)])


@pytest.fixture
async def engines(make_engine):
    cached = await make_engine(max_batch=1)
    plain = await make_engine(max_batch=1, prefix_cache_bytes=0)
    return cached, plain


async def test_a_follow_up_reads_only_its_new_tokens_and_answers_the_same(engines):
    cached, plain = engines
    image = _image(1)
    first = await _answer(cached, [image], [], "What is on the screen?")
    assert first == await _answer(plain, [image], [], "What is on the screen?")
    turns = [Turn("user", "What is on the screen?"), Turn("assistant", first)]
    follow_up = await _answer(cached, [image], turns, "And the error?")
    assert follow_up == await _answer(plain, [image], turns, "And the error?")  # greedy: token for token
    assert cached.stats.prefix_hits == 1
    assert cached.stats.tokens_reused > IMAGE_TOKENS  # the image and the first question were not read again
    assert plain.stats.prefix_hits == 0


async def test_another_chat_asking_about_the_same_image_reuses_the_image(engines):
    cached, plain = engines
    image = _image(2)
    await _answer(cached, [image], [], "First question")
    other = await _answer(cached, [image], [], "A different question")
    assert other == await _answer(plain, [image], [], "A different question")
    assert cached.stats.prefix_hits == 1
    assert cached.stats.tokens_reused >= IMAGE_TOKENS


async def test_a_different_image_is_not_answered_from_the_cache(engines):
    cached, plain = engines
    await _answer(cached, [_image(3)], [], "Q")
    answer = await _answer(cached, [_image(4)], [], "Q")
    assert answer == await _answer(plain, [_image(4)], [], "Q")
    assert cached.stats.prefix_hits == 0


async def test_the_cache_keeps_within_its_byte_budget(make_engine):
    probe = await make_engine(max_batch=1)
    await _answer(probe, [_image(5)], [], "Q")
    one_prefix = await eventually(lambda: probe._prefixes.nbytes)  # stored just after the answer went out
    await probe.stop()

    engine = await make_engine(max_batch=1, prefix_cache_bytes=int(one_prefix * 1.5))
    await _answer(engine, [_image(5)], [], "Q")
    await _answer(engine, [_image(6)], [], "Q")  # evicts image 5's prefix
    await eventually(lambda: engine._prefixes.get(("sha-6",)))
    assert len(engine._prefixes) == 1 and engine._prefixes.nbytes <= engine._prefixes.budget
    await _answer(engine, [_image(5)], [], "Q again")
    assert engine.stats.prefix_hits == 0
    await _answer(engine, [_image(5)], [], "Q again, later")
    assert engine.stats.prefix_hits == 1


async def test_questions_that_arrive_together_are_answered_in_one_batch(make_engine):
    batching = await make_engine(max_batch=8, batch_window_s=0.5, prefix_cache_bytes=0)
    single = await make_engine(max_batch=1, prefix_cache_bytes=0)
    # Different lengths, so the batch needs padding; different limits per question.
    asks = [([_image(10 + n)], "Why" + "?" * n, GenerationLimits(max_new_tokens=4 + 2 * n)) for n in range(5)]
    together = await asyncio.gather(*[_answer(batching, i, [], q, lim) for i, q, lim in asks])
    alone = [await _answer(single, i, [], q, lim) for i, q, lim in asks]
    assert list(together) == alone
    assert batching.stats.batches > 0 and batching.stats.questions == 5  # decode steps shared by several
    assert single.stats.batches == 0


async def test_a_batch_may_mix_questions_with_and_without_images(make_engine):
    batching = await make_engine(max_batch=8, batch_window_s=0.5, prefix_cache_bytes=0)
    single = await make_engine(max_batch=1, prefix_cache_bytes=0)
    asks = [([], "Hello?"), ([_image(30)], "What is this?"), ([], "And you?"), ([_image(31), _image(32)], "Both?")]
    together = await asyncio.gather(*[_answer(batching, images, [], q) for images, q in asks])
    assert batching.stats.batches > 0
    assert list(together) == [await _answer(single, images, [], q) for images, q in asks]


async def test_each_question_of_a_batch_streams_on_its_own(make_engine):
    engine = await make_engine(max_batch=4, batch_window_s=0.5)
    long_stream = engine.answer([_image(20)], [], "long", GenerationLimits(max_new_tokens=100_000))
    short = asyncio.ensure_future(_answer(engine, [_image(21)], [], "short", GenerationLimits(max_new_tokens=6)))
    first = await anext(long_stream)  # the long answer streams while the short one finishes
    assert first
    assert await asyncio.wait_for(short, 30)
    await long_stream.aclose()  # its row stops; the engine is free again
    assert await asyncio.wait_for(_answer(engine, [_image(22)], [], "next"), 30)


def test_prefix_cache_is_a_bounded_lru():
    cache = PrefixCache(budget=100)
    ids = torch.tensor([1, 2, 3])
    cache.put(("a",), Prefix(ids, None, {}, 40))
    cache.put(("b",), Prefix(ids, None, {}, 40))
    assert cache.get(("a",)) is not None  # a is now the most recently used
    cache.put(("c",), Prefix(ids, None, {}, 40))
    assert cache.get(("b",)) is None and len(cache) == 2 and cache.nbytes == 80
    cache.put(("d",), Prefix(ids, None, {}, 101))  # larger than the whole budget: not kept
    assert cache.get(("d",)) is None and cache.nbytes == 80


def test_common_prefix():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix(a, torch.tensor([1, 2, 3, 4, 5])) == 4
    assert common_prefix(a, torch.tensor([1, 2, 9, 4])) == 2
    assert common_prefix(a, torch.tensor([7])) == 0
    assert common_prefix(a, torch.tensor([], dtype=torch.long)) == 0


async def test_an_image_is_preprocessed_once_for_its_follow_ups(engines):
    cached, plain = engines
    image = _image(30)
    first = await _answer(cached, [image], [], "Q1")
    computed = cached._pixels.computed
    turns = [Turn("user", "Q1"), Turn("assistant", first)]
    assert await _answer(cached, [image], turns, "Q2") == await _answer(plain, [image], turns, "Q2")
    assert cached._pixels.computed == computed  # the follow-up reused the preprocessed pixels
    await _answer(cached, [_image(31)], [], "Q1")
    assert cached._pixels.computed == computed + 1


async def test_a_follow_up_s_pixels_stay_on_the_host(engines):
    # The follow-up's images are in its cached prefix: its pixels are not moved to the model's device.
    cached, _plain = engines
    moved: list[set[str]] = []
    to_device = cached._on_device

    def on_device(inputs):
        moved.append(set(inputs))
        return to_device(inputs)

    cached._on_device = on_device
    image = _image(32)
    first = await _answer(cached, [image], [], "Q1")
    await _answer(cached, [image], [Turn("user", "Q1"), Turn("assistant", first)], "Q2")
    assert cached.stats.prefix_hits == 1
    assert "pixel_values" in moved[0] and "pixel_values" not in moved[1]
    assert all(not entry.ids.is_cuda for entry in cached._prefixes._entries.values())  # compared on the host


def test_remembered_pixels_are_cast_once(tiny_model):
    from transformers import AutoProcessor

    from core.pixel_memo import ImageProcessorMemo

    memo = ImageProcessorMemo(AutoProcessor.from_pretrained(tiny_model).image_processor)
    outputs = []
    for _ in range(2):
        with memo.expecting(["sha-a"]):
            outputs.append(memo([_image(40).image], return_tensors="pt")["pixel_values"])
    assert outputs[0] is outputs[1] and memo.computed == 1
    cast = memo.cast(outputs[0], torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, outputs[0].to(torch.bfloat16))
    assert memo.cast(outputs[1], torch.bfloat16) is cast  # the same pixels again: the kept cast
    other = torch.rand(3, 4)  # pixels the memo did not hand out are cast, not kept
    assert memo.cast(other, torch.bfloat16) is not memo.cast(other, torch.bfloat16)


@pytest.fixture(scope="module")
def text_first_model(tiny_model, tmp_path_factory):
    """The tiny model with a template that puts the question before the image, as some models' do."""
    target = tmp_path_factory.mktemp("text-first")
    for f in tiny_model.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    template = (target / "chat_template.jinja").read_text()
    template = template.replace(
        "{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}",
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}",
    )
    assert "endfor %}{% for c in" in template
    (target / "chat_template.jinja").write_text(template)
    return target


async def test_without_a_common_prefix_the_image_features_are_reused(text_first_model):
    engines = [TransformersEngine(resolve("x", text_first_model, allow_download=False), device="cpu", max_batch=1,
                                  prefix_cache_bytes=budget) for budget in (2**30, 0)]
    cached, plain = engines
    for engine in engines:
        await engine.start()
    try:
        image = _image(40)
        await _answer(cached, [image], [], "First question")
        # The other question comes first in the prompt: the cached prefix ends before the image.
        other = await _answer(cached, [image], [], "Another question")
        assert other == await _answer(plain, [image], [], "Another question")
        assert cached.stats.prefix_hits == 0 and cached.stats.features_hits == 1
        assert plain.stats.features_hits == 0
    finally:
        for engine in engines:
            await engine.stop()


def test_caches_give_way_when_the_gpu_is_short_of_room():
    from core.kv_cache import make_room
    from core.prefix_cache import Features, StateCache

    prefixes: PrefixCache = PrefixCache(budget=10_000)
    features: StateCache[Features] = StateCache(budget=10_000)
    for n in range(3):
        prefixes.put((f"p{n}",), Prefix(torch.tensor([n]), None, {}, 1000))
        features.put((f"f{n}",), Features(None, 500))
    device_free = 1200  # what a real device would report; each eviction frees the entry's bytes

    def free() -> int:
        return device_free + (3 * 1000 - prefixes.nbytes) + (3 * 500 - features.nbytes)

    assert make_room(free, 2000, [features, prefixes])
    assert len(features) == 1  # features go first: they are cheaper to rebuild than a whole prefix
    assert len(prefixes) == 3 and free() >= 2000
    assert make_room(free, 4500, [features, prefixes])
    assert len(features) == 0 and len(prefixes) == 1 and prefixes.get(("p2",)) is not None  # oldest out first
    assert not make_room(free, 100, [features, prefixes])  # enough room: nothing to do
    assert make_room(free, 10**9, [features, prefixes]) and len(prefixes) == 0  # all of it, if need be
    assert not make_room(free, 10**9, [features, prefixes])  # nothing left to give


async def test_follow_ups_to_a_batch_use_each_question_s_own_prefix(make_engine):
    batching = await make_engine(max_batch=8, batch_window_s=0.5)
    plain = await make_engine(max_batch=1, prefix_cache_bytes=0)
    asks = [([_image(60 + n)], "Why" + "?" * n) for n in range(3)]  # different lengths: padded rows
    firsts = await asyncio.gather(*[_answer(batching, images, [], q) for images, q in asks])
    assert batching.stats.batches > 0
    await eventually(lambda: len(batching._prefixes) == 3)
    for (images, q), first in zip(asks, firsts, strict=True):
        turns = [Turn("user", q), Turn("assistant", first)]
        assert await _answer(batching, images, turns, "And then?") == await _answer(plain, images, turns, "And then?")
    assert batching.stats.prefix_hits == 3
