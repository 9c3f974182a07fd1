"""imsight's int4 decode kernel (``core.int4_mma``): what it reads from tinygemm's layout, its nibble
arithmetic, and its launch shapes. The kernel itself runs only on a CUDA GPU: every load there checks
it against the unpacked weight (``core.int4_weights.use_mma_kernel``), and ``bench/int4_kernels.py
--mma`` times it and prints its error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from core import int4_mma, int4_weights
from core.int4_weights import Int4Linear, dequantize, pack, quantize


def test_the_kernels_operands_read_from_tinygemms_layout_are_the_weight():
    # The kernel's index arithmetic, line for line: program tile i's lane (g, t) takes, for k-tile kt of
    # an outer tile, word kt // 2 of output blocks 2i (rows g) and 2i + 1 (rows g + 8), shifted by
    # (kt % 2) * 8, and reads two nibbles (bits 0-3, 16-19) at shift 0 (inputs 2t, 2t+1) and 4 (+8).
    n, k = 32, 256
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    words = pack(q, 8).to(torch.int64) & 0xFFFFFFFF
    read = torch.full((n, k), -1, dtype=torch.int64)
    for tile in range(n // 16):
        for outer in range(k // 128):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for kt in range(8):
                    for block, row in ((2 * tile, g), (2 * tile + 1, g + 8)):
                        word = int(words[block, outer, lane, kt // 2]) >> (kt % 2) * 8
                        for shift, column in ((0, 2 * t), (4, 2 * t + 8)):
                            at = outer * 128 + kt * 16 + column
                            read[tile * 16 + row, at] = word >> shift & 15
                            read[tile * 16 + row, at + 1] = word >> shift + 16 & 15
    assert torch.equal(read, q.to(torch.int64))


def test_the_exponent_trick_turns_nibbles_into_q_minus_8_exactly():
    q = torch.arange(16, dtype=torch.int32)
    as_bf16 = (q | 0x4300).to(torch.int16).view(torch.bfloat16)  # the kernel's 0x43004300 | nibbles
    assert torch.equal(as_bf16.float(), 128.0 + q.float())
    one, minus_136 = (torch.tensor([v], dtype=torch.int16).view(torch.bfloat16) for v in (0x3F80, -0x3CF8))  # 0xC308
    assert one.item() == 1.0 and minus_136.item() == -136.0
    assert torch.equal((as_bf16 * one + minus_136).float(), q.float() - 8)  # exact in bf16


def test_every_launch_shape_tiles_its_weight_and_is_compiled_at_load():
    weights = {(4608, 128), (4096, 128), (27392, 128), (16 * 3, 64), (16 * 107, 32)}
    compiled = set(int4_mma.launch_shapes(weights))
    for n, _group in weights:
        for rows in range(1, int4_mma.MAX_ROWS + 1):
            config = int4_mma.config_for(n, rows)
            assert (n // 16) % config.tiles == 0, (n, rows, config)
            assert config in compiled


def test_what_the_kernel_takes():
    q = torch.zeros(32, 256, dtype=torch.uint8)
    assert int4_mma.supports(pack(q, 8), 128)
    assert not int4_mma.supports(pack(q, 4), 128)  # 4 inner k-tiles: two words a lane, not four
    assert not int4_mma.supports(pack(q[:8], 8), 128)  # 8 outputs: not a block of 16


def test_compiled_steps_see_the_products_shape():
    # What dynamo and inductor see of the operator when they trace a decode step (its fake kernel).
    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.bfloat16)
        packed = torch.empty(4, 2, 32, 4, dtype=torch.int32)
        y = torch.ops.imsight.int4_mma(x, packed, torch.empty(2, 32, 2, dtype=torch.bfloat16), 128)
    assert tuple(y.shape) == (5, 32) and y.dtype == torch.bfloat16


def test_int4_linear_takes_the_operator_for_few_rows_eagerly_and_compiled():
    # The operator's CPU kernel computes what the CUDA one does (the unpacked weight's product), so the
    # layer's way to it runs here: up to MMA_ROWS rows through it (decode steps, follow-ups' tails), and a
    # compiled step calling it as one opaque node (dynamo traces its fake kernel; aot_eager needs no C++
    # compiler). More rows are unpacked instead.
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 256, generator=generator)
    q, scales_zeros = quantize(weight, 128)
    bias = torch.randn(32, generator=generator).to(torch.bfloat16)
    layer = Int4Linear(pack(q, 8), scales_zeros.to(torch.bfloat16), 128, bias, in_features=256, kernel=True)
    layer.mma = True
    full = dequantize(layer.packed, layer.scales_zeros, 128, torch.bfloat16)
    for rows in (1, 5, int4_mma.MAX_ROWS, int4_weights.MMA_ROWS, int4_weights.MMA_ROWS + 1):
        x = torch.randn(rows, 256, generator=generator).to(torch.bfloat16)
        through_operator = rows <= int4_weights.MMA_ROWS
        # the operator's path adds the bias to the product, as tinygemm's does; the unpacked one, in the product
        expected = F.linear(x, full) + bias if through_operator else F.linear(x, full, bias)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            eager = layer(x)
        calls = sum(event.name == "imsight::int4_mma" for event in profile.events())
        assert calls == through_operator, rows
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        assert torch.equal(eager, expected) and torch.equal(compiled, expected)
    torch.compiler.reset()


def test_the_launcher_takes_16_rows_a_launch():
    # A launch computes up to 16 rows; more rows take a launch per 16, each on its slice of the input and
    # the output. Here each "launch" is the kernel's product computed on the CPU from the arguments it
    # is handed, so the slices, their row counts and the launch shapes are what is checked.
    n, k = 48, 256
    generator = torch.Generator().manual_seed(5)
    q, scales_zeros = quantize(torch.randn(n, k, generator=generator), 128)
    packed, scales_zeros = pack(q, 8), scales_zeros.to(torch.bfloat16)
    weight = dequantize(packed, scales_zeros, 128, torch.bfloat16)
    launches: list[tuple[str, int]] = []

    def kernel_for(name: str) -> object:
        def launch(*, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[object]) -> None:
            x, _packed, _sz, y, m, n_out, k_in = args
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and isinstance(m, int)
            assert (n_out, k_in) == (n, k) and 0 < m <= int4_mma.MAX_ROWS and x.shape[0] == y.shape[0] == m
            assert x.data_ptr() % 16 == 0  # the staged 16-byte loads
            y.copy_(F.linear(x, weight))
            launches.append((name, m))
        return launch

    kernels = int4_mma.Kernels.__new__(int4_mma.Kernels)
    kernels._kernels = {int4_mma._kernel_name(c, r, 128): kernel_for(int4_mma._kernel_name(c, r, 128))
                        for c in int4_mma.launch_shapes({(n, 128)}) for r in (1, 2)}
    for rows, expected in ((0, []), (5, [5]), (16, [16]), (37, [16, 16, 5]), (64, [16, 16, 16, 16])):
        launches.clear()
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        y = kernels(x, packed, scales_zeros, 128)
        assert [m for _name, m in launches] == expected
        # a launch of 9-16 rows takes the instance of two row tiles, of up to 8 the one of one
        assert all(f", {1 + (m > 8)}, 128, " in name for name, m in launches), launches
        assert torch.equal(y, F.linear(x, weight))
