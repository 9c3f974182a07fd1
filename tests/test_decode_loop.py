"""Continuous batching on the tiny real model (CPU, float32; the same code path as the GPU, eagerly):
questions join and leave a running batch, each keeps its own limits and stream, failures and
cancellations stay with their question, and greedy output equals bare ``generate()``."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from PIL import Image

from core.answer_text import CUT_NOTE
from core.decode_loop import buckets
from core.engine import GenerationLimits, PreparedImage, Turn, Usage
from core.errors import EngineError
from helpers import bare_generate


def _image(n: int) -> PreparedImage:
    return PreparedImage(f"img-{n}", Image.new("RGB", (64, 48), (30 * n % 256, 120, 250 - n)))


async def _answer(engine, images, question, tokens=12, turns=(), usage=None) -> str:
    return "".join([c async for c in engine.answer(images, list(turns), question, GenerationLimits(tokens), usage)])


def test_bucket_sizes():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(4096, start=512) == [512, 1024, 2048, 4096]
    assert buckets(3000, start=512) == [512, 1024, 2048, 3000]
    assert buckets(256, start=512) == [256]


async def test_greedy_output_equals_bare_generate_token_for_token(make_engine):
    engine = await make_engine(max_batch=4, prefix_cache_bytes=0)
    for n, question in enumerate(["What is on the screen?", "Why?", "Read the error message, please."]):
        images = [_image(n)] if n != 1 else []
        got = await _answer(engine, images, question, tokens=24)
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, images, question, 24)
    # Several at once, in one running batch, each with its own limit: still each one's own answer.
    asks = [([_image(10 + n)], "Q" + "?" * n, 6 + 5 * n) for n in range(4)]
    together = await asyncio.gather(*[_answer(engine, i, q, t) for i, q, t in asks])
    for (images, question, tokens), got in zip(asks, together, strict=True):
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, images, question, tokens)
    assert engine.stats.batches > 0


async def test_first_questions_that_wait_together_are_prefilled_together(make_engine):
    engine = await make_engine(max_batch=4, batch_window_s=0.5)
    plain = await make_engine(max_batch=4, prefix_cache_bytes=0)
    asks = [([_image(60)], "What is it?", 9), ([], "No picture, a longer question than the others.", 14),
            ([_image(61), _image(62)], "Both?", 7)]
    encoder_runs = []
    hook = engine.loaded.model.model.vision_tower.register_forward_hook(lambda *_: encoder_runs.append(1))
    order: list[str] = []

    def spy(name):
        call = getattr(engine, name)

        def spied(*args, **kwargs):
            order.append(name)
            return call(*args, **kwargs)
        return spied

    engine._first_token, engine._take_slot = spy("_first_token"), spy("_take_slot")
    together = await asyncio.gather(*[_answer(engine, i, q, t) for i, q, t in asks])
    hook.remove()
    assert engine.stats.prefill_batches == 1  # the three waited for the window, then one forward
    # every first token out before any row's copies into its slot
    assert order == ["_first_token"] * 3 + ["_take_slot"] * 3
    assert len(encoder_runs) == 1  # and one vision-encoder run for the two questions' three images
    for (images, question, tokens), got in zip(asks, together, strict=True):
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, images, question, tokens)
    # Each one's prompt was kept from its row of the batch: a follow-up reads only its new tokens.
    images, question, _ = asks[2]
    turns = [Turn("user", question), Turn("assistant", together[2].removesuffix(CUT_NOTE))]
    usage = Usage()
    follow = await _answer(engine, images, "And then?", turns=turns, usage=usage)
    assert engine.stats.prefix_hits == 1
    assert follow == await _answer(plain, images, "And then?", turns=turns)
    assert usage.prefill.startswith("cached prefix, ") and usage.first_token_s > 0  # as the job's log line says


async def test_a_batch_that_cannot_be_prefilled_falls_back_to_one_at_a_time(make_engine):
    import torch

    engine = await make_engine(max_batch=4, batch_window_s=0.5, prefix_cache_bytes=0)

    def out_of_memory_for_several(_module, args, kwargs):  # prefilling more than one prompt (not a step)
        rows, tokens = kwargs["inputs_embeds"].shape[:2]
        if rows > 1 and tokens > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (a batch too large for this GPU)")

    language = engine.loaded.model.model.language_model
    hook = language.register_forward_pre_hook(out_of_memory_for_several, with_kwargs=True)
    asks = [([_image(70)], "What is it?", 8), ([], "And without a picture?", 6)]
    together = await asyncio.gather(*[_answer(engine, i, q, t) for i, q, t in asks])
    hook.remove()
    assert engine.stats.prefill_batches == 0 and engine.stats.oom_retries == 0
    for (images, question, tokens), got in zip(asks, together, strict=True):
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, images, question, tokens)

    # A picture that breaks the vision tower fails its own question only, batch or not.
    def refuse_pictures(_module, _args):
        raise ValueError("this image broke the vision tower")

    hook = engine.loaded.model.model.vision_tower.register_forward_pre_hook(refuse_pictures)
    outcomes = await asyncio.gather(_answer(engine, [_image(71)], "and this?"), _answer(engine, [], "text only"),
                                    return_exceptions=True)
    hook.remove()
    assert isinstance(outcomes[0], EngineError) and "broke the vision tower" in str(outcomes[0])
    assert isinstance(outcomes[1], str) and outcomes[1]


async def test_a_late_question_joins_the_running_batch_and_finishes_first(make_engine):
    engine = await make_engine(max_batch=4)
    long = engine.answer([_image(1)], [], "a long answer", GenerationLimits(max_new_tokens=100_000))
    await anext(long)  # it is being decoded
    started = time.monotonic()
    short = await asyncio.wait_for(_answer(engine, [_image(2)], "short one", tokens=5), 30)
    assert short.endswith(CUT_NOTE)  # it ran to its own limit, not the long one's
    assert engine.stats.batches > 0  # it shared decode steps with the long answer
    assert time.monotonic() - started < 30
    more = await anext(long)  # and the long one is still going
    assert more
    await long.aclose()  # cancelled mid-answer: its slot is freed
    assert await asyncio.wait_for(_answer(engine, [_image(3)], "after"), 30)


async def test_a_failing_question_leaves_the_others_answering(make_engine):
    engine = await make_engine(max_batch=4, prefix_cache_bytes=0)

    def refuse_pictures(_module, _args):
        raise ValueError("this image broke the vision tower")

    running = engine.answer([], [], "text only, long", GenerationLimits(max_new_tokens=60))
    first = await anext(running)
    hook = engine.loaded.model.model.vision_tower.register_forward_pre_hook(refuse_pictures)
    with pytest.raises(EngineError, match="broke the vision tower"):
        await _answer(engine, [_image(5)], "and this?")
    hook.remove()
    rest = "".join([c async for c in running])
    assert first + rest  # the text-only question ran to its end
    assert await _answer(engine, [_image(5)], "and now?")


async def test_a_follow_up_is_prefilled_from_the_cached_prefix_into_its_slot(make_engine):
    cached = await make_engine(max_batch=4)
    plain = await make_engine(max_batch=4, prefix_cache_bytes=0)
    image = _image(7)
    first = await _answer(cached, [image], "What is it?")
    turns = [Turn("user", "What is it?"), Turn("assistant", first.removesuffix(CUT_NOTE))]
    follow = await _answer(cached, [image], "And then?", turns=turns)
    assert cached.stats.prefix_hits == 1
    assert follow == await _answer(plain, [image], "And then?", turns=turns)


async def test_a_prompt_longer_than_a_slot_is_answered_the_old_way(make_engine):
    engine = await make_engine(max_batch=2, context_tokens=256, prefix_cache_bytes=0)
    question = "why " * 200  # well over 256 tokens
    got = await _answer(engine, [_image(8)], question, tokens=6)
    assert got.removesuffix(CUT_NOTE) == bare_generate(engine, [_image(8)], question, 6)
    assert engine.stats.decode_steps == 0


async def test_more_questions_than_slots_wait_for_a_free_one(make_engine):
    engine = await make_engine(max_batch=2, prefix_cache_bytes=0)
    asks = [([_image(40 + n)], f"question {n}?", 4 + 3 * n) for n in range(5)]
    together = await asyncio.gather(*[_answer(engine, i, q, t) for i, q, t in asks])
    for (images, question, tokens), got in zip(asks, together, strict=True):
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, images, question, tokens)
    assert engine.stats.questions == 5 and len(engine._active) == 0 and not engine._waiting


async def test_stopping_tells_every_waiting_question(make_engine, tiny_model):
    from core.model_files import resolve
    from core.transformers_engine import TransformersEngine

    engine = TransformersEngine(resolve("x", tiny_model, allow_download=False), device="cpu", max_batch=1,
                                warmup=False)
    await engine.start()
    streams = [engine.answer([_image(50 + n)], [], "long?", GenerationLimits(100_000)) for n in range(3)]
    first = await anext(streams[0])  # one is being answered, two wait for its slot
    assert first
    pending = [asyncio.ensure_future(anext(s)) for s in streams[1:]]
    await asyncio.sleep(0.1)
    await engine.stop()
    for task in pending:
        with pytest.raises(EngineError, match="engine stop"):
            await task
    with pytest.raises((EngineError, StopAsyncIteration)):
        async for _ in streams[0]:
            pass


def test_compiled_layers_step_exactly_as_the_eager_ones(tiny_model):
    """The GPU default (decoder layers through torch.compile, the slot cache's update eager inside them)
    run on the CPU: the same next tokens as the eager layers, for decode steps over several rows at
    their own positions; only the stepper's steps take the compiled layers (not a follow-up's tail,
    nor prefill). Twelve layers, more than dynamo's 8 recompiles: one compiled graph serves them all
    (it fails loudly past the limit)."""
    import torch
    from torch._dynamo.utils import counters

    from core.decode_loop import SlotKV, Stepper
    from core.fused_layers import FusedLayers, decoder_layers
    from core.kv_cache import cache_keyword
    from core.model_files import resolve
    from core.model_loading import load

    model = _twelve_layers(load(resolve("x", tiny_model, allow_download=False), device="cpu").model)
    layers = decoder_layers(model)
    attention = layers[0].self_attn
    heads, dim = attention.config.num_key_value_heads, attention.head_dim

    def run(fused: FusedLayers | None) -> list[list[int]]:
        kv = SlotKV(len(layers), 4, heads, dim, 1024, dtype=torch.float32, device="cpu")
        stepper = Stepper(model, kv, cache_keyword=cache_keyword(model), mrope=False, use_graphs=False, fused=fused)
        stepper.fused_kinds = {"step"} if fused is not None else set()  # as ``captures(fused=True)`` leaves it
        seen = []
        with torch.inference_mode():
            kv.positions[:4] = torch.tensor([5, 9, 3, 700])
            stepper.tokens[:4] = torch.tensor([11, 12, 13, 14])
            for rows in (4, 4, 3, 1):
                seen.append(stepper.step(rows, 710).wait())
            seen.append([stepper.prefill_tail(list(range(20, 40)), 12)])
            seen.append(stepper.step(2, 710).wait())
        return seen

    eager = run(None)
    fused = FusedLayers(layers)
    try:
        before = counters["stats"]["calls_captured"]
        assert run(fused) == eager
        assert counters["stats"]["calls_captured"] > before  # the compiled layers did run
        with torch.inference_mode():  # outside the stepper the eager layers answer (prefill's own cache)
            before = counters["stats"]["calls_captured"]
            model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
            assert counters["stats"]["calls_captured"] == before
    finally:
        fused.remove()
    assert "forward" not in vars(layers[0])
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # the library's own attention again


def test_the_first_shapes_captured_are_one_question_s_steps(tiny_model):
    """The engine is ready once these are captured (a question asked before would decode eagerly all
    through its answer): a one-row step first, at the longest span (it serves every shorter one until the
    compiled pass), then the other sizes' steps, then the rest."""
    import torch

    from core.decode_loop import SlotKV, Stepper
    from core.kv_cache import cache_keyword
    from core.model_files import resolve
    from core.model_loading import load

    model = load(resolve("x", tiny_model, allow_download=False), device="cpu").model
    attention = model.get_decoder().layers[0].self_attn
    kv = SlotKV(len(model.get_decoder().layers), 4, attention.config.num_key_value_heads, attention.head_dim, 2048,
                dtype=torch.float32, device="cpu")
    stepper = Stepper(model, kv, cache_keyword=cache_keyword(model), mrope=False, use_graphs=False)
    seen: list[tuple[int, int, int]] = []
    tails: list[int] = []  # the span of each follow-up tail's forward (token ids; first questions' take embeddings)

    def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        new = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        seen.append((new.shape[0], new.shape[1], kwargs["attention_mask"].shape[-1]))  # rows, tokens, span
        if kwargs.get("input_ids") is not None and new.shape[1] > 1:
            tails.append(seen[-1][2])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            for _ in stepper.captures(fused=False):
                pass
    finally:
        hook.remove()
    # The eager layers' pass: steps and tails at the longest span only (it serves the shorter ones), one
    # row first, then the other sizes' steps, then the rest.
    longest = stepper.spans[-1]
    assert seen[0] == (1, 1, longest)
    steps = [shape for shape in seen if shape[1] == 1]
    assert steps == [(1, 1, longest)] + [(size, 1, longest) for size in reversed(stepper.sizes[1:])]
    assert seen[:len(steps)] == steps
    assert tails == [longest] * len(stepper.tails)
    assert stepper.lone_steps()  # without CUDA graphs there is nothing to wait for
    # With them, ready once every span's one-row step has a graph: its own, or one at a longer span
    # (stand-ins here: never replayed).
    stepper.use_graphs = True
    assert not stepper.lone_steps()
    stepper._graphs.update({("step", 1, span): object() for span in stepper.spans[:-1]})
    stepper._graphs[("step", 2, longest)] = object()  # another size's step does not count
    assert not stepper.lone_steps()
    stepper._graphs = {("step", 1, longest): stepper._graphs[("step", 2, longest)]}
    assert stepper.lone_steps() and stepper._graph("step", 1, stepper.spans[0]) is stepper._graphs[("step", 1, longest)]
    assert stepper._graph("step", 2, stepper.spans[0]) is None


