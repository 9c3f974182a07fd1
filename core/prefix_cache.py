"""Bounded LRUs of model state per set of images: prefilled prefixes, encoded image features."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Features", "Prefix", "PrefixCache", "StateCache", "common_prefix"]


class _Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


_Entry = TypeVar("_Entry", bound=_Sized)


@dataclass(frozen=True, slots=True)
class Prefix:
    """The model state after reading ``ids``: enough to answer a follow-up by reading only what is new."""

    ids: Any  # 1-D token ids of the prompt that was prefilled
    cache: Any  # the transformers KV cache holding exactly ``ids``
    extra: dict[str, Any]  # model state that must be restored with the cache (M-RoPE deltas)
    nbytes: int


@dataclass(frozen=True, slots=True)
class Features:
    """What the vision encoder made of a set of images, as ``generate(mm_encoder_outputs=...)`` takes it."""

    outputs: Any
    nbytes: int


class StateCache(Generic[_Entry]):
    """One entry per set of images (their SHA-256s), least recently used evicted beyond ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[tuple[str, ...], _Entry] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, ...]) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, ...], entry: _Entry) -> None:
        self.discard(key)
        if entry.nbytes > self.budget:
            return
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            self.evict_one()

    def discard(self, key: tuple[str, ...]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def evict_one(self) -> bool:
        """Drop the least recently used prefix; ``False`` when there was none."""
        if not self._entries:
            return False
        _, old = self._entries.popitem(last=False)
        self.nbytes -= old.nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


PrefixCache = StateCache[Prefix]


def common_prefix(a: Any, b: Any) -> int:
    """Length of the common prefix of two 1-D token id tensors."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    same = a[:n] == b[:n]
    return n if bool(same.all()) else int((~same).nonzero()[0, 0])
