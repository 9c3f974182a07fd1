"""One image through the vision tower's blocks, replayed from a CUDA graph made for its patch count.

The blocks are compiled (``core/compiled_vision.py``) but still launched from Python: dynamo's guards
and the eager attention between ~480 kernels for one 1024x768 screenshot, from the engine thread, which
shares the host with renders, streaming and the daemon. Replayed from a graph, the 24 blocks are one launch.
On the H200 (GLM-4.6V-Flash, int4; bench/RESULTS.md, twenty-second step; one process, alternating): the
encoder alone 23.4 ms instead of 25.6; a lone question's first token the same (the host keeps ahead of the
blocks when nothing else runs); 8 questions asked 125 ms apart, the slowest answered after 650 ms instead of
727-866. Under the profiler, whose host cost makes the launching slower still, the GPU sat idle 4.8 ms of the
encoder instead of 24.9.

Shapes: a graph serves one image of one patch count. Everything a block reads that varies between
images of that count (the hidden states, the rotary's cos and sin) is copied into the graph's own
inputs first; the image boundaries (``[0, patches]``) and the longest image are the same for all of
them. Screenshots of one screen size share one graph. A capture stalls the answers being decoded for
tens of ms (and Python's garbage collection, which ``torch.cuda.graph`` runs first), so a size gets its
graph only once it has come back: its second image is encoded the usual way and kept as the example
(``wanted``), and ``capture`` makes the graph when the engine has time; a size met once (a photo, an odd
window) costs nothing. The most recently used ``most`` graphs are kept. Several images encoded together go
through the blocks as before.

Installed in place of the tower's ``blocks`` list: ``visual.blocks`` becomes a one-entry list holding a
``GraphedBlocks``, which holds the blocks themselves and runs them in order where it has no graph.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GraphedBlocks"]

log = logging.getLogger(__name__)

_SEEN = 64  # patch counts remembered as met once


@dataclass
class _Inputs:
    """What the blocks read for one image: the graph's own copies once captured (or an example to capture)."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    boundaries: torch.Tensor  # [0, patches]: read by the attention where it splits images
    longest: Any  # the tower's ``max_seqlen`` (an int, or None)

    def cloned(self) -> _Inputs:
        return _Inputs(self.hidden.clone(), self.cos.clone(), self.sin.clone(), self.boundaries.clone(),
                       self.longest)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: _Inputs  # the graph reads these tensors' memory: kept with it
    output: torch.Tensor


class GraphedBlocks(torch.nn.Module):
    """The vision tower's blocks as one module: a CUDA graph's replay for one image of a patch count that
    has one, else each block in turn."""

    def __init__(self, blocks: torch.nn.ModuleList, *, most: int = 4) -> None:
        super().__init__()
        self.blocks = blocks
        self.most = most
        self.enabled = False  # set by the engine where graphs can be made (a GPU), once the blocks stay as they are
        self.wanted: dict[int, _Inputs] = {}  # patch count -> an image's inputs, to capture a graph with
        self._seen: OrderedDict[int, None] = OrderedDict()  # patch counts met once (the last _SEEN of them)
        self._graphs: OrderedDict[int, _Graph] = OrderedDict()
        self._stream: torch.cuda.Stream | None = None
        self._pool: Any = None

    @classmethod
    def install(cls, visual: Any, *, most: int = 4) -> GraphedBlocks | None:
        """Put a ``GraphedBlocks`` in place of ``visual.blocks`` (once); ``None`` where it has no block list."""
        blocks = getattr(visual, "blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
            return None
        if isinstance(blocks[0], GraphedBlocks):
            return blocks[0]
        graphed = cls(blocks, most=most)
        visual.blocks = torch.nn.ModuleList([graphed])
        return graphed

    @property
    def patch_counts(self) -> list[int]:
        """The patch counts with a graph, the most recently used last."""
        return list(self._graphs)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        inputs = self._one_image(hidden_states, cu_seqlens, position_embeddings, kwargs)
        made = self._graphs.get(inputs.hidden.shape[0]) if inputs is not None else None
        if inputs is not None and made is not None:
            self._graphs.move_to_end(inputs.hidden.shape[0])
            for mine, given in ((made.inputs.hidden, inputs.hidden), (made.inputs.cos, inputs.cos),
                                (made.inputs.sin, inputs.sin)):
                mine.copy_(given)
            made.graph.replay()
            return made.output
        if inputs is not None:
            self._met(inputs)
        for block in self.blocks:
            hidden_states = block(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings,
                                  **kwargs)
        return hidden_states

    def _one_image(self, hidden: torch.Tensor, boundaries: torch.Tensor | None,
                   rotary: tuple[torch.Tensor, torch.Tensor] | None, kwargs: dict[str, Any]) -> _Inputs | None:
        """The inputs of a pass a graph can take (one image, on the GPU, nothing asked of the blocks but their
        output), else ``None``."""
        if not self.enabled or boundaries is None or boundaries.numel() != 2 or rotary is None \
                or set(kwargs) - {"max_seqlen"} or torch.compiler.is_compiling() \
                or (hidden.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        return _Inputs(hidden, rotary[0], rotary[1], boundaries, kwargs.get("max_seqlen"))

    def _met(self, inputs: _Inputs) -> None:
        """One image of a patch count without a graph: wanted if that count has come before, else remembered."""
        patches = inputs.hidden.shape[0]
        if patches in self.wanted:
            return
        if patches in self._seen:  # the second time
            del self._seen[patches]
            self.wanted[patches] = inputs.cloned()  # (before the blocks: the input)
            return
        self._seen[patches] = None
        while len(self._seen) > _SEEN:
            self._seen.popitem(last=False)

    def _blocks(self, inputs: _Inputs) -> torch.Tensor:
        hidden = inputs.hidden
        extra = {"max_seqlen": inputs.longest} if inputs.longest is not None else {}
        for block in self.blocks:
            hidden = block(hidden, cu_seqlens=inputs.boundaries, position_embeddings=(inputs.cos, inputs.sin),
                           **extra)
        return hidden

    def capture(self) -> int | None:
        """Make the graph for one patch count in ``wanted`` (the oldest): its patch count, ``None`` where
        none is wanted. Each is captured on a side stream into one memory pool shared by these graphs (one
        runs at a time, and each output is read before the next replay)."""
        if not self.wanted:
            return None
        patches = next(iter(self.wanted))
        example = self.wanted.pop(patches)
        started = time.monotonic()
        stream = self._stream = self._stream or torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._blocks(example)  # a warm-up on this stream, as torch's graph docs ask
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            output = self._blocks(example)
        self._pool = graph.pool()
        self._graphs[patches] = _Graph(graph, example, output)
        while len(self._graphs) > self.most:
            self._graphs.popitem(last=False)
        log.info("the vision encoder of one %d-patch image captured as a CUDA graph in %.2fs (%d kept)",
                 patches, time.monotonic() - started, len(self._graphs))
        return patches

    def drop(self) -> None:
        """No more graphs, made or wanted (a capture failed, say): every image through the blocks as before."""
        self.enabled = False
        self.wanted.clear()
        self._seen.clear()
        self._graphs.clear()
