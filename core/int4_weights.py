"""Group-wise int4 weights for the language model's linears: torch's own int4 kernel for decode,
dequantize + matmul for prefill, from one copy of the weights.

Why not only bitsandbytes: its NF4 mat-vec reads weights at about half of the GPU's bandwidth, and
for more than one row it dequantizes the whole weight every call, so a decode step of 8 questions
costs 2.6x one of a single question (bench/RESULTS.md). torch's "tinygemm" kernel
(``aten._weight_int4pack_mm``, what gpt-fast and torchao's int4 weight-only use) reads them at
twice the rate, but its cost doubles from 1 row to 8, and at prefill sizes it is 18x slower than a
dequantize + cuBLAS matmul. So each linear keeps one copy, in tinygemm's tiled layout, and reads it
three ways: for decode steps and short prefills (follow-ups' tails), up to ``MMA_ROWS`` rows, with
imsight's own CUDA kernel (``core.int4_mma``: 8 rows cost 1.1x one, not 2.4x; ``use_mma_kernel``),
for up to ``KERNEL_ROWS`` with tinygemm (where that kernel cannot compile), and for more unpacked to
a full-width weight (on a GPU with one Triton kernel, ``core.int4_unpack_gpu``).

The tiled layout is written down here (``pack``/``unpack``) after ``matrix_to_m16n8k16_Bint4_layout``
in PyTorch's ``int4mm.cu``: an int32 tensor ``[N/8, K/(tiles*16), 32, tiles/2]`` where lane ``t``
of an 8 x (tiles*16) block holds row ``t // 4`` and, per int32, eight values of two k-tiles. The
tests check it against a line-by-line port of that kernel, ``bench/int4_kernels.py`` against torch's
own packer on the GPU, and every load once more (``torch_layout_agrees``). Values are affine per
group of ``group`` inputs, as tinygemm takes them: ``w = (q - 8) * scale + zero`` with ``q`` in 0..15
and ``[groups, N, 2]`` scales and zeros.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from core import int4_mma
from core.quantized_linears import linear_names, replace_linears

__all__ = ["KEPT_KERNEL_ROWS", "KERNEL", "KERNEL_ROWS", "MMA_ROWS", "UNPACKED_BYTES", "Int4Linear", "dequantize",
           "fuse_unpacking", "keep_unpacked", "pack", "quantize", "quantize_linears", "stored_fits",
           "torch_layout_agrees", "unpack", "unpacked_bytes", "use_mma_kernel"]

log = logging.getLogger(__name__)

KERNEL = "group-wise, in torch's int4 layout"  # as the load's log names it
KERNEL_ROWS = 16  # up to this many rows tinygemm beats unpack + matmul (bench/int4_kernels.py --rows: ~22)
_GROUPS = (128, 64, 32)  # tinygemm takes 32..256; 128 is gpt-fast's and torchao's default
_TILES = (8, 4, 2)  # inner k-tiles: 8 gives the kernel 16-byte loads
# A prefill unpacks a weight a slice of outputs at a time, at most this big: GLM-4.6V-Flash's gate/up
# weight whole is 224 MB in bf16, most of what one question adds to the GPU's peak over the weights
# (measured on the H200: 10.64 GB peak with one question unpacked whole, 10.51 sliced; the GPU time
# of the prefill the same, 69-70 ms).
UNPACKED_BYTES = 64 * 2**20
# Up to this many rows imsight's kernel, a launch per 16 rows, beats both tinygemm and unpacking: each
# launch reads the weight once, unpacking reads it once and writes it 4x wider. A decoder layer's six
# weights on the H200 (bench/int4_kernels.py --rows): 156 us at 32 rows (tinygemm 471, unpacking 347),
# 312 at 64 (358), 390 at 80 (356).
MMA_ROWS = 64
# Where a weight is also kept unpacked (``keep_unpacked``), cuBLAS reads that copy straight away: a decoder layer's
# six weights on the H200 in 114-139 us at 8-128 rows, against imsight's kernel's 55 at 8 rows, 78 at 16 and 135
# at 24 (bench/int4_kernels.py --rows). So the kernel takes up to 16 rows there.
KEPT_KERNEL_ROWS = 16


def quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` as 4-bit values ``[N, K]`` (uint8, 0..15) and ``[K/group, N, 2]`` scales and zeros."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scales = (high - low).clamp(min=1e-6) / 15
    q = ((w - low) / scales).round_().clamp_(0, 15).to(torch.uint8).reshape(out_features, in_features)
    zeros = low + scales * 8  # tinygemm's zero is a float, at q = 8
    scales_zeros = torch.cat([scales, zeros], -1).transpose(0, 1).contiguous()
    return q, scales_zeros


def pack(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """4-bit values ``[N, K]`` in tinygemm's tiled int32 layout (what ``_convert_weight_to_int4pack`` makes)."""
    n, k = q.shape
    # k = outer*tiles*16 + pair*32 + i*8 + c*2 + odd, and lane t = r*4 + c for row n = block*8 + r
    blocks = q.reshape(n // 8, 8, k // (tiles * 16), tiles // 2, 4, 4, 2)
    lanes = blocks.permute(0, 2, 1, 5, 3, 6, 4)  # -> [block, outer, r, c, pair, odd, i]
    nibbles = lanes.reshape(n // 8, k // (tiles * 16), 32, tiles // 2, 4, 2)  # nibble s = odd*4 + i, two a byte
    packed_bytes = (nibbles[..., 0] | nibbles[..., 1] << 4).contiguous()
    return packed_bytes.view(torch.int32).reshape(_packed_shape(n, k, tiles))


def _packed_shape(n: int, k: int, tiles: int) -> tuple[int, int, int, int]:
    """The shape ``pack`` writes a ``[n, k]`` weight in."""
    return n // 8, k // (tiles * 16), 32, tiles // 2


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values ``[N, K]`` (uint8) of a weight in tinygemm's tiled layout; ``pack``'s inverse."""
    blocks, outer, _lanes, pairs = packed.shape
    packed_bytes = packed.contiguous().view(torch.uint8).reshape(blocks, outer, 32, pairs, 4, 1)
    nibbles = torch.cat([packed_bytes & 15, packed_bytes >> 4], -1)  # [..., byte, low/high]: nibble s = byte*2 + high
    lanes = nibbles.reshape(blocks, outer, 8, 4, pairs, 2, 4)  # [block, outer, r, c, pair, odd, i]
    return lanes.permute(0, 2, 1, 4, 6, 3, 5).reshape(blocks * 8, outer * pairs * 2 * 16)


def dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The full-width weight ``[N, K]`` of a packed one, as tinygemm computes it."""
    q = unpack(packed)
    n, k = q.shape
    scales_zeros = scales_zeros.to(dtype)
    scales = scales_zeros[..., 0].t().unsqueeze(-1)  # [N, groups, 1]
    zeros = scales_zeros[..., 1].t().unsqueeze(-1)
    return torch.addcmul(zeros, q.reshape(n, k // group, group).to(dtype) - 8, scales).reshape(n, k)


class Int4Linear(torch.nn.Module):
    """A linear layer whose weight is 4-bit, group-wise affine, in tinygemm's tiled layout."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, bias: torch.Tensor | None,
                 *, in_features: int, kernel: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, packed.shape[0] * 8, group
        self.kernel = kernel  # tinygemm runs here (a CUDA GPU of compute capability 8.0 or later)
        self.mma = False  # imsight's kernel takes up to MMA_ROWS rows (use_mma_kernel)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias: torch.nn.Parameter | None = (
            torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None)
        self._full_width: Callable[..., torch.Tensor] = dequantize
        # The weight unpacked once and kept (``keep_unpacked``: memory traded for prefill speed), else None.
        self.register_buffer("unpacked", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device: torch.device | str | None = None) -> Int4Linear | None:
        """The int4 copy of ``linear`` (on ``device``, else where it is); ``None`` when its shape does not tile."""
        out_features, in_features = linear.weight.shape
        layout = _layout(out_features, in_features)
        if layout is None:
            return None
        group, tiles = layout
        weight = linear.weight.detach().to(device or linear.weight.device)
        q, scales_zeros = quantize(weight, group)
        kernel = _kernel_runs(weight.device)
        bias = linear.bias.detach().to(weight.device) if linear.bias is not None else None
        return cls(pack(q, tiles), scales_zeros.to(torch.bfloat16 if kernel else weight.dtype), group, bias,
                   in_features=in_features, kernel=kernel)

    @classmethod
    def from_stored(cls, linear: torch.nn.Linear, stored: dict[str, torch.Tensor],
                    device: torch.device | str | None = None) -> Int4Linear:
        """The int4 copy of ``linear`` from what ``from_linear`` made of it before (``packed`` and ``scales_zeros``,
        kept by ``core.int4_cache``; ``stored_fits`` checks their shapes), on ``device``, else where it is."""
        where = torch.device(device or linear.weight.device)
        packed, scales_zeros = stored["packed"].to(where), stored["scales_zeros"].to(where)
        bias = linear.bias.detach().to(where) if linear.bias is not None else None
        in_features = linear.weight.shape[1]
        return cls(packed, scales_zeros, in_features // scales_zeros.shape[0], bias, in_features=in_features,
                   kernel=_kernel_runs(where))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        kept = self.unpacked is not None and self.unpacked.dtype == x.dtype
        if self.mma and x.dtype == torch.bfloat16 and rows <= (KEPT_KERNEL_ROWS if kept else MMA_ROWS):
            y: torch.Tensor = torch.ops.imsight.int4_mma(flat, self.packed, self.scales_zeros, self._group())
        elif self.kernel and x.dtype == torch.bfloat16 and rows <= KERNEL_ROWS:
            y = torch.ops.aten._weight_int4pack_mm(flat.contiguous(), self.packed, self._group(), self.scales_zeros)
        elif kept:
            return F.linear(x, self.unpacked, self.bias)
        else:
            return self._unpacked_linear(x)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y + self.bias if self.bias is not None else y

    def _unpacked_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the weight unpacked to ``x``'s dtype, at most ``UNPACKED_BYTES`` of it at a time."""
        blocks, outer, _lanes, pairs = self.packed.shape  # shapes, not attributes: constants to dynamo
        step = max(1, UNPACKED_BYTES // (8 * outer * pairs * 32 * x.element_size()))  # blocks of 8 outputs
        # Each slice's product straight into its columns of the output (cuBLAS writes a column slice in place):
        # concatenating the products afterwards copied the whole output again, GLM's gate/up projection's ~63 MB
        # for a screenshot prompt, and held it twice. Compiled layers keep the concatenation (inductor plans it).
        flat = x.reshape(-1, x.shape[-1])
        into = None if step >= blocks or torch.compiler.is_compiling() else torch.empty(
            flat.shape[0], blocks * 8, dtype=x.dtype, device=x.device)
        parts = []
        for start in range(0, blocks, step):
            outputs = slice(start * 8, (start + step) * 8)
            # (views of the packed weight and of its scales: no copies)
            weight = self._full_width(self.packed[start:start + step], self.scales_zeros[:, outputs], self._group(),
                                      x.dtype)
            bias = None if self.bias is None else self.bias[outputs]
            if into is None:
                parts.append(F.linear(x, weight, bias))
            elif bias is None:
                torch.mm(flat, weight.t(), out=into[:, outputs])
            else:
                torch.addmm(bias, flat, weight.t(), out=into[:, outputs])
        if into is not None:
            return into.view(*x.shape[:-1], into.shape[-1])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _group(self) -> int:
        # From the buffers' shapes, not an int attribute: under the compiled decode step dynamo treats
        # modules' ints as symbolic, and the kernel's group size must be a constant.
        blocks_of_k = self.packed.shape[1] * self.packed.shape[3] * 32
        return int(blocks_of_k // self.scales_zeros.shape[0])

    def fuse_unpacking(self, fused: Callable[..., torch.Tensor]) -> None:
        """Unpack with ``fused`` (one kernel instead of ``dequantize``'s eight)."""
        self._full_width = fused

    def keep_unpacked(self) -> None:
        """Unpack the weight once, as a prefill would, and keep it: prefills read it instead of unpacking
        again. The same values; a weight unpacked a slice at a time (over ``UNPACKED_BYTES``) is then multiplied
        in one GEMM instead of one a slice, which cuBLAS may round differently (3.3e-3 of the largest output
        at worst either way, ``bench/int4_kernels.py --rows``)."""
        self.unpacked = self._full_width(self.packed, self.scales_zeros, self._group(), self.scales_zeros.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"

    @classmethod
    def stacked(cls, layers: list[Int4Linear]) -> Int4Linear | None:
        """One weight holding ``layers``' outputs one after another (their product is theirs concatenated), for
        layers that multiply the same input; ``None`` where they differ in width, group, layout or kernels.
        Each output's product is the same arithmetic as before: the kernels work on blocks of outputs."""
        first = layers[0]
        alike = {(m.in_features, m.group, m.packed.shape[1:], m.packed.dtype, m.scales_zeros.dtype, m.kernel, m.mma,
                  m._full_width, m.bias is None, m.unpacked is None, m.packed.device) for m in layers}
        if len(alike) != 1:
            return None
        bias = None if first.bias is None else torch.cat([m.bias.detach() for m in layers if m.bias is not None])
        merged = cls(torch.cat([m.packed for m in layers]), torch.cat([m.scales_zeros for m in layers], dim=1),
                     first.group, bias, in_features=first.in_features, kernel=first.kernel)
        merged.mma, merged._full_width = first.mma, first._full_width
        if first.unpacked is not None:
            merged.unpacked = torch.cat([m.unpacked for m in layers if m.unpacked is not None])
        return merged


def _layout(out_features: int, in_features: int) -> tuple[int, int] | None:
    """A weight's group size and inner k-tiles, or ``None`` where its shape does not tile (it stays full width)."""
    group = next((g for g in _GROUPS if in_features % g == 0), None)
    tiles = next((t for t in _TILES if in_features % (t * 16) == 0), None)
    return None if group is None or tiles is None or out_features % 8 else (group, tiles)


def _kernel_runs(device: torch.device) -> bool:
    """Whether tinygemm runs here: a CUDA GPU of compute capability 8.0 or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def stored_fits(model: Any, skip: list[str], stored: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether ``stored`` holds, for exactly the linears ``quantize_linears`` would quantize, a packed weight and
    scales of their shapes."""
    quantized = 0
    for name in linear_names(model, skip):
        out_features, in_features = model.get_submodule(name).weight.shape
        layout, entry = _layout(out_features, in_features), stored.get(name)
        if layout is None or entry is None:
            if layout is not None or entry is not None:
                return False
            continue
        group, tiles = layout
        shapes = {"packed": _packed_shape(out_features, in_features, tiles),
                  "scales_zeros": (in_features // group, out_features, 2)}  # (as ``quantize`` writes them)
        if {part: tuple(tensor.shape) for part, tensor in entry.items()} != shapes:
            return False
        quantized += 1
    return quantized == len(stored)


def quantize_linears(model: Any, skip: list[str], device: torch.device | str | None = None, *,
                     stored: dict[str, dict[str, torch.Tensor]] | None = None) -> tuple[int, int]:
    """Replace the model's linears (outside ``skip``) by ``Int4Linear`` on ``device``; (replaced, left full width).
    ``stored``: what a start before made of them (``core.int4_cache``, checked by ``stored_fits``), taken as it is."""
    def convert(name: str, linear: torch.nn.Linear) -> Int4Linear | None:
        if stored is None:
            return Int4Linear.from_linear(linear, device)
        return Int4Linear.from_stored(linear, stored[name], device) if name in stored else None

    replaced, kept = replace_linears(model, skip, convert)
    kernels = [m for m in model.modules() if isinstance(m, Int4Linear) and m.kernel]
    if kernels and not torch_layout_agrees(kernels[0].packed.device):
        # tinygemm would read these weights wrongly: every answer would be noise. Correct and slower.
        log.warning("int4: this torch's int4 kernel packs weights differently from imsight's layout; "
                    "decoding unpacks every weight instead (slower; quantization = \"nf4\" is faster here)")
        for layer in kernels:
            layer.kernel = False
    fuse_unpacking(model)
    use_mma_kernel(model)
    return replaced, kept


def unpacked_bytes(model: Any) -> int:
    """What ``keep_unpacked`` adds: each int4 weight at the width of its scales (the model's dtype)."""
    return sum(m.out_features * m.in_features * m.scales_zeros.element_size()
               for m in model.modules() if isinstance(m, Int4Linear))


def keep_unpacked(model: Any) -> int:
    """Keep every int4 weight unpacked as well (``[engine] unpacked_weights``): a prefill of a first question or
    of a follow-up's tail then skips unpacking each weight (on the H200 with GLM-4.6V-Flash ~7.5 ms a prefill,
    at ~2 bytes a weight more). Decode steps still read the 4-bit copy. Returns the bytes kept."""
    for layer in model.modules():
        if isinstance(layer, Int4Linear):
            layer.keep_unpacked()
    return unpacked_bytes(model)


def torch_layout_agrees(device: torch.device | str, packer: Callable[..., torch.Tensor] | None = None) -> bool:
    """Whether torch's own packer (``_convert_weight_to_int4pack``, the layout its int4 kernel reads)
    writes what ``pack`` writes. Checked once at load: a torch upgrade could change the layout."""
    if packer is None:
        if torch.device(device).type != "cuda":
            return False  # other backends pack for their own kernels (the CPU's layout differs)
        packer = torch.ops.aten._convert_weight_to_int4pack
    q = torch.randint(0, 16, (16, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)).to(device)
    try:
        theirs = packer((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
    except RuntimeError:  # this GPU or build has no int4 packer
        return False
    ours = pack(q, 8)
    return theirs.shape == ours.shape and torch.equal(theirs, ours)


def fuse_unpacking(model: Any) -> None:
    """On a GPU, unpack with one Triton kernel (``core.int4_unpack_gpu``), once it has unpacked one weight
    exactly as the torch ops do; with the torch ops where Triton is missing or disagrees."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.kernel]
    if not layers:
        return
    try:
        from core.int4_unpack_gpu import dequantize_gpu

        probe = layers[0]
        agrees = True
        # The whole weight, and a slice of its outputs as ``_unpacked_linear`` takes one (its scales a view).
        probes = [(probe.packed, probe.scales_zeros)]
        if probe.packed.shape[0] > 1:  # (blocks of 8 outputs)
            probes.append((probe.packed[1:2], probe.scales_zeros[:, 8:16]))
        for packed, scales_zeros in probes:
            fused = dequantize_gpu(packed, scales_zeros, probe.group, torch.bfloat16).float()
            ref = dequantize(packed, scales_zeros, probe.group, torch.bfloat16).float()
            agrees &= bool((fused - ref).abs().max() <= 1e-3 * ref.abs().max())  # a wrong layout: off by steps
    except Exception as exc:  # no Triton, or a Triton that cannot build the kernel for this GPU
        log.info("int4: the Triton unpack is unavailable here (%s); prefill unpacks with torch ops (slower)", exc)
        return
    if not agrees:
        log.warning("int4: the Triton unpack disagrees with the torch ops here; prefill unpacks with torch ops")
        return
    for layer in layers:
        layer.fuse_unpacking(dequantize_gpu)


def use_mma_kernel(model: Any) -> None:
    """On a GPU, let decode steps and short prefills multiply with imsight's CUDA kernel (``core.int4_mma``),
    once it has compiled and matched the unpacked weight on each shape; with tinygemm where it cannot."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.kernel]
    device = layers[0].packed.device if layers else None
    fits = [m for m in layers if m.packed.device == device and int4_mma.supports(m.packed, m.group)]
    if not fits:
        return
    began = time.perf_counter()
    try:
        with torch.cuda.device(device):
            int4_mma.load({(m.out_features, m.group) for m in fits})
            worst = max(_mma_error(m, rows) for m in {(m.out_features, m.group): m for m in fits}.values()
                        for rows in (1, 5, int4_mma.MAX_ROWS, MMA_ROWS - 3))  # (the last: a launch per 16)
    except Exception as exc:  # no NVRTC, a GPU it cannot build for, a driver that cannot load it
        log.warning("int4: imsight's decode kernel is unavailable here (%s); decode steps use torch's int4 kernel "
                    "(several questions at once decode ~1.6x slower)", exc)
        return
    if worst > 2e-2:  # rounding is ~3e-3 of the largest output; a misread layout is off by whole steps
        log.warning("int4: imsight's decode kernel disagrees with the unpacked weight here (error %.1e); "
                    "decode steps use torch's int4 kernel", worst)
        return
    for layer in fits:
        layer.mma = True
    log.info("int4: up to %d rows multiply with imsight's CUDA kernel (%d of %d weights; "
             "compiled and checked in %.1f s)", MMA_ROWS, len(fits), len(layers), time.perf_counter() - began)


def _mma_error(layer: Int4Linear, rows: int) -> float:
    """``core.int4_mma``'s product for ``rows`` random rows against the unpacked weight's, relative to its
    largest value."""
    generator = torch.Generator(layer.packed.device).manual_seed(rows)
    x = torch.randn(rows, layer.in_features, device=layer.packed.device, generator=generator).to(torch.bfloat16)
    ours = torch.ops.imsight.int4_mma(x, layer.packed, layer.scales_zeros, layer.group).float()
    weight = dequantize(layer.packed, layer.scales_zeros, layer.group, torch.bfloat16)
    ref = F.linear(x.float(), weight.float())
    return float((ours - ref).abs().max() / ref.abs().max())
