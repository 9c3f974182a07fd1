"""GLM-4V's decoder layers as ~15 kernels each, with nothing for ``torch.compile`` to do.

transformers' decoder layer launches ~65 kernels, most of them small elementwise ones, so the engine
compiled the layers: inductor fused them into ~16 a layer. But dynamo traces the layers anew in every
process (its cache across processes fails on them), and everything captured through the eager layers
is captured again once they are compiled: a minute of every restart before the daemon answers at full
speed (bench/RESULTS.md, fifteenth step). Here the layer's forward calls ``core.decoder_kernels``
between its matrix products instead: one RMSNorm kernel, the query/key projection and its rotary, the
attention as before, one kernel for the residual add with the norms on either side of it, the gate,
and one more residual add: the graphs captured from this forward need no compiled pass after them. On the
H200 a decode step is 597 kernels instead of the compiled layers' 637, a question decodes at 291-295
tokens/s (284 compiled, same run), and everything is done ~35 s after a restart instead of 75-85
(bench/RESULTS.md, twenty-third step).

Installed at the engine's start for GLM-4V's text layers (GLM-4.1V, GLM-4.6V) where the query, key and
value projections are one weight (``core.qkv_projection``), the activation is SiLU and Triton runs on
the model's device. Checked on the first layer against transformers' forward before any layer
changes; the layer keeps its weights and modules, only its ``forward`` is its own (an instance
attribute).
"""

from __future__ import annotations

import logging
import os
import sys
import types
from typing import Any

import torch

from core.qkv_projection import QKVProjection, dummy_tokens

__all__ = ["close_enough", "forward", "install", "runs_here"]

log = logging.getLogger(__name__)

Rotary = tuple[torch.Tensor, torch.Tensor]


def forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Rotary | None = None,
            attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any) -> torch.Tensor:
    """transformers' ``Glm4vTextDecoderLayer.forward`` (5.x) through ``core.decoder_kernels``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from core import decoder_kernels as kernels

    if cache is None:  # the older keyword (transformers' layer takes both)
        cache = kwargs.pop("past_key_values", None)
    attn, mlp = self.self_attn, self.mlp
    eps = self.input_layernorm.variance_epsilon
    batch, tokens, _ = hidden_states.shape
    heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim

    # Each intermediate let go as soon as it is used (``del``): a captured prompt's graph keeps the most that is
    # alive at once in its memory pool, for good.
    # The query's, key's and value's outputs side by side, biases added:
    product = attn.qkv_proj.weight(kernels.rms_norm(hidden_states, self.input_layernorm.weight, eps))
    cos, sin = position_embeddings  # type: ignore[misc]  # (GLM's layers always pass them)
    query, key = kernels.rotated_qk(product, cos, sin, heads, kv_heads, dim)
    value = product[..., (heads + kv_heads) * dim:].view(batch, tokens, kv_heads, dim)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx, kwargs=kwargs)
    module = sys.modules[type(attn).__module__]
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, module.eager_attention_forward)
    attended, _ = attention(attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    del product, query, key, value
    projected = attn.o_proj(attended.reshape(batch, tokens, -1))
    del attended
    hidden, mlp_in = kernels.add_rms_norm(projected, hidden_states, self.post_self_attn_layernorm.weight, eps,
                                          self.post_attention_layernorm.weight)
    del projected
    assert mlp_in is not None
    gated = kernels.silu_mul(mlp.gate_up_proj(mlp_in))
    del mlp_in
    hidden, _ = kernels.add_rms_norm(mlp.down_proj(gated), hidden, self.post_mlp_layernorm.weight, eps)
    return hidden


def runs_here(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: compiled on a GPU, or under Triton's interpreter (the tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def install(model: Any) -> int:
    """``forward`` for each GLM-4V text decoder layer of ``model`` where it applies and the first layer's output
    agrees both ways; the number of layers changed (0 where none)."""
    from core.fused_layers import decoder_layers

    layers = decoder_layers(model)
    module: Any = sys.modules.get(type(layers[0]).__module__) if layers else None
    if module is None or not module.__name__.endswith(".glm4v.modeling_glm4v") \
            or not all(isinstance(layer, module.Glm4vTextDecoderLayer) for layer in layers):
        return 0
    if not all(isinstance(getattr(layer.self_attn, "qkv_proj", None), QKVProjection) for layer in layers):
        return 0  # the projections apart (not int4): transformers' layers, compiled
    first: Any = layers[0]
    config = first.self_attn.config
    if getattr(config, "hidden_act", None) != "silu" or not runs_here(next(first.parameters()).device):
        return 0
    if not _agrees(first):
        log.warning("the decoder layers stay transformers' (compiled): imsight's kernels disagree with them here")
        return 0
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)
    return len(layers)


def _agrees(layer: Any) -> bool:
    """The layer's output through ``forward`` against transformers' forward, on dummy tokens: one row (a decode
    step) and 80 (a prompt), within ``close_enough``."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    for rows in (1, 80):
        hidden, cos, sin = dummy_tokens(layer.self_attn, rows, generator, like=layer.input_layernorm.weight)
        with torch.inference_mode():
            theirs = type(layer).forward(layer, hidden, position_embeddings=(cos, sin))
            ours = forward(layer, hidden, position_embeddings=(cos, sin))
        if not close_enough(hidden, theirs[0] if isinstance(theirs, tuple) else theirs, ours):
            return False
    return True


def close_enough(given: torch.Tensor, theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """Whether a layer's output through imsight's kernels (``ours``) is transformers' (``theirs``) for the input
    ``given``: within 1 % of the largest change the layer makes to its input (the norms' sums may add up in another
    order), plus a rounding of the largest output. Not 1 % of the output: the residual can be most of it (a rotary
    turned the wrong way moves the tiny GLM's vision block output by 1e-4 of its value). In bfloat16 the rounding is
    0.8 % of the output, so there this is hardly stricter. (H200, GLM-4.6V-Flash's shape, random weights, decoder
    layers 0, 1, 20, 39: 0.9-1.5 % of the change at 80 and 1,070 rows, against 1.9-2.1 % allowed; one row exact.)"""
    rounding = torch.finfo(theirs.dtype).eps * theirs.abs().max()
    return ours.shape == theirs.shape and bool((theirs - ours).abs().max() <= 1e-2 * (theirs - given).abs().max()
                                               + rounding)
