"""Decode steps' attention on a GPU: one-token queries go to the split-KV kernel, the rest to the model's own.

A decode step's attention (one new token a row, a bool mask over its slot) is latency, not bytes:
through SDPA a row is two K/V heads' worth of programs walking the whole span (see
``core.split_kv_attention``). Everything else (prefill, the vision encoder, follow-up tails, any
other mask) keeps the function the model was loaded with, so only calls the kernel computes exactly
as SDPA would are sent to it.

Installed in transformers' attention registry, the way it offers to replace an implementation, by
the engine when it makes its decode step on a GPU, after the kernel has matched SDPA once on this
device; removed when the engine stops.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["StepAttention", "fits", "reference"]

log = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)


def _triton_runs(query: torch.Tensor) -> bool:
    # Under Triton's interpreter the kernel runs on the CPU (the tests), in float32 too.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return query.device.type == "cpu"
    return query.is_cuda and query.dtype in _HALF


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any) -> bool:
    """Whether ``split_kv_attention`` computes this call exactly as SDPA would: one query token a row,
    a plain bool mask over the positions, grouped heads, no dropout, soft-capping, window or sinks."""
    rows, heads, tokens, dim = query.shape
    return (tokens == 1 and _triton_runs(query)
            and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and tuple(mask.shape) == (rows, 1, 1, key.shape[2]) and mask.stride(-1) == 1
            and key.shape == value.shape and key.shape[0] == rows and heads % key.shape[1] == 0
            and 16 <= dim <= 256 and dim & (dim - 1) == 0
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and not kwargs.get("dropout") and kwargs.get("softcap") is None
            and kwargs.get("sliding_window") is None and kwargs.get("s_aux") is None
            and not kwargs.get("output_attentions"))


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    """What ``split_kv_attention`` must return, in float32: SDPA with each K/V head repeated for its
    query heads, ``[rows, 1, heads, dim]`` (the start-up check and the bench compare against it)."""
    groups = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(groups, 1), value.float().repeat_interleave(groups, 1),
        attn_mask=mask, scale=scale).transpose(1, 2)


class StepAttention:
    """Replaces the registry's ``name`` implementation by one that sends what ``fits`` to the kernel."""

    def __init__(self, name: str) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from core.split_kv_attention import split_kv_attention

        self._name = name
        self._original: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS[name]
        original = self._original
        # False: everything to the original (benchmarks compare the two in one process; steps captured
        # as CUDA graphs keep what they were captured with).
        self.enabled = True

        # The registry's calling convention: the mask positional (decoder layers) or by name (vision blocks).
        def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
            if self.enabled and fits(query, key, value, attention_mask, **kwargs):
                scale = kwargs.get("scaling") or 1 / math.sqrt(query.shape[-1])
                return split_kv_attention(query, key, value, attention_mask, scale), None
            return original(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]

        ALL_ATTENTION_FUNCTIONS[name] = attention

    @classmethod
    def install(cls, model: Any, kv_heads: int, dim: int, *, device: torch.device, dtype: torch.dtype
                ) -> StepAttention | None:
        """Where the kernel runs and agrees with SDPA on this device, at the model's head shapes; else
        None (the model's own attention stays)."""
        config = getattr(model, "config", None)
        text = getattr(config, "text_config", config)
        name = getattr(text, "_attn_implementation", None)
        if name != "sdpa":
            return None  # eager, flash-attention ...: their own kernels, not second-guessed
        probe = _Probe(getattr(text, "num_attention_heads", kv_heads), kv_heads, dim, device=device, dtype=dtype)
        if not probe.fits():
            return None  # a CPU, or shapes the kernel does not take
        try:
            installed = cls(name)
            agrees = probe.agrees()
        except Exception as exc:  # no Triton, or one that cannot build the kernel for this GPU
            log.info("decode steps' attention stays SDPA: the split-KV kernel is unavailable here (%s)", exc)
            return None
        if not agrees:
            installed.remove()
            log.warning("decode steps' attention stays SDPA: the split-KV kernel disagrees with it here")
            return None
        log.info("decode steps' attention: the split-KV kernel")
        return installed

    def remove(self) -> None:
        """The implementation it replaced, back in the registry."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[self._name] = self._original


class _Probe:
    """One call the kernel must get right before it is used: grouped heads, a ragged mask (a row that
    sees one position, one that sees half, one that sees all), several slices a row."""

    def __init__(self, heads: int, kv_heads: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> None:
        generator = torch.Generator(device="cpu").manual_seed(0)
        rows, span = 3, 700

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        self.query, self.key, self.value = (draw(rows, heads, 1, dim), draw(rows, kv_heads, span, dim),
                                            draw(rows, kv_heads, span, dim))
        lengths = torch.tensor([1, span // 2, span], device=device)
        self.mask = (torch.arange(span, device=device)[None, :] < lengths[:, None])[:, None, None, :]

    def fits(self) -> bool:
        return fits(self.query, self.key, self.value, self.mask)

    def agrees(self) -> bool:
        from core.split_kv_attention import split_kv_attention

        scale = self.query.shape[-1] ** -0.5
        got = split_kv_attention(self.query, self.key, self.value, self.mask, scale).float()
        ref = reference(self.query, self.key, self.value, self.mask, scale)
        return bool((got - ref).abs().max() <= 2e-2 * ref.abs().max())