def test_the_eager_pass_takes_every_span_where_no_compiled_pass_follows(tiny_model):
    """Where nothing is compiled after it (imsight's own decoder layers, or ``compile_decode = false``) the eager
    pass's graphs are the last: every step and tail at every span, each attending only over its own span;
    still one row's steps first (the engine is ready after the first)."""
    import torch

    from core.decode_loop import SlotKV, Stepper
    from core.kv_cache import cache_keyword
    from core.model_files import resolve
    from core.model_loading import load

    model = load(resolve("x", tiny_model, allow_download=False), device="cpu").model
    attention = model.get_decoder().layers[0].self_attn
    kv = SlotKV(len(model.get_decoder().layers), 4, attention.config.num_key_value_heads, attention.head_dim, 2048,
                dtype=torch.float32, device="cpu")
    stepper = Stepper(model, kv, cache_keyword=cache_keyword(model), mrope=False, use_graphs=False)
    seen: list[tuple[int, int, int]] = []  # rows, tokens, span of each forward
    tails: list[tuple[int, int, int]] = []  # the same of follow-ups' tails (token ids; first questions' are embeddings)

    def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        new = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        seen.append((new.shape[0], new.shape[1], kwargs["attention_mask"].shape[-1]))
        if kwargs.get("input_ids") is not None and new.shape[1] > 1:
            tails.append(seen[-1])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            for _ in stepper.captures(fused=False, every_span=True):
                pass
    finally:
        hook.remove()
    spans = list(reversed(stepper.spans))
    lone = [(1, 1, span) for span in spans]
    assert seen[:len(lone)] == lone
    steps = [shape for shape in seen if shape[1] == 1]
    assert sorted(steps) == sorted((size, 1, span) for size in stepper.sizes for span in spans)
    assert sorted(tails) == sorted((1, size, span) for size in stepper.tails for span in spans if span >= size)


