"""Loading a vision-language model: device, dtype, quantisation, a memory check, then the weights."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from core.errors import EngineError, ModelUnavailable
from core.int4_cache import Int4Cache, model_files
from core.memory import Estimate, available_bytes, ensure_fits, estimate
from core.model_files import ModelSource, unavailable
from core.quantization import OWN_MODES, Mode, bnb_config, pick_mode, unquantised_modules
from core.tiny_model import MARKER

__all__ = ["LoadPlan", "LoadedModel", "load", "pick_device", "pick_dtype", "plan", "vision_dtype"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: Any
    processor: Any
    device: str
    dtype: Any  # torch.dtype of the unquantised weights and of 4-bit compute
    mode: Mode
    pixel_dtype: Any  # the vision tower's own parameter dtype: pixel values are cast to it
    estimate: Estimate


def load(
    source: ModelSource,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str = "auto",
    cache_dir: Path | None = None,
    unpacked_weights: bool = False,
    int4_cache: Path | None = None,
) -> LoadedModel:
    """Load ``source``; raise ``ModelUnavailable`` with what to do when it cannot be. ``unpacked_weights``: int4's
    weights kept at full width as well, for prefill (``core.int4_weights.keep_unpacked``). ``int4_cache``: a
    directory where int4's quantized weights are kept for the next start, and read from (``core.int4_cache``)."""
    called = time.monotonic()
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    planned = plan(source, device=device, dtype=dtype, quantization=quantization, cache_dir=cache_dir,
                   unpacked_weights=unpacked_weights)
    where, torch_dtype, mode, keep, need = planned.device, planned.dtype, planned.mode, planned.keep, planned.need
    if mode in ("nf4", "int8"):
        _require_bitsandbytes(mode)
    name = source.name_or_path
    if planned.free is not None:
        ensure_fits(need, planned.free, where=where, model=name, mode=mode)
    common: dict[str, Any] = {"local_files_only": source.local_files_only, "cache_dir": cache_dir}
    started = time.monotonic()  # the phases are logged: they are most of a restart's time to ready
    try:
        processor = AutoProcessor.from_pretrained(name, **common)
        model = AutoModelForImageTextToText.from_pretrained(
            name, **common, dtype=torch_dtype, device_map="cpu" if planned.staged else where,
            quantization_config=bnb_config(mode, torch_dtype, keep),
        )
    except (OSError, ValueError, ImportError) as exc:
        raise unavailable(name, str(exc).splitlines()[0]) from exc
    model.eval()
    read = time.monotonic()
    if mode in OWN_MODES:
        from core import fp8_weights, int4_weights

        weights = {"int4": int4_weights, "fp8": fp8_weights}[mode]
        cache = _int4_cache(int4_cache, source, cache_dir, where, torch_dtype, keep) if mode == "int4" else None
        stored = cache.load() if cache is not None else None
        if cache is not None and stored is not None and not int4_weights.stored_fits(model, keep, stored):
            log.warning("int4: the cached weights in %s do not fit this model's linears; quantizing again", cache.path)
            stored = None
        if stored is not None:
            replaced, kept = int4_weights.quantize_linears(model, keep, device=where, stored=stored)
        else:
            replaced, kept = weights.quantize_linears(model, keep, device=where)
        cast(Any, model).to(where)  # the rest (vision tower, embeddings, norms, head), after the quantized layers
        how = f"read from {cache.path}" if cache is not None and stored is not None else \
            f"quantized{', one at a time from host memory' if planned.staged else ''}"
        log.info("%s: %d linear layers %s in %.1fs (%s), %d left full width", mode, replaced, how,
                 time.monotonic() - read, weights.KERNEL, kept)
        if cache is not None and stored is None:
            cache.save(model)
        if need.unpacked:
            log.info("int4: every weight kept unpacked too (unpacked_weights = true): %.1f GiB more, prefills read "
                     "them instead of unpacking", int4_weights.keep_unpacked(model) / 2**30)
    if unpacked_weights and not need.unpacked:
        log.info("unpacked_weights = true applies to int4 only (quantization %s here): nothing kept", mode)
    if getattr(model.config, MARKER, False):
        log.warning("model %s is imsight's tiny test model: random weights, answers are noise", name)
    log.info("model %s loaded on %s in %.1fs (weights read in %.1fs; before that, importing transformers and "
             "planning on the device %.1fs): %s, quantization %s, about %.1f GiB", name, where,
             time.monotonic() - started, read - started, started - called, torch_dtype, mode, need.weights / 2**30)
    return LoadedModel(model, processor, where, torch_dtype, mode, vision_dtype(model, keep), need)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """How a model would be loaded here, and the memory it would need: found before any weight is read."""

    device: str
    dtype: Any
    mode: Mode
    keep: list[str]  # modules left unquantised
    need: Estimate
    free: int | None  # bytes free where it would live (None: unknown)
    kv_bytes_per_token: int = 0  # keys and values of one token, all layers (the decode slots' unit)
    staged: bool = False  # int4/fp8 on a GPU: loaded into host memory, each linear quantized on its way over


