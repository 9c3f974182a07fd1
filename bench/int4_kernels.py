"""4-bit linear kernels on the GPU, at the shapes of GLM-4.6V-Flash's decoder (hidden 4096, MLP 13696).

Which 4-bit matrix kernel can make NF4-sized weights decode at the bandwidth: bitsandbytes' NF4
(``matmul_4bit``: a gemv for one row, dequantize-then-matmul for more), torch's own int4 "tinygemm"
(``_weight_int4pack_mm``, group-wise affine int4, what torchao's int4 weight-only uses), against
bf16 ``F.linear``. For each: microseconds a call at 1..16 rows (decode batches) and 1,000 rows
(a prefill), the weight bytes read per second at one row, and the error against the bf16 weight.

    python bench/int4_kernels.py
    python bench/int4_kernels.py --fused   # the batched-decode kernel experiment (int4_batched_matmul.py)
    python bench/int4_kernels.py --planes  # the same in a layout chosen for Triton (int4_planes_matmul.py)
    python bench/int4_kernels.py --gemlite  # GemLite's Triton kernels (pip install gemlite)
    python bench/int4_kernels.py --mma  # imsight's CUDA kernel for decode (core/int4_mma.py), shapes swept
    python bench/int4_kernels.py --rows  # short prefills (8-128 rows): that kernel a launch per 16 rows,
                                         # tinygemm, unpack + cuBLAS (where MMA_ROWS comes from), and cuBLAS
                                         # on a weight kept unpacked (KEPT_KERNEL_ROWS)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.int4_weights import Int4Linear, dequantize, pack, quantize, unpack

SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096)}
# GLM-4.6V-Flash's text layers keep q, k and v apart (2 key/value heads of 128): six weights a layer
LAYER = {"q": (4096, 4096), "k": (4096, 256), "v": (4096, 256), "o": (4096, 4096), "gate_up": (4096, 27392),
         "down": (13696, 4096)}
ROWS = (1, 2, 4, 8, 16, 32, 64, 1000)
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


def graph_timed(call: object, reps: int = 20) -> float:
    """Microseconds a call as a decode step runs it, replayed from a CUDA graph (no Python between calls)."""
    assert callable(call)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def int4_pack(weight: torch.Tensor, group: int = GROUP, inner_k_tiles: int = 8
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """imsight's int4 (``core.int4_weights``): the packed weight, scales and zeros, and the dequantized weight.

    Checks on the way that imsight's packer writes exactly what torch's ``_convert_weight_to_int4pack``
    does (the layout that ``unpack`` reads back for prefill)."""
    q, scales_zeros = quantize(weight, group)
    packed = pack(q, inner_k_tiles)
    torch_packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), inner_k_tiles)
    if not torch.equal(packed, torch_packed):
        raise SystemExit(f"int4 layout: imsight's pack differs from torch's for {tuple(weight.shape)}")
    scales_zeros = scales_zeros.to(torch.bfloat16)
    return packed, scales_zeros, dequantize(packed, scales_zeros, group, torch.bfloat16)


def check_layouts() -> None:
    """imsight's packer against torch's at every inner k-tiling, and unpack as its inverse."""
    for tiles in (2, 4, 8):
        q = torch.randint(0, 16, (64, 512), dtype=torch.uint8, device="cuda")
        torch_packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
        same = torch.equal(pack(q, tiles), torch_packed) and torch.equal(unpack(torch_packed), q)
        print(f"int4 layout, {tiles} inner k-tiles: imsight's pack/unpack {'match' if same else 'DIFFER FROM'} torch's")


def main() -> None:
    if not torch.cuda.is_available():
        print("int4 kernels: needs a CUDA GPU (cuda available: False)")
        return
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    check_layouts()
    from core.int4_unpack_gpu import dequantize_gpu
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    totals: dict[str, dict[int, float]] = {}
    for name, (k, n) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        nf4, state = quantize_4bit(weight, quant_type="nf4", blocksize=64)
        packed, scales_zeros, int4_weight = int4_pack(weight)
        nf4_weight = dequantize_4bit(nf4, state)
        # what imsight's Int4Linear does above KERNEL_ROWS: unpack (one Triton kernel), then cuBLAS
        unpacking = Int4Linear(packed, scales_zeros, GROUP, None, in_features=k, kernel=False)
        unpacking.fuse_unpacking(dequantize_gpu)
        fused = dequantize_gpu(packed, scales_zeros, GROUP, torch.bfloat16)
        difference = (fused.float() - int4_weight.float()).abs().max()
        print(f"{name}: Triton unpack vs torch ops, max difference {difference:.1e} "
              f"(largest weight {int4_weight.abs().max():.1e})")
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls = {
                "bf16": partial(F.linear, x, weight),
                "nf4 (bnb)": partial(bnb.matmul_4bit, x, nf4.t(), quant_state=state),
                "int4 (tinygemm)": partial(torch.ops.aten._weight_int4pack_mm, x, packed, GROUP, scales_zeros),
                "int4 (unpack+mm)": partial(unpacking, x),
            }
            if m in (1, 1000):
                calls["int4 unpack, torch ops"] = partial(dequantize, packed, scales_zeros, GROUP, torch.bfloat16)
                calls["int4 unpack, Triton"] = partial(dequantize_gpu, packed, scales_zeros, GROUP, torch.bfloat16)
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


def fastest(configs: list[Any], timed_call: Callable[[Any], Callable[[], object]],
            product: Callable[[Any], torch.Tensor], ref: torch.Tensor) -> list[tuple[float, Any, float]]:
    """Each launch shape timed as a decode step runs it (CUDA graphs) and its product's error against
    ``ref``: (us, shape, error), fastest first. A shape this GPU cannot launch is named and skipped."""
    results = []
    for config in configs:
        try:
            us = graph_timed(timed_call(config))
        except Exception as exc:  # shared memory or registers: too big a tile here
            print(f"  {tuple(config)}: {type(exc).__name__}")
            continue
        error = float((product(config).float() - ref).abs().max() / ref.abs().max())
        results.append((us, config, error))
    return sorted(results, key=lambda r: r[0])


def tinygemm_timed(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, ref: torch.Tensor
                   ) -> tuple[float, float]:
    """torch's int4 kernel on ``x`` as a decode step runs it (CUDA graphs): microseconds, and its error
    against ``ref`` (relative to ``ref``'s largest value), the sweeps' baseline."""
    us = graph_timed(partial(torch.ops.aten._weight_int4pack_mm, x, packed, GROUP, scales_zeros))
    product = torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scales_zeros).float()
    return us, float((product - ref).abs().max() / ref.abs().max())


def fused_sweep() -> None:
    """``int4_batched_matmul`` (an experiment) at each launch shape, against tinygemm, at 1 to 16 rows, timed as a
    decode step runs them (CUDA graphs): which shape wins per weight, and that it computes what the
    dequantized weight does. "As configured" includes adding up the partial sums."""
    if not torch.cuda.is_available():
        print("int4 kernels: needs a CUDA GPU (cuda available: False)")
        return
    from int4_batched_matmul import MatmulConfig, config_for, int4_matmul, int4_matmul_partials

    torch.manual_seed(0)
    shapes = list(itertools.product((64, 128), (4, 8, 16), (4, 8), (2, 3), (0, 1)))
    chosen: dict[int, float] = {}
    best_total: dict[int, float] = {}
    tiny: dict[int, float] = {}
    for name, (k, n) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        packed, scales_zeros, int4_weight = int4_pack(weight)
        for m in (1, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), int4_weight.float())
            error = (int4_matmul(x, packed, scales_zeros).float() - ref).abs().max() / ref.abs().max()
            tiny_us, tiny_error = tinygemm_timed(x, packed, scales_zeros, ref)
            configs = [c for c in map(MatmulConfig._make, shapes) if n % c.block_n == 0]
            # (the lambdas run inside fastest(), before the loop moves on)
            results = fastest(configs, lambda c: partial(int4_matmul_partials, x, packed, scales_zeros, *c),  # noqa: B023
                              lambda c: int4_matmul(x, packed, scales_zeros, c), ref)  # noqa: B023
            default = config_for(n, k)
            default_us = graph_timed(partial(int4_matmul, x, packed, scales_zeros, default))
            chosen[m] = chosen.get(m, 0.0) + default_us
            best_total[m] = best_total.get(m, 0.0) + results[0][0]
            tiny[m] = tiny.get(m, 0.0) + tiny_us
            print(f"{name} {k}x{n}, {m} rows: tinygemm {tiny_us:.1f} us (error {tiny_error:.1e}); fused, as "
                  f"configured {default} {default_us:.1f} us (error {error:.1e}, with the sum); fastest "
                  + ", ".join(f"{us:.1f} us {tuple(c)} (error {e:.1e})" for us, c, e in results[:4]))
    bytes_per_layer = sum(k * n for k, n in SHAPES.values()) * 4.25 / 8
    for m in (1, 4, 8, 16):
        print(f"one layer's four linears, {m} rows: tinygemm {tiny[m]:.1f} us, fused as configured {chosen[m]:.1f} "
              f"us ({bytes_per_layer / chosen[m] / 1e6:.2f} TB/s), fastest shapes {best_total[m]:.1f} us")


def planes_sweep() -> None:
    """``int4_planes_matmul`` (an experiment: weights in nibble planes) at each launch shape, against tinygemm on the
    same weights, at 1 to 16 rows, timed as a decode step runs them (CUDA graphs, partial sums added)."""
    if not torch.cuda.is_available():
        print("int4 kernels: needs a CUDA GPU (cuda available: False)")
        return
    from int4_planes_matmul import Launch, int4_matmul, launch_for, pack_planes

    torch.manual_seed(0)
    launches = [Launch(*shape) for shape in itertools.product((32, 64, 128, 256), (1, 2, 4, 8, 16), (4, 8), (2, 3, 4))]
    rows = (1, 2, 4, 8, 16)
    tiny: dict[int, float] = {}
    best: dict[int, float] = {}
    default: dict[int, float] = {}
    for name, (k, n) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        q, scales_zeros = quantize(weight, GROUP)
        packed = pack(q, 8)
        planes = pack_planes(q, GROUP)
        scales_zeros = scales_zeros.to(torch.bfloat16)
        int4_weight = dequantize(packed, scales_zeros, GROUP, torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), int4_weight.float())
            tiny_us, tiny_error = tinygemm_timed(x, packed, scales_zeros, ref)
            fitting = [c for c in launches if n % c.block_n == 0 and k // GROUP >= c.split]
            results = fastest(fitting, partial(partial, int4_matmul, x, planes, scales_zeros, GROUP),
                              partial(int4_matmul, x, planes, scales_zeros, GROUP), ref)
            chosen = launch_for(n, k, GROUP)
            chosen_us = graph_timed(partial(int4_matmul, x, planes, scales_zeros, GROUP, chosen))
            tiny[m] = tiny.get(m, 0.0) + tiny_us
            best[m] = best.get(m, 0.0) + results[0][0]
            default[m] = default.get(m, 0.0) + chosen_us
            print(f"{name} {k}x{n}, {m} rows: tinygemm {tiny_us:.1f} us (error {tiny_error:.1e}); planes "
                  f"{tuple(chosen)} {chosen_us:.1f} us; fastest "
                  + ", ".join(f"{us:.1f} us {tuple(c)} (error {e:.1e})" for us, c, e in results[:4]))
    bytes_per_layer = sum(k * n for k, n in SHAPES.values()) * 4.25 / 8
    for m in rows:
        print(f"one layer's four linears, {m} rows: tinygemm {tiny[m]:.1f} us, planes as configured {default[m]:.1f} "
              f"us ({bytes_per_layer / default[m] / 1e6:.2f} TB/s), fastest shapes {best[m]:.1f} us "
              f"({bytes_per_layer / best[m] / 1e6:.2f} TB/s)")


def gemlite_sweep() -> None:
    """GemLite's A16W4 Triton kernels (``pip install gemlite``, a library, not a dependency of imsight) on the
    same int4 weights as tinygemm, at 1 to 16 rows timed as a decode step runs them (CUDA graphs, each
    shape autotuned by GemLite first), and at 1,076 rows (a screenshot question's prefill) against
    imsight's unpack + cuBLAS. Run with both of GemLite's split-K sums: into bf16 (its default on Hopper)
    and into float32."""
    if not torch.cuda.is_available():
        print("int4 kernels: needs a CUDA GPU (cuda available: False)")
        return
    import gemlite
    from gemlite import DType, GemLiteLinear

    from core.int4_unpack_gpu import dequantize_gpu

    torch.manual_seed(0)
    rows = (1, 2, 4, 8, 16)
    layers = {}
    for name, (k, n) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        q, scales_zeros = quantize(weight, GROUP)
        packed, scales_zeros = pack(q, 8), scales_zeros.to(torch.bfloat16)
        imsight = Int4Linear(packed, scales_zeros, GROUP, None, in_features=k, kernel=True)
        imsight.fuse_unpacking(dequantize_gpu)
        # imsight's w = (q - 8) * scale + zero is GemLite's "fma" form w = q * scale + (zero - 8 * scale)
        scales, zeros = scales_zeros[..., 0].t().float(), scales_zeros[..., 1].t().float()
        theirs = GemLiteLinear(4, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.BF16,
                               output_dtype=DType.BF16)
        theirs.pack(q, scales.to(torch.bfloat16), (8 - zeros / scales), None)  # their zeros: w = (q - z) * s
        # pack() keeps -z * s in z's dtype, [groups, N] contiguous; bf16 here, and from imsight's zero
        # directly (a bf16 z would shift every weight by up to 1/32 of a step)
        theirs.zeros.data = (zeros - 8 * scales).t().contiguous().to(torch.bfloat16)
        layers[name] = (imsight, theirs, dequantize(packed, scales_zeros, GROUP, torch.bfloat16))
    totals: dict[str, dict[int, float]] = {}
    for sums in ("bf16", "float32"):
        gemlite.set_native_atomic_bfp16(sums == "bf16")
        for name, (imsight, theirs, int4_weight) in layers.items():
            for m in rows:
                x = torch.randn(m, imsight.in_features, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x.float(), int4_weight.float())
                theirs(x)  # autotunes this shape (seconds)
                error = float((theirs(x).float() - ref).norm() / ref.norm())
                us = graph_timed(partial(theirs, x))
                label = f"gemlite, sums in {sums}"
                totals.setdefault(label, {})[m] = totals.get(label, {}).get(m, 0.0) + us
                if sums == "bf16":
                    tiny_us, _ = tinygemm_timed(x, imsight.packed, imsight.scales_zeros, ref)
                    totals.setdefault("tinygemm", {})[m] = totals.get("tinygemm", {}).get(m, 0.0) + tiny_us
                print(f"{name}, {m} rows: {label} {us:.1f} us (relative error {error:.1e})")
    bytes_per_layer = sum(k * n for k, n in SHAPES.values()) * 4.25 / 8
    print("one layer's four linears, microseconds by rows (CUDA graphs):")
    for label, by_rows in totals.items():
        print(f"  {label:22s} " + "  ".join(f"{m}: {us:6.1f}" for m, us in by_rows.items())
              + f"   one row at {bytes_per_layer / by_rows[1] / 1e6:.2f} TB/s")
    prefill = {"imsight (unpack + cuBLAS)": 0.0, "gemlite": 0.0}
    for imsight, theirs, _ in layers.values():
        x = torch.randn(1076, imsight.in_features, device="cuda", dtype=torch.bfloat16)
        theirs(x)
        prefill["imsight (unpack + cuBLAS)"] += timed(partial(imsight, x), reps=20)
        prefill["gemlite"] += timed(partial(theirs, x), reps=20)
    print("one layer's four linears at 1,076 rows: " + ", ".join(f"{k} {us:.0f} us" for k, us in prefill.items()))


def mma_sweep() -> None:
    """``core.int4_mma``'s kernel against tinygemm at 1-16 rows, every launch shape, as a decode step
    runs them (CUDA graphs); then one decoder layer's six weights at each row count."""
    from core.int4_mma import Kernels, MmaConfig, config_for

    torch.manual_seed(0)
    configs = [MmaConfig(w, t, u, stage) for w in (4, 8, 16, 32) for t in (1, 2) for u in (1, 2) for stage in (0, 1)
               if w * t <= 32]  # (the partial sums of 32 warps x 2 blocks would not fit in 48 KB)
    began = time.perf_counter()
    kernels = Kernels(configs)
    print(f"NVRTC compiled {len(configs) * 2} kernels in {time.perf_counter() - began:.1f} s")
    layer: dict[str, dict[int, float]] = {"tinygemm": {}, "mma, best shape each": {}, "mma, config_for": {}}
    for name, (k, n) in LAYER.items():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        packed, scales_zeros, int4_weight = int4_pack(weight)
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), int4_weight.float())
            tiny_us, tiny_err = tinygemm_timed(x, packed, scales_zeros, ref)
            call = partial(kernels, x, packed, scales_zeros, GROUP)
            ranked = fastest(configs, partial(partial, call), call, ref)
            for us, config, _err in ranked:
                label = f"mma w{config.warps} t{config.tiles} u{config.unroll} s{config.stage}"
                layer.setdefault(label, {})[m] = layer.get(label, {}).get(m, 0.0) + us
            best_us, best, best_err = ranked[0]
            picked = next(us for us, config, _e in ranked if config == config_for(n, m))
            layer["mma, config_for"][m] = layer["mma, config_for"].get(m, 0.0) + picked
            layer["tinygemm"][m] = layer["tinygemm"].get(m, 0.0) + tiny_us
            layer["mma, best shape each"][m] = layer["mma, best shape each"].get(m, 0.0) + best_us
            worst_err = max(e for _u, _c, e in ranked)
            print(f"{name:7s} rows {m:2d}: tinygemm {tiny_us:6.1f} us (error {tiny_err:.1e}); mma best "
                  f"{best_us:6.1f} us {tuple(best)} (error {best_err:.1e}, worst of all shapes {worst_err:.1e}); "
                  "next: " + ", ".join(f"{tuple(c)} {u:.1f}" for u, c, _e in ranked[1:4]))
    print("one decoder layer's six weights (q, k, v apart, as GLM-4.6V-Flash has them), microseconds (CUDA graphs):")
    for label, by_rows in sorted(layer.items(), key=lambda kv: kv[1].get(8, 0.0)):
        print(f"  {label:22s} " + "  ".join(f"{m} rows {us:7.1f}" for m, us in sorted(by_rows.items())))
    params = sum(k * n for k, n in LAYER.values())
    for label in ("tinygemm", "mma, best shape each", "mma, config_for"):
        print(f"  {label}: one row reads {params * 4.25 / 8 / 1e6:.0f} MB a layer at "
              f"{params * 4.25 / 8 / layer[label][1] / 1e6:.2f} TB/s")


