"""8-bit floating-point weights for the language model's linears: e4m3, one scale per output, the
rows quantized to e4m3 on the fly (one scale per row), multiplied by cuBLAS (``torch._scaled_mm``).

Why next to int4: torch's int4 kernel (tinygemm) reads a weight once per call but its cost grows with
the rows (62 to 146 us for a decoder layer's four weights from 1 row to 8 on the H200), so a decode
step of 8 questions costs 1.8x one of a single question. cuBLAS's fp8 product reads twice int4's bytes
and costs the same at 1 row and 16 (58-62 us a layer), and at prefill sizes it is faster than bf16
(``bench/fp8_kernels.py``). The error against the full-width weight is a third of int4's with groups of
128 (relative norm 0.037 against 0.099). The price is memory: a byte a weight against int4's ~0.53.
(Since then imsight's own int4 decode kernel, ``core.int4_mma``, costs 1.1x from 1 row to 8 too, so
what fp8 still buys is the smaller error.)

The scales are applied to the product's output, not handed to ``_scaled_mm``: with a scale per row
and per output it runs a kernel that costs 2-3x at a few rows (cuBLAS's own fp8 path takes only one
scale each, here 1). In the compiled decode step the rows' quantizing and the output's scaling fuse
into the kernels before and after the product.
"""

from __future__ import annotations

from typing import Any

import torch

from core.quantized_linears import replace_linears

__all__ = ["FP8", "KERNEL", "Fp8Linear", "dequantize", "quantize", "quantize_linears"]

FP8 = torch.float8_e4m3fn
KERNEL = "e4m3 a scale per output, cuBLAS's fp8 product"  # as the load's log names it
_LARGEST = float(torch.finfo(FP8).max)  # 448
_TINY = 1e-12  # a row or output of zeros: any scale will do, but not zero


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` as e4m3 ``[N, K]`` and its float32 scale per output ``[N]`` (rows going in: the
    same, a scale per row)."""
    scale = weight.float().abs().amax(1).clamp(min=_TINY) / _LARGEST
    return (weight.float() / scale[:, None]).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The full-width weight ``[N, K]`` of a quantized one."""
    return (weight.float() * scale[:, None]).to(dtype)


class Fp8Linear(torch.nn.Module):
    """A linear layer whose weight is e4m3 with a float32 scale per output."""

    weight: torch.Tensor
    scale: torch.Tensor
    one: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("one", torch.ones((), dtype=torch.float32, device=weight.device))
        self.bias: torch.nn.Parameter | None = (
            torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device: torch.device | str | None = None) -> Fp8Linear | None:
        """The fp8 copy of ``linear`` (on ``device``, else where it is); ``None`` for a shape cuBLAS's fp8
        product does not take (both sides a multiple of 16)."""
        out_features, in_features = linear.weight.shape
        if out_features % 16 or in_features % 16:
            return None
        weight = linear.weight.detach().to(device or linear.weight.device)
        bias = linear.bias.detach().to(weight.device) if linear.bias is not None else None
        return cls(*quantize(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, row_scale = quantize(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(rows, self.weight.t(), scale_a=self.one, scale_b=self.one, out_dtype=torch.float32)
        y = (y * row_scale[:, None] * self.scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def quantize_linears(model: Any, skip: list[str], device: torch.device | str | None = None) -> tuple[int, int]:
    """Replace the model's linears (outside ``skip``) by ``Fp8Linear`` on ``device``; (replaced, left full width)."""
    return replace_linears(model, skip, lambda _name, linear: Fp8Linear.from_linear(linear, device))
