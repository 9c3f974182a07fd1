"""Up to 16 rows times an int4 weight in tinygemm's layout, as one CUDA kernel on the tensor cores,
for batched decode steps.

Why: torch's own kernel for this layout (``aten._weight_int4pack_mm``, "tinygemm") multiplies with
the weight as the tensor cores' right-hand 16 x 8 operand and the rows as the left-hand 16 x 16 one.
A decode step's 1-8 rows fill at most half of that, and its cost doubles from one row to eight (61
to 146 us for a decoder layer's four weights on the H200): an 8-question step cost 1.8x a
one-question step. Three Triton kernels did no better (bench/RESULTS.md, sixth to tenth steps).

How: the operands swap. ``mma.m16n8k16`` takes 16 outputs of the weight as the left-hand operand
and up to 8 rows as the right-hand one, so 8 rows cost what one does. tinygemm's layout already
holds what that needs: a lane's int32 words of output block ``2i`` (outputs ``16i..16i+7``) are the
left-hand fragment's rows ``g``, and the same lane's words of block ``2i+1`` its rows ``g+8``
(``core.int4_weights.pack`` writes the layout down). So this kernel reads the one copy of the
weights that the prefill's unpack and tinygemm read; nothing is repacked.

Each program takes ``16 * tiles`` outputs and all inputs; its warps split the inputs 128 at a time
(one outer tile of the layout) and add up in shared memory at the end, so one launch writes the
finished bf16 rows. A warp copies its rows of an outer tile into shared memory with 16-byte loads
and reads them as the right-hand operand with ``ldmatrix``: straight from memory that operand takes
4-byte loads that touch a different line for every row, and at 8 rows those loads, not the weights,
set the pace. Nibbles become bf16 with the exponent trick (``0x4300 | q`` is ``128 + q``), then
``(q - 8) * scale + zero`` in one rounding, as ``core.int4_weights.dequantize`` computes the weight.

The source is compiled at load with NVRTC, which torch's CUDA wheels carry (no CUDA toolkit needed
on the GPU host), and checked against the unpacked weight before any layer uses it
(``core.int4_weights.use_mma_kernel``).
"""

from __future__ import annotations

import ctypes
from typing import Any, NamedTuple

import torch

__all__ = ["MAX_ROWS", "Kernels", "MmaConfig", "config_for", "int4_mma", "launch_shapes", "load", "supports"]

MAX_ROWS = 16  # a launch's rows: two right-hand operands of 8; more rows take a launch per 16


class MmaConfig(NamedTuple):
    warps: int  # warps a program, splitting the inputs between them
    tiles: int  # blocks of 16 outputs a program computes (each warp loads its rows once for all of them)
    unroll: int  # outer tiles whose weights a warp loads before it multiplies any of them
    stage: int = 0  # 1: rows copied to shared memory with 16-byte loads, read with ldmatrix


SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) Words { u32 w[4]; };  // a lane's four int32 of one outer tile (8 k-tiles of 16)

__device__ __forceinline__ u32 bf16x2_fma(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Two nibbles (bits 0-3 and 16-19 of w) as bf16 weights: 0x4300 | q is 128 + q exactly, minus 136 is
// q - 8 exactly, then one fused multiply-add by the group's scale and zero.
__device__ __forceinline__ u32 dequant(u32 w, u32 scale2, u32 zero2) {
  const u32 v = (w & 0x000F000Fu) | 0x43004300u;
  return bf16x2_fma(bf16x2_fma(v, 0x3F803F80u, 0xC308C308u), scale2, zero2);
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 a;
  asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }" : "=r"(a) : "l"(p));
  return a;
}

// Four 8 x 8 matrices of bf16 from shared memory, lanes 8j..8j+7 naming matrix j's rows: lane (g, t)
// gets row g, columns 2t and 2t+1 of each, the right-hand operand's fragment.
__device__ __forceinline__ void ldmatrix4(u32* r, const u16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)));
}

constexpr int STAGE_STRIDE = 128 + 8;  // bf16 a staged row: 272 bytes, so ldmatrix's 8 rows hit 8 bank quads