def test_a_compiled_shape_is_warmed_up_until_a_call_compiles_nothing(tiny_model):
    """A compiled pass compiles first at its shortest span (one row, then the most rows): traced at the
    whole row's span, dynamo guards on a stride of the slots' keys that equals span x head_dim there, and
    every shorter span compiles again (8 graphs instead of 6 for these steps). Then each shape's capture:
    calls until one compiles nothing (at most three), so one call where its graphs exist (three each
    spent seconds of every start on the GPU running the compiled layers' Python). Dynamo is not reset
    here (it would cost the tests after it their graphs): after other tests nothing may compile at all."""
    import torch
    from torch._dynamo.utils import counters

    from core.decode_loop import SlotKV, Stepper
    from core.fused_layers import FusedLayers, decoder_layers
    from core.kv_cache import cache_keyword
    from core.model_files import resolve
    from core.model_loading import load

    model = load(resolve("x", tiny_model, allow_download=False), device="cpu").model
    layers = decoder_layers(model)
    attention = layers[0].self_attn
    kv = SlotKV(len(layers), 2, attention.config.num_key_value_heads, attention.head_dim, 1024,
                dtype=torch.float32, device="cpu")
    fused = FusedLayers(layers)
    stepper = Stepper(model, kv, cache_keyword=cache_keyword(model), mrope=False, use_graphs=False, fused=fused)
    calls: list[tuple[tuple[int, int], bool]] = []  # each call's (rows, span), and whether it compiled
    misses = 0

    def before(_module: Any, _args: Any, _kwargs: dict[str, Any]) -> None:
        nonlocal misses
        misses = counters["frames"]["total"]

    def after(_module: Any, _args: Any, kwargs: dict[str, Any], _output: Any) -> None:
        shape = (kwargs["input_ids"].shape[0], kwargs["attention_mask"].shape[-1])
        calls.append((shape, counters["frames"]["total"] > misses))

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    graphs = counters["stats"]["unique_graphs"]
    try:
        with torch.inference_mode():
            for _ in stepper.captures(fused=True, kind="step"):
                pass
    finally:
        for hook in hooks:
            hook.remove()
        fused.remove()
    runs = [(shape, [c for s, c in group]) for shape, group in itertools.groupby(calls, key=lambda call: call[0])]
    # The shortest span first, one row then two; then every shape, the largest first.
    assert [shape for shape, _ in runs] == [(1, 512), (2, 512), (2, 1024), (1, 1024), (2, 512), (1, 512)]
    for _, compiled in runs[:2]:  # compiling calls, then one that compiles nothing (or three in all)
        assert compiled in ([False], [True, False], [True, True, False], [True, True, True]), compiled
    assert all(compiled == [False] for _, compiled in runs[2:])  # nothing left to compile: one call each
    if any(compiled[0] for _, compiled in runs[:2]):  # compiled here, not found: 6 graphs, not 8
        assert counters["stats"]["unique_graphs"] - graphs <= 6
    assert stepper.fused_kinds == {"step"}


