"""imsight's decoder-layer kernels (``core.decoder_kernels``) against transformers' eager ops, on a GPU.

For GLM-4.6V-Flash's widths in bf16 at 1, 8 and 1,152 rows (a decode step, eight, a screenshot prompt):
how many outputs differ from the eager ops' and by how much (the kernels round where the eager ops round,
so only the sums inside the norms and the rotary may add up in another order), and each kernel's time
against the eager ops', replayed from a CUDA graph as a decode step runs them (``int4_kernels.graph_timed``).

    python bench/decoder_kernels.py
    python bench/decoder_kernels.py --quick   # Triton's interpreter on the CPU, small widths (a check of the script)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from int4_kernels import graph_timed

EPS = 1e-5


class Widths(NamedTuple):
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    dim: int


GLM_4_6V_FLASH = Widths(4096, 13696, 32, 2, 128)


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # Glm4vRMSNorm.forward
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def differ(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    wrong = (ours != theirs).sum().item()
    worst = (ours.float() - theirs.float()).abs().max().item() / theirs.float().abs().max().item()
    return f"{wrong} of {theirs.numel()} differ (largest {worst:.1e} of the largest value)"


def compare(rows: int, widths: Widths, **tensor: Any) -> None:
    from core import decoder_kernels as kernels
    from core.text_rotary import _rotated

    hidden, heads, kv_heads, dim = widths.hidden, widths.heads, widths.kv_heads, widths.dim
    w, w2 = torch.randn(hidden, **tensor) * 0.1 + 1, torch.randn(hidden, **tensor) * 0.1 + 1
    print(f"{rows} rows:")
    x, residual = torch.randn(1, rows, hidden, **tensor), torch.randn(1, rows, hidden, **tensor)
    gate_up = torch.randn(1, rows, 2 * widths.intermediate, **tensor)
    product = torch.randn(1, rows, (heads + 2 * kv_heads) * dim, **tensor)
    angles = torch.randn(1, rows, dim // 2, device=tensor["device"])
    cos, sin = angles.cos().to(tensor["dtype"]), angles.sin().to(tensor["dtype"])

    def eager_add() -> tuple[torch.Tensor, torch.Tensor]:
        total = residual + rms(x, w)
        return total, rms(total, w2)

    def eager_gate() -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * torch.nn.functional.silu(gate)

    def eager_rotary() -> tuple[torch.Tensor, torch.Tensor]:
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        q = product[..., :heads * dim].view(1, rows, heads, dim)
        k = product[..., heads * dim:(heads + kv_heads) * dim].view(1, rows, kv_heads, dim)
        return _rotated(q, c, s), _rotated(k, c, s)

    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("rms_norm", lambda: kernels.rms_norm(x, w, EPS), lambda: rms(x, w)),
        ("add_rms_norm (two norms)", lambda: kernels.add_rms_norm(x, residual, w, EPS, w2), eager_add),
        ("silu_mul", lambda: kernels.silu_mul(gate_up), eager_gate),
        ("rotated_qk", lambda: kernels.rotated_qk(product, cos, sin, heads, kv_heads, dim), eager_rotary),
    ]
    for name, ours, theirs in cases:
        got, want = ours(), theirs()
        pairs = zip(got, want, strict=True) if isinstance(got, tuple) else [(got, want)]
        checks = "; ".join(differ(a, b) for a, b in pairs)  # type: ignore[arg-type]
        timed = f"; {graph_timed(ours):.1f} us against eager {graph_timed(theirs):.1f} us" if x.is_cuda else ""
        print(f"  {name}: {checks}{timed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Triton's interpreter on the CPU, small widths, float32")
    args = parser.parse_args()
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"  # (read when the kernels are defined: before the import below)
    torch.manual_seed(0)
    widths = Widths(96, 200, 4, 2, 32) if args.quick else GLM_4_6V_FLASH
    tensor: dict[str, Any] = {"device": "cpu", "dtype": torch.float32} if args.quick else \
        {"device": "cuda", "dtype": torch.bfloat16}
    for rows in (1, 8) if args.quick else (1, 8, 1152):
        compare(rows, widths, **tensor)


if __name__ == "__main__":
    main()
