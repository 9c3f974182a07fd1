"""GLM-4V's vision blocks through imsight's kernels: nothing of the vision encoder to compile.

The vision encoder's blocks through transformers' eager ops launch ~48 kernels each (the RMSNorms, the
rotary in float32, the gate), so the engine compiled them with ``torch.compile`` (``core/compiled_vision.py``):
a screenshot encoded in 22 ms instead of 29.5 on the H200. But dynamo traces them anew in every process and
importing the compiler alone takes seconds: ~6.5 s of every restart, the last thing before the engine was
settled (bench/RESULTS.md, twenty-third step). Here a block's forward calls imsight's kernels between its
matrix products instead: the RMSNorm, the rotary of the query and key read from the qkv projection's
output (``core.vision_kernels``), the attention as before (``core.vision_attention``), the residual add
with the next norm in one kernel, the gate, and the last residual add.

Installed at the engine's start where the tower's blocks are GLM-4V's, its attention is imsight's
(``core.vision_attention``, installed first), the activation is SiLU, a head's width is a power of two and
Triton runs on the tower's device; checked on the first block against transformers' forward before any
block changes (an instance attribute, as ``core.glm_decoder``'s layers).
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import torch

from core import vision_attention
from core.compiled_vision import vision_blocks
from core.glm_decoder import close_enough, runs_here

__all__ = ["forward", "install"]

log = logging.getLogger(__name__)

Rotary = tuple[torch.Tensor, torch.Tensor]


def forward(self: Any, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
            position_embeddings: Rotary | None = None, **kwargs: Any) -> torch.Tensor:
    """transformers' ``Glm4vVisionBlock.forward`` (5.x) with its attention and MLP, through imsight's kernels;
    the attention is ``vision_attention.packed_sdpa``, as ``install`` requires."""
    from core import decoder_kernels as kernels
    from core import vision_kernels

    attn, mlp = self.attn, self.mlp
    tokens = hidden_states.shape[0]
    heads, dim = attn.num_heads, attn.head_dim
    kwargs.pop("max_seqlen", None)  # (the flash way's; SDPA's needs none)

    # Each intermediate let go as soon as it is used (``del``): the graph of one image's blocks keeps the most that
    # is alive at once in its own memory, for good.
    product = attn.qkv(kernels.rms_norm(hidden_states, self.norm1.weight, self.norm1.variance_epsilon))
    cos, sin = position_embeddings  # type: ignore[misc]  # (the tower always passes them)
    query, key = vision_kernels.rotated_halves(product, cos, sin, heads, dim)  # [tokens, heads, dim] each
    value = product.view(tokens, 3, heads, dim)[:, 2]
    heads_first = [part.transpose(0, 1).unsqueeze(0) for part in (query, key, value)]
    attended, _ = vision_attention.packed_sdpa(attn, *heads_first, None, cu_seq_lens_q=cu_seqlens, scaling=attn.scaling,
                                               dropout=0.0, is_causal=False, **kwargs)
    del product, query, key, value, heads_first
    hidden, mlp_in = kernels.add_rms_norm(attn.proj(attended.reshape(tokens, -1)), hidden_states, None,
                                          self.norm2.variance_epsilon, self.norm2.weight)
    del attended
    assert mlp_in is not None
    gated = kernels.silu_mul(mlp.gate_proj(mlp_in), mlp.up_proj(mlp_in))
    del mlp_in
    out: torch.Tensor = hidden + mlp.down_proj(gated)
    return out


def install(model: Any) -> int:
    """``forward`` for each of ``model``'s GLM-4V vision blocks where it applies and the first block's output
    agrees both ways; the number of blocks changed (0 where none)."""
    blocks = vision_blocks(model)  # (only where the attention is vision_attention's)
    module: Any = sys.modules.get(type(blocks[0]).__module__) if blocks else None
    if module is None or not module.__name__.endswith(".glm4v.modeling_glm4v") \
            or not all(type(block) is module.Glm4vVisionBlock for block in blocks):
        return 0
    first: Any = blocks[0]
    dim = first.attn.head_dim
    if type(first.mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation") \
            or dim & (dim - 1) or not runs_here(next(first.parameters()).device):
        return 0
    if not _agrees(first):
        log.warning("the vision encoder's blocks stay transformers' (compiled): imsight's kernels disagree with "
                    "them here")
        return 0
    for block in blocks:
        block.forward = types.MethodType(forward, block)
    return len(blocks)


def _agrees(block: Any) -> bool:
    """The block's output through ``forward`` against transformers' forward on random patches: one image, then
    two packed together, within ``glm_decoder.close_enough``."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    like = block.norm1.weight
    for lengths in ([80], [48, 32]):
        rows = sum(lengths)
        hidden = torch.randn(rows, like.shape[0], generator=generator)
        angles = torch.randn(rows, block.attn.head_dim // 2, generator=generator).repeat(1, 2)
        hidden = hidden.to(like.device, like.dtype)
        rotary = (angles.cos().to(like.device), angles.sin().to(like.device))
        boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                  device=like.device)
        with torch.inference_mode():
            theirs = type(block).forward(block, hidden, cu_seqlens=boundaries, position_embeddings=rotary)
            ours = forward(block, hidden, cu_seqlens=boundaries, position_embeddings=rotary)
        if not close_enough(hidden, theirs, ours):
            return False
    return True
