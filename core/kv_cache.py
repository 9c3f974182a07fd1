"""KV caches and other model state kept between questions: sizes, cropping, copying, eviction."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from core.prefix_cache import StateCache

__all__ = ["cache_bytes", "cache_keyword", "copied", "crop_to", "holding", "make_room", "own_storage",
           "tensor_bytes"]


def make_room(free: Callable[[], int], reserve: int, caches: Sequence[StateCache[Any]]) -> bool:
    """Evict from ``caches``, in order, least recently used first, until ``free()`` reaches ``reserve``.

    Returns whether anything was evicted (the caller then returns the memory to the device).
    """
    evicted = False
    while free() < reserve and any(cache.evict_one() for cache in caches):
        evicted = True
    return evicted


def cache_keyword(model: Any) -> str:
    """transformers 5.2x renamed generate's ``past_key_values`` to ``cache``; older 5.x know only the first."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside an encoder output (a ModelOutput, tuple or tensor)."""
    if hasattr(value, "element_size"):
        return int(value.numel() * value.element_size())
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


def crop_to(cache: Any, length: int) -> None:
    """Keep the first ``length`` tokens (``crop`` counts from the end in 5.2x: negative values work everywhere)."""
    surplus = cache.get_seq_length() - length
    if surplus > 0:
        cache.crop(-surplus)


def cache_bytes(cache: Any) -> int:
    """Bytes of a KV cache's keys and values."""
    return tensor_bytes([(getattr(layer, "keys", None), getattr(layer, "values", None))
                         for layer in getattr(cache, "layers", ())])


def own_storage(cache: Any) -> None:
    """Give each layer its own tensors: a cropped or sliced view would pin the whole source in memory."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()


def holding(cache: Any, layers: Sequence[tuple[Any, Any]]) -> Any:
    """``cache`` (new, empty) holding ``layers``, one ``(keys, values)`` a layer: the tensors themselves, not
    copies. A plain layer's ``update`` would copy them onto an empty tensor it makes first: on the H200 that
    is 80 copies and 80 allocations launched from Python a question kept (GLM's 40 layers), on tensors the
    caller has just copied anyway. Other layers (a sliding window keeps only its last tokens) take ``update``."""
    from transformers.cache_utils import DynamicLayer

    for index, (keys, values) in enumerate(layers):
        layer = cache.layers[index] if index < len(cache.layers) else None
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        else:
            cache.update(keys, values, index)
    return cache


def copied(layers: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """A copy of ``layers`` (one ``(keys, values)`` a layer) that pins nothing else in memory: one copy of
    all layers' keys and one of their values, handed out as views a layer (a copy a layer is 80 launches
    from Python for GLM). Layers of different shapes are copied one by one."""
    import torch

    if len({tuple(keys.shape) for keys, _ in layers} | {tuple(values.shape) for _, values in layers}) > 1:
        return [(keys.clone(), values.clone()) for keys, values in layers]
    keys = torch.stack([keys for keys, _ in layers])
    values = torch.stack([values for _, values in layers])
    return list(zip(keys.unbind(0), values.unbind(0), strict=True))
