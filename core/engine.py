"""The Engine interface: images, earlier turns and a question in, streamed text out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

__all__ = ["Engine", "GenerationLimits", "Measured", "PreparedImage", "Turn", "Usage"]


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


@dataclass(slots=True)
class Usage:
    """What one answer cost, in the model's tokens; an engine fills it in by the end of the answer
    (images' tokens count as prompt). Zero where an engine cannot tell (a model server that does not
    report it)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Where its time went, from the engine's first sight of the question (an engine that cannot tell
    # leaves them 0): to its first token, and of that, waiting (prompt rendering, then other questions'
    # turns) before its prefill began; ``prefill`` says how it was prefilled.
    first_token_s: float = 0.0
    waited_s: float = 0.0
    prefill: str = ""


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
        usage: Usage | None = None,
    ) -> AsyncIterator[str]:
        """Stream the answer as text chunks. Earlier ``turns`` come first, oldest first. ``usage``, when
        given, holds the answer's token counts once the stream has ended."""
        ...


@runtime_checkable
class Measured(Protocol):
    """An engine that reports its own counters (for ``/metrics``)."""

    def measurements(self) -> Mapping[str, float]:
        """Counters since start and current sizes, by name; cheap, callable from the event loop."""
        ...
