"""The vision encoder's blocks through ``torch.compile``, once made; eager before that and after a failure.

Once its attention no longer reads the images' lengths in every block (``core/vision_attention.py``), a
vision tower's time is its kernels': for one 1024x768 screenshot (GLM-4.6V-Flash, H200) ~1,150 of them and
27 ms of GPU time, many small elementwise ones (RMSNorm, the rotary in float32, the MLP's gate). Compiled
the way the decoder layers are (``core/fused_layers.py``: each block's forward, sizes symbolic, attention
eager), a screenshot encodes in 22.1 ms instead of 29.5 and eight in 141.7 instead of 198.7
(bench/RESULTS.md, seventeenth step). With the blocks' own split at ``lengths.tolist()`` every block's
graph broke in two and compiling was slower than eager (fifth step): so only with the sync-free attention.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from core import vision_attention
from core.errors import one_line
from core.fused_layers import FusedLayers

__all__ = ["CompiledVision", "vision_blocks"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def vision_blocks(model: Any) -> list[torch.nn.Module]:
    """The vision tower's blocks where its attention is the sync-free one (GLM-4V-shaped towers), or ``[]``."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    blocks = getattr(visual, "blocks", None)
    attention = getattr(getattr(visual, "config", None), "_attn_implementation", None)
    return list(blocks) if isinstance(blocks, torch.nn.ModuleList) and attention == vision_attention.NAME else []


class CompiledVision:
    """What the engine runs the vision encoder through: its blocks compiled once ``compile`` has made them."""

    def __init__(self) -> None:
        self._fused: FusedLayers | None = None

    @property
    def compiled(self) -> bool:
        return self._fused is not None

    def compile(self, model: Any, dummies: Callable[[], object], *, cache_dir: Path | None = None) -> bool:
        """Compile ``model``'s vision blocks by running ``dummies`` (the vision encoder on one dummy image,
        then on several, whose graphs are one image's: a guard that failed would compile here, not when chats
        first ask together) through them; logged. ``False`` where this tower cannot be compiled here (it
        stays eager)."""
        blocks = vision_blocks(model)
        if not blocks:
            return False
        fused = FusedLayers(blocks, cache_dir=cache_dir)
        if not fused.compiles("the vision encoder", dummies):
            fused.remove()
            return False
        self._fused = fused
        return True

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The compiled blocks in use where they are made (a CUDA graph of them is captured inside)."""
        with self._fused.active() if self._fused is not None else contextlib.nullcontext():
            yield

    def run(self, work: Callable[[], _T]) -> _T:
        """``work`` (the vision encoder over some images) through the compiled blocks where they are made;
        where they fail it (past dynamo's recompile limit, say), again eagerly, and eagerly from then on."""
        fused = self._fused
        if fused is not None:
            try:
                with fused.active():
                    return work()
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                log.warning("the compiled vision encoder failed (%s); it runs eagerly from now on", one_line(exc))
                fused.remove()
                self._fused = None
        return work()
