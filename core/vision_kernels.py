"""The vision encoder's rotary in one Triton kernel: its query and key heads read straight from the qkv
projection's output and turned by the patches' angles, in float32 as transformers turns them.

transformers' ``apply_rotary_pos_emb_vision`` casts the query and key to float32, multiplies, adds and
casts back: ~10 elementwise kernels for each of a screenshot's 24 blocks. Here each head of a token is one
program: the same float32 products and sum (no fused multiply-add, so each rounds as the eager ops do), one
rounding to the tensors' dtype at the end.

Imported only where Triton is, as ``core.decoder_kernels``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotated_halves"]


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _rotated_halves(product_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, heads,  # type: ignore[no-untyped-def]
                    DIM: tl.constexpr) -> None:
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)  # heads: the query's, then the key's
    d = tl.arange(0, DIM)
    source = product_ptr + token * 3 * heads * DIM + head * DIM
    x = tl.load(source + d).to(tl.float32)
    # rotate_half: the second half negated, then the first.
    partner = tl.load(source + (d + DIM // 2) % DIM).to(tl.float32)
    half = tl.where(d < DIM // 2, -partner, partner)
    cos = tl.load(cos_ptr + token * DIM + d).to(tl.float32)
    sin = tl.load(sin_ptr + token * DIM + d).to(tl.float32)
    out = (x * cos + half * sin).to(q_ptr.dtype.element_ty)
    if head < heads:
        tl.store(q_ptr + (token * heads + head) * DIM + d, out)
    else:
        tl.store(k_ptr + (token * heads + head - heads) * DIM + d, out)


def rotated_halves(product: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key of ``product`` (``[tokens, 3 * heads * dim]``: query, key and value side by side, as
    the vision attention's ``qkv`` writes them) turned by ``cos``/``sin`` (``[tokens, dim]``) as
    ``apply_rotary_pos_emb_vision`` turns them: new ``[tokens, heads, dim]`` tensors."""
    product = product.contiguous()
    tokens = product.shape[0]
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty((tokens, heads, dim), dtype=product.dtype, device=product.device)
    k = torch.empty_like(q)
    # No fused multiply-adds: the products and their sum each round to float32, as the eager ops' do.
    _rotated_halves[(tokens, 2 * heads)](product, cos, sin, q, k, heads, DIM=dim, enable_fp_fusion=False)
    return q, k