def _twelve_layers(model: Any) -> Any:
    """The tiny model with twelve decoder layers (copies of its two): more than dynamo's 8 recompiles."""
    import copy

    decoder = model.get_decoder()
    for index in range(len(decoder.layers), 12):
        layer = copy.deepcopy(decoder.layers[index % 2])
        layer.self_attn.layer_idx = index
        decoder.layers.append(layer)
    decoder.config.num_hidden_layers = 12
    return model


def test_compiled_code_is_kept_under_the_compile_cache(tmp_path, monkeypatch):
    """Inductor's caches go under the daemon's ``data_dir/compile-cache``, where a restart finds them:
    by the time an engine starts, importing torch._dynamo has set TORCHINDUCTOR_CACHE_DIR to torch's
    default under /tmp, and that value is replaced; an operator's own stays."""
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from core.fused_layers import keep_compiled_code_in

    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # set by torch itself, at import
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    keep_compiled_code_in(tmp_path / "compile-cache")
    assert cache_dir() == str((tmp_path / "compile-cache").resolve())  # where inductor writes and looks
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))
    keep_compiled_code_in(tmp_path / "compile-cache")
    assert cache_dir() == str(tmp_path / "operator")


def test_compiled_layers_prefill_exactly_as_the_eager_ones(tiny_model):
    """A first question's prefill through the compiled layers (its cache a ``prefill_cache``): the same
    logits and the same cached keys and values as the eager layers, for prompts of several lengths and
    for a follow-up's tail after them, all twelve layers within dynamo's recompile limit (past it: an
    error), each shape traced once."""
    import torch
    from torch._dynamo.utils import counters

    from core.fused_layers import FusedLayers, decoder_layers, prefill_cache
    from core.kv_cache import cache_keyword
    from core.model_files import resolve
    from core.model_loading import load

    model = _twelve_layers(load(resolve("x", tiny_model, allow_download=False), device="cpu").model)
    fused = FusedLayers(decoder_layers(model))
    keyword = cache_keyword(model)
    generator = torch.Generator().manual_seed(3)
    try:
        with torch.inference_mode():
            for length in (5, 37, 90):
                ids = torch.randint(0, 200, (1, length), generator=generator)
                caches = [prefill_cache(model.config), prefill_cache(model.config)]
                eager = model(input_ids=ids, use_cache=True, **{keyword: caches[0]}).logits
                before, graphs = counters["stats"]["calls_captured"], counters["stats"]["unique_graphs"]
                with fused.active():
                    compiled = model(input_ids=ids, use_cache=True, **{keyword: caches[1]}).logits
                torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
                assert length > 5 or counters["stats"]["calls_captured"] > before  # compiled on the first
                # Traced once: the layer's three pieces around its two eager calls (the cache's update,
                # attention). Without nested graph breaks each enclosing frame is traced again: 5.
                assert counters["stats"]["unique_graphs"] - graphs <= 3
                assert len(caches[1].layers) == 12
                for ours, theirs in zip(caches[1].layers, caches[0].layers, strict=True):
                    torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
                    assert ours.keys.shape[2] == length
                # A follow-up's long tail: more tokens after the cached ones, at their positions.
                tail = torch.randint(0, 200, (1, 30), generator=generator)
                positions = torch.arange(length, length + 30)[None, :]
                eager = model(input_ids=tail, position_ids=positions, use_cache=True, **{keyword: caches[0]}).logits
                with fused.active():
                    compiled = model(input_ids=tail, position_ids=positions, use_cache=True,
                                     **{keyword: caches[1]}).logits
                torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
                assert caches[1].get_seq_length() == length + 30
    finally:
        fused.remove()


