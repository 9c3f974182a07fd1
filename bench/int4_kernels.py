"""4-bit linear kernels on the GPU, at the shapes of GLM-4.6V-Flash's decoder (hidden 4096, MLP 13696).

Which 4-bit matrix kernel can make NF4-sized weights decode at the bandwidth: bitsandbytes' NF4
(``matmul_4bit``: a gemv for one row, dequantize-then-matmul for more), torch's own int4 "tinygemm"
(``_weight_int4pack_mm``, group-wise affine int4, what torchao's int4 weight-only uses), against
bf16 ``F.linear``. For each: microseconds a call at 1..16 rows (decode batches) and 1,000 rows
(a prefill), the weight bytes read per second at one row, and the error against the bf16 weight.

    python bench/int4_kernels.py
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096)}
ROWS = (1, 2, 4, 8, 16, 1000)
GROUP = 128


def timed(call: object, reps: int = 100) -> float:
    """Microseconds a call, back to back on the GPU."""
    assert callable(call)
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def int4_pack(weight: torch.Tensor, group: int = GROUP, inner_k_tiles: int = 8
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 as tinygemm takes it: the packed weight, ``[groups, out, 2]`` scales
    and zeros, and the dequantized weight (to measure the error)."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scales = (high - low).clamp(min=1e-6) / 15
    zeros = low + scales * 8  # tinygemm's zero point is a float: w = (q - 8) * scale + zero
    q = ((w - low) / scales).round().clamp(0, 15).to(torch.int32)
    dequantized = ((q - 8) * scales + zeros).reshape(out_features, in_features).to(torch.bfloat16)
    q = q.reshape(out_features, in_features)
    nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
    scales_zeros = torch.cat([scales, zeros], -1).to(torch.bfloat16).transpose(0, 1).contiguous()
    return packed, scales_zeros, dequantized


def main() -> None:
    if not torch.cuda.is_available():
        print("int4 kernels: needs a CUDA GPU (cuda available: False)")
        return
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    totals: dict[str, dict[int, float]] = {}
    for name, (k, n) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        nf4, state = quantize_4bit(weight, quant_type="nf4", blocksize=64)
        packed, scales_zeros, int4_weight = int4_pack(weight)
        nf4_weight = dequantize_4bit(nf4, state)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls = {
                "bf16": partial(F.linear, x, weight),
                "nf4 (bnb)": partial(bnb.matmul_4bit, x, nf4.t(), quant_state=state),
                "int4 (tinygemm)": partial(torch.ops.aten._weight_int4pack_mm, x, packed, GROUP, scales_zeros),
            }
            if m == 1:
                ref = F.linear(x.float(), weight.float())
                err_nf4 = (calls["nf4 (bnb)"]().float() - F.linear(x.float(), nf4_weight.float())).abs().max()
                err_int4 = (calls["int4 (tinygemm)"]().float() - F.linear(x.float(), int4_weight.float())).abs().max()
                scale = ref.abs().max()
                q_nf4 = (F.linear(x.float(), nf4_weight.float()) - ref).norm() / ref.norm()
                q_int4 = (F.linear(x.float(), int4_weight.float()) - ref).norm() / ref.norm()
                print(f"{name} {k}x{n}: kernel vs its own dequantized weight, max error / max output: "
                      f"nf4 {err_nf4 / scale:.1e}, int4 {err_int4 / scale:.1e}; quantization error "
                      f"(relative norm): nf4 {q_nf4:.4f}, int4 g{GROUP} {q_int4:.4f}")
            line = []
            for label, call in calls.items():
                us = timed(call, reps=20 if m >= 1000 else 100)
                totals.setdefault(label, {})[m] = totals.get(label, {}).get(m, 0.0) + us
                line.append(f"{label} {us:8.1f} us")
            print(f"  rows {m:5d}: " + ", ".join(line))
    print("one decoder layer's four linears (x40 for the model), microseconds:")
    for label, by_rows in totals.items():
        print(f"  {label:16s} " + "  ".join(f"{m} rows {us:8.1f}" for m, us in by_rows.items()))
    params = sum(k * n for k, n in SHAPES.values())
    for label, bits in (("bf16", 16), ("nf4 (bnb)", 4.5), ("int4 (tinygemm)", 4.25)):
        print(f"  {label}: one row reads {params * bits / 8 / 1e6:.0f} MB a layer at "
              f"{params * bits / 8 / totals[label][1] / 1e6:.2f} TB/s")


if __name__ == "__main__":
    main()
