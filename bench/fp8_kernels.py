"""8-bit floating-point weights on the GPU, at the shapes of GLM-4.6V-Flash's decoder: is an fp8 mode
worth having next to int4?

int4 decode steps are bound by torch's int4 kernel ("tinygemm"), whose cost grows with the rows (61 to
145 us a decoder layer from 1 row to 8 on the H200; ``int4_kernels.py``). fp8 weights (e4m3, one scale
per output) are twice int4's bytes, but cuBLAS multiplies them (``torch._scaled_mm``, rows quantized to
fp8 on the fly with one scale per row) at a cost that should not grow with the rows. For each of the
four weights: microseconds a call at 1..16 rows and 1,000 rows, against tinygemm and bf16, replayed
from CUDA graphs, the rows' quantizing included (compiled, as a decode step would run it), and the
error against the bf16 weight.

    python bench/fp8_kernels.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_kernels import GROUP, SHAPES, graph_timed

from core.fp8_weights import FP8, Fp8Linear
from core.fp8_weights import quantize as fp8_quantize
from core.int4_weights import dequantize, pack, quantize

ROWS = (1, 2, 4, 8, 16, 1000)


def fp8_linear_rowwise(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The alternative ``Fp8Linear`` does not take: the rows' and outputs' scales handed to ``_scaled_mm``
    (``weight_scale`` as ``[1, N]``), its row-wise path."""
    x8, scale = fp8_quantize(x)
    return torch._scaled_mm(x8, weight.t(), scale_a=scale[:, None], scale_b=weight_scale, out_dtype=x.dtype)


def main() -> None:
    if not torch.cuda.is_available():
        print("fp8 kernels: needs a CUDA GPU (cuda available: False)")
        return
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(fp8_linear_rowwise, dynamic=False)
    one = torch.ones((), device="cuda")
    totals: dict[str, dict[int, float]] = {}
    for name, (k, n) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        w8, out_scale = fp8_quantize(weight)
        w_scale = out_scale[None, :].contiguous()
        layer = torch.compile(Fp8Linear(w8, out_scale, None), dynamic=False)  # what quantization = "fp8" runs
        q, scales_zeros = quantize(weight, GROUP)
        packed, scales_zeros = pack(q, 8), scales_zeros.to(torch.bfloat16)
        int4_weight = dequantize(packed, scales_zeros, GROUP, torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weight.float())
            calls = {
                "bf16": partial(F.linear, x, weight),
                "int4 (tinygemm)": partial(torch.ops.aten._weight_int4pack_mm, x, packed, GROUP, scales_zeros),
                "fp8, eager": partial(fp8_linear_rowwise, x, w8, w_scale),
                "fp8, compiled": partial(compiled, x, w8, w_scale),
                "fp8 per-tensor, matmul alone": partial(torch._scaled_mm, x.to(FP8), w8.t(), scale_a=one,
                                                        scale_b=one, out_dtype=torch.bfloat16),
                "fp8 per-tensor, compiled": partial(layer, x),
            }
            if m > 16:
                del calls["int4 (tinygemm)"]
            line = []
            for label, call in calls.items():
                try:
                    us = graph_timed(call)
                except Exception as exc:  # a row count cuBLAS's fp8 path does not take
                    line.append(f"{label} {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                totals.setdefault(label, {})[m] = totals.get(label, {}).get(m, 0.0) + us
                line.append(f"{label} {us:7.1f} us")
            if m in (1, 8):
                scale = ref.norm()
                err8 = (compiled(x, w8, w_scale).float() - ref).norm() / scale
                err8u = (layer(x).float() - ref).norm() / scale
                err4 = (F.linear(x.float(), int4_weight.float()) - ref).norm() / scale
                line.append(f"error vs bf16 (relative norm): fp8 {err8:.4f}, per-tensor path {err8u:.4f}, "
                            f"int4 g{GROUP} {err4:.4f}")
            print(f"{name} {k}x{n}, rows {m:5d}: " + ", ".join(line))
    print("one decoder layer's four linears (x40 for the model), microseconds:")
    for label, by_rows in totals.items():
        print(f"  {label:16s} " + "  ".join(f"{m} rows {us:8.1f}" for m, us in by_rows.items()))


if __name__ == "__main__":
    main()
