"""The in-process engine: any ``AutoModelForImageTextToText`` model, generation on one owner thread.

Continuous batching (``core.decode_loop``): each question is prefilled on arrival and joins the
questions being answered at the next decode step, in a KV slot of its own; every step decodes all of
them at once (a CUDA graph on the GPU). A follow-up about the same images reuses the prefilled KV
cache of the conversation so far and reads only its new tokens. A prompt longer than a slot is
answered with ``generate()`` on its own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from core import glm_decoder, glm_vision, qkv_projection, text_rotary, vision_attention, vision_positions
from core.answer_text import CUT_NOTE, AnswerText, without_thinking
from core.compiled_vision import CompiledVision, vision_blocks
from core.decode_loop import SlotKV, Stepper, StepTokens
from core.engine import GenerationLimits, PreparedImage, Turn, Usage
from core.errors import EngineError, EngineOutOfMemory, one_line
from core.fused_layers import FusedLayers, compile_summary, decoder_layers, prefill_cache
from core.kv_cache import (
    cache_bytes,
    cache_keyword,
    copied,
    crop_to,
    holding,
    make_room,
    own_storage,
    tensor_bytes,
)
from core.model_files import ModelSource
from core.model_loading import LoadedModel, load
from core.pixel_memo import ImageProcessorMemo
from core.prefill_batch import (
    Prefilled,
    image_inputs,
    left_padded,
    pad_token,
    prefill_together,
    split_encoder_outputs,
    uses_mrope,
)
from core.prefix_cache import Features, Prefix, PrefixCache, StateCache, common_prefix
from core.prompt_embeddings import PromptEmbeddings, prompt_embeddings
from core.prompt_inputs import eos_ids, halved, hidden_special_ids, image_token_ids, rendered
from core.step_attention import StepAttention, prompts_attended_causally, without_cudnn
from core.vision_graphs import GraphedBlocks

__all__ = ["EngineStats", "TransformersEngine"]

log = logging.getLogger(__name__)

MiB = 2**20
_WORKING_RESERVE = 1024 * MiB  # free GPU memory a generation may need; prefixes are evicted to keep it
_T = TypeVar("_T")


@dataclass(slots=True)
class EngineStats:
    """Counters since start: what batching and the prefix cache did."""

    questions: int = 0
    batches: int = 0  # decode steps shared by more than one question
    prefix_hits: int = 0
    prefix_misses: int = 0
    features_hits: int = 0  # no usable prefix, but the images' encoder output was reused
    tokens_reused: int = 0  # prompt tokens not prefilled again thanks to a cached prefix
    tokens_generated: int = 0
    prefill_batches: int = 0  # forwards that prefilled several first questions together
    slot_prefills: int = 0  # first questions prefilled by the stepper's forward (a CUDA graph on a GPU)
    oom_retries: int = 0
    decode_steps: int = 0


@dataclass(eq=False)
class _Request:
    images: Sequence[PreparedImage]
    turns: Sequence[Turn]
    question: str
    limits: GenerationLimits
    emit: Callable[[object], object]
    cancelled: threading.Event
    inputs: Any = None  # the processor's output: rendered on the render thread, moved to the device when admitted
    prompt_ids: Any = None  # its input ids on the host: prefix lookups compare these without waiting on the GPU
    key: tuple[str, ...] = field(default=())
    streamed: bool = False  # some of the answer has gone out: it cannot be started over
    remember: bool = True  # keep its prefix and image features for follow-ups
    # The asker's (or one nobody reads), filled in before its end is sent: tokens, and where its time went.
    usage: Usage = field(default_factory=Usage)
    asked: float = field(default_factory=time.monotonic)

    def send(self, text: object) -> None:
        self.first_token_out()  # (generate()'s path has no earlier sight of it)
        self.streamed = True
        self.emit(text)

    def first_token_out(self) -> None:
        if not self.usage.first_token_s:
            self.usage.first_token_s = time.monotonic() - self.asked


@dataclass(eq=False)
class _Active:
    """A question in a decode slot: what it has said so far, and how long its row is."""

    request: _Request
    limit: int
    length: int  # tokens in its KV row
    text: AnswerText  # the shown tokens (hidden special ones left out), streamed as text
    generated: int = 0


def _row_cache(config: Any, layers: list[tuple[Any, Any]]) -> Any:
    """A ``prefill_cache`` holding one question's KV, given per layer (batch of one): those tensors, not
    copies (``holding``; the callers copy first, or after)."""
    return holding(prefill_cache(config), layers)


def _as_engine_error(exc: Exception) -> EngineError:
    """What a question that failed while generating is told."""
    return exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")


def _offset(delta: Any) -> int:
    """An M-RoPE position offset (``rope_deltas``, one per prompt) as a number; 0 for other models."""
    return int(delta.reshape(-1)[0]) if delta is not None else 0


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()
_PIXEL_KEYS = frozenset({"pixel_values", "pixel_values_videos", "image_patches"})


class TransformersEngine:
    """Loads a model with transformers and answers on a single worker thread.

    Like aiosqlite's connection thread, one thread owns the model: torch work never runs on the
    event loop, and the model sees one generate() call at a time.
    """

    name = "transformers"
    supports_images = True

    def __init__(
        self,
        source: ModelSource,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str = "auto",
        cache_dir: Path | None = None,
        max_batch: int = 8,
        batch_window_s: float = 0.0,
        prefix_cache_bytes: int = 1024 * MiB,
        warmup: bool = True,
        context_tokens: int = 4096,
        cuda_graphs: bool = True,
        compile_decode: bool = True,
        split_kv_attention: bool = True,
        compile_cache: Path | None = None,
        unpacked_weights: bool = False,
        decoder_kernels: bool = True,
        vision_kernels: bool = True,
        int4_cache: Path | None = None,
    ) -> None:
        self._source = source
        self.model = source.name_or_path
        self._load_args: dict[str, Any] = {
            "device": device, "dtype": dtype, "quantization": quantization, "cache_dir": cache_dir,
            "unpacked_weights": unpacked_weights, "int4_cache": int4_cache,
        }
        self.max_batch = max_batch
        self._window_s = batch_window_s
        self._prefixes = PrefixCache(prefix_cache_bytes)
        # The fallback when a prompt does not start with a cached one: skip only the vision encoder.
        self._features: StateCache[Features] = StateCache(prefix_cache_bytes // 4)
        self._encodes_ahead = False
        self._warmup = warmup
        # Each question's slot holds this many tokens (prompt and answer); set from free memory at start.
        self._context_tokens = context_tokens
        self._use_graphs = cuda_graphs
        self._compile_decode = compile_decode
        self._decoder_kernels = decoder_kernels  # GLM-4V's layers through core/glm_decoder.py where it applies
        self._own_layers = False  # whether they are: then nothing of the decoder is compiled
        self._vision_kernels = vision_kernels  # GLM-4V's vision blocks through core/glm_vision.py where it applies
        self._own_vision = False  # whether they are: then nothing of the vision encoder is compiled
        self._split_kv_attention = split_kv_attention
        self._compile_cache = compile_cache
        self._kv: SlotKV | None = None
        self._speeding_up: Iterator[None] | None = None  # capturing and compiling the step, a shape per idle turn
        self.settled = threading.Event()  # the decode step is as fast as it will get (compiled, or not to be)
        self._lone_steps = threading.Event()  # one question's steps are captured (or will not be): start waits
        self._compile_without_graphs = False  # compile where CUDA graphs cannot be captured (tests, on the CPU)
        self._prefill_uncaptured = False  # first questions through ``Stepper.prefill`` without its graphs (tests)
        self._stepper: Stepper | None = None
        self._active: list[_Active] = []  # questions being decoded; index = slot row
        self._in_flight: tuple[list[_Active], StepTokens] | None = None  # a launched step, tokens unread
        self._waiting: collections.deque[_Request] = collections.deque()  # prefilled when a slot frees
        self._loaded: LoadedModel | None = None
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # Prompts are rendered (chat template, image processor: ~30 ms of CPU for a 1024x768 screenshot)
        # on a thread of their own, so the engine thread never leaves the GPU idle for them.
        self._renderer: concurrent.futures.ThreadPoolExecutor | None = None
        self._render_lock = threading.Lock()  # the image processor's memo serves one render at a time
        self._intake = threading.Lock()  # a question is queued before the engine thread's last look, or refused
        self._drained = False
        self._fused_prefill: FusedLayers | None = None  # the compiled layers first questions' prefill takes
        self._fused_together = False  # whether several prefilled together take them too
        self._vision = CompiledVision()  # what the vision encoder runs through: its blocks compiled, once made
        self._vision_graphs: GraphedBlocks | None = None  # one image's pass through them, as CUDA graphs
        self._step_attention: StepAttention | None = None  # decode steps' attention, where its kernel runs
        self._closing = threading.Event()
        self._cache_kw = "past_key_values"
        self._image_token_ids: set[int] = set()
        self._hidden_ids: set[int] = set()
        self._eos: set[int] = set()
        self._pad_id = 0
        self._mrope = False
        self._pixels: ImageProcessorMemo | None = None
        self.stats = EngineStats()
        self.device = "cpu"

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineError("engine is not started")
        return self._loaded

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing.clear()
        self._loaded = await loop.run_in_executor(None, lambda: load(self._source, **self._load_args))
        self.device = self._loaded.device
        if await loop.run_in_executor(None, vision_attention.install, self._loaded.model):
            log.info("vision encoder's attention: the images' lengths read once a run, not in every block")
        if await loop.run_in_executor(None, vision_positions.install, self._loaded.model):
            log.info("vision encoder's position embeddings: resized by a matrix product, not grid_sample")
        if await loop.run_in_executor(None, text_rotary.install, self._loaded.model):
            log.info("decoder's rotary: in the projections' own layout, no transposing copy")
        if layers := await loop.run_in_executor(None, qkv_projection.install, self._loaded.model):
            log.info("decoder's query, key and value projections: one int4 weight, one launch (%d layers)", layers)
        layers = await loop.run_in_executor(None, glm_decoder.install, self._loaded.model) \
            if self._decoder_kernels else 0
        self._own_layers = layers > 0
        if layers:
            log.info("decoder layers: imsight's kernels between the products, nothing to compile (%d layers)", layers)
        blocks = await loop.run_in_executor(None, glm_vision.install, self._loaded.model) \
            if self._vision_kernels else 0
        self._own_vision = blocks > 0
        if blocks:
            log.info("vision encoder's blocks: imsight's kernels between the products, nothing to compile (%d blocks)",
                     blocks)
        self._cache_kw = cache_keyword(self._loaded.model)
        self._image_token_ids = image_token_ids(self._loaded.model.config)
        processor = self._loaded.processor
        self._pixels = processor.image_processor = ImageProcessorMemo(processor.image_processor)
        self._hidden_ids = hidden_special_ids(processor.tokenizer)
        self._eos = eos_ids(self._loaded.model)
        self._pad_id = pad_token(processor.tokenizer, self._eos)
        # transformers >= 5.2x encodes images before prefill and accepts the result back.
        self._encodes_ahead = bool(getattr(self._loaded.model, "_supports_mm_encoder_outputs", lambda: False)())
        self._mrope = uses_mrope(self._loaded.model)
        self._renderer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imsight-render")
        self._drained = False
        self._thread = threading.Thread(target=self._serve, name="imsight-engine", daemon=True)
        self._thread.start()
        if self._warmup:
            started = time.monotonic()
            try:
                await self._warm_up()
            except BaseException:
                await self.stop()  # a model that cannot answer a dummy question will not answer real ones
                raise
            log.info("engine warmed up in %.2fs", time.monotonic() - started)
            if self._stepper is not None:
                # Ready once a question asked now decodes from graphs: before, its whole answer would run
                # eagerly (steps are not captured while it is answered), 2.6-5.6 s for 64 tokens instead of
                # 0.4 (GLM-4.6V-Flash, H200). Capturing one question's 4 step shapes takes about a second.
                started = time.monotonic()
                await loop.run_in_executor(None, self._lone_steps.wait, 120)
                log.info("one question's decode steps captured in %.2fs", time.monotonic() - started)

    async def stop(self) -> None:
        self._closing.set()  # a generation in flight stops at its next token
        if self._thread is not None:
            self._requests.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        if self._renderer is not None:
            self._renderer.shutdown(wait=False)  # a render still queued there fails its question (closing)
            self._renderer = None
        self._clear_caches()
        # What the engine put in transformers' attention registry, out again in the reverse order (each restores
        # what it found): the compiled layers' never-compiled attention, then the decode steps' kernel.
        if self._stepper is not None and self._stepper.fused is not None:
            self._stepper.fused.remove()
            self._stepper.fused = None
        self._fused_prefill = None  # (its layers are the model's, which goes now)
        if self._step_attention is not None:
            self._step_attention.remove()
            self._step_attention = None
        self._loaded = None

    async def answer(
        self,
        images: Sequence[PreparedImage],
        turns: Sequence[Turn],
        question: str,
        limits: GenerationLimits,
        usage: Usage | None = None,
    ) -> AsyncIterator[str]:
        async for text in self._ask(images, turns, question, limits, remember=True, usage=usage):
            yield text

    async def _ask(
        self,
        images: Sequence[PreparedImage],
        turns: Sequence[Turn],
        question: str,
        limits: GenerationLimits,
        *,
        remember: bool,
        usage: Usage | None = None,
    ) -> AsyncIterator[str]:
        if self._thread is None or self._closing.is_set():
            raise EngineError("engine is not started" if self._thread is None else "engine is stopping")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[object] = asyncio.Queue()
        request = _Request(images, turns, question, limits,
                           lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item), threading.Event(),
                           remember=remember, usage=usage if usage is not None else Usage())
        assert self._renderer is not None
        if await loop.run_in_executor(self._renderer, self._render, request):
            with self._intake:
                if self._drained:
                    raise EngineError("engine is stopping")
                self._requests.put(request)

        async def raw() -> AsyncIterator[str]:
            while (item := await chunks.get()) is not _DONE:
                if isinstance(item, _Failed):
                    raise item.error
                yield str(item)

        try:
            async for text in without_thinking(raw()):
                yield text
        finally:
            request.cancelled.set()  # the consumer went away (cancelled or closed): stop generating

    async def _warm_up(self) -> None:
        """One short answer, so the first real question does not pay for CUDA's lazy start (seconds)."""
        from PIL import Image

        image = PreparedImage("warm-up", Image.new("RGB", (64, 64), (128, 128, 128)))
        # Not remembered: its prefix would be stored on the engine thread after the answer is out,
        # racing with the clearing below.
        async for _ in self._ask([image], [], "Hi", GenerationLimits(max_new_tokens=2), remember=False):
            pass
        self._clear_caches()
        self.stats = EngineStats()

    # -- the engine thread -------------------------------------------------------------------

    def _serve(self) -> None:
        import torch

        with torch.inference_mode():  # every tensor the engine keeps (caches too) is inference-only
            while not self._closing.is_set():
                try:
                    if not self._take_requests():
                        break
                    self._admit_waiting()
                    if self._vision_graphs is not None and self._vision_graphs.wanted and not self._waiting:
                        self._capture_vision(self._vision_graphs)
                    if self._active:
                        self._step()
                    elif self._speeding_up is not None and not self._waiting:
                        self._idle_turn(self._speeding_up)
                except BaseException as exc:
                    log.exception("engine thread: unexpected error")
                    for active in self._active:
                        self._fail(active.request, EngineError(f"generation failed: {exc}"))
                    self._active.clear()
                    self._in_flight = None
        for active in self._active:
            self._fail(active.request, EngineError("engine stopped"))
        self._active.clear()
        with self._intake:
            self._drained = True  # nothing is queued after this
        # Whoever is still waiting learns that the engine stopped.
        while self._waiting:
            self._fail(self._waiting.popleft(), EngineError("engine stopped"))
        while True:
            try:
                left = self._requests.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                self._fail(left, EngineError("engine stopped"))

    def _idle_turn(self, work: Iterator[None]) -> None:
        """One shape of the decode step's capturing or compiling; ``settled`` once all are done."""
        done = next(work, _DONE) is _DONE
        if done or (self._stepper is not None and self._stepper.lone_steps()):  # (made before any idle turn)
            self._lone_steps.set()
        if done:
            self._speeding_up = None
            self.settled.set()

    def _take_requests(self) -> bool:
        """New questions into the waiting line: wait for one when idle, else take what has come.

        When idle, the first question waits up to the batch window for others, so questions that
        arrive together start together. ``False`` once the engine is told to stop.
        """
        idle = not self._active and not self._waiting
        while True:
            try:
                waits = idle and self._speeding_up is None  # else there is work for idle turns
                request = self._requests.get(timeout=None) if waits else self._requests.get_nowait()
            except queue.Empty:
                return True
            if request is None:
                return False
            self._waiting.append(request)
            if idle and self.max_batch > 1:
                deadline = time.monotonic() + self._window_s
                while len(self._waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        more = self._requests.get(timeout=left)
                    except queue.Empty:
                        break
                    if more is None:
                        self._requests.put(None)  # stop after these
                        break
                    self._waiting.append(more)
            idle = False

    def _admit_waiting(self) -> None:
        """Prefill waiting questions into free slots (they join the next decode step); first questions
        that wait together are prefilled together (core/prefill_batch.py)."""
        together: list[tuple[_Request, Features | None]] = []
        while self._waiting and len(self._active) + len(together) < self.max_batch and not self._closing.is_set():
            request = self._waiting.popleft()
            if request.cancelled.is_set():
                request.emit(_DONE)
                continue
            request.usage.waited_s = time.monotonic() - request.asked
            hit = self._lookup(request)
            if hit is not None:  # the images are in the cached prefix: their pixels need not reach the GPU
                for key in _PIXEL_KEYS:
                    request.inputs.pop(key, None)
            request.inputs = self._on_device(request.inputs)
            features = self._features.get(request.key) if hit is None and request.key else None
            self.stats.features_hits += features is not None
            if hit is None and self._fits_slot(request):
                together.append((request, features))
            else:
                self._admit_safely(request, hit, features)
        if len(together) > 1:
            together = self._admit_together(together)
        for request, features in together:
            self._admit_safely(request, None, features)

    def _fits_slot(self, request: _Request) -> bool:
        return int(request.inputs["input_ids"].shape[1]) + 1 < self._slot_tokens()

    def _admit_safely(self, request: _Request, hit: tuple[Prefix, int] | None, features: Features | None) -> None:
        import torch

        if not self._fits_slot(request):
            # Longer than a slot: answered alone by generate(), with a growable cache.
            self._answer_safely(request, hit, features)
            return
        try:
            try:
                self._admit(request, hit, features)
            except torch.OutOfMemoryError:
                self._answer_after_oom(request)
                request.emit(_DONE)
        except Exception as exc:
            self._failed_generating(request, exc)

    def _admit_together(self, group: list[tuple[_Request, Features | None]]
                        ) -> list[tuple[_Request, Features | None]]:
        """First questions prefilled as one batch, each then seated as if prefilled alone; returns what
        is left to admit one at a time: all of them where the batch cannot be made or run (out of
        memory, say), so each question keeps its own retry and its own error."""
        model = self.loaded.model
        self._make_room()
        try:
            with self._attention_kernels():
                encoded = self._encoded_together(group)
                batch = left_padded(encoded, self._pad_id)
            if batch is None:
                return group
            cache = prefill_cache(model.config)
            width = int(batch["input_ids"].shape[1])
            starts = [width - int(one["input_ids"].shape[1]) for one in encoded]  # (left-padded)
            with prompts_attended_causally(self._step_attention, starts):
                rows = self._prefilled(lambda: prefill_together(model, batch, cache, cache_keyword=self._cache_kw,
                                                                mrope=self._mrope), together=True)
        except Exception as exc:  # out of memory too
            log.info("%d questions could not be prefilled together (%s); one at a time", len(group), one_line(exc))
            return group
        self.stats.prefill_batches += 1
        # Every first token goes out before any row is kept or seated: each row's copies (~7 ms of Python on
        # the H200 when they were a copy a layer; a few now) would otherwise hold up the rows after it.
        answering: list[tuple[_Request, Prefilled, _Active | None]] = []
        for (request, _), row in zip(group, rows, strict=True):
            request.usage.prefill = f"together with {len(group) - 1} other(s)"
            try:
                answering.append((request, row, self._first_token(request, row.first, row.length)))
            except Exception as exc:
                self._failed_generating(request, exc)
        for request, row, active in answering:
            try:
                if self._keeps(request):
                    # (a copy: views would pin the whole batch's cache)
                    self._keep_prefix(request, _row_cache(model.config, copied(row.layers)), row.delta)
                if active is not None:
                    self._take_slot(active, row.first, row.delta,
                                    partial(SlotKV.place, layers=row.layers, length=row.length), cache)
            except Exception as exc:
                self._failed_generating(request, exc)
        return []

    def _failed_generating(self, request: _Request, exc: Exception) -> None:
        log.warning("generation failed: %s", exc)
        self._fail(request, _as_engine_error(exc))

    def _fail(self, request: _Request, error: BaseException) -> None:
        request.emit(_Failed(error))
        request.emit(_DONE)

    def _slot_tokens(self) -> int:
        return self._kv.length if self._kv is not None else self._context_tokens

    def _admit(self, request: _Request, hit: tuple[Prefix, int] | None, features: Features | None) -> None:
        """Prefill one question on its own, as ``generate()`` would, and give it a decode slot."""
        model = self.loaded.model
        self._make_room()
        inputs = dict(request.inputs)
        ids = inputs["input_ids"]
        prompt_len = int(ids.shape[1])
        if hit is not None and self._stepper is not None and self._stepper.fits_tail(prompt_len - hit[1], hit[1]):
            self._admit_follow_up(request, hit, prompt_len)
            return
        if hit is not None:  # a tail too long for the captured forwards (a long answer before it, say)
            request.usage.prefill = f"cached prefix, {prompt_len - hit[1]} new tokens by the model's forward"
            cache, out = self._prefilled(lambda: self._prefill_tail(hit, ids))
        else:
            with self._attention_kernels():
                encoded = self._encoded(request, inputs, features)
                prompt = self._embedded(encoded, prompt_len)
            if prompt is not None:
                self._admit_in_slot(request, prompt, prompt_len)
                return
            request.usage.prefill = "the model's forward"
            cache, out = self._prefilled(lambda: self._prefill(encoded))
        first = int(out.logits[0, -1].argmax())
        delta = model.model.rope_deltas if self._mrope else None
        if self._keeps(request):
            self._keep_prefix(request, cache, delta)
        self._seat(request, first, prompt_len, delta,
                   lambda kv, row: kv.place(row, [(layer.keys, layer.values) for layer in cache.layers], prompt_len),
                   cache)

    def _prefill(self, inputs: dict[str, Any]) -> tuple[Any, Any]:
        """A first question's forward over its whole prompt, into a new cache: the cache and the output."""
        model = self.loaded.model
        cache = prefill_cache(model.config)
        if self._mrope:
            model.model.rope_deltas = None  # computed anew from this prompt's images
        # (Alone, nothing padded: transformers drops the mask itself, and SDPA attends causally.)
        return cache, model(**inputs, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})

    def _prefill_tail(self, hit: tuple[Prefix, int], ids: Any) -> tuple[Any, Any]:
        """The tokens of ``ids`` after a cached prefix, into a copy of its cache: the cache and the output."""
        import torch

        model = self.loaded.model
        entry, reuse = hit
        cache = copy.deepcopy(entry.cache)  # a ``prefill_cache``, as every kept prefix
        crop_to(cache, reuse)
        delta = entry.extra.get("rope_deltas")
        positions = torch.arange(reuse, ids.shape[1], device=ids.device)[None, :]
        if self._mrope:
            model.model.rope_deltas = delta.clone() if delta is not None else None
            offset = delta.reshape(-1)[:1] if delta is not None else 0
            positions = (positions + offset).unsqueeze(0).expand(3, 1, -1)
        out = model(input_ids=ids[:, reuse:], position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{self._cache_kw: cache})
        return cache, out

    def _prefilled(self, work: Callable[[], _T], *, together: bool = False) -> _T:
        """``work`` (part of a first question's prefill, or of several ``together``) through the compiled
        layers once they are in use; where they fail it (a shape past dynamo's recompile limit, say),
        again eagerly, and eagerly from then on. Only cuDNN-free attention: prompts come in every
        length, cuDNN re-plans for each."""
        import torch

        if self._fused_prefill is not None and (self._fused_together or not together):
            try:
                with self._attention_kernels(), self._fused_prefill.active():
                    return work()
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                log.warning("the compiled prefill%s failed (%s); it runs eagerly from now on",
                            " of several questions together" if together else "", one_line(exc))
                if together:
                    self._fused_together = False
                else:
                    self._fused_prefill = None
        with self._attention_kernels():
            return work()

    def _embedded(self, encoded: dict[str, Any], prompt_len: int) -> PromptEmbeddings | None:
        """A first question's prompt as its language model takes it, where a captured forward can prefill
        it (else ``None``: prefilled by the model's own forward)."""
        stepper = self._stepper
        if stepper is None or not stepper.fits_prefill(prompt_len, captured=not self._prefill_uncaptured):
            return None
        model = self.loaded.model
        if self._mrope:
            model.model.rope_deltas = None  # computed anew from this prompt's images
        prompt = prompt_embeddings(model, encoded)
        return prompt if prompt is not None and stepper.takes_positions(prompt.positions, prompt_len) else None

    def _admit_in_slot(self, request: _Request, prompt: PromptEmbeddings, prompt_len: int) -> None:
        """A first question prefilled by one captured forward into the staging row (its vision encoder
        and embeddings already run), then moved into a slot, as a follow-up's tail is."""
        assert self._kv is not None
        assert self._stepper is not None
        delta = self.loaded.model.model.rope_deltas if self._mrope else None
        request.usage.prefill = "captured prompt" if self._stepper.use_graphs else "prompt into its slot"
        first = self._stepper.prefill(prompt.embeds, prompt.positions)
        self.stats.slot_prefills += 1
        self._seat_from_staging(request, first, prompt_len, delta)

    def _admit_follow_up(self, request: _Request, hit: tuple[Prefix, int], prompt_len: int) -> None:
        """A follow-up: the cached prefix copied into the staging row, only the new tokens prefilled
        there (one captured forward), then the row moved into a slot."""
        assert self._kv is not None
        assert self._stepper is not None
        kv, stepper = self._kv, self._stepper
        entry, reuse = hit
        kv.place(kv.staging, [(layer.keys, layer.values) for layer in entry.cache.layers], reuse)
        delta = entry.extra.get("rope_deltas")
        stepper.rope_deltas[kv.staging] = _offset(delta)
        request.usage.prefill = (f"cached prefix, {prompt_len - reuse} new tokens "
                                 + ("captured" if stepper.use_graphs else "into its slot"))
        first = stepper.prefill_tail(request.prompt_ids[reuse:].tolist(), reuse)
        self._seat_from_staging(request, first, prompt_len, delta)

    def _seat_from_staging(self, request: _Request, first: int, prompt_len: int, delta: Any) -> None:
        """``_seat`` for a question whose prompt the staging row holds; kept as a prefix from there."""
        assert self._kv is not None
        kv = self._kv
        self._seat(request, first, prompt_len, delta, lambda kv, row: kv.move(kv.staging, row, prompt_len))
        if self._keeps(request):  # after the first token is out; the staging row still holds the prompt
            self._keep_prefix(request, _row_cache(self.loaded.model.config, kv.prefix(kv.staging, prompt_len)), delta)

    def _seat(self, request: _Request, first: int, prompt_len: int, delta: Any,
              place: Callable[[SlotKV, int], None], cache: Any = None) -> None:
        """The prefilled question's first token out; unless that ended it, its KV into the next slot row."""
        active = self._first_token(request, first, prompt_len)
        if active is not None:
            self._take_slot(active, first, delta, place, cache)

    def _first_token(self, request: _Request, first: int, prompt_len: int) -> _Active | None:
        """The prefilled question's first token out; the question being answered, unless that ended it."""
        request.first_token_out()
        self.stats.questions += 1
        request.usage.prompt_tokens = prompt_len
        decode = partial(self.loaded.processor.tokenizer.decode, skip_special_tokens=False)
        active = _Active(request, request.limits.max_new_tokens, prompt_len, AnswerText(decode, request.send))
        return None if self._accept_token(active, first) else active

    def _take_slot(self, active: _Active, first: int, delta: Any, place: Callable[[SlotKV, int], None],
                   cache: Any = None) -> None:
        """A question past its first token: its KV into the next slot row (``place``), decoded from there."""
        kv = self._slots(cache)
        assert self._stepper is not None
        row = len(self._active)
        place(kv, row)
        self._stepper.tokens[row] = first
        self._stepper.rope_deltas[row] = _offset(delta)
        self._active.append(active)

    def _keeps(self, request: _Request) -> bool:
        """Whether this question's prompt is kept for follow-ups."""
        return bool(request.key) and request.remember and self._prefixes.budget > 0 and not self._closing.is_set()

    def _keep_prefix(self, request: _Request, cache: Any, delta: Any) -> None:
        extra = {"rope_deltas": delta.clone()} if delta is not None else {}
        self._prefixes.put(request.key, Prefix(request.prompt_ids, cache, extra, cache_bytes(cache)))

    def _slots(self, cache: Any) -> SlotKV:
        """The slot cache, made the first time from a prefilled cache's shapes (and its graphs captured)."""
        if self._kv is not None:
            return self._kv

        keys = cache.layers[0].keys
        _, heads, _, dim = keys.shape
        per_token = 2 * len(cache.layers) * heads * dim * keys.element_size()
        length = self._context_tokens
        if self.device == "cuda":
            # The slots take at most a quarter of what is free after the weights.
            room = self._free_gpu_bytes() // 4
            length = max(512, min(length, room // (per_token * self.max_batch)))
        self._kv = SlotKV(len(cache.layers), self.max_batch, heads, dim, length, dtype=keys.dtype, device=keys.device)
        if self._split_kv_attention:
            with self._attention_kernels():  # (checked with the kernels it will be used with)
                self._step_attention = StepAttention.install(self.loaded.model, heads, dim, device=keys.device,
                                                             dtype=keys.dtype)
        elif keys.device.type == "cuda":
            log.info("split_kv_attention = false: decode steps' attention is SDPA")
        graphs = self._use_graphs and keys.device.type == "cuda"
        compiles = self._compile_decode and (graphs or self._compile_without_graphs)
        self._stepper = Stepper(self.loaded.model, self._kv, cache_keyword=self._cache_kw, mrope=self._mrope,
                                use_graphs=graphs, attention=self._step_attention)
        log.info("KV slots: %d questions x %d tokens = %.2f GB (%d KB per token)", self.max_batch, length,
                 self._kv.nbytes / 1e9, per_token // 1024)
        if graphs or compiles:
            compiled = compiles and not self._own_layers
            log.info("the decode step runs eagerly until it is %s, while idle (batch sizes %s x spans %s; "
                     "follow-up tails %s)", "captured and compiled" if compiled else "captured",
                     self._stepper.sizes, self._stepper.spans, self._stepper.tails)
            self._speeding_up = self._speed_up_when_idle(self._stepper, compiles=compiles)
        else:
            log.info("%s: the decode step runs eagerly, neither compiled nor captured",
                     "cuda_graphs = false" if keys.device.type == "cuda" else "no GPU")
            self._lone_steps.set()
            self.settled.set()
        return self._kv

    def _fuse(self) -> FusedLayers | None:
        layers = decoder_layers(self.loaded.model)
        if not layers:
            log.warning("cannot find this model's decoder layers; the decode step runs them unfused")
            return None
        return FusedLayers(layers, cache_dir=self._compile_cache)

    def _compile_prefill(self, fused: FusedLayers) -> None:
        """The compiled layers for first questions' prefill too: compiled now, on a dummy screenshot
        question (sizes are symbolic: one compilation serves every prompt length)."""
        if self._compiles(fused, "the prefill", lambda: self._prefill(self._dummy_question(0))):
            self._fused_prefill = fused

    def _compile_prefill_together(self, fused: FusedLayers) -> None:
        """The compiled layers for first questions prefilled together too. A batch takes a graph of its own
        (several rows, an attention mask: ``left_padded`` always pads), compiled here on two dummy questions
        rather than when chats first ask at once (20-25 s on the H200, every asker waiting)."""
        if self._fused_prefill is not fused:
            return
        model = self.loaded.model

        def pair() -> None:
            batch = left_padded([self._dummy_question(0), self._dummy_question(1)], self._pad_id)
            if batch is None:
                raise EngineError("this model's inputs cannot be joined")
            prefill_together(model, batch, prefill_cache(model.config), cache_keyword=self._cache_kw,
                             mrope=self._mrope)

        self._fused_together = self._compiles(fused, "the prefill of several questions together", pair)

    def _compile_vision(self) -> None:
        """The vision encoder's blocks compiled (``core/compiled_vision.py``) on a dummy screenshot question,
        then on two together."""
        if not self._encodes_ahead:
            return

        def dummies() -> None:
            first = self._dummy_question(0)
            self._vision_encoder(dict(first))
            self._vision_encoder(image_inputs([first, self._dummy_question(1)]))

        with self._attention_kernels():
            self._vision.compile(self.loaded.model, dummies, cache_dir=self._compile_cache)

    def _graph_vision(self) -> None:
        """From now on one image's pass through the vision blocks replays a CUDA graph made for its patch
        count (``core/vision_graphs.py``), each made once an image of a new size has been encoded."""
        if not (self._encodes_ahead and vision_blocks(self.loaded.model)):
            return
        self._vision_graphs = GraphedBlocks.install(self.loaded.model.model.visual)
        if self._vision_graphs is not None:
            self._vision_graphs.enabled = True

    def _capture_vision(self, graphs: GraphedBlocks) -> None:
        """The graph for one image size that has come (a few tens of ms, between decode steps); where that
        cannot be done, images go through the blocks as before, said once."""
        import torch

        try:
            with self._attention_kernels(), self._vision.active():
                graphs.capture()
        except Exception as exc:
            if self.device == "cuda":
                torch.cuda.synchronize()
            log.warning("cannot capture the vision encoder as a CUDA graph (%s); it runs as before", one_line(exc))
            graphs.drop()
            self._vision_graphs = None

    def _compiles(self, fused: FusedLayers, what: str, work: Callable[[], object]) -> bool:
        """``FusedLayers.compiles`` with the attention kernels prefill runs with."""
        with self._attention_kernels():
            return fused.compiles(what, work)

    def _dummy_question(self, n: int) -> Any:
        """A screenshot-sized question about a blank image of its own, rendered: what compiling runs on."""
        from PIL import Image

        image = PreparedImage(f"imsight-compile-{n}", Image.new("RGB", (448, 336), (70, 90, 110 + n)))
        return self._inputs([image], [], "What is on this screen?")

    def _speed_up_when_idle(self, stepper: Stepper, *, compiles: bool) -> Iterator[None]:
        """Capture the decode step, follow-ups' tails and first questions' prompts as CUDA graphs
        (seconds), then compile the layers and capture the step again, then the prompts and tails, and
        last compile the model's own prefill (alone, for prompts longer than the captured ones, and several
        together); one shape per idle turn of ``_serve``: never while a question is being answered.

        Why not at start: dynamo traces every graph anew in each process, inductor's cache or not, and
        everything is captured again (measured on the H200: all done 64-88 s after a restart, ~10 s of
        it tracing), so the daemon would be ready a minute late on every restart. This way it is ready
        once the model is loaded; until then steps run eagerly, then captured, then compiled (int4 on
        the H200: 252 tokens/s). A question that comes meanwhile waits for the shape in hand: under a
        second while capturing, up to ~20 s while the first shapes compile (GLM-4.6V-Flash on the H200).

        Where the decoder layers are imsight's own (``core.glm_decoder``) the first pass is the decoder's last,
        at every span, and only the vision encoder is compiled after it (everything done ~35 s after a restart
        on the H200); where its blocks are imsight's too (``core.glm_vision``), nothing is compiled at all."""
        if stepper.use_graphs:
            # Every span where no compiled pass comes after this one (imsight's own layers need none).
            yield from self._idle_work(stepper, fused=False, every_span=self._own_layers or not compiles)
        if compiles and not self._own_layers:
            # Made here, not with the stepper: torch.compile's first call imports inductor, seconds that
            # would delay ready (measured on the H200: 3.2 s of a 21 s restart).
            yield
            stepper.fused = self._fuse()
        if stepper.fused is not None:
            yield from self._idle_work(stepper, fused=True)
        # What nearly every question takes next: first questions' prompts and follow-ups' new tokens replay
        # graphs of the eager layers until these (62 against 48 ms a screenshot question, H200, int4).
        for kind in ("prefill", "tail"):
            if stepper.fused is not None and stepper.use_graphs:
                yield from self._idle_work(stepper, fused=True, kind=kind)
        if self._own_vision:  # nothing to compile: one image's blocks replay graphs from now on
            if stepper.use_graphs:
                self._graph_vision()
        elif compiles and (self._own_layers or stepper.fused is not None):  # (dropped where it cannot compile)
            yield
            self._compile_vision()
            yield
            if stepper.use_graphs:
                self._graph_vision()
        if stepper.fused is not None:
            self._compile_prefill(stepper.fused)
            yield
            self._compile_prefill_together(stepper.fused)

    def _idle_work(self, stepper: Stepper, *, fused: bool, kind: str = "step", every_span: bool = False
                   ) -> Iterator[None]:
        """``stepper.captures`` a shape at a time; what cannot be done here is done without, said once."""
        import torch

        started, busy = time.monotonic(), 0.0
        work = stepper.captures(fused=fused, kind=kind, every_span=every_span)
        what = {"prefill": "first questions' prefill", "tail": "follow-ups' prefill"}.get(kind, "decode step")
        done = False
        while not done:
            shape_started = time.monotonic()
            try:
                done = next(work, _DONE) is _DONE
            except Exception as exc:
                if self.device == "cuda":
                    torch.cuda.synchronize()
                reason = one_line(exc)
                if kind != "step":  # its graphs of the eager layers stay
                    log.warning("cannot compile %s (%s); it stays unfused", what, reason)
                elif fused:  # a model or GPU it cannot compile for: the step stays as it is
                    assert stepper.fused is not None
                    log.warning("cannot compile the decode step (%s); it stays unfused", reason)
                    stepper.fused.remove()
                    stepper.fused = None
                else:  # a kernel that cannot be captured
                    log.warning("cannot capture the decode step as a CUDA graph (%s); decoding eagerly", reason)
                    stepper.use_graphs = False
                return
            busy += time.monotonic() - shape_started
            if not done:
                yield
        # The graphs' own memory comes on top of the weights and slots the load logged (0.03 GB for
        # GLM-4.6V-Flash in int4 on the H200, bench/RESULTS.md ninth step): what the GPU holds now says it.
        held = f"; GPU memory allocated now {torch.cuda.memory_allocated() / 1e9:.2f} GB" if self.device == "cuda" \
            else ""
        log.info("%s %s: %.1fs of work over %.1fs%s%s", what,
                 ("compiled and captured" if stepper.use_graphs else "compiled") if fused else "captured",
                 busy, time.monotonic() - started, f" ({compile_summary()})" if fused else "", held)

    def _step(self) -> None:
        """Launch the next decode step for every active question, then take the tokens of the one before.

        One step ahead: while the GPU runs step n+1, this thread reads step n's tokens, streams their
        text and retires finished questions (measured on the H200: ~1 ms a token of Python that
        otherwise leaves the GPU idle between steps). A question that ended at step n costs step n+1
        one wasted row; its token is dropped. Everything that touches the slots (moves, new
        questions' KV) is queued on the same CUDA stream, so it lands after the step in flight.
        """
        for row in reversed(range(len(self._active))):
            if self._active[row].request.cancelled.is_set():
                self._finish(row, cut=False)
        previous, self._in_flight = self._in_flight, None
        if self._active:
            assert self._stepper is not None
            rows = len(self._active)
            self.stats.decode_steps += 1
            self.stats.batches += rows > 1
            # Rows still owed the previous step's token hold one more than their ``length`` says.
            longest = max(active.length for active in self._active) + 1 + (previous is not None)
            self._in_flight = (list(self._active), self._stepper.step(rows, longest))
        if previous is not None:
            self._take_tokens(*previous)
        if not self._active:
            self._in_flight = None  # only rows that have ended were in it

    def _take_tokens(self, stepped: list[_Active], tokens: StepTokens) -> None:
        """A step's tokens to the questions that were in it and are still being answered."""
        assert self._kv is not None
        ended: list[tuple[_Active, bool]] = []
        current = set(map(id, self._active))
        for active, token in zip(stepped, tokens.wait(), strict=True):
            if id(active) not in current:
                continue  # it ended (or was cancelled) after this step was launched
            active.length += 1  # the token fed in was written to its row
            if self._accept_token(active, token, in_slot=True):
                ended.append((active, False))
            elif active.length + 1 >= self._kv.length:
                ended.append((active, True))  # its slot is full: the answer is cut there
        for active, cut in ended:
            self._finish(self._active.index(active), cut=cut)

    def _accept_token(self, active: _Active, token: int, *, in_slot: bool = False) -> bool:
        """Record a generated token and stream the text; ``True`` when the answer ended with it."""
        active.generated += 1
        ended = token in self._eos
        if not ended and token not in self._hidden_ids:
            active.text.tokens.append(token)
        cut = not ended and active.generated >= active.limit
        active.text.flush(final=ended or cut)
        if cut:
            active.request.send(CUT_NOTE)
        if ended or cut:
            self._count(active.request, active.generated)
            if not in_slot:
                active.request.emit(_DONE)
            return True
        return False

    def _count(self, request: _Request, generated: int) -> None:
        self.stats.tokens_generated += generated
        request.usage.completion_tokens = generated

    def _finish(self, row: int, *, cut: bool) -> None:
        """End the question in ``row``; the last active row moves into its place (rows stay packed)."""
        assert self._kv is not None
        assert self._stepper is not None
        active = self._active[row]
        if cut:
            active.text.flush(final=True)
            active.request.send(CUT_NOTE)
            self._count(active.request, active.generated)
        last = len(self._active) - 1
        if row != last:
            moving = self._active[last]
            # One position more than it is known to hold: the step in flight may have written it.
            self._kv.move(last, row, min(moving.length + 1, self._kv.length))
            self._stepper.tokens[row] = self._stepper.tokens[last]
            self._stepper.rope_deltas[row] = self._stepper.rope_deltas[last]
            self._active[row] = moving
        self._active.pop()
        active.request.emit(_DONE)

    def measurements(self) -> dict[str, float]:
        """``core.engine.Measured``: the counters of ``stats``, cache sizes, and GPU memory in use."""
        values = {field.name: float(getattr(self.stats, field.name)) for field in dataclasses.fields(self.stats)}
        fused_kinds = self._stepper.fused_kinds if self._stepper is not None else set()
        values["decode_compiled"] = float("step" in fused_kinds)
        values["decoder_kernels"] = float(self._own_layers)  # imsight's layers: nothing of the decoder to compile
        values["settled"] = float(self.settled.is_set())  # everything captured and compiled that will be
        values["prefill_compiled"] = float(self._fused_prefill is not None)
        values["vision_compiled"] = float(self._vision.compiled)
        values["vision_kernels"] = float(self._own_vision)  # imsight's blocks: nothing of the vision encoder to compile
        values["vision_graphs"] = float(len(self._vision_graphs.patch_counts) if self._vision_graphs else 0)
        values["prefill_together_compiled"] = float(self._fused_prefill is not None and self._fused_together)
        values["prompt_graphs_compiled"] = float("prefill" in fused_kinds)  # first questions' captured prefill
        values["tail_graphs_compiled"] = float("tail" in fused_kinds)  # follow-ups' captured tails
        values["prefix_cache_bytes"] = float(self._prefixes.nbytes)
        values["features_cache_bytes"] = float(self._features.nbytes)
        if self.device == "cuda":
            import torch

            values["gpu_memory_allocated_bytes"] = float(torch.cuda.memory_allocated())
            values["gpu_memory_reserved_bytes"] = float(torch.cuda.memory_reserved())
        return values

    def _clear_caches(self) -> None:
        self._prefixes.clear()
        self._features.clear()

    def _render(self, request: _Request) -> bool:
        """The prompt through the processor's chat template, in host memory; ``False`` (and the error
        sent) on failure."""
        if self._closing.is_set():
            self._fail(request, EngineError("engine is stopping"))
            return False
        try:
            self._take_rendered(request)
            request.key = tuple(image.sha256 for image in request.images)
            return True
        except Exception as exc:
            self._fail(request, EngineError(f"cannot prepare the prompt: {exc}"))
            return False

    def _take_rendered(self, request: _Request) -> None:
        request.inputs = self._rendered(request.images, request.turns, request.question)
        request.prompt_ids = request.inputs["input_ids"][0]

    def _rendered(self, images: Sequence[PreparedImage], turns: Sequence[Turn], question: str) -> Any:
        loaded = self.loaded
        assert self._pixels is not None
        with self._render_lock, self._pixels.expecting([image.sha256 for image in images]):
            inputs = rendered(loaded.processor, images, turns, question)
            if "pixel_values" in inputs:  # cast here: half the bytes to move
                inputs["pixel_values"] = self._pixels.cast(inputs["pixel_values"], loaded.pixel_dtype)
        return inputs

    def _on_device(self, inputs: Any) -> Any:
        # Moved by the engine thread, on its stream: a copy from the render thread would wait for the
        # step in flight.
        return inputs.to(self.loaded.model.device)

    def _inputs(self, images: Sequence[PreparedImage], turns: Sequence[Turn], question: str) -> Any:
        """The prompt rendered and on the model's device (the engine thread's own renders, and benches)."""
        return self._on_device(self._rendered(images, turns, question))

    def _answer_safely(self, request: _Request, hit: tuple[Prefix, int] | None, features: Features | None = None
                       ) -> None:
        import torch

        try:
            try:
                self._generate(request, hit, features)
            except torch.OutOfMemoryError:
                self._answer_after_oom(request)
        except Exception as exc:
            log.warning("generation failed: %s", exc)
            request.emit(_Failed(_as_engine_error(exc)))
        finally:
            request.emit(_DONE)

    def _answer_after_oom(self, request: _Request) -> None:
        """Out of GPU memory: drop every cached prefix, then try the question once more, smaller."""
        import torch

        self.stats.oom_retries += 1
        log.warning("out of GPU memory answering a question: freeing caches, retrying with smaller images")
        self._clear_caches()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if request.streamed:
            raise EngineError("out of GPU memory in the middle of an answer")
        request.images = [halved(image) for image in request.images]
        self._take_rendered(request)
        request.inputs = self._on_device(request.inputs)
        try:
            self._generate(request, None)
        except torch.OutOfMemoryError as exc:
            raise EngineOutOfMemory("out of GPU memory, even with a smaller image; try a shorter question, "
                                    "fewer images, or [engine] quantization = \"nf4\"") from exc

    def _lookup(self, request: _Request) -> tuple[Prefix, int] | None:
        """A cached prefix covering this prompt's images, and how many of its tokens can be reused."""
        if not request.key:
            return None
        entry = self._prefixes.get(request.key)
        if entry is None:
            self.stats.prefix_misses += 1
            return None
        ids = request.prompt_ids
        reuse = min(common_prefix(entry.ids, ids), len(ids) - 1)  # generate() needs one new token
        if reuse < self._image_end(ids):
            self.stats.prefix_misses += 1  # the images themselves would be read again
            return None
        self.stats.prefix_hits += 1
        self.stats.tokens_reused += reuse
        return entry, reuse

    def _image_end(self, ids: Any) -> int:
        """Index just past the last image token: a reused prefix must cover every image."""
        import torch

        marks = torch.isin(ids, torch.tensor(sorted(self._image_token_ids), device=ids.device))
        positions = marks.nonzero()
        return int(positions[-1, 0]) + 1 if len(positions) else len(ids)

    def _generate(self, request: _Request, hit: tuple[Prefix, int] | None, features: Features | None = None) -> None:
        """One question answered alone by ``generate()`` with a growable cache: a prompt longer than a
        slot, or a retry after running out of memory."""
        from transformers import StoppingCriteriaList

        from core.token_streams import RowStopper, RowStreamer

        loaded = self.loaded
        model, tokenizer = loaded.model, loaded.processor.tokenizer
        self._make_room()
        inputs = dict(request.inputs)
        self.stats.questions += 1
        request.usage.prefill = "alone, by generate()"
        prompt_len = inputs["input_ids"].shape[1]
        request.usage.prompt_tokens = int(prompt_len)
        limit = request.limits.max_new_tokens
        if hit is not None:
            entry, reuse = hit
            cache = copy.deepcopy(entry.cache)
            crop_to(cache, reuse)
            for name, value in entry.extra.items():
                setattr(model.model, name, value.clone())
            inputs.pop("pixel_values", None)  # the images are already in the cache
        else:
            cache = prefill_cache(model.config)  # kept as a prefix: a later long tail may take compiled layers
            inputs = self._encoded(request, inputs, features)

        def done(_row: int) -> None:
            self._count(request, streamer.generated[0])  # counted before the asker hears of it
            request.emit(_DONE)

        streamer = RowStreamer(tokenizer, [request.send], self._eos, self._hidden_ids, [limit], done)
        stopper = RowStopper(prompt_len, [limit], [request.cancelled], self._closing)
        with self._attention_kernels():
            model.generate(
                **inputs,
                **{self._cache_kw: cache},
                max_new_tokens=limit,
                do_sample=False,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([stopper]),
            )
        if self._keeps(request):
            crop_to(cache, prompt_len)  # the answer as generated may not be how the template re-renders it
            own_storage(cache)
            self._keep_prefix(request, cache, model.model.rope_deltas if self._mrope else None)

    def _attention_kernels(self) -> contextlib.AbstractContextManager[None]:
        """SDPA without cuDNN's kernels. cuDNN's are the fastest, but it plans every new shape (45-65 ms a shape,
        ~0.8 s for a process's first: H200, torch 2.11), and prompts and batches come in every length: a growing
        cache's steps were 2x slower. The captured prompts take flash (``step_attention.causal_rows``), the
        captured follow-up tails the split-KV kernel (``step_attention.tail_attention``; without cuDNN SDPA's
        masked kernel made a follow-up 3.6-3.9 ms slower). So no cuDNN plan is made, unless the kernel's check
        refuses the tails: they then keep cuDNN."""
        return without_cudnn() if self.device == "cuda" else contextlib.nullcontext()

    def _encoded(self, request: _Request, inputs: dict[str, Any], features: Features | None) -> dict[str, Any]:
        """``inputs`` with the images' vision-encoder output in place of their pixels (cached, or made
        and kept now) where the model takes it that way; else as they are."""
        if not (request.key and self._encodes_ahead):
            return inputs
        features = features or self._encode(request.key, inputs)
        if features is None:
            return inputs
        encoded = {k: v for k, v in inputs.items() if k not in _PIXEL_KEYS}
        encoded["mm_encoder_outputs"] = {"image": features.outputs}
        return encoded

    def _encoded_together(self, group: list[tuple[_Request, Features | None]]) -> list[dict[str, Any]]:
        """``_encoded`` for several questions, the images without cached encoder output encoded in one run."""
        fresh = [request for request, features in group if features is None and request.key]
        made: dict[_Request, Features | None] = {}
        if self._encodes_ahead and len(fresh) > 1:
            made = dict(zip(fresh, self._encode_together(fresh), strict=True))
        return [self._encoded(request, dict(request.inputs), features or made.get(request))
                for request, features in group]

    def _encode_together(self, requests: list[_Request]) -> list[Features | None]:
        """The vision encoder run once over several questions' images, kept per question as ``_encode``
        keeps one's; where its output cannot be split per question, each encoded on its own."""
        encoded = self._vision_encoder(image_inputs([request.inputs for request in requests]))
        outputs = encoded.get("mm_encoder_outputs", {}).get("image")
        parts = split_encoder_outputs(outputs, [len(request.images) for request in requests])
        if parts is None:
            return [self._encode(request.key, request.inputs) for request in requests]
        return [self._keep_features(request.key, part) for request, part in zip(requests, parts, strict=True)]

    def _encode(self, key: tuple[str, ...], inputs: dict[str, Any]) -> Features | None:
        """Run the vision encoder as generate() would, and keep its output for this set of images."""
        encoded = self._vision_encoder(dict(inputs))
        outputs = encoded.get("mm_encoder_outputs", {}).get("image")
        return self._keep_features(key, outputs) if outputs is not None else None

    def _vision_encoder(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The vision encoder over ``inputs``' images as ``generate()`` runs it (through the compiled blocks
        once they are made): the model's encoder keyword arguments."""
        encode = self.loaded.model._prepare_multimodal_encoder_kwargs_for_generation
        return self._vision.run(lambda: encode(inputs))

    def _keep_features(self, key: tuple[str, ...], outputs: Any) -> Features:
        """The vision encoder's output for this set of images, kept for the next question about them."""
        features = Features(outputs, tensor_bytes(outputs))
        if self._features.budget > 0:
            self._features.put(key, features)
        return features

    def _make_room(self) -> None:
        """Evict cached prefixes and features while the GPU is short of room for a generation."""
        if self.device != "cuda":
            return
        import torch

        if make_room(self._free_gpu_bytes, _WORKING_RESERVE, [self._features, self._prefixes]):
            torch.cuda.empty_cache()

    @staticmethod
    def _free_gpu_bytes() -> int:
        import torch

        available, _ = torch.cuda.mem_get_info()
        # Memory torch holds but does not use is free for the next generation too.
        return int(available) + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
