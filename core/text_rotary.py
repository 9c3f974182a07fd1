"""GLM-4V's decoder rotary in the projections' own layout: no transposing copy in every layer.

transformers' decoder attention views the query and key projections as ``[batch, heads, tokens, dim]``
(a transposed view of ``[batch, tokens, heads, dim]``) and rotates them there, returning new tensors in
the heads-first layout: the compiled kernel that rotates also moves every element to another place. On
the H200 that kernel took 2.2 ms of a 1,152-token screenshot prompt's 40 layers and 23.2 ms of eight such
prompts'. Rotating tokens-first and handing back the heads-first views computes the same values, each
where the next step reads it (SDPA's flash kernel takes tokens-first itself): 1.7 and 12.8 ms
(bench/RESULTS.md, twenty-first step).

Installed for GLM-4V's text attention (GLM-4.1V, GLM-4.6V) in transformers' module, after both ways
have given the same values on a dummy prompt (``install``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["install", "rotated"]

log = logging.getLogger(__name__)


def rotated(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4V's ``apply_rotary_pos_emb`` (partial, interleaved pairs) computed on ``[b, tokens, heads, dim]``:
    ``q`` and ``k`` come as ``[b, heads, tokens, dim]`` and go back so, as views."""
    if unsqueeze_dim != 1:  # another layout than the attention layer's
        raise ValueError(f"rotated takes the heads at dimension 1 (unsqueeze_dim=1), not {unsqueeze_dim}")
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # over the heads, in the tokens-first layout
    return _rotated(q.transpose(1, 2), cos, sin).transpose(1, 2), _rotated(k.transpose(1, 2), cos, sin).transpose(1, 2)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    width = cos.shape[-1]
    part, rest = x[..., :width], x[..., width:]
    half = torch.stack((-part[..., 1::2], part[..., 0::2]), dim=-1).flatten(-2)  # GLM's rotate_half_llm
    return torch.cat([part * cos + half * sin, rest], dim=-1)


def install(model: Any) -> bool:
    """``rotated`` for the decoder attention of this model where it is GLM-4V's and both ways agree on a
    dummy prompt; ``False`` where not (transformers' stays)."""
    from core.fused_layers import decoder_layers

    layers = decoder_layers(model)
    attention: Any = getattr(layers[0], "self_attn", None) if layers else None
    module: Any = sys.modules.get(type(attention).__module__) if attention is not None else None
    own: Callable[..., Any] | None = getattr(module, "apply_rotary_pos_emb", None)
    if module is None or not module.__name__.endswith(".glm4v.modeling_glm4v") or own is None:
        return False
    if own is rotated:
        return True
    weight = next(attention.parameters())
    heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
    dim = attention.head_dim
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens, width = 37, dim // 2  # partial rotary: GLM rotates half of each head
    draw = [torch.randn(1, tokens, n * dim, generator=generator) for n in (heads, kv_heads)]
    q, k = (x.to(weight.device, weight.dtype).view(1, tokens, -1, dim).transpose(1, 2) for x in draw)
    angles = torch.randn(1, tokens, width, generator=generator).to(weight.device, torch.float32)
    cos, sin = angles.cos().to(weight.dtype), angles.sin().to(weight.dtype)
    with torch.inference_mode():
        theirs, ours = own(q, k, cos, sin), rotated(q, k, cos, sin)
    if not all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True)):
        log.warning("the decoder's rotary stays as loaded: the tokens-first way disagrees with it here")
        return False
    module.apply_rotary_pos_emb = rotated
    return True
