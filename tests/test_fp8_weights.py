"""imsight's fp8 weights (``core.fp8_weights``): e4m3 with a scale per output, the rows quantized on
the fly, multiplied through ``torch._scaled_mm`` (which runs on the CPU too; the tiny model answering
through them: tests/test_quantization.py). ``bench/fp8_kernels.py`` times the same product on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import EngineError
from core.fp8_weights import FP8, Fp8Linear, dequantize, quantize
from core.memory import estimate
from core.quantization import pick_mode, unquantised_modules


def _rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows as the layer hands them to the product: each scaled to e4m3's range (448), rounded to
    e4m3 and scaled back."""
    rows = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
    return (x / rows).to(FP8).float() * rows


def test_the_dequantized_weight_is_within_e4m3s_rounding_of_the_original():
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    weight[3] *= 100  # an output of another magnitude: it has a scale of its own
    q, scale = quantize(weight)
    assert q.dtype == FP8 and scale.shape == (48,)
    restored = dequantize(q, scale, torch.float32)
    # three mantissa bits: half a step is 1/16 of the value; below e4m3's smallest normal, a fixed step
    assert ((restored - weight).abs() <= weight.abs() / 16 + scale[:, None] * 2**-10).all()
    assert 0.01 < float((restored - weight).norm() / weight.norm()) < 0.05  # 8 bits: close, not equal


def test_an_fp8_linear_multiplies_the_rounded_rows_by_the_dequantized_weight():
    linear = torch.nn.Linear(256, 48, bias=True)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8 is not None
    x = torch.randn(3, 5, 256) * torch.logspace(-2, 2, 5)[:, None]  # rows of very different sizes
    with torch.no_grad():
        got = fp8(x)
        want = F.linear(_rounded_rows(x), dequantize(fp8.weight, fp8.scale, torch.float32), linear.bias)
        assert got.shape == (3, 5, 48)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert float((got - linear(x)).norm() / linear(x).norm()) < 0.08
        assert Fp8Linear.from_linear(linear.to(torch.bfloat16))(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_a_linear_cublas_does_not_take_stays_full_width():
    assert Fp8Linear.from_linear(torch.nn.Linear(40, 32)) is None  # 40 inputs: not a multiple of 16
    assert Fp8Linear.from_linear(torch.nn.Linear(64, 24)) is None  # 24 outputs: likewise


def test_fp8_is_asked_for_never_picked_and_needs_a_gpu_that_multiplies_it():
    assert pick_mode("fp8", "cuda", (9, 0)) == "fp8"  # Hopper
    assert pick_mode("fp8", "cuda", (8, 9)) == "fp8"  # Ada
    assert pick_mode("fp8", "cpu") == "fp8"  # torch's CPU product: tests, and slow but correct
    assert pick_mode("auto", "cuda", (9, 0)) == "int4"
    with pytest.raises(EngineError, match=r'compute capability 8\.9 or later.*this one is 8\.0.*"int4"'):
        pick_mode("fp8", "cuda", (8, 0))


def test_fp8s_estimate_is_a_byte_a_weight_after_a_full_width_load():
    from transformers import AutoModelForImageTextToText, Glm4vConfig

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(Glm4vConfig())
    keep = unquantised_modules(model)
    bf16, int4, fp8 = (estimate(model, mode, 2, keep) for mode in ("none", "int4", "fp8"))
    assert int4.weights < fp8.weights < bf16.weights
    linears = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and name.startswith("model.language_model."))
    assert abs(bf16.weights - fp8.weights - linears) < 0.01 * linears  # a byte a weight less than bf16's two
    assert fp8.weights + fp8.loading == bf16.weights  # quantized after a full-width load
    assert abs(fp8.weights - int4.weights - 0.47 * linears) < 0.01 * linears  # int4: 0.53 bytes a weight
