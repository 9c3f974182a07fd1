"""A first question prefilled by the stepper's own forward (``Stepper.prefill``, captured as CUDA graphs
on a GPU): the prompt as the model hands it to its language model (core/prompt_embeddings.py), padded
to a captured size, into the staging row. On the CPU, float32, it must leave exactly what the model's
own prefill leaves: the first token, the KV and the M-RoPE offset; and the engine's answers through it
must be bare ``generate()``'s."""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from core.answer_text import CUT_NOTE
from core.decode_loop import PREFILL_SIZES, SlotKV, Stepper
from core.engine import GenerationLimits, PreparedImage, Turn
from core.fused_layers import decoder_layers, prefill_cache
from core.kv_cache import cache_keyword
from core.model_files import resolve
from core.model_loading import load
from core.prefill_batch import uses_mrope
from core.prompt_embeddings import prompt_embeddings
from core.prompt_inputs import chat_messages
from core.step_attention import StepAttention, prompt_call
from tests.helpers import bare_generate, sdpa_calls

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _stepper(model: Any, length: int = 1024, step_attention: StepAttention | None = None
             ) -> tuple[SlotKV, Stepper]:
    attention = decoder_layers(model)[0].self_attn
    config = attention.config
    kv = SlotKV(len(decoder_layers(model)), 2, config.num_key_value_heads, attention.head_dim, length,
                dtype=torch.float32, device="cpu")
    return kv, Stepper(model, kv, cache_keyword=cache_keyword(model), mrope=uses_mrope(model), use_graphs=False,
                       attention=step_attention)


