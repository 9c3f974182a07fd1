"""The Engine interface: images, earlier turns and a question in, streamed text out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

__all__ = ["Engine", "GenerationLimits", "Measured", "PreparedImage", "Turn"]


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A decoded, validated RGB image and the SHA-256 of the bytes it came from (a cache key)."""

    sha256: str
    image: Image.Image


@dataclass(frozen=True, slots=True)
class Turn:
    """An earlier question or answer of the same conversation, sent as text."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True, slots=True)
class GenerationLimits:
    max_new_tokens: int = 512


class Engine(Protocol):
    """A vision-language model that answers questions about images."""

    name: str
    model: str  # what answers: a hub id, a directory, or the name a server serves
    max_batch: int
    supports_images: bool

    async def start(self) -> None:
        """Load the model; raise ``ModelUnavailable`` with a fix when it cannot be."""

    async def stop(self) -> None: ...

    def answer(
        self,
        images: Sequence[PreparedImage],
        turns: Sequence[Turn],
        question: str,
        limits: GenerationLimits,
    ) -> AsyncIterator[str]:
        """Stream the answer as text chunks. Earlier ``turns`` come first, oldest first."""
        ...


@runtime_checkable
class Measured(Protocol):
    """An engine that reports its own counters (for ``/metrics``)."""

    def measurements(self) -> Mapping[str, float]:
        """Counters since start and current sizes, by name; cheap, callable from the event loop."""
        ...
