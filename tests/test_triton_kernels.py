"""The int4 Triton kernels, run by Triton's interpreter on the CPU (on a GPU they run compiled).

``core.int4_unpack_gpu`` unpacks int4 weights for every prefill on a GPU; ``bench/int4_batched_matmul.py``
is an experiment kept for the next try. Both compute from tinygemm's tiled layout with index
arithmetic of their own, which is what these tests check: on the GPU a wrong index reads the right
bytes in the wrong order and still looks like a weight. The interpreter decides when a kernel is
defined (``TRITON_INTERPRET``), so each check runs in a fresh interpreter process of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(script: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_triton_unpack_writes_what_the_torch_ops_do_at_every_tiling() -> None:
    out = run_interpreted("""
        import torch
        from core.int4_weights import dequantize, pack, quantize
        from core.int4_unpack_gpu import dequantize_gpu

        torch.manual_seed(0)
        for tiles, group, n, k in [(2, 32, 16, 64), (4, 64, 24, 128), (8, 128, 16, 256), (8, 32, 8, 384)]:
            q, scales_zeros = quantize(torch.randn(n, k), group)
            packed = pack(q, tiles)
            ref = dequantize(packed, scales_zeros, group, torch.float32)
            got = dequantize_gpu(packed, scales_zeros, group, torch.float32)
            assert got.shape == ref.shape, (got.shape, ref.shape)
            assert torch.allclose(got, ref, atol=1e-5), (tiles, group, (got - ref).abs().max())
            print("unpacked", tiles, group)
    """)
    assert out.count("unpacked") == 4


def test_the_batched_int4_matmul_computes_the_dequantized_product() -> None:
    out = run_interpreted("""
        import torch
        from core.int4_weights import dequantize, pack, quantize
        from int4_batched_matmul import MatmulConfig, config_for, int4_matmul, supports

        torch.manual_seed(0)
        checked = 0
        for tiles, n, k in [(2, 48, 96), (4, 64, 192), (8, 256, 384)]:
            q, scales_zeros = quantize(torch.randn(n, k), tiles * 16)
            packed = pack(q, tiles)
            assert supports(packed, scales_zeros, tiles * 16)
            weight = dequantize(packed, scales_zeros, tiles * 16, torch.float32)
            for rows in (1, 5, 16):
                x = torch.randn(rows, k)
                ref = x @ weight.t()
                # more splits than k-tiles too: those programs own no inputs and must add nothing
                for config in (MatmulConfig(16, 1, 4, 2), MatmulConfig(16, 3, 4, 2), MatmulConfig(16, 3, 4, 2, 1),
                               config_for(n, k)):
                    got = int4_matmul(x, packed, scales_zeros, config)
                    assert got.shape == (rows, n)
                    error = ((got - ref).abs().max() / ref.abs().max()).item()
                    assert error < 1e-5, (tiles, rows, config, error)
                    checked += 1
        print("checked", checked)
    """)
    assert "checked 36" in out
