"""bitsandbytes quantisation: which mode, which modules stay unquantised, and the config for it."""

from __future__ import annotations

from typing import Any, Literal

from core.errors import EngineError

__all__ = ["Mode", "bnb_config", "pick_mode", "unquantised_modules"]

Mode = Literal["nf4", "int8", "none"]

_LANGUAGE_MODEL_NAMES = {"language_model", "text_model", "llm"}


def pick_mode(setting: str, device: str) -> Mode:
    """``auto`` is NF4 where CUDA is, none on CPU (CPU has the memory; 4-bit there is for tests)."""
    if setting == "auto":
        return "nf4" if device == "cuda" else "none"
    if setting in ("nf4", "int8", "none"):
        return setting  # type: ignore[return-value]
    raise EngineError(f"[engine] quantization = {setting!r}: expected auto, nf4, int8 or none")


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
    if mode == "none":
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