def rows_sweep() -> None:
    """Short prefills (a follow-up's tail, a short text question): one decoder layer's six weights at
    8-128 rows through ``core.int4_mma`` (a launch per 16 rows, the shapes ``config_for`` picks),
    tinygemm, the unpack + cuBLAS that longer prefills take, and cuBLAS on a weight kept unpacked
    (``[engine] unpacked_weights``), replayed from CUDA graphs as the captured tails run. Where
    ``core.int4_weights.MMA_ROWS``, ``KERNEL_ROWS`` and ``KEPT_KERNEL_ROWS`` come from."""
    from core.int4_mma import Kernels, launch_shapes
    from core.int4_unpack_gpu import dequantize_gpu
    from core.int4_weights import KEPT_KERNEL_ROWS, KERNEL_ROWS, MMA_ROWS

    torch.manual_seed(0)
    kernels = Kernels(launch_shapes({(n, GROUP) for _k, n in LAYER.values()}))
    rows = (8, 12, 16, 24, 32, 48, 64, 80, 96, 128)
    layer: dict[str, dict[int, float]] = {"mma, a launch per 16 rows": {}, "tinygemm": {}, "unpack + cuBLAS": {},
                                          "kept unpacked + cuBLAS": {}}
    worst = kept_error = 0.0
    for k, n in LAYER.values():
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        packed, scales_zeros, int4_weight = int4_pack(weight)
        unpacking = Int4Linear(packed, scales_zeros, GROUP, None, in_features=k, kernel=False)
        unpacking.fuse_unpacking(dequantize_gpu)
        kept = Int4Linear(packed, scales_zeros, GROUP, None, in_features=k, kernel=False)
        kept.fuse_unpacking(dequantize_gpu)
        kept.keep_unpacked()
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), int4_weight.float())
            mine = partial(kernels, x, packed, scales_zeros, GROUP)
            worst = max(worst, float((mine().float() - ref).abs().max() / ref.abs().max()))
            # The same weight; one GEMM instead of one a 64-MB slice (gate/up), so it may round differently.
            kept_error = max(kept_error, float((kept(x).float() - ref).abs().max() / ref.abs().max()))
            for label, call in (("mma, a launch per 16 rows", mine), ("unpack + cuBLAS", partial(unpacking, x)),
                                ("kept unpacked + cuBLAS", partial(kept, x)),
                                ("tinygemm", partial(torch.ops.aten._weight_int4pack_mm, x, packed, GROUP,
                                                     scales_zeros))):
                layer[label][m] = layer[label].get(m, 0.0) + graph_timed(call)
    print(f"one decoder layer's six weights at prefill-like row counts, microseconds (CUDA graphs); "
          f"MMA_ROWS = {MMA_ROWS}, KERNEL_ROWS = {KERNEL_ROWS}, KEPT_KERNEL_ROWS = {KEPT_KERNEL_ROWS}; "
          f"worst error: mma {worst:.1e}, kept unpacked {kept_error:.1e}:")
    for label, by_rows in layer.items():
        print(f"  {label:26s} " + "  ".join(f"{m} rows {us:7.1f}" for m, us in sorted(by_rows.items())))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fused", action="store_true",
                        help="only the tinygemm-layout few-row kernel, launch shapes swept")
    parser.add_argument("--planes", action="store_true", help="only the nibble-plane kernel, launch shapes swept")
    parser.add_argument("--gemlite", action="store_true",
                        help="GemLite's 4-bit kernels against tinygemm (pip install gemlite)")
    parser.add_argument("--mma", action="store_true",
                        help="imsight's CUDA kernel for decode (core/int4_mma.py) against tinygemm")
    parser.add_argument("--rows", action="store_true",
                        help="short prefills: imsight's kernel a launch per 16 rows, tinygemm, unpack or kept + cuBLAS")
    args = parser.parse_args()
    if args.rows:
        rows_sweep()
    elif args.mma:
        mma_sweep()
    elif args.gemlite:
        gemlite_sweep()
    elif args.planes:
        planes_sweep()
    elif args.fused:
        fused_sweep()
    else:
        main()
