"""A decode step's attention on the GPU, at GLM-4.6V-Flash's shapes (32 query heads, 2 K/V heads, dim 128).

transformers' SDPA call as a decode step makes it (one query token a row, a bool mask over the slot,
"pack GQA") against imsight's split-KV kernel (``core/split_kv_attention.py``), per layer, replayed
from CUDA graphs as a step runs them, by rows x span; rows see a little more than half their span,
as a screenshot question's row does at span 2048. Also the kernel's error against float32 SDPA, and
its time by launch shape (positions a loop step, programs aimed for). Then a follow-up's tail (its new tokens
after the row's cached ones, a bool mask each): SDPA as transformers calls it (the K/V heads repeated, cuDNN as
SDPA picks it, and without cuDNN as the engine runs eager prompts) against ``step_attention.tail_attention``
(the split-KV kernel, a row a token), the engine's way since this ran (bench/RESULTS.md, twenty-sixth step).

    python bench/attention_kernels.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_kernels import graph_timed

HEADS, KV_HEADS, DIM, SLOTS, LENGTH = 32, 2, 128, 8, 4096


def main() -> None:
    if not torch.cuda.is_available():
        print("attention kernels: needs a CUDA GPU (cuda available: False)")
        return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import core.split_kv_attention as kernel
    from core.step_attention import reference

    torch.manual_seed(0)
    default_block, default_programs = kernel.BLOCK, kernel._programs
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False)
    cache_k, cache_v = (torch.randn(SLOTS + 1, KV_HEADS, LENGTH, DIM, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
    scale = DIM ** -0.5
    print(f"one layer's attention, us (graph replay); {torch.cuda.get_device_name()}; "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    totals: dict[str, float] = {}
    for rows in (1, 2, 4, 8):
        for span in (512, 1024, 2048, 4096):
            key, value = cache_k[:rows, :, :span], cache_v[:rows, :, :span]
            query = torch.randn(rows, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
            seen = torch.full((rows,), span // 2 + 30, device="cuda")
            mask = (torch.arange(span, device="cuda")[None, :] < seen[:, None])[:, None, None, :]

            def sdpa(query=query, key=key, value=value, mask=mask):
                return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scale)[0]

            def split(query=query, key=key, value=value, mask=mask):
                return kernel.split_kv_attention(query, key, value, mask, scale)

            ref = reference(query, key, value, mask, scale)
            error = ((split().float() - ref).abs().max() / ref.abs().max()).item()
            sdpa_error = ((sdpa().float() - ref).abs().max() / ref.abs().max()).item()
            sdpa_us, split_us = graph_timed(sdpa), graph_timed(split)
            if span == 2048:
                totals[f"{rows}"] = 40 * (sdpa_us - split_us)
            print(f"rows {rows} span {span}: sdpa {sdpa_us:.1f} us (error {sdpa_error:.1e}), split-KV {split_us:.1f} "
                  f"us (error {error:.1e}) = {sdpa_us / split_us:.2f}x")
            if span in (2048, 4096) and rows in (1, 8):
                sweep = []
                for block in (32, 64, 128):
                    for factor in (1, 2, 4, 8):
                        kernel.BLOCK = block
                        kernel._programs = lambda device, f=factor: f * torch.cuda.get_device_properties(  # type: ignore[assignment]
                            device).multi_processor_count
                        try:
                            sweep.append((graph_timed(split), block, factor))
                        except Exception as exc:  # (shared memory)
                            print(f"  block {block}: {type(exc).__name__}")
                kernel.BLOCK, kernel._programs = default_block, default_programs
                sweep.sort()
                print("  launch shapes (us, block, programs per SM): "
                      + ", ".join(f"{us:.1f} {b} {f}" for us, b, f in sweep[:6]))
    print("saved a step at span 2048, 40 layers (ms): "
          + ", ".join(f"{rows} rows {us / 1e3:.2f}" for rows, us in totals.items()))
    tails(module, cache_k[SLOTS:], cache_v[SLOTS:], scale)


def tails(module: SimpleNamespace, row_k: torch.Tensor, row_v: torch.Tensor, scale: float) -> None:
    """A follow-up's tail in the staging row (``row_k``/``row_v``: ``[1, kv_heads, length, dim]``), half its span
    cached before it, each way replayed from a CUDA graph; the first call of each (cuDNN plans a new shape)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from core.step_attention import tail_attention, tail_reference, without_cudnn

    saved: dict[str, float] = {}
    device, dtype = row_k.device, row_k.dtype
    for tokens in (8, 26, 105, 256):
        for span in (1024, 2048, 4096):
            key, value = row_k[:, :, :span], row_v[:, :, :span]
            query = torch.randn(1, HEADS, tokens, DIM, device=device, dtype=dtype)
            cached = span // 2
            sees = torch.arange(span, device=device)[None, :] <= cached + torch.arange(tokens, device=device)[:, None]
            mask = sees[None, None]

            def sdpa(query=query, key=key, value=value, mask=mask):
                return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scale)[0]

            def sdpa_without_cudnn(query=query, key=key, value=value, mask=mask):
                with without_cudnn():
                    return sdpa(query, key, value, mask)

            def split(query=query, key=key, value=value, mask=mask):
                return tail_attention(query, key, value, mask, scale)

            ref = tail_reference(query, key, value, mask, scale)
            firsts = []
            for way in (sdpa, split):
                torch.cuda.synchronize()
                started = time.perf_counter()
                way()
                torch.cuda.synchronize()
                firsts.append((time.perf_counter() - started) * 1e3)
            errors = [((way().float() - ref).abs().max() / ref.abs().max()).item() for way in (sdpa, split)]
            times = [graph_timed(way) for way in (sdpa, sdpa_without_cudnn, split)]
            if span == 2048:
                saved[f"{tokens} tokens"] = 40 * (times[0] - times[2])
            print(f"tail {tokens} tokens, span {span}: sdpa {times[0]:.1f} us (error {errors[0]:.1e}; first call "
                  f"{firsts[0]:.1f} ms), sdpa without cuDNN {times[1]:.1f}, tail_attention {times[2]:.1f} us (error "
                  f"{errors[1]:.1e}; first call {firsts[1]:.1f} ms) = {times[0] / times[2]:.2f}x")
    print("tail_attention saves a follow-up at span 2048, 40 layers (ms; negative: slower): "
          + ", ".join(f"{what} {us / 1e3:.2f}" for what, us in saved.items()))


if __name__ == "__main__":
    main()
