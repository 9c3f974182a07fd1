"""The decode loop imsight owns: questions in fixed KV slots, one step for all of them, as a CUDA graph.

Why not ``generate()``: its per-step overhead caps one stream near 110 tokens/s even compiled, a
batch runs to its longest answer, and transformers never compiles a bitsandbytes model. Why not
transformers' ``ContinuousBatchingManager``: it takes token ids only (``add_request(input_ids)``),
with no way in for pixels, encoder outputs or M-RoPE positions, so a vision prefill cannot join it.

So: each question is prefilled on its own, as ``generate()`` would, and its KV lands in a free row
(a "slot") of one preallocated cache: copied there from the model's own forward and cache, or, once
captured, by the stepper's forward over the prompt's embeddings into the spare "staging" row (a
follow-up's new tokens after a cached prefix take that way too), then moved.
Every step then decodes all active rows at once: one token each, each row at its own position,
with a mask that hides the unused end of its row. Rows stay packed at the front (a finished row's
place is taken by the last one), so a step over ``n`` rows runs on the first bucket size >= ``n``
(1, 2, 4, 8 ...) and reads only those rows. On CUDA each bucket's step is captured once as a CUDA
graph: a decode step is one graph launch instead of thousands of kernel launches from Python, and
with ``fused`` layers (core/fused_layers.py) a thousand fused kernels instead of 2,600 small ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from core.fused_layers import FusedLayers
from core.step_attention import StepAttention, prompts_attended_causally

__all__ = ["PREFILL_SIZES", "SlotKV", "StepTokens", "Stepper", "buckets"]

log = logging.getLogger(__name__)


# Sizes a first question's prefill is captured at: short text questions, then steps of 128 tokens up to
# 2,048 (a 1024x768 screenshot question is ~1,070 tokens with GLM-4.6V-Flash; at most 127 tokens padded).
# Longer prompts are prefilled the way they were before (compiled layers, not captured).
PREFILL_SIZES = (16, 32, 64, *range(128, 2048 + 1, 128))


_MOST_WARM_UPS = 3  # calls before a compiled shape's capture, at most


def _dynamo_misses() -> int:
    """Frames dynamo has been asked to compile in this process (each a miss of its cache)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def buckets(slots: int, start: int = 1) -> list[int]:
    """Sizes a step is run (and captured) at: powers of two from ``start`` up to ``slots``, and ``slots``."""
    sizes = [min(start, slots)]
    while sizes[-1] * 2 < slots:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != slots:
        sizes.append(slots)
    return sizes