async def test_the_decode_step_is_compiled_while_idle_and_answers_meanwhile(tiny_model, started):
    """The GPU's start-up order, on the CPU: the engine answers at once with the eager step while it
    compiles the step's layers shape by shape between questions, then switches to the compiled step,
    then compiles the layers for first questions' prefill; the answers are the same before, during
    and after (the images are new to the engine after: their prefill runs through compiled layers)."""
    from core.model_files import resolve
    from core.transformers_engine import TransformersEngine

    engine = TransformersEngine(resolve("x", tiny_model, allow_download=False), device="cpu", max_batch=2,
                                prefix_cache_bytes=64 * 2**20, context_tokens=1024)
    engine._compile_without_graphs = True  # what CUDA does, without CUDA graphs
    await started(engine)
    assert not engine.settled.is_set()  # the warm-up question made the slots; the compiling is to come
    asks = [([_image(60)], "What is it?", 10), ([], "Why?", 8)]
    during = [await _answer(engine, *asks[0])]
    # Answered without waiting for all of it: the step is compiled for one row after (one shape at a time,
    # the largest first: 2 rows, then 1).
    assert engine.measurements()["decode_compiled"] == 0
    assert engine.measurements()["settled"] == 0 and engine.measurements()["decoder_kernels"] == 0  # (LLaVA)
    during.append(await _answer(engine, *asks[1]))
    for _ in range(600):
        if engine.measurements()["decode_compiled"]:
            break
        await asyncio.sleep(0.5)
    assert engine.measurements()["decode_compiled"] == 1
    # Then first questions' prefill through the compiled layers too.
    assert await asyncio.to_thread(engine.settled.wait, 300)
    assert engine.measurements()["prefill_compiled"] == 1
    assert engine.measurements()["settled"] == 1
    steps = engine.stats.decode_steps
    hits = engine.stats.prefix_hits
    after = [await _answer(engine, [_image(61)], "What is it?", 10), await _answer(engine, [], "Why?", 8)]
    assert engine.stats.decode_steps > steps
    assert engine.stats.prefix_hits == hits  # an image new to the engine: prefilled whole
    assert after[1] == during[1]
    for images, got in (([_image(60)], during[0]), ([_image(61)], after[0])):
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, images, "What is it?", 10)
    # A follow-up after a long answer: its tail is longer than the captured ones (256 tokens), so it is
    # prefilled after the cached prefix through the compiled layers.
    turns = [Turn("user", "What is it?"), Turn("assistant", "a long answer, " * 30)]
    follow_up = await _answer(engine, [_image(61)], "Why?", 8, turns)
    assert engine.stats.prefix_hits == hits + 1
    assert engine.measurements()["prefill_compiled"] == 1  # (a failure there turns it off)
    assert follow_up.removesuffix(CUT_NOTE) == bare_generate(engine, [_image(61)], "Why?", 8, turns)

    # Questions prefilled together take the graph compiled while idle, prompts of one length too (they
    # are padded anyway: without padding transformers drops the mask, a graph of its own to compile).
    from torch._dynamo.utils import counters

    assert engine.measurements()["prefill_together_compiled"] == 1
    graphs, batches = counters["stats"]["unique_graphs"], engine.stats.prefill_batches
    engine._window_s = 0.5
    for pair in ([([_image(63)], "What is it?", 6), ([_image(64)], "What is it?", 6)],
                 [([_image(65)], "What is it?", 6), ([], "And a longer question without a picture?", 5)]):
        got = await asyncio.gather(*[_answer(engine, i, q, t) for i, q, t in pair])
        for (images, question, tokens), answer in zip(pair, got, strict=True):
            assert answer.removesuffix(CUT_NOTE) == bare_generate(engine, images, question, tokens)
    engine._window_s = 0.0
    assert engine.stats.prefill_batches == batches + 2
    assert counters["stats"]["unique_graphs"] == graphs

    # A prefill the compiled layers fail (past dynamo's recompile limit, say) is done again eagerly,
    # and prefill stays eager.
    def fails_compiled() -> str:
        if engine._stepper.fused._active:
            raise RuntimeError("recompile limit reached")
        return "eager"

    assert engine.measurements()["prefill_together_compiled"] == 1
    assert engine._prefilled(fails_compiled, together=True) == "eager"  # several together: only they go eager
    assert engine.measurements()["prefill_together_compiled"] == 0
    assert engine.measurements()["prefill_compiled"] == 1
    assert engine._prefilled(fails_compiled) == "eager"
    assert engine.measurements()["prefill_compiled"] == 0
    eager = await _answer(engine, [_image(62)], "What is it?", 10)
    assert eager.removesuffix(CUT_NOTE) == bare_generate(engine, [_image(62)], "What is it?", 10)

    # Stopped, it leaves transformers' attention registry as it found it (a second engine in this process
    # would otherwise wrap the first one's never-compiled wrapper).
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    await engine.stop()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


