"""What goes into a prompt: chat messages, and the token ids that matter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.engine import PreparedImage, Turn

__all__ = ["REASONING_MARKERS", "chat_messages", "eos_ids", "halved", "hidden_special_ids", "image_token_ids",
           "rendered"]

# Reasoning models mark their thinking with tokens that may be "special"; they are kept in the
# decoded text so that the thinking can be told apart from the answer (core.answer_text drops it).
REASONING_MARKERS = frozenset({"<think>", "</think>", "<answer>", "</answer>"})


def chat_messages(images: Sequence[PreparedImage], turns: Sequence[Turn], question: str) -> list[dict[str, Any]]:
    """Chat messages with the images at the start of the first user turn.

    The images stay in the first user message, so the rendered prompt of a follow-up extends the
    earlier one (a stable prefix for caching) and models that allow one image per sequence work.
    Only pixels go in: no file name or path reaches the prompt.
    """
    content_images: list[dict[str, Any]] = [{"type": "image", "image": p.image} for p in images]
    messages: list[dict[str, Any]] = []
    for turn in [*turns, Turn("user", question)]:
        role = "user" if turn.role == "user" else "assistant"
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.text}]
        if role == "user" and content_images:
            content = [*content_images, *content]
            content_images = []
        messages.append({"role": role, "content": content})
    return messages


def rendered(processor: Any, images: Sequence[PreparedImage], turns: Sequence[Turn], question: str) -> Any:
    """The prompt as the processor's chat template renders it (token ids, and the images' pixels where there are
    any): what the engine prefills, and what the benches hand bare ``generate()``."""
    inputs = processor.apply_chat_template(chat_messages(images, turns, question), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)  # some processors return it; generate() rejects it
    return inputs


def halved(image: PreparedImage) -> PreparedImage:
    from PIL import Image

    w, h = image.image.size
    smaller = image.image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS)
    return PreparedImage(image.sha256 + ":half", smaller)


def image_token_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    for name in ("image_token_id", "image_token_index", "image_start_token_id", "image_end_token_id",
                 "boi_token_id", "eoi_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids or {-1}


def hidden_special_ids(tokenizer: Any) -> set[int]:
    """Special tokens left out of answers; reasoning markers are kept for ``ThinkingFilter``.

    Computed once: a 150k-entry vocabulary makes ``get_vocab()`` cost ~100 ms (measured on GLM).
    """
    ids = set(tokenizer.all_special_ids)
    return {i for i in ids if tokenizer.convert_ids_to_tokens(i) not in REASONING_MARKERS}


def eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
