"""GLM-4V's query, key and value projections as one int4 weight: one kernel launch a layer instead of three.

A decode step of GLM-4.6V-Flash in int4 launches imsight's int4 kernel six times a layer. The key's and
value's weights are 0.5 MB each, yet each of their kernels took ~4.4 us inside a captured step on the H200:
bound by the kernel's fixed costs, not its bytes. With the three weights' outputs stacked into one weight,
one launch reads them all, in about the query's time alone; each output is the same arithmetic as before
(the kernels work on blocks of outputs), and so is a prefill's unpacking. On the H200: the one-row step
3.42 ms instead of 3.83 (the int4 kernel's share 2.02 ms instead of 2.37), a question decoding at 281
tokens/s instead of 253 (bench/RESULTS.md, twenty-second step).

Installed at the engine's start for GLM-4V's text attention (GLM-4.1V, GLM-4.6V) where the three are
``Int4Linear`` alike: each attention layer gets a ``qkv_proj`` in place of ``q_proj``, ``k_proj`` and
``v_proj``, and ``forward`` below as its own forward (transformers' computes the three products one by
one); other models keep transformers' forward. Checked on the first layer: its output through ``forward``
against transformers', before any weight is replaced.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import torch

from core.int4_weights import Int4Linear

__all__ = ["QKVProjection", "dummy_tokens", "forward", "install"]

log = logging.getLogger(__name__)


class QKVProjection(torch.nn.Module):
    """The three projections' product in one: the query's, key's and value's outputs, as views."""

    def __init__(self, weight: Int4Linear, widths: list[int]) -> None:
        super().__init__()
        self.weight = weight
        self.widths = widths

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        product: torch.Tensor = self.weight(x)
        return tuple(torch.split(product, self.widths, dim=-1))


Rotary = tuple[torch.Tensor, torch.Tensor]


def forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Rotary | None = None,
            attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' ``Glm4vTextAttention.forward`` (5.x) with the three projections in one (``self.qkv_proj``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = sys.modules[type(self).__module__]  # its rotary and eager attention, as installed there
    if cache is None:  # the older keyword (transformers' forward takes both)
        cache = kwargs.pop("past_key_values", None)
    bsz, q_len, _ = hidden_states.size()
    query_states, key_states, value_states = (
        part.view(bsz, q_len, -1, self.head_dim).transpose(1, 2) for part in self.qkv_proj(hidden_states))
    cos, sin = position_embeddings  # type: ignore[misc]  # (GLM's layers always pass them)
    query_states, key_states = module.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, module.eager_attention_forward)
    attn_output, attn_weights = attention(self, query_states, key_states, value_states, attention_mask,
                                          dropout=0.0 if not self.training else self.attention_dropout,
                                          scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def install(model: Any) -> int:
    """Stack each GLM-4V text attention layer's three int4 projections into a ``qkv_proj`` taken by ``forward``,
    where the first layer's output agrees both ways; the number of layers changed (0 where none could be)."""
    from core.fused_layers import decoder_layers

    attentions: list[Any] = [getattr(layer, "self_attn", None) for layer in decoder_layers(model)]
    module: Any = sys.modules.get(type(attentions[0]).__module__) if attentions else None
    if module is None or not module.__name__.endswith(".glm4v.modeling_glm4v") \
            or not all(isinstance(a, module.Glm4vTextAttention) for a in attentions):
        return 0
    first = _stacked(attentions[0])
    if first is None:
        return 0
    if not _agrees(attentions[0], first):
        log.warning("the decoder's query, key and value projections stay apart: one weight disagrees with them here")
        return 0
    merged = 0
    for attention in attentions:  # a layer at a time: the three weights are freed as their stack is made
        qkv = first if attention is attentions[0] else _stacked(attention)
        if qkv is not None:
            for name in ("q_proj", "k_proj", "v_proj"):
                delattr(attention, name)
            attention.qkv_proj = qkv
            attention.forward = types.MethodType(forward, attention)
            merged += 1
    return merged


def _stacked(attention: Any) -> QKVProjection | None:
    parts = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    linears = [part for part in parts if isinstance(part, Int4Linear)]
    weight = Int4Linear.stacked(linears) if len(linears) == len(parts) else None
    return QKVProjection(weight, [part.out_features for part in linears]) if weight is not None else None


def _agrees(attention: Any, qkv: QKVProjection) -> bool:
    """The layer's output through ``forward`` with ``qkv`` against transformers' forward, on dummy tokens: one
    row (multiplied by imsight's int4 kernel on a GPU: then equal) and 80 (past it: the weights unpacked for
    cuBLAS, which may round a wider product differently: then within 1 % of the largest value)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    attention.qkv_proj = qkv  # (beside the three, while checking)
    try:
        for rows in (1, 80):
            hidden, cos, sin = dummy_tokens(attention, rows, generator, like=qkv.weight.scales_zeros)
            with torch.inference_mode():
                theirs = attention(hidden, position_embeddings=(cos, sin))[0]
                ours = forward(attention, hidden, position_embeddings=(cos, sin))[0]
            if rows == 1 and qkv.weight.mma:
                if not torch.equal(theirs, ours):
                    return False
            elif (theirs - ours).abs().max() > 1e-2 * theirs.abs().max():
                return False
        return True
    finally:
        del attention.qkv_proj


def dummy_tokens(attention: Any, rows: int, generator: torch.Generator, *, like: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random hidden states of ``rows`` tokens for a GLM-4V text attention layer, and its rotary's cos and sin (GLM
    rotates half a head), on ``like``'s device and in its dtype: what the install checks run a layer on."""
    hidden = torch.randn(1, rows, attention.config.hidden_size, generator=generator)
    angles = torch.randn(1, rows, attention.head_dim // 2, generator=generator)
    hidden, cos, sin = (x.to(like.device, like.dtype) for x in (hidden, angles.cos(), angles.sin()))
    return hidden, cos, sin
