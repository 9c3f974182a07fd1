"""The in-process engine: any ``AutoModelForImageTextToText`` model, generation on one owner thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.engine import GenerationLimits, PreparedImage, Turn
from core.errors import EngineError
from core.model_files import ModelSource, unavailable
from core.tiny_model import MARKER

__all__ = ["TransformersEngine"]

log = logging.getLogger(__name__)

_DONE = object()


class TransformersEngine:
    """Loads a model with transformers and answers on a single worker thread.

    Like aiosqlite's connection thread, one thread owns the model: torch work never runs on the
    event loop, and requests reach the model one at a time in the order they were made.
    """

    name = "transformers"
    max_batch = 1
    supports_images = True

    def __init__(self, source: ModelSource, *, device: str = "auto", dtype: str = "auto") -> None:
        self._source = source
        self._device_setting = device
        self._dtype_setting = dtype
        self._executor: ThreadPoolExecutor | None = None
        self._model: Any = None
        self._processor: Any = None
        self._closing = threading.Event()
        self.device = "cpu"

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imsight-engine")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def stop(self) -> None:
        self._closing.set()  # a generation in flight stops at its next token
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
            self._executor = None
        self._model = self._processor = None

    async def answer(
        self,
        images: Sequence[PreparedImage],
        turns: Sequence[Turn],
        question: str,
        limits: GenerationLimits,
    ) -> AsyncIterator[str]:
        if self._executor is None or self._model is None:
            raise EngineError("engine is not started")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        messages = _messages(images, turns, question)
        work = loop.run_in_executor(self._executor, self._generate, messages, limits, emit, cancelled)
        try:
            while (item := await chunks.get()) is not _DONE:
                yield str(item)
            await work  # re-raises what the generation thread raised
        finally:
            cancelled.set()  # the consumer went away (cancelled or closed): stop generating

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = _pick_device(self._device_setting, torch.cuda.is_available())
        dtype = _pick_dtype(self._dtype_setting, self.device, torch)
        name, local_only = self._source.name_or_path, self._source.local_files_only
        try:
            self._processor = AutoProcessor.from_pretrained(name, local_files_only=local_only)
            self._model = AutoModelForImageTextToText.from_pretrained(
                name, local_files_only=local_only, dtype=dtype, device_map=self.device
            )
        except (OSError, ValueError) as exc:
            raise unavailable(name, str(exc).splitlines()[0]) from exc
        self._model.eval()
        if getattr(self._model.config, MARKER, False):
            log.warning("model %s is imsight's tiny test model: random weights, answers are noise", name)
        log.info("model %s loaded on %s as %s", name, self.device, dtype)

    def _generate(
        self,
        messages: list[dict[str, Any]],
        limits: GenerationLimits,
        emit: Any,
        cancelled: threading.Event,
    ) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        closing = self._closing

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancelled.is_set() or closing.is_set()

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    emit(text)

        try:
            inputs = self._processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            inputs.pop("token_type_ids", None)  # some processors return it; generate() rejects it
            inputs = inputs.to(self._model.device)
            streamer = _Streamer(self._processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            with torch.inference_mode():
                self._model.generate(
                    **inputs,
                    max_new_tokens=limits.max_new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Stop()]),
                )
        except Exception as exc:
            raise EngineError(f"generation failed: {exc}") from exc
        finally:
            emit(_DONE)  # the consumer stops waiting, then learns of any error from the future


def _messages(images: Sequence[PreparedImage], turns: Sequence[Turn], question: str) -> list[dict[str, Any]]:
    """Chat messages with the images at the start of the first user turn.

    The images stay in the first user message, so the rendered prompt of a follow-up extends the
    earlier one (a stable prefix for caching) and models that allow one image per sequence work.
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


def _pick_device(setting: str, cuda_available: bool) -> str:
    if setting == "cuda" and not cuda_available:
        raise EngineError("[engine] device = \"cuda\" but torch sees no CUDA device")
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    return setting


def _pick_dtype(setting: str, device: str, torch: Any) -> Any:
    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, setting)
