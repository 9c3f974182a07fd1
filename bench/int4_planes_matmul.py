"""An experiment, not used by the engine: a few rows times a group-wise int4 weight as one Triton
kernel, the weight in a layout chosen for Triton rather than tinygemm's.

Why it was tried: the first try (``int4_batched_matmul.py``) read tinygemm's tiled layout, whose
order forced eight 16-input products and gathered inputs per group, and read weights at 0.9 TB/s. If
that layout was the limit, one that Triton reads naturally should do better. It did not:
``int4_kernels.py --planes`` on the H200 (bench/RESULTS.md, eighth step) measured 122-136 us for a
decoder layer's four weights at 1 to 16 rows at the fastest launch shapes (0.8-0.9 TB/s), against
tinygemm's 62 at one row and 145 at eight, the same rate as the first try.

The weight is stored in "nibble planes" (``pack_planes``): an int32 ``[K/8, N]`` where,
within each block of ``GROUP`` inputs, word ``kk`` holds in nibble ``j`` the input ``j*GROUP/8 + kk``.
A program loads a ``[GROUP/8, BLOCK_N]`` tile of words (outputs contiguous: coalesced), and each
nibble position ``j`` is then a ``[GROUP/8, BLOCK_N]`` matrix of 4-bit values for ``GROUP/8``
consecutive inputs, which multiplies a contiguous slice of the rows on the tensor cores with no
reshuffling. The values multiply as the integers 0..15 (exact in bf16); each group's scale and zero
apply once to the group's sum, in float32: ``x @ (q * scale + zero - 8 * scale)``. Rows are padded to
16, the smallest tile ``tl.dot`` takes, so 1 row and 16 cost the same: the weight is read once for all.

For weights with few outputs (4,096: too few programs for the GPU), ``split`` programs share a block of
outputs, each over a slice of the groups, and the caller adds up the float32 partial products.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ROWS", "Launch", "int4_matmul", "int4_matmul_partials", "launch_for", "pack_planes", "unpack_planes"]

ROWS = 16  # rows a call takes at most


class Launch(NamedTuple):
    block_n: int  # outputs a program computes
    split: int  # programs sharing one block of outputs, each over 1/split of the groups
    warps: int
    stages: int


def launch_for(n_out: int, k_in: int, group: int) -> Launch:
    """The launch shape for a weight of this shape."""
    block_n = next(b for b in (128, 64, 32, 16) if n_out % b == 0)
    groups = k_in // group
    split = 1
    while (n_out // block_n) * split < 256 and groups // (split * 2) >= 4:
        split *= 2
    return Launch(block_n=block_n, split=split, warps=4, stages=3)


def pack_planes(q: torch.Tensor, group: int) -> torch.Tensor:
    """4-bit values ``[N, K]`` as nibble planes, int32 ``[K/8, N]``: in each block of ``group`` inputs, word
    ``kk`` holds input ``j*group/8 + kk`` in nibble ``j``."""
    n, k = q.shape
    planes = q.reshape(n, k // group, 8, group // 8).permute(1, 3, 0, 2).to(torch.int64)  # [block, kk, n, j]
    words = (planes << (4 * torch.arange(8, device=q.device))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the top nibble is the int32's sign
    return words.to(torch.int32).reshape(k // 8, n).contiguous()


def unpack_planes(packed: torch.Tensor, group: int) -> torch.Tensor:
    """The 4-bit values ``[N, K]`` (uint8) of a weight in nibble planes; ``pack_planes``' inverse."""
    words, n = packed.shape
    shifts = 4 * torch.arange(8, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 15  # [K/8, N, j]
    blocks = nibbles.reshape(words * 8 // group, group // 8, n, 8)  # [block, kk, n, j]
    return blocks.permute(2, 0, 3, 1).reshape(n, words * 8).to(torch.uint8)


@triton.jit(do_not_specialize=["m", "n_out", "k_in", "groups_per_split"])  # type: ignore[untyped-decorator,unused-ignore]
def _int4_matmul(x, packed, scales_zeros, out, m, n_out, k_in, groups, groups_per_split,  # type: ignore[no-untyped-def]
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, M_PAD: tl.constexpr) -> None:
    block, split = tl.program_id(0), tl.program_id(1)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, M_PAD)
    row_ok = rows[:, None] < m
    kk = tl.arange(0, GROUP // 8)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    first = split * groups_per_split
    for g in range(first, tl.minimum(first + groups_per_split, groups)):
        words = tl.load(packed + (g * (GROUP // 8) + kk)[:, None] * n_out + n[None, :])
        dot = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((M_PAD,), dtype=tl.float32)
        for j in tl.static_range(8):
            xs = tl.load(x + rows[:, None] * k_in + (g * GROUP + j * (GROUP // 8) + kk)[None, :], mask=row_ok,
                         other=0.0)
            q = ((words >> (j * 4)) & 15).to(xs.dtype)
            dot = tl.dot(xs, q, dot)
            x_sum += tl.sum(xs.to(tl.float32), axis=1)
        at = (g * n_out + n) * 2
        scale = tl.load(scales_zeros + at).to(tl.float32)
        zero = tl.load(scales_zeros + at + 1).to(tl.float32)
        acc += dot * scale[None, :] + x_sum[:, None] * (zero - 8.0 * scale)[None, :]
    tl.store(out + (split * m + rows[:, None]) * n_out + n[None, :], acc.to(out.dtype.element_ty), mask=row_ok)


@torch.library.custom_op("imsight_bench::int4_planes_partials", mutates_args=())  # type: ignore[misc,unused-ignore]
def int4_matmul_partials(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                         block_n: int, split: int, warps: int, stages: int) -> torch.Tensor:
    """``[split, rows, N]`` partial products of ``x [rows <= 16, K]`` and the packed weight: in float32
    when ``split > 1`` (the caller adds them up), else ``[1, rows, N]`` in ``x``'s dtype. An op of its own,
    so that dynamo and CUDA graphs take it whole."""
    m, k_in = x.shape
    n_out = packed.shape[1]
    groups = k_in // group
    out = torch.empty(split, m, n_out, device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    _int4_matmul[(n_out // block_n, split)](x, packed, scales_zeros, out, m, n_out, k_in, groups,
                                            triton.cdiv(groups, split), GROUP=group, BLOCK_N=block_n, M_PAD=ROWS,
                                            num_warps=warps, num_stages=stages)
    return out


@int4_matmul_partials.register_fake  # type: ignore[misc,unused-ignore]
def _(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
      block_n: int, split: int, warps: int, stages: int) -> torch.Tensor:
    return x.new_empty(split, x.shape[0], packed.shape[1], dtype=torch.float32 if split > 1 else x.dtype)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                launch: Launch | None = None) -> torch.Tensor:
    """``x [rows <= 16, K] @ weight.T`` for a weight packed in nibble planes (``pack_planes``)."""
    launch = launch or launch_for(packed.shape[1], x.shape[1], group)
    partials = int4_matmul_partials(x.contiguous(), packed, scales_zeros, group, *launch)
    return partials[0] if launch.split == 1 else partials.sum(0).to(x.dtype)
