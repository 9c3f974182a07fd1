"""An experiment, not used by the engine: several rows times an int4 weight in tinygemm's tiled layout,
as one Triton kernel, for batched decode steps.

Why it was tried: torch's own kernel for this layout (``aten._weight_int4pack_mm``, "tinygemm") is
the fastest at one to four rows, but its cost doubles from one row to eight (61 to 146 us for a
decoder layer's four weights on the H200), and that is most of why a decode step of 8 questions
costs 1.5x one of a single question. Here each program takes ``BLOCK_N`` outputs and 1/``split`` of
the inputs, reads each 4-bit weight once for all (up to 16) rows and multiplies on the tensor cores:
``x @ (q - 8)`` exactly in bf16 (the integers -8..7 are exact), then per group ``* scale + sum(x) *
zero`` in float32. The weight is read in its stored order (``core.int4_weights.pack``), one nibble
position at a time, and the inputs are gathered in the matching order.

What it measured (bench/RESULTS.md, sixth step; ``bench/int4_kernels.py --fused``, CUDA graphs): at
its best launch shape 126 us a layer at 8 rows against tinygemm's 146, 149 against 246 at 16 rows,
but 114 against 61 at one row (0.9 TB/s: far from the bandwidth). Wired into ``Int4Linear`` for 5-16
rows with its partial sums added after it, the compiled 8-row step got slower (11.7 ms against 9.5):
the partial sums and the opaque op cost more inside the compiled step than the kernel saved. Adding
into one output with atomics instead (``atomic``) did not close the gap at 8 rows either (161.5 us
with the zeroing and the cast, tinygemm 145.5). What would make it worth it: about twice the read
rate at one row, so that one kernel serves every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ROWS", "MatmulConfig", "config_for", "int4_matmul", "int4_matmul_partials", "supports"]

ROWS = 16  # rows a call takes: the smallest tile tl.dot multiplies


class MatmulConfig(NamedTuple):
    block_n: int  # outputs a program computes (a multiple of 16: tl.dot's smallest tile)
    split: int  # programs sharing one block of outputs, each over 1/split of the inputs
    warps: int
    stages: int
    atomic: int = 0  # 1: the split programs add into one float32 output (atomics), no partial sums to add up


def config_for(n_out: int, k_in: int) -> MatmulConfig:
    """The launch shape that was fastest, or within 5 % of it, for each of GLM-4.6V's four weights at 1 to
    16 rows on the H200 (``bench/int4_kernels.py --fused``), adding up with atomics: with the sums
    counted, that measured best (run 6)."""
    block_n = next(b for b in (128, 64, 32, 16) if n_out % b == 0)
    return MatmulConfig(block_n=block_n, split=16, warps=4, stages=2, atomic=1)


# One compiled kernel for every row count and weight (Triton would otherwise specialise on m == 1
# and on each int's divisibility by 16): fewer compiles, and nothing those hints would speed.
@triton.jit(do_not_specialize=["m", "k_in", "outer_tiles", "tiles_per_split"])  # type: ignore[untyped-decorator,unused-ignore]
def _int4_matmul(x, packed, scales_zeros, out, m, n_out, k_in, outer_tiles, tiles_per_split,  # type: ignore[no-untyped-def]
                 TILES: tl.constexpr, BLOCK_N: tl.constexpr, M_PAD: tl.constexpr, ATOMIC: tl.constexpr) -> None:
    program, split = tl.program_id(0), tl.program_id(1)
    n = program * BLOCK_N + tl.arange(0, BLOCK_N)
    block, r = n // 8, n % 8
    # Row r's 2*TILES words of an outer tile: word w = c * TILES/2 + pair holds, in nibble s = odd*4 + i,
    # input pair*32 + i*8 + c*2 + odd. Taking one nibble position at a time keeps the weights as loaded
    # (a reshape to [BLOCK_N, TILES*16] measured 1.5-2x slower on the H200).
    w = tl.arange(0, 2 * TILES)
    c, pair = w // (TILES // 2), w % (TILES // 2)
    rows = tl.arange(0, M_PAD)
    row_ok = rows[:, None] < m
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    first = split * tiles_per_split
    for outer in range(first, tl.minimum(first + tiles_per_split, outer_tiles)):
        words_at = (block * outer_tiles + outer) * (16 * TILES) + r * (2 * TILES)
        words = tl.load(packed + words_at[:, None] + w[None, :])
        dot = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((M_PAD,), dtype=tl.float32)
        for nibble in tl.static_range(8):
            q = ((words >> (nibble * 4)) & 15) - 8
            k = outer * (TILES * 16) + pair * 32 + (nibble % 4) * 8 + c * 2 + nibble // 4
            xs = tl.load(x + rows[:, None] * k_in + k[None, :], mask=row_ok, other=0.0)
            dot += tl.dot(xs, tl.trans(q.to(xs.dtype)))
            x_sum += tl.sum(xs.to(tl.float32), axis=1)
        group_at = (outer * n_out + n) * 2  # one group per outer tile (``supports``)
        scale = tl.load(scales_zeros + group_at).to(tl.float32)
        zero = tl.load(scales_zeros + group_at + 1).to(tl.float32)
        acc += dot * scale[None, :] + x_sum[:, None] * zero[None, :]
    if ATOMIC:
        tl.atomic_add(out + rows[:, None] * n_out + n[None, :], acc, mask=row_ok)
    else:
        tl.store(out + (split * m + rows[:, None]) * n_out + n[None, :], acc.to(out.dtype.element_ty), mask=row_ok)


def supports(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> bool:
    """Whether this kernel takes a weight of this packing: one group per outer k-tile, whole blocks of outputs."""
    blocks, _outer, _lanes, pairs = packed.shape
    return group == pairs * 2 * 16 and (blocks * 8) % 16 == 0  # tl.dot takes 16 outputs or more


@torch.library.custom_op("imsight_bench::int4_matmul_partials", mutates_args=())  # type: ignore[misc,unused-ignore]
def int4_matmul_partials(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                         block_n: int, split: int, warps: int, stages: int, atomic: int = 0) -> torch.Tensor:
    """``[split, rows, n_out]`` partial products of ``x [rows <= 16, k_in]`` and the packed weight
    (``[1, rows, n_out]``, their sum, when ``atomic``); float32 when split, else ``x``'s dtype. An op of
    its own so that dynamo and CUDA graphs take it whole."""
    blocks, outer_tiles, _lanes, pairs = packed.shape
    m, k_in = x.shape
    n_out = blocks * 8
    atomic = int(atomic and split > 1)  # one program per output: nothing to add up
    dtype = torch.float32 if split > 1 else x.dtype
    out = (torch.zeros(1, m, n_out, device=x.device, dtype=dtype) if atomic
           else torch.empty(split, m, n_out, device=x.device, dtype=dtype))
    per_split = triton.cdiv(outer_tiles, split)
    _int4_matmul[(n_out // block_n, split)](x, packed, scales_zeros, out, m, n_out, k_in, outer_tiles, per_split,
                                            TILES=pairs * 2, BLOCK_N=block_n, M_PAD=ROWS, ATOMIC=bool(atomic),
                                            num_warps=warps, num_stages=stages)
    return out


@int4_matmul_partials.register_fake  # type: ignore[misc,unused-ignore]
def _(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
      block_n: int, split: int, warps: int, stages: int, atomic: int = 0) -> torch.Tensor:
    return x.new_empty(1 if atomic and split > 1 else split, x.shape[0], packed.shape[0] * 8,
                       dtype=torch.float32 if split > 1 else x.dtype)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                config: MatmulConfig | None = None) -> torch.Tensor:
    """``x [rows <= 16, k_in] @ weight.T`` for a weight packed as ``core.int4_weights.pack`` does."""
    n_out, k_in = packed.shape[0] * 8, x.shape[1]
    config = config or config_for(n_out, k_in)
    partials: torch.Tensor = int4_matmul_partials(x.contiguous(), packed, scales_zeros, *config)
    return partials[0] if config.split == 1 else partials.sum(0).to(x.dtype)  # (atomic: a sum of one)
