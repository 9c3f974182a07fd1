"""The vision encoder's attention without a host sync in every block.

GLM-4V's vision blocks (Qwen2-VL's too) attend within each image of a packed batch. Under SDPA each
block splits its queries, keys and values per image, each at ``lengths.tolist()`` of a GPU tensor: three
host syncs in each of the 24 blocks, so the host never runs ahead of the GPU and the blocks' kernel
launches leave it idle (H200, int4, one 1024x768 screenshot: 36.0 ms that way, 30.6 this one; eight,
195.3 and 188.9; the same output, bench/RESULTS.md sixteenth step). Under an
implementation whose name says "flash" the blocks hand the attention function the images' boundaries
(``cu_seq_lens_q``) instead. This function takes that way and computes what the SDPA way does: one
image in one SDPA call (no split, no sync), several split once per encoder run, the same calls after.

Installed on the vision tower's config alone (the language model keeps its own), after the encoder
has given the same output both ways on two dummy images (``install``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["NAME", "install", "packed_sdpa", "random_patches"]

log = logging.getLogger(__name__)

# "flash" in the name is what makes the vision blocks pass the boundaries (transformers'
# ``is_flash_attention_requested``); the kernels are SDPA's.
NAME = "imsight_flash_boundaries_sdpa"

# The last boundaries seen and their lengths. Held, so no other tensor can be that object while it is
# here; the vision tower makes new boundaries for each run and no block changes them.
_last: tuple[torch.Tensor, list[int]] | None = None


# Eager inside compiled blocks (bench/vision_encoder.py --compiled), as the decoder layers' attention is.
@torch.compiler.disable  # type: ignore[untyped-decorator]  # (untyped in torch)
def packed_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any = None, *, cu_seq_lens_q: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA within each image of ``[1, heads, tokens, dim]`` queries packed at ``cu_seq_lens_q``;
    ``[1, tokens, heads, dim]`` out, as the SDPA way's per-image calls concatenated."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if cu_seq_lens_q is None or cu_seq_lens_q.shape[0] <= 2:  # one image: nothing to split
        output, _ = sdpa(module, query, key, value, attention_mask, **kwargs)
    else:
        lengths = _lengths(cu_seq_lens_q)
        parts = zip(*(torch.split(tensor, lengths, dim=2) for tensor in (query, key, value)), strict=True)
        output = torch.cat([sdpa(module, q, k, v, None, **kwargs)[0] for q, k, v in parts], dim=1)
    # One layout for one image and several: SDPA's output of batch one has a leading stride of heads x dim,
    # the concatenation's tokens x heads x dim, and compiled blocks guard on it (a second graph otherwise).
    return output.reshape(-1, *output.shape[2:]).unsqueeze(0), None


def _lengths(boundaries: torch.Tensor) -> list[int]:
    """Each image's token count; read from the GPU once per encoder run, whose blocks all pass the
    same boundaries tensor. Two threads encoding at once cost each other a read, never a wrong split:
    the pair is read and replaced whole."""
    global _last
    last = _last
    if last is None or last[0] is not boundaries:
        last = _last = (boundaries, (boundaries[1:] - boundaries[:-1]).tolist())
    return last[1]


def install(model: Any) -> bool:
    """``packed_sdpa`` for this model's vision tower, where it runs on SDPA and gives the same output
    both ways on two dummy images; ``False`` where not (it keeps its own)."""
    from transformers import AttentionInterface

    visual: Any = getattr(getattr(model, "model", None), "visual", None)
    config = getattr(visual, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, packed_sdpa)
    try:
        weight = next(visual.parameters())
        merge = int(getattr(config, "spatial_merge_size", 2))  # two small images, of whole merged patches
        grid = torch.tensor([[1, 2 * merge, 2 * merge], [1, 2 * merge, 3 * merge]], device=weight.device)
        pixels = random_patches(config, grid).to(device=weight.device, dtype=weight.dtype)
        with torch.inference_mode():
            own = _features(visual, pixels, grid)
            config._attn_implementation = NAME
            ours = _features(visual, pixels, grid)
    except Exception as exc:  # a tower that takes other inputs: left as it is
        config._attn_implementation = "sdpa"
        log.info("the vision encoder's attention stays as loaded (%s)", exc)
        return False
    if not torch.equal(own, ours):
        config._attn_implementation = "sdpa"
        log.warning("the vision encoder's attention stays as loaded: the sync-free way disagrees with it here")
        return False
    return True


def random_patches(config: Any, grid: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Random pixels for images of ``grid`` (``[images, 3]``: t, h, w patches), packed as the processor
    packs them for GLM-4V/Qwen2-VL: a row a patch, channels x temporal x height x width; float32, CPU."""
    width = int(config.in_channels) * int(config.temporal_patch_size) * int(config.patch_size) ** 2
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), width, generator=generator)


def _features(visual: Any, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = visual(pixels, grid_thw=grid)
    return getattr(out, "pooler_output", out)  # type: ignore[no-any-return]