// y[m, n] = x[m, k] @ W[n, k]^T for m <= 8 * ROW_TILES, W in tinygemm's layout with 8 inner k-tiles:
// packed [n/8, k/128, 32 lanes, 4] int32, scales_zeros [k/GROUP, n] (scale, zero) bf16 pairs.
// STAGE: each warp copies its rows of an outer tile into shared memory with 16-byte loads and reads
// them with ldmatrix, instead of two 4-byte loads a row tile and k-tile straight from memory.
// (Where the stages would not fit in 48 KB of shared memory, 16 rows with 8 warps, it reads directly.)
template <int WARPS, int TILES, int UNROLL, int ROW_TILES, int GROUP, int STAGE_ASKED>
__global__ void __launch_bounds__(WARPS * 32) int4_mma(
    const u16* __restrict__ x, const Words* __restrict__ packed, const u32* __restrict__ scales_zeros,
    u16* __restrict__ y, int m, int n, int k) {
  constexpr int PARTS = TILES * ROW_TILES * 4;
  constexpr bool STAGE = STAGE_ASKED && WARPS * ROW_TILES * 8 * STAGE_STRIDE * 2 <= 48 * 1024;
  constexpr int STAGE_BYTES = STAGE ? WARPS * ROW_TILES * 8 * STAGE_STRIDE * 2 : 0;
  constexpr int SUM_BYTES = WARPS * PARTS * 32 * 4;
  __shared__ alignas(16) unsigned char shared[STAGE_BYTES > SUM_BYTES ? STAGE_BYTES : SUM_BYTES];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int outer_tiles = k >> 7;
  const int first_tile = blockIdx.x * TILES;
  float acc[TILES][ROW_TILES][4];
#pragma unroll
  for (int i = 0; i < TILES; ++i)
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][r][c] = 0.0f;
  // Rows past m read row m - 1 (their products are never written).
  const u16* rows[ROW_TILES];
#pragma unroll
  for (int r = 0; r < ROW_TILES; ++r) rows[r] = x + (long long)min(r * 8 + g, m - 1) * k + 2 * t;
  u16* stage = reinterpret_cast<u16*>(shared) + warp * ROW_TILES * 8 * STAGE_STRIDE;

  for (int start = warp; start < outer_tiles; start += WARPS * UNROLL) {
    Words lo[UNROLL][TILES], hi[UNROLL][TILES];  // output blocks 2i (rows g) and 2i+1 (rows g + 8)
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int outer = start + u * WARPS;
      if (outer < outer_tiles) {
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
          const long long block = 2LL * (first_tile + i);
          lo[u][i] = packed[(block * outer_tiles + outer) * 32 + lane];
          hi[u][i] = packed[((block + 1) * outer_tiles + outer) * 32 + lane];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int outer = start + u * WARPS;
      if (outer >= outer_tiles) break;
      if (STAGE) {
        // 16 lanes copy a row's 256 bytes: two rows a load
#pragma unroll
        for (int j = 0; j < ROW_TILES * 4; ++j) {
          const int row = j * 2 + (lane >> 4), column = (lane & 15) * 8;
          *reinterpret_cast<Words*>(stage + row * STAGE_STRIDE + column) =
              *reinterpret_cast<const Words*>(x + (long long)min(row, m - 1) * k + outer * 128 + column);
        }
        __syncwarp();
      }
      u32 scale_lo[TILES], zero_lo[TILES], scale_hi[TILES], zero_hi[TILES], staged[ROW_TILES][4];
#pragma unroll
      for (int kt = 0; kt < 8; ++kt) {
        const int kk = outer * 128 + kt * 16;
        if (kt % (GROUP / 16) == 0) {
#pragma unroll
          for (int i = 0; i < TILES; ++i) {
            const long long at = (long long)(kk / GROUP) * n + (first_tile + i) * 16 + g;
            const u32 sz_lo = scales_zeros[at], sz_hi = scales_zeros[at + 8];
            scale_lo[i] = __byte_perm(sz_lo, 0, 0x1010);
            zero_lo[i] = __byte_perm(sz_lo, 0, 0x3232);
            scale_hi[i] = __byte_perm(sz_hi, 0, 0x1010);
            zero_hi[i] = __byte_perm(sz_hi, 0, 0x3232);
          }
        }
        u32 b[ROW_TILES][2];
#pragma unroll
        for (int r = 0; r < ROW_TILES; ++r) {
          if (STAGE) {
            // one ldmatrix a row tile reads k-tiles kt and kt + 1: columns 0-7, 8-15 of each
            if ((kt & 1) == 0)
              ldmatrix4(staged[r], stage + (r * 8 + (lane & 7)) * STAGE_STRIDE + kt * 16 + (lane >> 3) * 8);
            b[r][0] = staged[r][(kt & 1) * 2];
            b[r][1] = staged[r][(kt & 1) * 2 + 1];
          } else {
            b[r][0] = *reinterpret_cast<const u32*>(rows[r] + kk);
            b[r][1] = *reinterpret_cast<const u32*>(rows[r] + kk + 8);
          }
        }
        // k-tile kt is word kt / 2 of the lane, nibbles 2 (kt % 2) (inputs 2t, 2t+1) and 2 (kt % 2) + 1 (+8)
        const int shift = (kt & 1) * 8;
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
          const u32 wl = lo[u][i].w[kt >> 1] >> shift, wh = hi[u][i].w[kt >> 1] >> shift;
          const u32 a0 = dequant(wl, scale_lo[i], zero_lo[i]);
          const u32 a1 = dequant(wh, scale_hi[i], zero_hi[i]);
          const u32 a2 = dequant(wl >> 4, scale_lo[i], zero_lo[i]);
          const u32 a3 = dequant(wh >> 4, scale_hi[i], zero_hi[i]);
#pragma unroll
          for (int r = 0; r < ROW_TILES; ++r) mma(acc[i][r], a0, a1, a2, a3, b[r][0], b[r][1]);
        }
      }
      if (STAGE) __syncwarp();  // all lanes have read the stage before the next outer tile overwrites it
    }
  }

  __syncthreads();  // the stages' memory becomes the partial sums'
  float (*partial)[PARTS][32] = reinterpret_cast<float (*)[PARTS][32]>(shared);
