"""Attention for one new token a row, split along the cached positions (flash-decoding), in Triton.

A decode step asks each row's one new token to attend over up to a few thousand cached positions.
Through SDPA, transformers folds the 16 query heads of a K/V head into one 16-token query (its
"pack GQA" path), so a row of GLM-4.6V-Flash is 2 heads' work: on the H200 a handful of programs
walk the whole span one after another while the rest of the GPU waits (measured: ~24 us a layer
at 1,024 positions, +20 us for each 1,024 more, for 2 MB of keys and values). Here every program
takes one slice of positions for one (row, K/V head), with all the head's query heads at once on
the tensor cores, and writes its partial result (running max, sum, weighted values); a second
kernel merges the slices. Both are launched from Python, so they run inside CUDA graphs.

Imported only where Triton is (a CUDA build of torch, or the CPU tests under Triton's interpreter,
tests/test_triton_kernels.py); ``core.step_attention`` decides when it is used.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["split_kv_attention"]

BLOCK = 64  # positions a program's loop takes at a time
MAX_SPLITS = 64  # the merge holds one partial row per slice in registers: 64 x dim floats at most


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _attend_slice(q, k, v, mask, part_out, part_max, part_sum,  # type: ignore[no-untyped-def]
                  q_row, q_head, k_row, k_head, k_pos, v_row, v_head, v_pos, mask_row,
                  kv_heads, span, per_split, splits, scale,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr) -> None:
    row_head, split = tl.program_id(0), tl.program_id(1)
    row, head = row_head // kv_heads, row_head % kv_heads
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM)
    in_group = g < GROUP
    # The query heads that share this K/V head; padded to the tensor cores' 16 rows with zeros.
    query = tl.load(q + row * q_row + (head * GROUP + g)[:, None] * q_head + d[None, :],
                    mask=in_group[:, None], other=0.0)
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
    start = split * per_split
    for offset in range(start, tl.minimum(start + per_split, span), BLOCK):
        n = offset + tl.arange(0, BLOCK)
        inside = n < span
        visible = tl.load(mask + row * mask_row + n, mask=inside, other=0) != 0
        keys = tl.load(k + row * k_row + head * k_head + n[:, None] * k_pos + d[None, :],
                       mask=inside[:, None], other=0.0)
        scores = tl.dot(query, tl.trans(keys)).to(tl.float32) * scale
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        # A slice with nothing visible yet keeps -inf: subtract 0 there, so that exp gives 0, not NaN.
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - shift[:, None])
        keep = tl.exp(best - shift)
        values = tl.load(v + row * v_row + head * v_head + n[:, None] * v_pos + d[None, :],
                         mask=inside[:, None], other=0.0)
        total = total * keep + tl.sum(weights, 1)
        acc = acc * keep[:, None] + tl.dot(weights.to(values.dtype), values).to(tl.float32)
        best = new_best
    at = (row_head * splits + split) * GROUP_PAD + g
    tl.store(part_max + at, best)
    tl.store(part_sum + at, total)
    tl.store(part_out + at[:, None] * DIM + d[None, :], acc)


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _merge_slices(part_out, part_max, part_sum, out, splits,  # type: ignore[no-untyped-def]
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                  SPLITS_PAD: tl.constexpr) -> None:
    row_head, member = tl.program_id(0), tl.program_id(1)  # one query head of one (row, K/V head)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM)
    at = (row_head * splits + s) * GROUP_PAD + member
    best = tl.load(part_max + at, mask=s < splits, other=float("-inf"))
    top = tl.max(best, 0)
    weight = tl.exp(best - top)  # a slice that saw nothing weighs 0 (the row's own token is always seen)
    total = tl.sum(tl.load(part_sum + at, mask=s < splits, other=0.0) * weight, 0)
    acc = tl.load(part_out + at[:, None] * DIM + d[None, :], mask=(s < splits)[:, None], other=0.0)
    merged = tl.sum(acc * weight[:, None], 0) / total
    tl.store(out + (row_head * GROUP + member) * DIM + d, merged.to(out.dtype.element_ty))


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs to aim for: two per multiprocessor (a handful under the interpreter, to split there too)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def split_kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Attention of ``query`` ``[rows, heads, 1, dim]`` over ``key``/``value`` ``[rows, kv_heads, span,
    dim]`` (views with any row, head and position strides), where ``mask`` ``[rows, 1, 1, span]`` (bool)
    is True; returns ``[rows, 1, heads, dim]``, as transformers' attention functions do."""
    rows, heads, _, dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    group = heads // kv_heads
    blocks = triton.cdiv(span, BLOCK)
    splits = min(blocks, MAX_SPLITS, max(1, _programs(query.device) // (rows * kv_heads)))
    per_split = triton.cdiv(blocks, splits) * BLOCK
    splits = triton.cdiv(span, per_split)
    group_pad = max(16, triton.next_power_of_2(group))
    partial = (rows * kv_heads, splits, group_pad)
    part_out = torch.empty((*partial, dim), dtype=torch.float32, device=query.device)
    part_max = torch.empty(partial, dtype=torch.float32, device=query.device)
    part_sum = torch.empty(partial, dtype=torch.float32, device=query.device)
    out = torch.empty((rows, 1, heads, dim), dtype=query.dtype, device=query.device)
    _attend_slice[(rows * kv_heads, splits)](
        query, key, value, mask, part_out, part_max, part_sum,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0),
        kv_heads, span, per_split, splits, scale,
        GROUP=group, GROUP_PAD=group_pad, DIM=dim, BLOCK=BLOCK)
    _merge_slices[(rows * kv_heads, group)](
        part_out, part_max, part_sum, out, splits,
        GROUP=group, GROUP_PAD=group_pad, DIM=dim, SPLITS_PAD=max(2, triton.next_power_of_2(splits)))
    return out
