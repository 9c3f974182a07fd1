"""Quantisation: which mode, which modules stay unquantised, and bitsandbytes' config for its modes.

``nf4`` and ``int8`` are bitsandbytes'; ``int4`` (``core.int4_weights``: imsight's CUDA kernel,
``core.int4_mma``, or torch's int4 kernel for decode) and ``fp8`` (``core.fp8_weights``: cuBLAS's e4m3
product) are imsight's own, applied after a full-width load.
"""

from __future__ import annotations

from typing import Any, Literal

from core.errors import EngineError

__all__ = ["OWN_MODES", "Mode", "bnb_config", "pick_mode", "unquantised_modules"]

Mode = Literal["nf4", "int4", "fp8", "int8", "none"]
OWN_MODES: tuple[Mode, ...] = ("int4", "fp8")  # imsight's own: loaded at full width, then each linear quantized

_LANGUAGE_MODEL_NAMES = {"language_model", "text_model", "llm"}


def pick_mode(setting: str, device: str, capability: tuple[int, int] | None = None) -> Mode:
    """``auto`` is 4-bit where CUDA is, none on CPU (CPU has the memory; 4-bit there is for tests).

    The 4-bit mode is int4 on GPUs whose compute capability (``capability``) runs torch's int4
    kernel (8.0, Ampere, and later): on the H200 it decodes 1.3x faster than NF4 alone and 2.2x with
    8 questions at once, at the same memory (bench/RESULTS.md). NF4 on older GPUs.

    ``fp8`` is asked for, never picked: twice int4's bytes a weight, for a third of int4's error (with
    imsight's int4 decode kernel, int4 is as fast with several questions at once). It needs compute
    capability 8.9 (Ada, Hopper) or later, and says so otherwise rather than running slowly.
    """
    if setting == "auto":
        if device != "cuda":
            return "none"
        return "int4" if capability is not None and capability >= (8, 0) else "nf4"
    if setting == "fp8" and device == "cuda" and (capability is None or capability < (8, 9)):
        found = f"{capability[0]}.{capability[1]}" if capability else "unknown"
        raise EngineError(f'[engine] quantization = "fp8" needs a GPU of compute capability 8.9 or later '
                          f'(Ada, Hopper); this one is {found}. Fix: quantization = "int4" (faster for one '
                          f'question, half the bytes a weight) or "auto"')
    if setting in ("nf4", "int4", "fp8", "int8", "none"):
        return setting  # type: ignore[return-value]
    raise EngineError(f"[engine] quantization = {setting!r}: expected auto, nf4, int4, fp8, int8 or none")


def unquantised_modules(meta_model: Any) -> list[str]:
    """Full names of the vision tower, projector and output head of a model built on the meta device.

    They are small next to the language model, and quantising them costs accuracy and causes the
    dtype mismatches reported for GLM vision models. transformers 5.x matches these names from the
    start of a module's full name, so they must be full prefixes ("model.visual", not "visual").
    """
    names: list[str] = []
    inner = getattr(meta_model, "model", None)
    if inner is not None and hasattr(inner, "named_children"):
        names += [f"model.{name}" for name, _ in inner.named_children() if name not in _LANGUAGE_MODEL_NAMES]
    for name, _ in meta_model.named_children():
        if name != "model" and name not in _LANGUAGE_MODEL_NAMES:
            names.append(name)  # lm_head, and the vision parts of models without an inner `model`
    return names


def bnb_config(mode: Mode, compute_dtype: Any, skip: list[str]) -> Any:
    """The ``quantization_config`` for ``from_pretrained``; ``None`` for no quantisation.

    ``load_in_4bit=`` on ``from_pretrained`` was removed in transformers 5: this is the only way.
    """
    if mode == "none" or mode in OWN_MODES:
        return None
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
