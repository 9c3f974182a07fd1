"""Prefilling first questions together (core/prefill_batch.py): each row of the batch comes out as its
own prefill would have left it (first token, KV, M-RoPE offset), on the tiny LLaVA-shaped model and on
a tiny GLM-4.1V-shaped one (M-RoPE), float32 on the CPU."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from core.engine import PreparedImage
from core.fused_layers import decoder_layers, prefill_cache
from core.kv_cache import cache_keyword
from core.model_files import resolve
from core.model_loading import load
from core.prefill_batch import (
    image_inputs,
    join_encoder_outputs,
    left_padded,
    pad_token,
    prefill_together,
    split_encoder_outputs,
    uses_mrope,
)
from core.prompt_inputs import chat_messages
from core.step_attention import StepAttention
from tests.helpers import sdpa_calls

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _alone(model: Any, inputs: dict[str, Any], mrope: bool) -> tuple[int, Any, Any]:
    """One question's own prefill: its first token, cache and M-RoPE offset."""
    cache = prefill_cache(model.config)
    if mrope:
        model.model.rope_deltas = None
    out = model(**inputs, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    return int(out.logits[0, -1].argmax()), cache, model.model.rope_deltas if mrope else None


@pytest.fixture
def causal() -> Iterator[StepAttention]:
    """The engine's attention on a GPU, installed here on the CPU: prompts' rows causally, no mask."""
    installed = StepAttention("sdpa")
    yield installed
    installed.remove()


def _assert_rows_as_alone(model: Any, inputs: list[dict[str, Any]], pad_id: int, mrope: bool,
                          causal: StepAttention | None = None) -> None:
    """Each row as its own prefill; with ``causal``, the decoder's attention each row's own, causal and
    unmasked (as the engine prefills several questions on a GPU)."""
    batch = left_padded(inputs, pad_id)
    assert batch is not None
    lengths = [one["input_ids"].shape[1] for one in inputs]
    # (prompts all of one length are padded by a token too: a batch always has a mask to keep)
    width = max(lengths) + (len(set(lengths)) == 1)
    assert batch["input_ids"].shape == (len(inputs), width)
    assert not batch["attention_mask"].all()
    with causal.causal_prompts([width - n for n in lengths]) if causal else contextlib.nullcontext(), \
            sdpa_calls() as calls:
        rows = prefill_together(model, batch, prefill_cache(model.config), cache_keyword=cache_keyword(model),
                                mrope=mrope)
    decoder = [call for call in calls if call[3] or call[4]]  # (the vision encoder's: neither masked nor causal)
    layers = len(decoder_layers(model))
    if causal is None:
        assert decoder == [(len(inputs), width, width, True, False)] * layers
    else:
        assert decoder == [(1, n, n, False, True) for n in lengths] * layers
    for one, row in zip(inputs, rows, strict=True):
        first, cache, delta = _alone(model, one, mrope)
        assert row.first == first
        assert row.length == one["input_ids"].shape[1]
        for (keys, values), layer in zip(row.layers, cache.layers, strict=True):
            torch.testing.assert_close(keys, layer.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(values, layer.values, atol=1e-5, rtol=1e-4)
        if mrope:  # (a prompt without images has none alone, and 0 in a batch with images: the same)
            assert row.delta is not None
            assert row.delta.tolist() == (delta.tolist() if delta is not None else [[0]])


def test_each_row_of_a_padded_batch_is_its_own_prefill(tiny_model, causal):
    loaded = load(resolve("x", tiny_model, allow_download=False), device="cpu")
    image = PreparedImage("a", Image.new("RGB", (64, 48), (200, 30, 90)))
    asks = [([image], "What is on the screen?"), ([], "A question without a picture, and a longer one than that."),
            ([image, image], "Two?")]
    inputs = [dict(loaded.processor.apply_chat_template(chat_messages(images, [], question),
                                                        add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt"))
              for images, question in asks]
    assert len({one["input_ids"].shape[1] for one in inputs}) == 3  # so there is padding to get right
    assert not uses_mrope(loaded.model)  # LLaVA-shaped: positions given per row
    with torch.inference_mode():
        _assert_rows_as_alone(loaded.model, inputs, pad_id=0, mrope=uses_mrope(loaded.model))
        _assert_rows_as_alone(loaded.model, inputs, pad_id=0, mrope=uses_mrope(loaded.model), causal=causal)


def test_prompts_of_one_length_are_padded_and_each_row_is_its_own_prefill(tiny_model, causal):
    loaded = load(resolve("x", tiny_model, allow_download=False), device="cpu")
    inputs = [dict(loaded.processor.apply_chat_template(
        chat_messages([PreparedImage(str(n), Image.new("RGB", (64, 48), (n, 30, 90)))], [], "What is it?"),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")) for n in (10, 200)]
    assert len({one["input_ids"].shape[1] for one in inputs}) == 1
    with torch.inference_mode():
        _assert_rows_as_alone(loaded.model, inputs, pad_id=0, mrope=False)
        _assert_rows_as_alone(loaded.model, inputs, pad_id=0, mrope=False, causal=causal)


def _glm_inputs(config: Any, grid: tuple[int, int, int] | None, text: list[int], seed: int) -> dict[str, Any]:
    """A GLM-4.1V prompt built by hand (its processor needs torchvision): text, one image of ``grid``
    patches (or none), more text."""
    generator = torch.Generator().manual_seed(seed)
    start = [5, 6]
    ids, types = list(start), [0, 0]
    inputs: dict[str, Any] = {}
    if grid is not None:
        tokens = grid[0] * grid[1] * grid[2] // 4  # the vision tower merges 2 x 2 patches
        ids += [config.image_start_token_id, *[config.image_token_id] * tokens, config.image_end_token_id]
        types += [0, *[1] * tokens, 0]
        vision = config.vision_config
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        inputs["pixel_values"] = torch.randn(grid[0] * grid[1] * grid[2], width, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([grid])
    ids += text
    types += [0] * len(text)
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.tensor([types])
    return inputs


@pytest.fixture(scope="module")
def glm() -> Any:
    from glm_model import tiny_glm

    return tiny_glm()


def test_m_rope_rows_keep_their_own_positions_and_offsets(glm, causal):
    config = glm.config
    inputs = [_glm_inputs(config, (1, 4, 6), [40, 41, 42], seed=1),
              _glm_inputs(config, (1, 6, 8), [43] * 17, seed=2),  # more image tokens, a longer question
              _glm_inputs(config, None, [44, 45, 46, 47, 48, 49, 50], seed=3)]  # no image
    with torch.inference_mode():
        assert uses_mrope(glm)
        for way in (None, causal):
            _assert_rows_as_alone(glm, inputs, pad_id=config.text_config.pad_token_id, mrope=True, causal=way)


def test_encoder_outputs_split_per_question_and_join_back(glm):
    config = glm.config
    inputs = [_glm_inputs(config, (1, 4, 6), [40], seed=1), _glm_inputs(config, (1, 6, 8), [41], seed=2)]
    with torch.inference_mode():
        together = glm.model.get_image_features(**image_inputs(inputs), return_dict=True)
        alone = [glm.model.get_image_features(one["pixel_values"], one["image_grid_thw"], return_dict=True)
                 for one in inputs]
        parts = split_encoder_outputs(together, [1, 1])
        assert parts is not None
        for part, own in zip(parts, alone, strict=True):
            torch.testing.assert_close(part.pooler_output[0], own.pooler_output[0], atol=1e-5, rtol=1e-4)
        joined = join_encoder_outputs(parts)
        assert [t.shape for t in joined.pooler_output] == [t.shape for t in together.pooler_output]
        # Questions whose images come already encoded (the engine's memo) batch as those with pixels do.
        encoded = [{**{k: v for k, v in one.items() if k != "pixel_values"}, "mm_encoder_outputs": {"image": part}}
                   for one, part in zip(inputs, parts, strict=True)]
        _assert_rows_as_alone(glm, encoded, pad_id=config.text_config.pad_token_id, mrope=uses_mrope(glm))
    assert split_encoder_outputs(together, [1, 2]) is None  # not one entry per image: not split
    assert split_encoder_outputs(None, [1, 1]) is None  # a model whose encoder kept nothing
    video = {**encoded[0], "mm_encoder_outputs": {"video": parts[0]}}
    assert left_padded([encoded[1], video], pad_id=0) is None  # only images' encoder outputs are joined


def test_inputs_it_does_not_know_are_not_batched():
    one = {"input_ids": torch.ones(1, 3, dtype=torch.long), "second_per_grid_ts": torch.ones(1)}
    assert left_padded([one, one], pad_id=0) is None
    assert left_padded([{"input_ids": torch.ones(1, 3, dtype=torch.long)}, {"pixel_values": torch.ones(1)}],
                       pad_id=0) is None


def test_the_pad_token_is_the_tokenizers_else_an_end_of_sequence_one():
    from types import SimpleNamespace

    assert pad_token(SimpleNamespace(pad_token_id=5), {2, 1}) == 5
    assert pad_token(SimpleNamespace(pad_token_id=0), {2}) == 0  # 0 is a token, not "none"
    assert pad_token(SimpleNamespace(pad_token_id=None), {9, 4}) == 4
    assert pad_token(SimpleNamespace(pad_token_id=None), set()) == 0