async def test_each_answer_reports_its_prompt_and_answer_tokens(make_engine):
    """``Usage``: the prompt's tokens (the image's included) and the answer's, as bare generate() counts them,
    and where its time went, for questions answered together and for one answered alone by generate()
    (longer than a slot)."""
    engine = await make_engine(max_batch=4, prefix_cache_bytes=0, context_tokens=256)
    asks = [([_image(70)], "What is it?", 9), ([_image(71)], "Why?" * 3, 5), ([_image(72)], "why " * 200, 6)]
    usages = [Usage() for _ in asks]

    async def ask(images, question, tokens, usage):
        return "".join([c async for c in engine.answer(images, [], question, GenerationLimits(tokens), usage)])

    await asyncio.gather(*[ask(*a, u) for a, u in zip(asks, usages, strict=True)])
    import torch

    for (images, question, tokens), usage in zip(asks, usages, strict=True):
        inputs = engine._inputs(images, [], question)
        with torch.inference_mode():
            out = engine.loaded.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        ended = next((i + 1 for i, t in enumerate(new) if t in engine._eos), len(new))
        assert (usage.prompt_tokens, usage.completion_tokens) == (inputs["input_ids"].shape[1], ended)
        # Where its time went, for the job's log line: waited (rendering, others' turns), then its first token.
        assert 0 < usage.waited_s < usage.first_token_s
    assert usages[2].prefill == "alone, by generate()"
    assert {usages[0].prefill, usages[1].prefill} <= {"together with 1 other(s)", "the model's forward",
                                                      "prompt into its slot"}
