"""imsight's int4 weights (``core.int4_weights``): tinygemm's tiled layout, written and read back, and
the dequantized weight (the tiny model answering through them: tests/test_quantization.py).

On a GPU the same packed weight feeds torch's kernel; ``bench/int4_kernels.py`` checks there that
``pack`` writes byte for byte what torch's own packer writes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.int4_weights import Int4Linear, dequantize, pack, quantize, torch_layout_agrees, unpack
from core.memory import estimate
from core.quantization import pick_mode, unquantised_modules


def _kernel_pack(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """A line-by-line port of ``matrix_to_m16n8k16_Bint4_layout`` (PyTorch's int4mm.cu, the CUDA branch),
    fed as ``_convert_weight_to_int4pack`` is: ``[n][k/2]`` bytes, the even k in the high nibble."""
    n, k = q.shape
    packed_bytes = (q[:, ::2] << 4 | q[:, 1::2]).tolist()
    out = torch.zeros(n // 8, k // (tiles * 16), 32, tiles // 2, dtype=torch.int64)
    for n_tile in range(n // 8):
        for k_outer in range(k // (tiles * 16)):
            for t in range(32):
                for inner in range(0, tiles, 2):
                    row = packed_bytes[n_tile * 8 + t // 4]
                    base = (k_outer * tiles + inner) * 16 // 2
                    v = [row[base + t % 4], row[base + t % 4 + 4], row[base + 8 + t % 4], row[base + 12 + t % 4]]
                    word = ((v[3] & 0xF) << 28 | (v[2] & 0xF) << 24 | (v[1] & 0xF) << 20 | (v[0] & 0xF) << 16
                            | (v[3] & 0xF0) << 8 | (v[2] & 0xF0) << 4 | (v[1] & 0xF0) | (v[0] & 0xF0) >> 4)
                    out[n_tile, k_outer, t, inner // 2] = word - (1 << 32) if word >= 1 << 31 else word
    return out.to(torch.int32)


@pytest.mark.parametrize(("n", "k", "tiles"), [(16, 64, 2), (8, 128, 4), (24, 256, 8), (8, 512, 4)])
def test_pack_writes_tinygemms_layout_and_unpack_reads_it_back(n, k, tiles):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
    packed = pack(q, tiles)
    assert torch.equal(packed, _kernel_pack(q, tiles))
    assert torch.equal(unpack(packed), q)


def test_a_torch_whose_packer_writes_another_layout_is_caught():
    def port(packed_bytes: torch.Tensor, tiles: int) -> torch.Tensor:  # what torch's CUDA packer does
        q = torch.stack([packed_bytes >> 4, packed_bytes & 15], -1).reshape(packed_bytes.shape[0], -1)
        return _kernel_pack(q, tiles)

    def transposed_tiles(packed_bytes: torch.Tensor, tiles: int) -> torch.Tensor:  # a layout of another torch
        return port(packed_bytes, tiles).transpose(2, 3).contiguous().reshape(port(packed_bytes, tiles).shape)

    assert torch_layout_agrees("cpu", port)
    assert not torch_layout_agrees("cpu", transposed_tiles)
    assert not torch_layout_agrees("cpu")  # torch's CPU packer writes the CPU kernel's layout: no tinygemm here


def test_the_dequantized_weight_is_within_a_group_step_of_the_original():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    q, scales_zeros = quantize(weight, 64)
    assert scales_zeros.shape == (256 // 64, 64, 2) and int(q.max()) <= 15
    restored = dequantize(pack(q, 8), scales_zeros, 64, torch.float32)
    step = scales_zeros[..., 0].t().repeat_interleave(64, dim=1)  # each weight's own group's scale
    assert ((restored - weight).abs() <= step / 2 + 1e-6).all()
    assert 0.02 < float((restored - weight).norm() / weight.norm()) < 0.15  # 4 bits: close, not equal


def test_an_int4_linear_computes_with_its_dequantized_weight():
    linear = torch.nn.Linear(256, 32, bias=True)
    int4 = Int4Linear.from_linear(linear)
    assert int4 is not None and int4.group == 128 and not int4.kernel  # no tinygemm on the CPU
    x = torch.randn(3, 5, 256)
    weight = dequantize(int4.packed, int4.scales_zeros, 128, torch.float32)
    with torch.no_grad():
        assert torch.allclose(int4(x), F.linear(x, weight, linear.bias), atol=1e-5)
        assert float((int4(x) - linear(x)).norm() / linear(x).norm()) < 0.15


@pytest.mark.parametrize("bias", [True, False])
def test_a_prefill_unpacks_the_weight_a_slice_of_outputs_at_a_time(monkeypatch, bias):
    import core.int4_weights

    linear = torch.nn.Linear(256, 40, bias=bias)
    int4 = Int4Linear.from_linear(linear)
    x = torch.randn(2, 7, 256)
    with torch.no_grad():
        whole = int4(x)
        widths = []
        unpack_slice = int4._full_width
        int4.fuse_unpacking(lambda packed, *args: widths.append(packed.shape[0] * 8) or unpack_slice(packed, *args))
        # 16 outputs x 256 inputs x 4 bytes: two blocks of 8 outputs a slice, and the last one alone
        monkeypatch.setattr(core.int4_weights, "UNPACKED_BYTES", 16 * 256 * 4)
        sliced = int4(x)
    assert widths == [16, 16, 8]
    assert torch.allclose(sliced, whole, atol=1e-6)


def test_a_linear_that_does_not_tile_stays_full_width():
    assert Int4Linear.from_linear(torch.nn.Linear(40, 32)) is None  # 40 inputs: no group of 32 fits
    assert Int4Linear.from_linear(torch.nn.Linear(64, 12)) is None  # 12 outputs: not a multiple of 8


def test_int4_is_a_mode_of_its_own_and_its_estimate_counts_the_full_width_load():
    from transformers import AutoModelForImageTextToText, Glm4vConfig

    assert pick_mode("int4", "cuda") == "int4"
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(Glm4vConfig())
    keep = unquantised_modules(model)
    bf16, int4 = estimate(model, "none", 2, keep), estimate(model, "int4", 2, keep)
    assert 7.0e9 < int4.weights < 9.5e9
    assert int4.weights + int4.loading == bf16.weights  # quantized after a full-width load


def test_a_weight_kept_unpacked_is_read_not_unpacked_again_and_gives_the_same_products():
    from core.int4_weights import keep_unpacked, unpacked_bytes

    model = torch.nn.Sequential(torch.nn.Linear(256, 40, bias=True), torch.nn.Linear(40, 16))
    model[0] = Int4Linear.from_linear(model[0])
    int4 = model[0]
    x = torch.randn(3, 9, 256)
    with torch.no_grad():
        unpacked_each_time = int4(x)
        calls = []
        unpack_slice = int4._full_width
        int4.fuse_unpacking(lambda *args: calls.append(args[0].shape) or unpack_slice(*args))
        assert keep_unpacked(model) == unpacked_bytes(model) == 40 * 256 * 4  # the int4 linear only
        assert len(calls) == 1  # unpacked once, whole
        for rows in (x, x[:1, :1], torch.randn(70, 256)):
            expected = F.linear(rows, dequantize(int4.packed, int4.scales_zeros, 128, torch.float32), int4.bias)
            assert torch.equal(int4(rows), expected)
        assert len(calls) == 1  # every prefill above read the kept copy
        assert torch.equal(int4(x), unpacked_each_time)
    assert "0.unpacked" not in model.state_dict()  # made at load, never saved
    assert int4.unpacked is not None and int4.unpacked.dtype == torch.float32
