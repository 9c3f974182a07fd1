"""A decode step's attention on the GPU, at GLM-4.6V-Flash's shapes (32 query heads, 2 K/V heads, dim 128).

transformers' SDPA call as a decode step makes it (one query token a row, a bool mask over the slot,
"pack GQA") against imsight's split-KV kernel (``core/split_kv_attention.py``), per layer, replayed
from CUDA graphs as a step runs them, by rows x span; rows see a little more than half their span,
as a screenshot question's row does at span 2048. Also the kernel's error against float32 SDPA, and
its time by launch shape (positions a loop step, programs aimed for).

    python bench/attention_kernels.py
"""

from __future__ import annotations

import sys
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


if __name__ == "__main__":
    main()