class SlotKV:
    """Keys and values of ``slots`` rows of up to ``length`` tokens, per layer; row ``r`` writes its next
    token at ``positions[r]``. Passed to the model as its cache for decode steps (transformers calls
    ``update`` from each attention layer and attends over what it returns)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, length: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        # One row more than there are slots: a follow-up's tail is prefilled there, then moved in.
        shape = (layers, slots + 1, kv_heads, length, head_dim)
        # All layers in one tensor, each layer's a view of it: moving a row, or copying it out to keep, is
        # one copy for all layers instead of one a layer (80 launches from Python for GLM's 40).
        self._keys = torch.zeros(shape, dtype=dtype, device=device)
        self._values = torch.zeros(shape, dtype=dtype, device=device)
        self.keys, self.values = list(self._keys.unbind(0)), list(self._values.unbind(0))
        self.positions = torch.zeros(slots + 1, dtype=torch.long, device=device)
        self.slots, self.length = slots, length
        self.staging = slots  # the extra row
        self.first = 0  # the first row a forward works on (set per forward by ``aim``, like ``span``)
        self.span = length  # how much of each row a forward attends over
        self._targets = torch.zeros(0, dtype=torch.long, device=device)  # flat (row, head, position) to write
        self._rows = torch.arange(slots + 1, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values))

    # -- the cache protocol transformers' attention layers use ----------------------------------

    # Eager inside compiled layers: one graph for all of them (see fused_layers).
    @torch.compiler.disable  # type: ignore[untyped-decorator]  # (untyped in torch)
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        first, rows = self.first, key_states.shape[0]
        dim = key_states.shape[-1]
        # One copy kernel each for keys and values, to the places ``aim`` worked out once for all layers.
        self.keys[layer_idx].view(-1, dim).index_copy_(0, self._targets, key_states.reshape(-1, dim))
        self.values[layer_idx].view(-1, dim).index_copy_(0, self._targets, value_states.reshape(-1, dim))
        # Attention reads (and, with grouped heads and a mask, copies per head) every position it is
        # given: only the span that holds tokens, not the whole row.
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        return keys[first:first + rows, :, :self.span], values[first:first + rows, :, :self.span]

    def aim(self, first: int, where: torch.Tensor, span: int) -> None:
        """The next forward works on rows ``first ..`` and writes row r's new token t at ``where[r, t]``
        (no host sync, so capturable), attending over the first ``span`` positions of each row."""
        rows = where.shape[0]
        heads, length = self.keys[0].shape[1], self.length
        row_heads = self._rows[first:first + rows, None] * heads + torch.arange(heads, device=where.device)
        self._targets = (row_heads[:, :, None] * length + where[:, None, :]).reshape(-1)
        self.first, self.span = first, span

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are passed explicitly; nothing asks this during a step

    # -- moving questions in and out ------------------------------------------------------------

    def place(self, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Put a prefilled question's KV (one ``(keys, values)`` per layer, batch of one) into ``row``."""
        # Stacked, then one copy: a copy a layer's keys or values took ~1.3 ms of a follow-up's first token
        # on the H200 (``torch._foreach_copy_`` measured the same: it still launches one each).
        self._keys[:, row, :, :length] = torch.stack([keys[0, :, :length] for keys, _ in layers])
        self._values[:, row, :, :length] = torch.stack([values[0, :, :length] for _, values in layers])
        self.positions[row] = length

    def prefix(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of ``row``'s first ``length`` tokens, per layer, batch of one (to keep as a prefix): views
        of one copy for all layers."""
        keys = self._keys[:, row:row + 1, :, :length].clone()
        values = self._values[:, row:row + 1, :, :length].clone()
        return list(zip(keys.unbind(0), values.unbind(0), strict=True))

    def move(self, source: int, target: int, length: int) -> None:
        """Row ``source``'s first ``length`` tokens into row ``target`` (to keep active rows packed)."""
        self._keys[:, target, :, :length] = self._keys[:, source, :, :length]
        self._values[:, target, :, :length] = self._values[:, source, :, :length]
        self.positions[target] = self.positions[source]


class StepTokens:
    """The next tokens of a step that may still be running on the GPU: copied to host memory as the
    step ends, read by ``wait``. Lets the loop launch the next step before it reads this one."""

    def __init__(self, host: torch.Tensor, rows: int, done: torch.cuda.Event | None) -> None:
        self._host, self._rows, self._done = host, rows, done

    def wait(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        tokens: list[int] = self._host[:self._rows].tolist()
        return tokens


class Stepper:
    """One greedy decode step over the first ``n`` rows of a ``SlotKV``: eager, or replayed from a
    CUDA graph captured per bucket size.

    ``tokens[r]`` is row ``r``'s last token on the way in and its next token on the way out; the step
    writes the last token's KV at ``positions[r]`` and advances it.
    """

    def __init__(self, model: Any, kv: SlotKV, *, cache_keyword: str, mrope: bool, use_graphs: bool,
                 fused: FusedLayers | None = None, attention: StepAttention | None = None) -> None:
        self._model, self._kv, self._cache_kw, self._mrope = model, kv, cache_keyword, mrope
        self._attention = attention  # where installed: a prompt's attention takes SDPA's causal path
        device = kv.positions.device
        self.tokens = torch.zeros(kv.slots + 1, dtype=torch.long, device=device)
        self.rope_deltas = torch.zeros(kv.slots + 1, dtype=torch.long, device=device)  # M-RoPE: per row
        self._span = torch.arange(kv.length, device=device)
        self.sizes = buckets(kv.slots)
        self.spans = buckets(kv.length, start=512)
        # A follow-up's new tokens (its question and the answer before it, after the cached prefix) are
        # prefilled by a captured forward too: eagerly, 30 tokens cost as much as 1,000 (launch-bound).
        self.tails = [t for t in (8, 16, 32, 64, 128, 256) if t < kv.length]
        self._tail_ids = torch.zeros((1, max(self.tails, default=1)), dtype=torch.long, device=device)
        self._tail_next = torch.zeros(max(self.tails, default=1), dtype=torch.long, device=device)
        # A first question's prompt after the vision encoder (its input embeddings and positions) is
        # prefilled into the staging row by a captured forward too, padded to the next of these sizes: the
        # model's own forward through compiled layers launches from Python between them, and the GPU waits
        # (71 ms for ~42 ms of GPU work, H200, int4; replayed: 48 ms). Padding goes after the prompt, where
        # the causal mask hides it from the prompt's tokens; its KV lands past the row's end, unused.
        # A prompt attends over its own padded size, not the next span: a 1,152-token screenshot question
        # attended over 2,048 positions, masked (6.3 ms of its 48 on the H200).
        self.prefills = [t for t in PREFILL_SIZES if t < kv.length]
        width = max(self.prefills, default=1)
        embedding = model.get_input_embeddings()
        self._embeds = torch.zeros((1, width, embedding.embedding_dim), dtype=embedding.weight.dtype, device=device)
        self._rope = torch.zeros((3, 1, width) if mrope else (1, width), dtype=torch.long, device=device)
        self._last = torch.zeros(1, dtype=torch.long, device=device)  # the prompt's last token, in the padded one
        self._prefill_next = torch.zeros((1, 1), dtype=torch.long, device=device)
        # ("step"|"tail"|"prefill", size, span)
        self._graphs: dict[tuple[str, int, int], torch.cuda.CUDAGraph] = {}
        # Where each step's tokens land on the host: two, since one may be unread while the next step
        # runs. Pinned on the GPU, so the copy is asynchronous.
        pinned = device.type == "cuda"
        self._host = [torch.zeros(kv.slots + 1, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._launched = 0
        self.use_graphs = use_graphs
        # One side stream and one memory pool for every capture, both passes. cuBLAS keeps a workspace
        # per stream it has run on (32 MiB each on Hopper, never freed), and ``torch.cuda.Stream()``
        # hands out up to 32 different streams: a new stream per shape held ~1.1 GB on the H200 (GLM-4.6V-
        # Flash, 56 captures). The graphs never run at the same time and keep nothing in the pool that
        # another reads (inputs and outputs live in the stepper's and slots' own tensors), so one pool
        # serves them all; a pool per pass kept both passes' memory, the first with the tail graphs.
        self._stream: torch.cuda.Stream | None = None
        self._pool: Any = None
        self.fused = fused  # compiled layers, used by steps once ``captures(fused=True)`` has run
        self.fused_kinds: set[str] = set()  # the kinds that run through the compiled layers (``captures``)

    def bucket(self, rows: int) -> int:
        return next(size for size in self.sizes if size >= rows)

    def step(self, rows: int, longest: int) -> StepTokens:
        """Advance rows ``0..rows-1`` by one token, without waiting for the GPU; the new tokens stay in
        ``tokens`` (the next step's input) and come back through the returned ``StepTokens``.

        ``longest``: the most tokens any of these rows will hold after the step.
        """
        self._run("step", self.bucket(rows), next(s for s in self.spans if s >= min(longest, self._kv.length)))
        host = self._host[self._launched % 2]
        self._launched += 1
        host[:rows].copy_(self.tokens[:rows], non_blocking=True)
        done = None
        if self.tokens.is_cuda:
            done = torch.cuda.Event()
            done.record()
        return StepTokens(host, rows, done)

    def prefill_tail(self, ids: list[int], start: int) -> int:
        """Prefill ``ids`` into the staging row after its first ``start`` tokens (already placed there);
        returns the token that follows them. The row then holds ``start + len(ids)`` tokens."""
        kv = self._kv
        size = next(t for t in self.tails if t >= len(ids))
        self._tail_ids[0, :len(ids)] = torch.tensor(ids, device=self._tail_ids.device)
        self._tail_ids[0, len(ids):size] = 0  # padding: written past the row's end, overwritten later
        kv.positions[kv.staging] = start
        self._run("tail", size, next(s for s in self.spans if s >= start + size))
        kv.positions[kv.staging] = start + len(ids)
        return int(self._tail_next[len(ids) - 1])

    def fits_tail(self, count: int, start: int) -> bool:
        return bool(self.tails) and count <= self.tails[-1] and start + self.tails[-1] <= self._kv.length

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor | None) -> int:
        """A first question's prompt into the staging row from its start: its input embeddings
        (``[1, n, hidden]``, images merged in) and the positions the model gave them (M-RoPE's
        ``[3, 1, n]``; ``None``: 0 .. n-1). Returns the token that follows; the row then holds ``n``."""
        kv = self._kv
        count = int(embeds.shape[1])
        size = next(t for t in self.prefills if t >= count)
        self._embeds[:, :count] = embeds
        self._embeds[:, count:size] = 0
        self._rope[..., :size] = self._span[:size]
        if positions is not None:
            self._rope[..., :count] = positions
        self._last.fill_(count - 1)
        kv.positions[kv.staging] = 0
        self._run("prefill", size, size)
        kv.positions[kv.staging] = count
        return int(self._prefill_next[0, 0])

    def takes_positions(self, positions: torch.Tensor | None, count: int) -> bool:
        """Whether ``prefill`` takes these positions for ``count`` tokens: M-RoPE's three sections, or one
        row, or none (a model that hands its language model a fourth section, say, is prefilled its own way)."""
        return positions is None or tuple(positions.shape) == ((3, 1, count) if self._mrope else (1, count))

    def fits_prefill(self, count: int, *, captured: bool = True) -> bool:
        """Whether ``prefill`` takes a prompt of ``count`` tokens (``captured``: from a graph made for it)."""
        size = next((t for t in self.prefills if t >= count), None)
        return size is not None and (not captured or ("prefill", size, size) in self._graphs)

    def captures(self, *, fused: bool, kind: str = "step", every_span: bool = False) -> Iterator[None]:
        """Capture every (kind, size, span) forward, one shape per ``next``, each warmed up first where its kind's
        first shape was not (eager layers) or where it compiles (``fused``): the caller may decode in between with
        what it has, but not during one (it uses the slots' rows).

        ``fused=False``: with the eager layers, every kind; each graph is used as soon as it is made.
        Steps and tails only at the longest span unless ``every_span`` (no compiled pass comes after).
        ``fused=True``: compile the layers and capture that ``kind`` again ("step", "prefill" or
        "tail", a pass each, so that one failing leaves the others); the compiled graphs replace the
        others together, once all are made (after an error, none). Without CUDA graphs only the
        warm-ups run (they compile, where ``fused``).
        """
        made: dict[tuple[str, int, int], torch.cuda.CUDAGraph] = {}
        shapes = self._shapes()
        # Steps first (every answer needs them), each kind the largest first: the others fit in what it took.
        kinds = (kind,) if fused else ("step", "tail", "prefill")
        order = [shape for kind in kinds for shape in reversed(shapes) if shape[0] == kind]
        if not fused and not every_span:
            # The eager layers' graphs serve only until the compiled ones replace them (a minute of a first
            # start): steps and tails at the longest span only, which serves the shorter ones (``_graph``),
            # 29 captures instead of 59 for GLM-4.6V-Flash.
            order = [shape for shape in order if shape[0] == "prefill" or shape[2] == self.spans[-1]]
        if not fused:  # what one question needs first: ``lone_steps`` (the engine is ready after them)
            lone = [shape for shape in order if shape[:2] == ("step", 1)]
            order = lone + [shape for shape in order if shape not in lone]
        elif order:
            # Compiled first at the kind's shortest span, its smallest size and its largest (one row or several
            # are graphs of their own): traced at a whole row's span, the slots' keys seen by the layer
            # (``keys[:rows, :, :span]``) have a stride equal to span x head_dim, dynamo guards on that
            # equality, and every shorter span compiles again (the tiny model's steps: 8 graphs, 6 this way).
            span = min(span for _, _, span in order)
            shortest = [shape for shape in order if shape[2] == span]  # the largest size first
            for shape in dict.fromkeys([shortest[-1], shortest[0]]):
                self._capture(shape, fused, warm_only=True)
                yield
        warmed: set[str] = set()
        for shape in order:
            # The eager layers: only each kind's first shape warms up (on the capture stream: cuBLAS's workspace
            # and plans for it); the rest are captured straight away, half the layers' Python of the pass.
            graph = self._capture(shape, fused, warm_up=fused or shape[0] not in warmed)
            warmed.add(shape[0])
            if graph is not None:
                made[shape] = graph
                if not fused:
                    self._graphs[shape] = graph
            yield
        if fused:
            self._graphs.update(made)
            self.fused_kinds.add(kind)

    def lone_steps(self) -> bool:
        """Whether one question's steps replay graphs, at every span (or there are none to replay)."""
        return not self.use_graphs or all(self._graph("step", 1, span) is not None for span in self.spans)

    def _graph(self, kind: str, size: int, span: int) -> torch.cuda.CUDAGraph | None:
        """The graph for this shape (a prompt's span is its own size, none of ``spans``), or else the same rows'
        at the nearest longer span (which attends over more positions, masked: the eager layers' pass captures
        steps and tails at the longest span only)."""
        for longer in (span, *(s for s in self.spans if s > span)):
            if (graph := self._graphs.get((kind, size, longer))) is not None:
                return graph
        return None

    def _shapes(self) -> list[tuple[str, int, int]]:
        shapes = [("step", size, span) for span in self.spans for size in self.sizes]
        shapes += [("tail", size, span) for size in self.tails for span in self.spans if span >= size]
        return shapes + [("prefill", size, size) for size in self.prefills]

    def _capture(self, shape: tuple[str, int, int], fused: bool, *, warm_only: bool = False, warm_up: bool = True
                 ) -> torch.cuda.CUDAGraph | None:
        """One shape warmed up (compilation, lazy inits and autotuning stay out of the graph), then
        captured where there are graphs (unless ``warm_only``). Row contents do not matter and nothing is
        kept. ``warm_up=False``: captured straight away, and where that fails, warmed up and captured again."""
        kv = self._kv
        saved = kv.positions.clone()
        stream = None
        if self.use_graphs:
            stream = self._stream = self._stream or torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            # Lazy starts (cuBLAS plans, Triton's autotuning) and compiling stay out of the graph. Eager layers:
            # one call. Compiled ones: calls until one compiles nothing (a kind's first shapes compile, and may
            # recompile on the second call; the rest reuse those graphs). Three calls each ran the compiled
            # layers' Python for seconds of every start (H200, int4: the tails' pass, nothing to compile,
            # 2.9 s of work; 1.9 s with one call each).
            # (without graphs the warm-ups are all there is: never skipped)
            for _ in range(_MOST_WARM_UPS if fused else int(warm_up or stream is None)):
                misses = _dynamo_misses()
                kv.positions.zero_()
                self._eager(*shape, fused=fused)
                if _dynamo_misses() == misses:
                    break
        graph = None
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        if stream is not None and not warm_only:
            kv.positions.zero_()
            graph = torch.cuda.CUDAGraph()
            # Global capture mode (the default): a CUDA call from any other thread meanwhile fails the capture,
            # and the engine then decodes eagerly for good. The render thread makes none (page-locking
            # prompts there did: bench/RESULTS.md, sixteenth step).
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    self._eager(*shape, fused=fused)
            except Exception:
                if warm_up:
                    raise
                # Something of this shape's own wanted a first call outside a capture (a Triton kernel's
                # specialization loaded, say): the way every shape went before.
                torch.cuda.synchronize()
                kv.positions.copy_(saved)
                log.info("capturing %s without a warm-up failed; warmed up and captured again", shape)
                return self._capture(shape, fused)
            self._pool = graph.pool()
        kv.positions.copy_(saved)
        if stream is not None:
            torch.cuda.synchronize()
        return graph

    def _run(self, kind: str, size: int, span: int) -> None:
        graph = self._graph(kind, size, span) if self.use_graphs else None
        if graph is not None:
            graph.replay()
        else:
            self._eager(kind, size, span, fused=kind in self.fused_kinds)

    def _eager(self, kind: str, size: int, span: int, *, fused: bool = False) -> None:
        kv = self._kv
        if kind == "step":  # ``size`` rows from the first, one token each
            self.tokens[:size] = self._forward(0, span, fused, ids=self.tokens[:size, None])[:, -1]
            kv.positions[:size] = torch.clamp(kv.positions[:size] + 1, max=kv.length - 1)
        elif kind == "tail":  # the staging row, ``size`` tokens
            self._tail_next[:size] = self._forward(kv.staging, span, fused, ids=self._tail_ids[:, :size])[0]
        else:  # "prefill": the staging row, ``size`` embeddings at their own positions; the last one's token
            # Copied out of the wider buffers: a slice's strides (even the batch's, of size 1) tell one size
            # from another, a recompile of the compiled layers per size.
            dense = torch.contiguous_format
            with prompts_attended_causally(self._attention, [0]):
                self._prefill_next[:] = self._forward(kv.staging, span, fused,
                                                      embeds=self._embeds[:, :size].clone(memory_format=dense),
                                                      rope=self._rope[..., :size].clone(memory_format=dense),
                                                      keep=self._last)

    def _forward(self, first: int, span: int, fused: bool, *, ids: torch.Tensor | None = None,
                 embeds: torch.Tensor | None = None, rope: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``first ..`` take new tokens, as ``ids`` (``[rows, count]``) or ``embeds`` (``[rows,
        count, hidden]``), each row at its position; returns the greedy next token after each of them
        (``[rows, count]``), or after those ``keep`` names. ``rope``: the tokens' rotary positions where
        they are not the row's positions (plus its M-RoPE offset)."""
        kv = self._kv
        new = ids if ids is not None else embeds
        assert new is not None
        rows, count = new.shape[:2]
        # Token t of row r sits at positions[r] + t and sees that row's tokens up to there, nothing past.
        where = kv.positions[first:first + rows, None] + self._span[None, :count]
        kv.aim(first, where, span)
        mask = (self._span[None, None, :span] <= where[:, :, None])[:, None]
        if rope is None:
            rope = where
            if self._mrope:  # text after the image: all three M-RoPE sections at position + the row's offset
                rope = (where + self.rope_deltas[first:first + rows, None]).unsqueeze(0).expand(3, rows, count)
        tokens = {"input_ids": ids} if ids is not None else {"inputs_embeds": embeds}
        with self.fused.active() if fused and self.fused is not None else contextlib.nullcontext():
            out = self._model(**tokens, position_ids=rope, attention_mask=mask, use_cache=True,
                              logits_to_keep=keep if keep is not None else 0 if count > 1 else 1,
                              **{self._cache_kw: kv})
        kv.first = 0
        next_tokens: torch.Tensor = out.logits.argmax(-1)
        return next_tokens