def plan(
    source: ModelSource, *, device: str = "auto", dtype: str = "auto", quantization: str = "auto",
    cache_dir: Path | None = None, unpacked_weights: bool = False,
) -> LoadPlan:
    """Read the model's config and build it on the meta device; raise ``ModelUnavailable`` when it cannot be."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    where = pick_device(device, torch.cuda.is_available())
    torch_dtype = pick_dtype(dtype, where)
    mode = pick_mode(quantization, where, torch.cuda.get_device_capability() if where == "cuda" else None)
    name = source.name_or_path
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=source.local_files_only, cache_dir=cache_dir)
        with torch.device("meta"):  # shapes only: no memory, no weights read
            skeleton = AutoModelForImageTextToText.from_config(config)
    except (OSError, ValueError) as exc:
        raise unavailable(name, str(exc).splitlines()[0]) from exc
    keep = unquantised_modules(skeleton)
    need = estimate(skeleton, mode, torch_dtype.itemsize, keep, unpacked=unpacked_weights)
    # int4 and fp8 load at full width first. On a GPU that happens in host memory when it has room, so
    # the GPU never holds more than the quantized model and one full-width linear (bitsandbytes' NF4 likewise).
    host = available_bytes("cpu") if mode in OWN_MODES and where == "cuda" else None
    staged = host is not None and need.weights + need.loading <= host * 0.9
    if staged:
        need = replace(need, loading=0)
    elif mode == "int4" and quantization == "auto":
        # No room to stage in host memory: NF4, which bitsandbytes quantizes as the weights arrive.
        mode = "nf4"
        need = estimate(skeleton, mode, torch_dtype.itemsize, keep, unpacked=unpacked_weights)
    return LoadPlan(where, torch_dtype, mode, keep, need, available_bytes(where),
                    kv_token_bytes(config, torch_dtype.itemsize), staged)


def _int4_cache(directory: Path | None, source: ModelSource, cache_dir: Path | None, device: str, dtype: Any,
                keep: list[str]) -> Int4Cache | None:
    """Where this model's int4 weights are kept between starts; ``None`` without a directory, or where the model's
    files cannot be found on this machine to tell one version of it from another."""
    if directory is None:
        return None
    files = model_files(source.name_or_path, cache_dir)
    return Int4Cache(directory, files, device=device, dtype=dtype, skip=keep) if files is not None else None


def kv_token_bytes(config: Any, itemsize: int) -> int:
    """Bytes of one token's keys and values over every layer of the language model."""
    text = getattr(config, "text_config", config)
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) // max(1, heads))
    return 2 * int(getattr(text, "num_hidden_layers", 0)) * int(kv_heads) * int(head_dim) * itemsize


def vision_dtype(model: Any, unquantised: list[str]) -> Any:
    """The dtype of the vision tower's floating-point weights, read from the loaded model.

    Remote-code GLM models fail with "Input type (BFloat16) and bias type (Half)" when pixels and
    weights differ; native classes cast for themselves, so the cast here is cheap insurance.
    """
    modules = dict(model.named_modules())
    for name in unquantised:
        module = modules.get(name)
        if module is None or name == "lm_head":
            continue
        for param in module.parameters():
            if param.dtype.is_floating_point:
                return param.dtype
    return model.dtype


def pick_device(setting: str, cuda_available: bool) -> str:
    if setting == "cuda" and not cuda_available:
        raise EngineError('[engine] device = "cuda" but torch sees no CUDA device')
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    return setting


def pick_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, setting)


def _require_bitsandbytes(mode: Mode) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelUnavailable(
            f'[engine] quantization needs bitsandbytes for {mode} ({exc}). Fix: pip install bitsandbytes, '
            'or set [engine] quantization = "none".'
        ) from exc
