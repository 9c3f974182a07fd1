"""A prompt as the language model inside a vision-language model receives it.

The captured first-question prefill (``Stepper.prefill``) replays a fixed forward over input
embeddings, so what comes before the decoder layers (merging the vision encoder's output into the
token embeddings, M-RoPE's 3-D positions for the image) runs first, on its own. Rather than copy
each model's merging and position code, the model's own forward runs up to its language model and
stops there: a forward pre-hook takes the arguments it was about to be called with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PromptEmbeddings", "prompt_embeddings"]


@dataclass
class PromptEmbeddings:
    embeds: torch.Tensor  # [1, tokens, hidden], the images' features in place of their tokens
    positions: torch.Tensor | None  # the rotary positions the model chose ([3, 1, tokens] for M-RoPE), or its default


class _Reached(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("the language model was reached")
        self.kwargs = kwargs


def prompt_embeddings(model: Any, inputs: dict[str, Any]) -> PromptEmbeddings | None:
    """What ``model``'s forward over ``inputs`` (a first question: no cache) hands its language model;
    ``None`` where the model is not built that way (no ``model.language_model``) or hands it tokens.

    Side effects are the forward's own: an M-RoPE model keeps the prompt's ``rope_deltas``."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    if not isinstance(inner, torch.nn.Module) or not isinstance(language_model, torch.nn.Module):
        return None

    def reached(_module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Reached(kwargs)

    handle = language_model.register_forward_pre_hook(reached, with_kwargs=True)
    try:
        inner(**inputs, use_cache=False)
    except _Reached as stop:
        embeds, positions = stop.kwargs.get("inputs_embeds"), stop.kwargs.get("position_ids")
    else:
        return None
    finally:
        handle.remove()
    if not isinstance(embeds, torch.Tensor) or embeds.shape[0] != 1:
        return None
    return PromptEmbeddings(embeds, positions if isinstance(positions, torch.Tensor) else None)
