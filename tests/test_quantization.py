"""Quantisation, dtypes and memory on the tiny real model: NF4/int8 on CPU, imsight's own int4 and fp8
linears answering as bare ``generate()`` does, pixel casts, the memory guard."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from core.answer_text import CUT_NOTE
from core.engine import GenerationLimits, PreparedImage
from core.errors import EngineError, ModelUnavailable
from core.memory import Estimate, GiB, ensure_fits, estimate
from core.quantization import pick_mode, unquantised_modules
from helpers import bare_generate, eventually

LIMITS = GenerationLimits(max_new_tokens=6)
IMAGE = PreparedImage("a" * 64, Image.new("RGB", (64, 48), (250, 10, 10)))
KEPT = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


async def _answer(engine, question="What is it?") -> str:
    return "".join([c async for c in engine.answer([IMAGE], [], question, LIMITS)])


def _linear_kinds(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if "Linear" in type(m).__name__}


@pytest.mark.parametrize(("mode", "quantised_class"), [("int4", "Int4Linear"), ("fp8", "Fp8Linear")])
async def test_the_tiny_model_answers_through_imsights_quantized_linears_as_bare_generate_does(
        make_engine, mode, quantised_class):
    engine = await make_engine(quantization=mode, max_batch=4)
    model = engine.loaded.model
    kinds = _linear_kinds(model)
    assert {k for n, k in kinds.items() if n.startswith("model.language_model.")} == {quantised_class}
    assert kinds["lm_head"] == "Linear" and kinds["model.multi_modal_projector.linear_1"] == "Linear"
    assert engine.loaded.mode == mode
    footprint = model.get_memory_footprint()
    assert 0.8 * footprint <= engine.loaded.estimate.weights <= 1.25 * footprint

    async def ask(images: list[PreparedImage], question: str, tokens: int) -> str:
        return "".join([c async for c in engine.answer(images, [], question, GenerationLimits(tokens))])

    images = [PreparedImage(f"{mode}-{n}", Image.new("RGB", (64, 48), (40 * n % 256, 90, 200))) for n in range(3)]
    asks = [([images[n]], "What is this?" + "?" * n, 8 + 4 * n) for n in range(3)]
    answers = await asyncio.gather(*[ask(*a) for a in asks])  # decoded together, in one running batch
    for (image, question, tokens), got in zip(asks, answers, strict=True):
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, image, question, tokens)


@pytest.mark.parametrize(("mode", "quantised_class"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
async def test_bitsandbytes_quantises_the_language_model_only(make_engine, mode, quantised_class):
    engine = await make_engine(quantization=mode, dtype="bfloat16")
    kinds = _linear_kinds(engine.loaded.model)
    language = {n: k for n, k in kinds.items() if n.startswith("model.language_model.")}
    kept = {n: k for n, k in kinds.items() if any(n == p or n.startswith(p + ".") for p in KEPT)}
    assert language and set(language.values()) == {quantised_class}
    assert kept and set(kept.values()) == {"Linear"}  # vision tower, projector and head stay full width
    assert engine.loaded.mode == mode
    assert engine.loaded.pixel_dtype == torch.bfloat16  # read from the vision tower, not from uint8 weights
    assert await _answer(engine)


async def test_float32_pixels_reach_a_bfloat16_vision_tower_as_bfloat16(make_engine):
    engine = await make_engine(dtype="bfloat16", quantization="none")
    seen: list[torch.dtype] = []
    tower = engine.loaded.model.model.vision_tower
    handle = tower.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["pixel_values"]).dtype), with_kwargs=True)
    rendered = engine.loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": IMAGE.image}, {"type": "text", "text": "q"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert rendered["pixel_values"].dtype == torch.float32  # what the processor hands over
    assert await _answer(engine)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_auto_quantisation_is_4_bit_on_cuda_and_none_on_cpu():
    assert pick_mode("auto", "cuda", (9, 0)) == "int4"  # Hopper: torch's int4 kernel runs
    assert pick_mode("auto", "cuda", (7, 5)) == "nf4"  # Turing: it does not, bitsandbytes does
    assert pick_mode("auto", "cpu") == "none"
    assert pick_mode("int8", "cpu") == "int8"
    with pytest.raises(EngineError):
        pick_mode("fp3", "cuda")


def test_unquantised_modules_are_full_prefixes(tiny_model):
    from transformers import AutoConfig, AutoModelForImageTextToText, Glm4vConfig

    with torch.device("meta"):
        llava = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_model))
        glm = AutoModelForImageTextToText.from_config(Glm4vConfig(
            text_config={"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64,
                         "num_attention_heads": 2, "num_key_value_heads": 1},
            vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 64, "out_hidden_size": 64}))
    assert unquantised_modules(llava) == KEPT
    assert unquantised_modules(glm) == ["model.visual", "lm_head"]


@pytest.mark.parametrize("mode", ["none", "nf4"])
async def test_the_memory_estimate_matches_what_loading_takes(make_engine, mode):
    engine = await make_engine(quantization=mode, dtype="bfloat16")
    actual = engine.loaded.model.get_memory_footprint()
    predicted = engine.loaded.estimate.weights
    assert 0.8 * actual <= predicted <= 1.25 * actual, (predicted, actual)


def test_a_model_that_does_not_fit_is_refused_before_loading():
    need = Estimate(weights=20 * GiB, working=2 * GiB)
    ensure_fits(need, 30 * GiB, where="cuda", model="m", mode="none")
    with pytest.raises(ModelUnavailable) as caught:
        ensure_fits(need, 16 * GiB, where="cuda", model="zai-org/GLM-4.6V-Flash", mode="none")
    message = str(caught.value)
    assert "22.0 GiB" in message and "16.0 GiB is free" in message and 'quantization = "nf4"' in message


def test_the_estimate_of_the_9b_glm_shape_is_what_was_measured():
    """INFERENCE.md measured GLM-4.1V-9B at 20.6 GB in bf16: the estimate must agree without loading it."""
    from transformers import AutoModelForImageTextToText, Glm4vConfig

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(Glm4vConfig())
    keep = unquantised_modules(model)
    bf16 = estimate(model, "none", 2, keep)
    nf4 = estimate(model, "nf4", 2, keep)
    assert 20.0e9 < bf16.weights < 21.2e9
    assert 7.0e9 < nf4.weights < 9.5e9  # the vision tower and head stay bf16: more than the 7.6 GB all-NF4


async def test_out_of_memory_frees_caches_and_retries_once_with_a_smaller_image(make_engine):
    engine = await make_engine(max_batch=1)
    await _answer(engine, "fill the prefix cache")
    await eventually(lambda: len(engine._prefixes) == 1)  # stored just after the answer went out
    calls: list[int] = []

    def fail_first(_module, _args):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine.loaded.model.model.vision_tower.register_forward_pre_hook(fail_first)
    other = PreparedImage("b" * 64, Image.new("RGB", (64, 48), (0, 0, 250)))
    answer = "".join([c async for c in engine.answer([other], [], "Q", LIMITS)])
    assert answer
    assert engine.stats.oom_retries == 1 and len(calls) == 2
    assert engine._prefixes.get((IMAGE.sha256,)) is None  # the cache was emptied to make room


async def test_out_of_memory_twice_is_a_clear_error(make_engine):
    engine = await make_engine(max_batch=1)

    def always(_module, _args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    engine.loaded.model.model.vision_tower.register_forward_pre_hook(always)
    with pytest.raises(EngineError, match="out of GPU memory, even with a smaller image"):
        await _answer(engine)


async def test_int4_weights_kept_unpacked_answer_as_without_and_are_counted_before_loading(make_engine):
    from core.int4_weights import Int4Linear, unpacked_bytes

    plain = await make_engine(quantization="int4")
    engine = await make_engine(quantization="int4", unpacked_weights=True)
    layers = [m for m in engine.loaded.model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.unpacked is not None for m in layers)
    assert not any(m.unpacked is not None for m in plain.loaded.model.modules() if isinstance(m, Int4Linear))
    kept = unpacked_bytes(engine.loaded.model)
    assert engine.loaded.estimate.unpacked == kept and plain.loaded.estimate.unpacked == 0
    assert engine.loaded.estimate.total == plain.loaded.estimate.total + kept

    def unpacking(*args):
        raise AssertionError("a prefill unpacked a weight that is kept unpacked")

    for layer in layers:
        layer.fuse_unpacking(unpacking)
    images = [PreparedImage(f"kept-{n}", Image.new("RGB", (64, 48), (60 * n, 90, 200))) for n in range(2)]
    for image in images:
        got = "".join([c async for c in engine.answer([image], [], "What is this?", GenerationLimits(8))])
        assert got == "".join([c async for c in plain.answer([image], [], "What is this?", GenerationLimits(8))])
        assert got.removesuffix(CUT_NOTE) == bare_generate(plain, [image], "What is this?", 8)


async def test_unpacked_weights_ask_for_nothing_outside_int4(make_engine):
    engine = await make_engine(quantization="none", unpacked_weights=True)
    assert engine.loaded.estimate.unpacked == 0


def test_a_model_whose_kept_unpacked_weights_do_not_fit_is_refused_with_that_setting_named():
    need = Estimate(weights=5 * GiB, working=1 * GiB, unpacked=15 * GiB)
    with pytest.raises(ModelUnavailable) as caught:
        ensure_fits(need, 16 * GiB, where="cuda", model="m", mode="int4")
    message = str(caught.value)
    assert "21.0 GiB" in message and "15.0 GiB of them kept unpacked" in message
    assert "unpacked_weights = false" in message