#pragma unroll
  for (int i = 0; i < TILES; ++i)
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) partial[warp][(i * ROW_TILES + r) * 4 + c][lane] = acc[i][r][c];
  __syncthreads();
  for (int e = threadIdx.x; e < PARTS * 32; e += WARPS * 32) {
    const int part = e >> 5, l = e & 31;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][part][l];
    const int c = part & 3, r = (part >> 2) % ROW_TILES, i = (part >> 2) / ROW_TILES;
    // c0, c1: output g, rows 2t and 2t+1; c2, c3: output g + 8
    const int row = r * 8 + 2 * (l & 3) + (c & 1);
    const int out = (first_tile + i) * 16 + (l >> 2) + (c >> 1) * 8;
    if (row < m) {
      u16 h;
      asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(sum));
      y[(long long)row * n + out] = h;
    }
  }
}
"""


def supports(packed: torch.Tensor, group: int) -> bool:
    """Whether a weight's layout is one the kernel reads: 8 inner k-tiles, outputs in blocks of 16, and
    groups of a whole number of k-tiles."""
    blocks, _outer, _lanes, pairs = packed.shape
    return pairs == 4 and blocks % 2 == 0 and group % 16 == 0


def config_for(n_out: int, rows: int) -> MmaConfig:
    """The launch shape for a weight of ``n_out`` outputs at ``rows`` rows. One rule for every weight,
    within 6 % of each weight's fastest shape on the H200 for GLM-4.6V's layer (51.8 against 49.0 us at
    one row, 55.3 against 54.3 at eight; ``bench/int4_kernels.py --mma``). From 3 rows on, rows go
    through shared memory (at 8 rows 48.8 us against 72.1 straight from memory, for the layer's four
    largest weights: the rows' 4-byte loads touch a line each); at 9-16 two blocks of outputs a
    program share them."""
    if rows <= 2:
        config = MmaConfig(warps=8, tiles=1, unroll=1, stage=0)
    else:
        config = MmaConfig(warps=8, tiles=1 if rows <= 8 else 2, unroll=1, stage=1)
    while (n_out // 16) % config.tiles:
        config = config._replace(tiles=config.tiles // 2)
    return config


def _kernel_name(config: MmaConfig, row_tiles: int, group: int) -> str:
    return f"int4_mma<{config.warps}, {config.tiles}, {config.unroll}, {row_tiles}, {group}, {config.stage}>"


class Kernels:
    """The kernel compiled for this GPU, one instance per launch shape, row tiles and group size."""

    def __init__(self, configs: list[MmaConfig], groups: tuple[int, ...] = (128,)) -> None:
        major, minor = torch.cuda.get_device_capability()
        names = [_kernel_name(c, r, g) for c in configs for r in (1, 2) for g in groups]
        self._kernels = _compile(SOURCE, names, f"{major}{minor}")

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                 config: MmaConfig | None = None) -> torch.Tensor:
        """``x [m, k] @ W^T`` as bf16 ``[m, n]``: one launch for each ``MAX_ROWS`` rows. (Each launch
        reads the whole weight: past a few launches, unpacking it once costs less.)"""
        m, k = x.shape
        n = packed.shape[0] * 8
        if x.data_ptr() % 16:  # a view into the middle of a tensor: the staged loads take 16 bytes at a time
            x = x.clone()
        y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
        for start in range(0, m, MAX_ROWS):
            # (rows of k and n bf16, multiples of 128 and 16: every slice starts 16-byte aligned)
            rows = min(MAX_ROWS, m - start)  # the kernel reads row rows - 1 for those past it, writes none
            launch = config or config_for(n, rows)
            kernel = self._kernels[_kernel_name(launch, 1 if rows <= 8 else 2, group)]
            kernel(grid=(n // (16 * launch.tiles), 1, 1), block=(launch.warps * 32, 1, 1),
                   args=[x[start:start + rows], packed, scales_zeros, y[start:start + rows], rows, n, k])
        return y


_loaded: Kernels | None = None


def load(weights: set[tuple[int, int]]) -> None:
    """Compile the kernel for every launch shape that weights of these ``(outputs, group)`` take, on
    the current GPU; ``int4_mma`` launches them from then on."""
    global _loaded
    _loaded = Kernels(launch_shapes(weights), tuple(sorted({group for _n, group in weights})))


def launch_shapes(weights: set[tuple[int, int]]) -> list[MmaConfig]:
    """Every launch shape ``config_for`` picks for weights of these ``(outputs, group)``."""
    return sorted({config_for(n, rows) for n, _group in weights for rows in range(1, MAX_ROWS + 1)})


@torch.library.custom_op("imsight::int4_mma", mutates_args=(), device_types="cuda")
def int4_mma(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """``x [m, k]`` times an int4 weight in tinygemm's layout, as bf16 ``[m, n]``. An operator
    of its own so that compiled decode steps call it as one opaque kernel (dynamo cannot trace ctypes)."""
    if _loaded is None:
        raise RuntimeError("int4_mma: the kernel is not compiled (core.int4_mma.load)")
    return _loaded(x.contiguous(), packed, scales_zeros, group)


@int4_mma.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * 8)


@int4_mma.register_kernel("cpu")
def _(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    # What the kernel computes, the slow way: the CPU tests run the operator's path through
    # Int4Linear and a compiled step with it.
    from core.int4_weights import dequantize

    return torch.nn.functional.linear(x, dequantize(packed, scales_zeros, group, x.dtype))


def _compile(source: str, names: list[str], arch: str) -> dict[str, Any]:
    """The kernels ``names`` (template instances of ``source``), compiled by NVRTC for ``sm_{arch}``.

    torch's ``torch.cuda._compile_kernel`` compiles one name a program and asks for a CUDA toolkit's
    headers; this source needs none, so it calls NVRTC itself and loads the module through torch."""
    from torch.cuda._utils import _cuda_load_module, _get_gpu_rtc_library

    nvrtc = _get_gpu_rtc_library()

    def check(result: int) -> None:
        if result != 0:
            message = ctypes.c_char_p()
            nvrtc.nvrtcGetErrorString(result, ctypes.byref(message))
            raise RuntimeError(f"NVRTC: {message.value.decode() if message.value else result}")

    program = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"int4_mma.cu", 0, None, None))
    try:
        for name in names:
            check(nvrtc.nvrtcAddNameExpression(program, name.encode()))
        options = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17"]
        result = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        if result != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, text)
            raise RuntimeError(f"NVRTC could not compile the int4 kernel:\n{text.value.decode()}")
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(program, cubin))
        lowered = {}
        for name in names:
            mangled = ctypes.c_char_p()
            check(nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(mangled)))
            assert mangled.value is not None
            lowered[name] = mangled.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    loaded = _cuda_load_module(cubin.raw, list(lowered.values()))
    assert isinstance(loaded, dict)
    return {name: loaded[mangled] for name, mangled in lowered.items()}
