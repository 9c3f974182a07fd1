"""Swapping a loaded model's linears for quantized ones (imsight's own modes: int4, fp8), one at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["linear_names", "replace_linears"]


def linear_names(model: Any, skip: list[str]) -> list[str]:
    """The names of the model's linears outside ``skip`` (full-name prefixes)."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and not any(name == s or name.startswith(s + ".") for s in skip)]


def replace_linears(model: Any, skip: list[str],
                    convert: Callable[[str, torch.nn.Linear], torch.nn.Module | None]) -> tuple[int, int]:
    """Replace each of the model's linears outside ``skip`` (full-name prefixes) by ``convert(name, linear)``, or
    keep it where that is ``None``; (replaced, kept)."""
    replaced = kept = 0
    # Names, not modules: each full-width weight is freed as soon as it is replaced, so quantizing
    # needs one layer's worth of memory more than the quantized model, not the full-width model more.
    for name in linear_names(model, skip):
        quantized = convert(name, model.get_submodule(name))
        if quantized is None:
            kept += 1
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        replaced += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replaced, kept
