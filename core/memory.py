"""Memory: what a model will need once loaded, and what the device has free, checked before loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelUnavailable
from core.quantization import OWN_MODES, Mode

__all__ = ["Estimate", "available_bytes", "ensure_fits", "estimate"]

GiB = 2**30
_BYTES_PER_WEIGHT = {
    "nf4": 0.5 + 1 / 64,  # 4 bits, plus one 8-bit absmax per 64-weight block (double quantisation)
    "int4": 0.5 + 4 / 128,  # 4 bits, plus a bf16 scale and zero per group of 128
    "fp8": 1.0,  # e4m3, plus a float32 scale per output row (counted below)
    "int8": 1.0,
}
_WORKING_FLOOR = 1 * GiB  # activations, KV cache and CUDA context for one screenshot question


@dataclass(frozen=True, slots=True)
class Estimate:
    weights: int
    working: int
    loading: int = 0  # held only while loading: int4 and fp8 load full width, then quantize
    unpacked: int = 0  # int4 weights kept unpacked as well, for prefill ([engine] unpacked_weights)

    @property
    def total(self) -> int:
        return self.weights + self.working + self.loading + self.unpacked


def estimate(meta_model: Any, mode: Mode, dtype_bytes: int, skip: list[str], *, unpacked: bool = False) -> Estimate:
    """Bytes of a model built on the meta device, once loaded with ``mode`` and ``skip`` unquantised (and,
    ``unpacked``, int4's weights kept at full width too)."""
    import torch

    full = weights = sum(p.numel() for p in meta_model.parameters()) * dtype_bytes
    quantized = 0
    if mode != "none":
        per_weight = _BYTES_PER_WEIGHT[mode]
        for name, module in meta_model.named_modules():
            if isinstance(module, torch.nn.Linear) and not _skipped(name, skip):
                n = module.weight.numel()
                quantized += n
                # The weight shrinks from full width to ``per_weight``; plus a scale per output row.
                weights += int(n * per_weight) - n * dtype_bytes + module.out_features * 4
    return Estimate(weights=weights, working=max(_WORKING_FLOOR, weights // 10),
                    loading=full - weights if mode in OWN_MODES else 0,
                    unpacked=quantized * dtype_bytes if unpacked and mode == "int4" else 0)


def ensure_fits(need: Estimate, free: int, *, where: str, model: str, mode: Mode) -> None:
    """Refuse to start a load that would run out of memory halfway, with what to change."""
    if need.total <= free:
        return
    hint = "" if mode == "nf4" else ' Try [engine] quantization = "nf4" (about a quarter of the bf16 weights).'
    if need.unpacked:
        hint = " Try [engine] unpacked_weights = false."
    loading = f", {need.loading / GiB:.1f} GiB more while they load at full width" if need.loading else ""
    unpacked = f", {need.unpacked / GiB:.1f} GiB of them kept unpacked" if need.unpacked else ""
    weights = f"{need.weights / GiB:.1f} GiB of weights as {mode}{loading}{unpacked}"
    raise ModelUnavailable(
        f"model {model!r} needs about {need.total / GiB:.1f} GiB on {where} "
        f"({weights}, {need.working / GiB:.1f} GiB to work in) "
        f"but only {free / GiB:.1f} GiB is free.{hint} Or use a smaller model, or free the device "
        "(nvidia-smi lists what holds GPU memory)."
    )


def available_bytes(device: str) -> int | None:
    """Free memory where the model will live; ``None`` when it cannot be known."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)