def _assert_as_own_prefill(model: Any, inputs: dict[str, Any], step_attention: StepAttention | None = None) -> None:
    mrope = uses_mrope(model)
    kv, stepper = _stepper(model, step_attention=step_attention)
    count = int(inputs["input_ids"].shape[1])
    assert count not in stepper.prefills  # so the prompt is padded
    if mrope:
        model.model.rope_deltas = None
    prompt = prompt_embeddings(model, inputs)
    assert prompt is not None and prompt.embeds.shape[:2] == (1, count)
    assert stepper.takes_positions(prompt.positions, count)
    assert not stepper.takes_positions(torch.zeros(4, 1, count, dtype=torch.long), count)  # (text positions too)
    delta = model.model.rope_deltas if mrope else None
    first = stepper.prefill(prompt.embeds, prompt.positions)

    cache = prefill_cache(model.config)
    if mrope:
        model.model.rope_deltas = None
    out = model(**inputs, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    assert first == int(out.logits[0, -1].argmax())
    assert int(kv.positions[kv.staging]) == count
    for index, layer in enumerate(cache.layers):
        torch.testing.assert_close(kv.keys[index][kv.staging, :, :count], layer.keys[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kv.values[index][kv.staging, :, :count], layer.values[0], atol=1e-5, rtol=1e-4)
    if mrope:
        own = model.model.rope_deltas
        assert (delta is None) == (own is None)
        if delta is not None:
            assert delta.tolist() == own.tolist()


def test_a_first_question_prefilled_in_the_staging_row_is_its_own_prefill(tiny_model):
    loaded = load(resolve("x", tiny_model, allow_download=False), device="cpu")
    image = PreparedImage("a", Image.new("RGB", (64, 48), (200, 30, 90)))
    with torch.inference_mode():
        for images, question in (([image], "What is on the screen?"), ([], "A question without a picture."),
                                 ([image, image], "Two?")):
            inputs = dict(loaded.processor.apply_chat_template(chat_messages(images, [], question),
                                                               add_generation_prompt=True, tokenize=True,
                                                               return_dict=True, return_tensors="pt"))
            _assert_as_own_prefill(loaded.model, inputs)


def test_a_prompt_attends_over_its_own_padded_size_causally_where_installed(tiny_model):
    """Through the masked SDPA (decode steps' attention not installed) and, with it installed, through
    SDPA's causal path with no mask: both over the padded prompt's own positions, not the next span's,
    and both leave the model's own prefill (text and image prompts, the padding after them)."""
    loaded = load(resolve("x", tiny_model, allow_download=False), device="cpu")
    image = PreparedImage("a", Image.new("RGB", (64, 48), (200, 30, 90)))
    inputs = dict(loaded.processor.apply_chat_template(chat_messages([image], [], "What is on the screen?"),
                                                       add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt"))
    count = int(inputs["input_ids"].shape[1])
    size = next(t for t in PREFILL_SIZES if t >= count)
    layers = len(decoder_layers(loaded.model))
    installed = StepAttention("sdpa")
    try:
        with torch.inference_mode():
            for way in (None, installed):
                _, stepper = _stepper(loaded.model, step_attention=way)
                prompt = prompt_embeddings(loaded.model, inputs)
                assert prompt is not None
                with sdpa_calls() as calls:
                    stepper.prefill(prompt.embeds, prompt.positions)
                assert calls == [(1, size, size, way is None, way is not None)] * layers
                _assert_as_own_prefill(loaded.model, inputs, way)
            # Off (as where the causal path disagreed with the mask at install): the mask again.
            installed.causal = False
            _, stepper = _stepper(loaded.model, step_attention=installed)
            with sdpa_calls() as calls:
                stepper.prefill(prompt.embeds, prompt.positions)
            assert calls == [(1, size, size, True, False)] * layers
    finally:
        installed.remove()


def test_a_lone_prompt_through_the_models_own_forward_reaches_sdpa_causal_and_unmasked(glm):
    """Why the engine's own prefill of one prompt (``_prefill``) needs no ``causal_prompts``: nothing padded,
    transformers drops the mask itself (a library upgrade that stops doing so fails here)."""
    from test_prefill_batch import _glm_inputs

    inputs = _glm_inputs(glm.config, (1, 4, 6), [40, 41, 42], seed=1)
    count = int(inputs["input_ids"].shape[1])
    with torch.inference_mode(), sdpa_calls() as calls:
        glm.model.rope_deltas = None
        glm(**inputs, use_cache=True, logits_to_keep=1, **{cache_keyword(glm): prefill_cache(glm.config)})
    decoder = [call for call in calls if call[1] == count]  # (the vision encoder's: its patches)
    assert decoder == [(1, count, count, False, True)] * len(decoder_layers(glm))


def test_only_the_prompts_own_calls_take_the_causal_path():
    query, key = torch.zeros(1, 4, 7, 8), torch.zeros(1, 2, 7, 8)
    square = torch.ones(1, 1, 7, 7, dtype=torch.bool).tril()
    assert prompt_call(query, key, square, 1)
    assert not prompt_call(query, key, None, 1)  # the vision encoder's: bidirectional, no mask
    assert not prompt_call(query, key, square.float(), 1)
    assert not prompt_call(query, torch.zeros(1, 2, 9, 8), square, 1)  # after a prefix
    assert not prompt_call(query[:, :, :1], key[:, :, :1], square[..., :1, :1], 1)  # one token
    assert not prompt_call(torch.zeros(2, 4, 7, 8), torch.zeros(2, 2, 7, 8), square, 1)  # rows it was not told of
    assert prompt_call(torch.zeros(2, 4, 7, 8), torch.zeros(2, 2, 7, 8), square, 2)


def test_the_causal_path_asks_for_flash_and_leaves_the_other_calls_their_kernels(monkeypatch):
    """cuDNN plans every new shape (~60 ms each on an H200): a prompt's causal call goes without it, the
    settings back as they were after it, and a masked call that is not a prompt's keeps them."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    query, key = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8)
    square = torch.ones(1, 1, 7, 7, dtype=torch.bool).tril()
    module = type("Attention", (), {"num_key_value_groups": 2, "is_causal": True})()
    installed = StepAttention("sdpa")
    try:
        attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
        with installed.causal_prompts([0]):
            attention(module, query, key, key, square)
        attention(module, query, key, key, square)
    finally:
        installed.remove()
    assert seen == [False, True]
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_causal_path_is_checked_against_the_mask_at_install():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from core.step_attention import _Probe

    probe = _Probe(8, 2, 32, device=torch.device("cpu"), dtype=torch.float32)
    assert probe.causal_agrees(sdpa_attention_forward)

    def ignores_causality(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
                          **kwargs: Any) -> Any:
        return sdpa_attention_forward(module, query, key, value, mask, **{**kwargs, "is_causal": False})

    assert not probe.causal_agrees(ignores_causality)


@pytest.fixture(scope="module")
def glm() -> Any:
    from glm_model import tiny_glm

    return tiny_glm()


def test_m_rope_prompts_keep_the_models_positions(glm):
    """GLM-4.1V-shaped: the image's 3-D positions come from the model's own forward, the offset too; a
    prompt without an image takes the plain positions the language model would have given it."""
    from test_prefill_batch import _glm_inputs

    config = glm.config
    assert uses_mrope(glm)
    with torch.inference_mode():
        for grid, text, seed in (((1, 4, 6), [40, 41, 42], 1), ((1, 6, 8), [43] * 17, 2), (None, [44, 45, 46], 3)):
            _assert_as_own_prefill(glm, _glm_inputs(config, grid, text, seed))


def test_prompt_embeddings_need_a_language_model_inside():
    assert prompt_embeddings(torch.nn.Linear(2, 2), {}) is None


def test_prefill_sizes_cover_a_screenshot_question_in_steps_of_128():
    sizes = list(PREFILL_SIZES)
    assert sizes == sorted(sizes) and sizes[-1] == 2048
    assert all(b - a <= 128 for a, b in itertools.pairwise(sizes))


async def test_the_engine_answers_first_questions_through_it(make_engine):
    """The engine's way on a GPU once the prefill graphs are captured, taken here without them: first
    questions (images or none, alone and several at once) and follow-ups answer as bare ``generate()``."""
    engine = await make_engine(max_batch=2)
    engine._prefill_uncaptured = True
    image = PreparedImage("b", Image.new("RGB", (64, 48), (20, 130, 90)))
    before = engine.stats.slot_prefills
    asks: list[tuple[list[PreparedImage], list[Turn], str, int]] = [
        ([image], [], "What is on the screen?", 8),
        ([], [], "Hello there?", 6),
        ([image], [Turn("user", "What is on the screen?"), Turn("assistant", "a chart")], "Which colour?", 6),
    ]
    for images, turns, question, tokens in asks:
        got = "".join([part async for part in engine.answer(images, turns, question, GenerationLimits(tokens))])
        assert got.removesuffix(CUT_NOTE) == bare_generate(engine, images, question, tokens, turns)
    assert engine.stats.slot_prefills == before + 2  # the follow-up took the cached prefix instead
    assert engine.stats.prefix_hits >= 1


def test_the_prefill_through_compiled_layers_is_the_eager_one(tiny_model):
    """The GPU's last pass, on the CPU: the stepper's prefill through the compiled decoder layers (its
    warm-ups compile them; a graph is captured per size on a GPU) leaves the eager forward's first token
    and KV; one compilation serves every size (the sizes are symbolic)."""
    from core.fused_layers import FusedLayers

    loaded = load(resolve("x", tiny_model, allow_download=False), device="cpu")
    model = loaded.model
    inputs = dict(loaded.processor.apply_chat_template(
        chat_messages([PreparedImage("c", Image.new("RGB", (64, 48), (9, 99, 199)))], [], "What is it?"),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"))
    fused = FusedLayers(decoder_layers(model))
    try:
        with torch.inference_mode():
            prompt = prompt_embeddings(model, inputs)
            assert prompt is not None
            seen = []
            for compiled, kv, stepper in _eager_then_compiled(model, fused, "prefill"):
                with _through_compiled_layers(model, fused) as active:
                    first = stepper.prefill(prompt.embeds, prompt.positions)
                assert active == [compiled]  # through the compiled layers exactly when they were compiled for it
                count = prompt.embeds.shape[1]
                seen.append((first, [k[kv.staging, :, :count].clone() for k in kv.keys]))
        assert seen[0][0] == seen[1][0]
        for eager_keys, compiled_keys in zip(seen[0][1], seen[1][1], strict=True):
            torch.testing.assert_close(compiled_keys, eager_keys, atol=1e-5, rtol=1e-4)
    finally:
        fused.remove()


def test_follow_up_tails_through_compiled_layers_are_the_eager_ones(tiny_model):
    """The same for a follow-up's new tokens after a cached prefix (the staging row from ``start``):
    the eager forward's next token and KV, one compilation for every tail size and start."""
    from core.fused_layers import FusedLayers

    model = load(resolve("x", tiny_model, allow_download=False), device="cpu").model
    fused = FusedLayers(decoder_layers(model))
    asks = [(list(range(20, 40)), 12), (list(range(50, 53)), 7), (list(range(60, 160)), 30)]
    try:
        with torch.inference_mode():
            seen = []
            for compiled, kv, stepper in _eager_then_compiled(model, fused, "tail"):
                firsts, keys = [], []
                with _through_compiled_layers(model, fused) as active:
                    for ids, start in asks:
                        kv.positions[kv.staging] = start
                        firsts.append(stepper.prefill_tail(ids, start))
                        keys.append([k[kv.staging, :, :start + len(ids)].clone() for k in kv.keys])
                assert active == [compiled] * len(asks)
                seen.append((firsts, keys))
        assert seen[0][0] == seen[1][0]
        for eager_rows, compiled_rows in zip(seen[0][1], seen[1][1], strict=True):
            for eager_keys, compiled_keys in zip(eager_rows, compiled_rows, strict=True):
                torch.testing.assert_close(compiled_keys, eager_keys, atol=1e-5, rtol=1e-4)
    finally:
        fused.remove()


def _eager_then_compiled(model: Any, fused: Any, kind: str) -> Iterator[tuple[bool, SlotKV, Stepper]]:
    """A stepper with the eager layers, then one whose ``kind`` went through the compiled layers' pass
    (the warm-ups' writes to its rows undone, so both start alike)."""
    for compiled in (False, True):
        kv, stepper = _stepper(model, length=256)
        stepper.fused = fused
        if compiled:
            _compiled_pass(stepper, kind)
            for tensor in (*kv.keys, *kv.values):
                tensor.zero_()
        yield compiled, kv, stepper


def _compiled_pass(stepper: Stepper, kind: str) -> None:
    """``kind``'s pass through the compiled layers, all its sizes: compiled once, for the first (largest)."""
    from torch._dynamo.utils import counters

    work = stepper.captures(fused=True, kind=kind)
    next(work)
    graphs = counters["stats"]["unique_graphs"]
    for _ in work:
        pass
    assert counters["stats"]["unique_graphs"] == graphs  # the smaller sizes: no new graph
    assert stepper.fused_kinds == {kind}


@contextlib.contextmanager
def _through_compiled_layers(model: Any, fused: Any) -> Iterator[list[bool]]:
    """For each forward of the first decoder layer meanwhile: whether it took the compiled layers."""
    active: list[bool] = []
    hook = decoder_layers(model)[0].register_forward_pre_hook(lambda *_: active.append(fused._active))
    try:
        yield active
    finally:
        hook.remove()
