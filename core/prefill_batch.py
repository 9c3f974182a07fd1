"""First questions that wait together, prefilled together: one left-padded forward for all of them.

Why: 8 chats asking at once used to wait for eight prefills one after another before any of them
decoded (~120 ms each for a screenshot question to GLM-4.6V-Flash on the H200, vision encoder
included). As one batch the same work took 0.76-0.83x the time (bench/prefill_batching.py,
bench/RESULTS.md eighth step).

Each question's KV then goes into its own slot row exactly as if it had been prefilled alone: the
padding sits at the front of the batch's rows and is cut off, and positions count from each row's
first real token (given explicitly for plain RoPE; M-RoPE models work theirs out from the attention
mask and hand back each row's offset in ``rope_deltas``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Prefilled", "image_inputs", "join_encoder_outputs", "left_padded", "pad_token", "prefill_together",
           "split_encoder_outputs", "uses_mrope"]

# One value per prompt token (padded at the front), and one entry per image (joined in order).
_TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"})
_IMAGE_KEYS = frozenset({"pixel_values", "image_grid_thw", "image_sizes"})
_ENCODED = "mm_encoder_outputs"  # the vision encoder's output in place of pixels, per modality
# What a vision encoder's output may hold for ``pooler_output`` alone to carry its images into the
# language model (a model whose forward reads more from it is not batched).
_PLAIN_OUTPUT = frozenset({"last_hidden_state", "pooler_output", "hidden_states", "attentions"})


@dataclass(frozen=True, slots=True)
class Prefilled:
    """One question of a batch, as its own prefill would have left it."""

    first: int  # the greedy token after the prompt
    length: int  # prompt tokens
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # keys, values per layer: [1, heads, length, dim] views
    delta: torch.Tensor | None  # M-RoPE position offset, [1, 1]; None for other models


def uses_mrope(model: Any) -> bool:
    """Whether ``model`` is an M-RoPE model (GLM-4.1V/4.6V, Qwen-VL): one that keeps the position offset
    its images leave behind (``rope_deltas``), per prompt."""
    return hasattr(getattr(model, "model", None), "rope_deltas")


def pad_token(tokenizer: Any, eos: set[int]) -> int:
    """The token that fills the front of shorter prompts in a batch: masked, so any will do; the
    tokenizer's pad token, else an end-of-sequence one, else 0."""
    return next((t for t in (tokenizer.pad_token_id, *sorted(eos)) if t is not None), 0)


def left_padded(inputs: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any] | None:
    """Single-question model inputs as one batch: per-token tensors left-padded to the longest prompt
    (one token beyond it where all are as long), per-image ones (pixels, or the vision encoder's output
    already made) joined in order. ``None`` where an input is of a kind this cannot join (the questions
    are then prefilled one at a time)."""
    keys = {key for one in inputs for key in one}
    if not keys <= _TOKEN_KEYS | _IMAGE_KEYS | {_ENCODED} or any("input_ids" not in one for one in inputs):
        return None
    encoded = [one[_ENCODED] for one in inputs if _ENCODED in one]
    joined = None
    if encoded:
        if any(set(one) != {"image"} for one in encoded):
            return None
        joined = join_encoder_outputs([one["image"] for one in encoded])
        if joined is None:
            return None
    lengths = {int(one["input_ids"].shape[1]) for one in inputs}
    # A pad token more where every prompt is as long: transformers drops an attention mask without
    # padding, and compiled layers would take a second graph for such batches (one more to compile at
    # every start, for batches rare outside benchmarks: every screenshot's size and question's length
    # alike). The extra token is cut off with the rest of the padding.
    width = max(lengths) + (len(lengths) == 1)
    batch: dict[str, Any] = {}
    for key in keys & _TOKEN_KEYS | {"attention_mask"}:
        fill = pad_id if key == "input_ids" else 0
        rows = []
        for one in inputs:
            ids = one["input_ids"]
            row = one.get(key, torch.ones_like(ids) if key == "attention_mask" else None)
            if row is None:  # a per-token input some prompts lack: theirs would be all zeros
                row = torch.zeros_like(ids)
            rows.append(torch.cat([row.new_full((1, width - row.shape[1]), fill), row], dim=1))
        batch[key] = torch.cat(rows)
    if joined is not None:
        batch[_ENCODED] = {"image": joined}
    return batch | image_inputs(inputs)


def image_inputs(inputs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-image tensors of several questions' inputs, joined in order."""
    keys = {key for one in inputs for key in one} & _IMAGE_KEYS
    return {key: torch.cat([one[key] for one in inputs if key in one]) for key in keys}


def join_encoder_outputs(outputs: Sequence[Any]) -> Any:
    """Several questions' vision-encoder outputs (``mm_encoder_outputs["image"]``) as one, images in
    order; ``None`` where one is not plain (``pooler_output``, one entry per image, and nothing more)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if not all(_plain(one) for one in outputs):
        return None
    images = tuple(image for one in outputs for image in one.pooler_output)
    return BaseModelOutputWithPooling(pooler_output=images)  # type: ignore[arg-type]  # a tuple, as transformers' own


def split_encoder_outputs(outputs: Any, counts: Sequence[int]) -> list[Any] | None:
    """The vision encoder's output for several questions' images, encoded together, back as one output
    per question (``counts[i]`` images each); ``None`` where there is none, or it is not plain or not one
    entry per image."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if not _plain(outputs) or len(outputs.pooler_output) != sum(counts):
        return None
    images = list(outputs.pooler_output)
    parts, start = [], 0
    for count in counts:
        parts.append(BaseModelOutputWithPooling(pooler_output=tuple(images[start:start + count])))  # type: ignore[arg-type]
        start += count
    return parts


def _plain(outputs: Any) -> bool:
    return (hasattr(outputs, "keys") and getattr(outputs, "pooler_output", None) is not None
            and set(outputs.keys()) <= _PLAIN_OUTPUT)


def prefill_together(model: Any, batch: dict[str, Any], cache: Any, *, cache_keyword: str,
                     mrope: bool) -> list[Prefilled]:
    """One forward over a ``left_padded`` batch into ``cache`` (empty); each row's first token, KV and
    position offset."""
    mask = batch["attention_mask"]
    if mrope:
        model.model.rope_deltas = None  # computed anew from these prompts' images and mask
    if not (mrope and "image_grid_thw" in batch):
        # Counted from each row's first real token, as generate() does for a padded batch (M-RoPE
        # models do the same themselves where there are images, and add each row's offset).
        batch = {**batch, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    out = model(**batch, use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
    firsts = out.logits[:, -1].argmax(-1).tolist()
    lengths = mask.sum(-1).tolist()
    deltas = model.model.rope_deltas if mrope else None
    width = mask.shape[1]
    return [
        Prefilled(
            first=int(first),
            length=int(length),
            layers=[(layer.keys[row:row + 1, :, width - length:], layer.values[row:row + 1, :, width - length:])
                    for layer in cache.layers],
            delta=deltas[row:row + 1] if deltas is not None else None,
        )
        for row, (first, length) in enumerate(zip(firsts, lengths, strict=True))
    ]
