"""``core.int4_weights.dequantize`` as one Triton kernel, for prefill on the GPU.

The torch version (unpack, permute, scale) is eight kernels; through ``torch.compile`` one, but that
one wrote the full-width weight at ~0.45 TB/s on the H200 (about 1 ms a decoder layer, more than
the 1,000-token matmul after it). Here each program takes one 8 x (tiles*16) block of the tiled
layout, whose 512 bytes sit together, and writes its rows contiguously: reading 0.5 and writing 2
bytes a weight, at the bandwidth. Imported only where Triton is (a CUDA build of torch); the CPU
tests run it in Triton's interpreter against ``dequantize`` (tests/test_triton_kernels.py), and every
load on a GPU checks it once more (``core.int4_weights.fuse_unpacking``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dequantize_gpu"]


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _dequantize_block(packed, scales_zeros, out, group_stride, k_in, outer_tiles,  # type: ignore[no-untyped-def]  # noqa: ANN001
                      TILES: tl.constexpr, GROUP: tl.constexpr) -> None:
    block, outer = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, 8)[:, None]  # row within the block of 8
    kk = tl.arange(0, TILES * 16)[None, :]  # input within this outer tile
    # k = pair*32 + i*8 + c*2 + odd; lane t = r*4 + c holds nibble s = odd*4 + i of word (t, pair)
    pair, i, c, odd = kk // 32, (kk % 32) // 8, (kk % 8) // 2, kk % 2
    word_at = ((block * outer_tiles + outer) * 32 + r * 4 + c) * (TILES // 2) + pair
    q = (tl.load(packed + word_at) >> ((odd * 4 + i) * 4)) & 15
    n = block * 8 + r
    k = outer * (TILES * 16) + kk
    at = (k // GROUP) * group_stride + n * 2
    scale = tl.load(scales_zeros + at).to(tl.float32)
    zero = tl.load(scales_zeros + at + 1).to(tl.float32)
    tl.store(out + n * k_in + k, ((q.to(tl.float32) - 8.0) * scale + zero).to(out.dtype.element_ty))


def dequantize_gpu(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize`` of ``packed``'s outputs, ``scales_zeros`` ``[groups, outputs, 2]`` for just those: the whole
    weight's, or a slice of its outputs as a view (a prefill unpacks a large weight a slice at a time, and copying
    each slice's scales out took a launch of its own)."""
    blocks, outer_tiles, _lanes, pairs = packed.shape
    n_out, k_in = blocks * 8, outer_tiles * pairs * 2 * 16
    if scales_zeros.stride()[1:] != (2, 1):
        scales_zeros = scales_zeros.contiguous()
    out = torch.empty(n_out, k_in, dtype=dtype, device=packed.device)
    _dequantize_block[(blocks, outer_tiles)](packed, scales_zeros, out, scales_zeros.stride(0), k_in, outer_tiles,
                                             TILES=pairs * 2, GROUP=group)
    return out
