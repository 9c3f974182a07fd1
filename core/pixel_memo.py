"""Preprocessed pixels per image, so a follow-up about the same screenshot skips the image processor."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["ImageProcessorMemo"]


class ImageProcessorMemo:
    """Stands in for a processor's ``image_processor``; remembers its output per set of images.

    The processor copies images on their way in, so nothing on the image itself identifies it:
    the caller says which images (by SHA-256) the next call is about, in message order.
    Resizing and patching a 1024x768 screenshot costs tens of milliseconds of CPU per question.
    """

    def __init__(self, inner: Any, capacity: int = 8) -> None:
        self._inner = inner
        self._capacity = capacity
        self._memo: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._casts: dict[tuple[Any, ...], Any] = {}  # per entry: its pixels as the model takes them
        self._expected: tuple[str, ...] | None = None
        self.computed = 0  # calls that ran the real image processor

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped processor's
        return getattr(self._inner, name)

    @contextmanager
    def expecting(self, shas: Sequence[str]) -> Iterator[None]:
        self._expected = tuple(shas)
        try:
            yield
        finally:
            self._expected = None

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> Any:
        count = len(_flatten(images))
        if not self._expected or count != len(self._expected) or args:
            self.computed += 1
            return self._inner(images, *args, **kwargs)
        key = (self._expected, repr(sorted(kwargs.items())))
        output = self._memo.get(key)
        if output is None:
            self.computed += 1
            output = self._memo[key] = self._inner(images, **kwargs)
            while len(self._memo) > self._capacity:
                self._casts.pop(self._memo.popitem(last=False)[0], None)
        else:
            self._memo.move_to_end(key)
        return type(output)(dict(output))  # a fresh mapping: callers may add or pop keys

    def cast(self, pixels: Any, dtype: Any) -> Any:
        """``pixels`` in ``dtype``; cast once and kept where they are pixels this memo handed out (the
        processor passes them through): casting a screenshot's 4.7M values for every follow-up took ~2 ms.
        Not cast inside the memo: some processors turn the pixels into numpy, which has no bfloat16."""
        key = next((k for k, output in self._memo.items() if output.get("pixel_values") is pixels), None)
        if key is None:
            return pixels.to(dtype)
        kept = self._casts.get(key)
        if kept is None or kept.dtype != dtype:
            kept = self._casts[key] = pixels.to(dtype)
        return kept


def _flatten(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, list | tuple):
        return [leaf for item in images for leaf in _flatten(item)]
    return [images]
