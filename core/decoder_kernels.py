"""GLM-4V's decoder layer between its matrix products, in four Triton kernels: the RMSNorm before
attention, the two residual adds with the norms around them, the MLP's gate, and the rotary of the
query and key.

Why: through transformers' eager ops a layer launches ~65 small kernels (each RMSNorm alone is eight),
so the engine compiled the layers with ``torch.compile`` to fuse them: dynamo traces the layers anew
in every process, ~60 s of each restart before the decode step is at full speed. These kernels fuse
the same work by hand, so a layer is the same handful of kernels with nothing to compile or trace.

Each kernel rounds where the eager ops round (to the tensors' dtype after every op), so it computes
what transformers' layer computes; only the norms' sums of squares may add up in another order.

The vision encoder's blocks (``core.glm_vision``) use the same norms and gate, with its own rotary
(``core.vision_kernels``).

Imported only where Triton is (a CUDA build of torch, or the CPU tests under Triton's interpreter);
``core.glm_decoder`` decides when they are used and has the same ops in torch for the rest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["add_rms_norm", "rms_norm", "rotated_qk", "silu_mul"]

ELEMENTS = 1024  # a program's share of the gate's outputs


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _normed(x, w, n, eps, dt: tl.constexpr) -> tl.tensor:  # type: ignore[no-untyped-def]
    """``w * (x / rms(x))`` as Glm4vRMSNorm rounds it: to ``dt`` before the weight, and after."""
    variance = tl.sum(x * x, axis=0) / n
    return (w * (x * tl.math.rsqrt(variance + eps)).to(dt).to(tl.float32)).to(dt)


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _rms_norm(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr) -> None:  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, _normed(x, w, n, eps, out_ptr.dtype.element_ty), mask=inside)


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _add_rms_norm(x_ptr, res_ptr, w_ptr, next_ptr, sum_ptr, out_ptr, n, eps,  # type: ignore[no-untyped-def]
                  NORM_X: tl.constexpr, NEXT: tl.constexpr, BLOCK: tl.constexpr) -> None:
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n
    dt = sum_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * n + cols, mask=inside, other=0.0).to(tl.float32)
    residual = tl.load(res_ptr + row * n + cols, mask=inside, other=0.0).to(tl.float32)
    if NORM_X:
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        x = _normed(x, w, n, eps, dt).to(tl.float32)
    total = (residual + x).to(dt)
    tl.store(sum_ptr + row * n + cols, total, mask=inside)
    if NEXT:
        w_next = tl.load(next_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, _normed(total.to(tl.float32), w_next, n, eps, dt), mask=inside)


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _silu_mul(gate_ptr, up_ptr, out_ptr, n, stride, BLOCK: tl.constexpr) -> None:  # type: ignore[no-untyped-def]
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n
    dt = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (up * silu).to(dt), mask=inside)


@triton.jit  # type: ignore[untyped-decorator,unused-ignore]
def _rotated_qk(product_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, row_width, heads, kv_heads,  # type: ignore[no-untyped-def]
                width, DIM: tl.constexpr) -> None:
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)  # heads: the query's, then the key's
    d = tl.arange(0, DIM)
    source = product_ptr + token * row_width + head * DIM
    x = tl.load(source + d).to(tl.float32)
    # GLM's rotate_half_llm on interleaved pairs: (-x1, x0, -x3, x2, ...) over the rotated part.
    partner = tl.load(source + (d ^ 1)).to(tl.float32)
    half = tl.where(d % 2 == 0, -partner, partner)
    rotary = d < width
    cos = tl.load(cos_ptr + token * width + d, mask=rotary, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * width + d, mask=rotary, other=0.0).to(tl.float32)
    dt = q_ptr.dtype.element_ty
    turned = ((x * cos).to(dt).to(tl.float32) + (half * sin).to(dt).to(tl.float32)).to(dt)
    out = tl.where(rotary, turned, x.to(dt))
    if head < heads:
        tl.store(q_ptr + (token * heads + head) * DIM + d, out)
    else:
        tl.store(k_ptr + (token * kv_heads + head - heads) * DIM + d, out)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Glm4vRMSNorm over the last dimension."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    _rms_norm[(_rows(x),)](x, weight, out, n, eps, BLOCK=triton.next_power_of_2(n))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``residual + norm(x) * weight`` (``residual + x`` where ``weight`` is None: a block without a norm after
    its attention, as the vision encoder's), and that sum normed by ``next_weight`` where given (else ``None``)."""
    x, residual = x.contiguous(), residual.contiguous()
    total = torch.empty_like(residual)
    out = torch.empty_like(residual) if next_weight is not None else None
    n = x.shape[-1]
    # (``residual`` stands in for a weight that is not there: a pointer the kernel never reads)
    _add_rms_norm[(_rows(x),)](x, residual, weight if weight is not None else residual,
                               next_weight if next_weight is not None else residual, total,
                               out if out is not None else total, n, eps, NORM_X=weight is not None,
                               NEXT=next_weight is not None, BLOCK=triton.next_power_of_2(n))
    return total, out


def silu_mul(gate_up: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """The second half of the last dimension times SiLU of the first, as Glm4vTextMLP computes it; where ``up``
    is given, ``up`` times SiLU of ``gate_up`` (the gate alone), as the vision encoder's MLP computes it."""
    gate_up = gate_up.contiguous()
    if up is None:
        n = gate_up.shape[-1] // 2
        gate, up, stride = gate_up, gate_up[..., n:], 2 * n
    else:
        gate, up, n = gate_up, up.contiguous(), gate_up.shape[-1]
        stride = n
        assert up.shape == gate.shape, (up.shape, gate.shape)
    out = torch.empty((*gate.shape[:-1], n), dtype=gate.dtype, device=gate.device)
    _silu_mul[(_rows(gate), triton.cdiv(n, ELEMENTS))](gate, up, out, n, stride, BLOCK=ELEMENTS)
    return out


def rotated_qk(product: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
               dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key heads of ``product`` (``[..., tokens, (heads + 2 kv_heads) * dim]``, the value's
    last) rotated by ``cos``/``sin`` (``[..., tokens, width]``) over each head's first ``width``: new
    ``[..., tokens, heads, dim]`` and ``[..., tokens, kv_heads, dim]`` tensors."""
    product = product.contiguous()
    lead = product.shape[:-1]
    cos, sin = (c.expand(*lead, c.shape[-1]).contiguous() for c in (cos, sin))
    q = torch.empty((*lead, heads, dim), dtype=product.dtype, device=product.device)
    k = torch.empty((*lead, kv_heads, dim), dtype=product.dtype, device=product.device)
    _rotated_qk[(_rows(product), heads + kv_heads)](product, cos, sin, q, k, product.shape[-1], heads, kv_heads,
                                                    cos.shape[-1], DIM=dim)
    return q, k
