"""GLM-4V's query, key and value projections stacked into one int4 weight (core/qkv_projection.py), on a tiny
GLM-4.1V-shaped model in int4 on the CPU: the same logits and greedy tokens, every layer changed, and left as it
is where the projections are not int4, the model not GLM-4V, or the stack disagrees."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from core import int4_weights, qkv_projection
from core.fused_layers import decoder_layers
from core.model_files import resolve
from core.model_loading import load
from helpers import tiny_glm

IDS = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(1))


def _logits_and_tokens(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        logits = model(input_ids=IDS).logits
        tokens = model.generate(input_ids=IDS, max_new_tokens=12, do_sample=False)
    return logits, tokens


def test_stacked_projections_give_the_same_logits_and_tokens():
    model = tiny_glm()
    before = _logits_and_tokens(model)
    attention = decoder_layers(model)[0].self_attn
    widths = [attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features]
    assert qkv_projection.install(model) == len(decoder_layers(model)) == 2
    for layer in decoder_layers(model):
        attention = layer.self_attn
        assert not any(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj"))
        assert attention.qkv_proj.widths == widths
        assert attention.qkv_proj.weight.out_features == sum(widths)
    after = _logits_and_tokens(model)
    assert torch.equal(before[0], after[0])
    assert torch.equal(before[1], after[1])
    assert before[1].shape[1] > IDS.shape[1]  # (tokens were generated)


def test_a_stack_is_each_weight_s_rows_one_after_another():
    model = tiny_glm()
    attention = decoder_layers(model)[0].self_attn
    parts = [attention.q_proj, attention.k_proj, attention.v_proj]
    stacked = int4_weights.Int4Linear.stacked(parts)
    assert stacked is not None
    x = torch.randn(3, parts[0].in_features, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(stacked(x), torch.cat([part(x) for part in parts], dim=-1))
    down = decoder_layers(model)[0].mlp.down_proj
    assert down.in_features != parts[0].in_features
    assert int4_weights.Int4Linear.stacked([parts[0], down]) is None  # another input
    assert attention.o_proj.in_features == parts[0].in_features and attention.o_proj.bias is None
    assert int4_weights.Int4Linear.stacked([parts[0], attention.o_proj]) is None  # one with a bias, one without


def test_left_as_it_is_where_it_does_not_apply(tiny_model: Path):
    full_width = tiny_glm(int4=False)
    assert qkv_projection.install(full_width) == 0  # no int4 weights to stack
    assert hasattr(decoder_layers(full_width)[0].self_attn, "q_proj")
    llava = load(resolve("x", tiny_model, allow_download=False), device="cpu", quantization="int4").model
    assert qkv_projection.install(llava) == 0  # not GLM-4V's attention


def test_a_stack_that_disagrees_is_not_installed(monkeypatch, caplog):
    model = tiny_glm()
    stacked = int4_weights.Int4Linear.stacked

    def off(layers: list[int4_weights.Int4Linear]) -> int4_weights.Int4Linear | None:
        weight = stacked(layers)
        if weight is not None:
            weight.scales_zeros[..., 0] *= 1.1  # every product 10 % off
        return weight

    monkeypatch.setattr(int4_weights.Int4Linear, "stacked", staticmethod(off))
    before = _logits_and_tokens(model)[0]
    with caplog.at_level(logging.WARNING, logger="core.qkv_projection"):
        assert qkv_projection.install(model) == 0
    assert "stay apart" in caplog.text
    attention = decoder_layers(model)[0].self_attn
    assert hasattr(attention, "q_proj") and not hasattr(attention, "qkv_proj")
    assert torch.equal(_logits_and_tokens(model)[0], before)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_the_cache_keyword_either_way(keyword):
    """transformers' forward takes ``cache`` and, deprecated, ``past_key_values``: so does the stacked one."""
    from transformers import DynamicCache

    model = tiny_glm()
    assert qkv_projection.install(model)
    attention = decoder_layers(model)[0].self_attn
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    angles = torch.randn(1, 5, attention.head_dim // 2, generator=torch.Generator().manual_seed(4))
    cache = DynamicCache(config=model.config.text_config)
    with torch.inference_mode():
        attention(hidden, position_embeddings=(angles.cos(), angles.sin()), **{keyword: cache})
    assert cache.get_seq_length() == 5
