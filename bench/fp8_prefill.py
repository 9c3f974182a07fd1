"""A prefill's linears in bf16 (what int4 weights are unpacked to for cuBLAS) against e4m3 GEMMs: not what
the engine does, the measurement behind an fp8 prefill (bench/RESULTS.md, seventeenth step).

For GLM-4-9B's four linears of a decoder layer, at a screenshot question's rows and at eight of them
together: bf16 ``x @ w.t()``, ``torch._scaled_mm`` with per-tensor scales and with row-wise ones, and the
rows' quantizing to e4m3 (compiled, called alone); each one's time, the sums for a layer and for 40, and
row-wise fp8's error against bf16 (relative, L2).

    python bench/fp8_prefill.py            # GPU (e4m3 GEMMs need compute capability 8.9: Ada, Hopper)
    python bench/fp8_prefill.py --quick    # small shapes on the CPU (figures mean nothing)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
ROWS = (1152, 8 * 1072)  # one 1024x768 screenshot question (padded as captured), eight
LAYERS = 40
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@torch.compile
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row scaled to e4m3's range and rounded; the rows' scales (float32, a column)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(E4M3), scale


def timed(run: Callable[[], object], reps: int) -> float:
    """Microseconds a call, after three."""
    cuda = torch.cuda.is_available()
    for _ in range(3):
        run()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        run()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / reps * 1e6


def ways(rows: int, n: int, k: int, device: str) -> tuple[dict[str, Callable[[], object]], float]:
    """The four ways for one linear of ``n`` outputs and ``k`` inputs, and row-wise fp8's error."""
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    w_scale = w.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX
    w8, w_scale = (w / w_scale).to(E4M3), w_scale.t().contiguous()
    x8, x_scale = quantize_rows(x)
    one = torch.ones((), device=device)

    def fp8(scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(x8, w8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

    exact = (x @ w.t()).float()
    error = float((fp8(x_scale, w_scale).float() - exact).norm() / exact.norm())
    return {"bf16": lambda: x @ w.t(), "fp8 per-tensor": lambda: fp8(one, one),
            "fp8 row-wise": lambda: fp8(x_scale, w_scale), "rows quantized": lambda: quantize_rows(x)}, error


def layer(rows: int, shapes: dict[str, tuple[int, int]], reps: int, device: str) -> dict[str, float]:
    """Each linear's ways timed and printed; their sums for the layer."""
    torch.manual_seed(0)
    totals: dict[str, float] = {}
    for name, (n, k) in shapes.items():
        runs, error = ways(rows, n, k, device)
        line = []
        for way, run in runs.items():
            us = timed(run, reps)
            totals[way] = totals.get(way, 0.0) + us
            line.append(f"{way} {us:.0f} us")
        print(f"{rows} rows, {name} {n}x{k}: " + ", ".join(line) + f"; row-wise fp8 error {error:.2e}")
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="small shapes on the CPU, a few seconds")
    args = parser.parse_args()
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    shapes = {name: (n // 64, k // 64) for name, (n, k) in SHAPES.items()} if args.quick else SHAPES
    rows_list = (32, 64) if args.quick else ROWS
    for rows in rows_list:
        totals = layer(rows, shapes, 2 if args.quick else args.reps, device)
        fp8 = totals["fp8 row-wise"] + totals["rows quantized"]
        print(f"{rows} rows, one layer's linears: " + ", ".join(f"{way} {us:.0f} us" for way, us in totals.items())
              + f"; x{LAYERS} layers: bf16 {totals['bf16'] * LAYERS / 1e3:.1f} ms, "
              f"fp8 row-wise and quantizing {fp8 * LAYERS / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
