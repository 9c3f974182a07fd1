"""Per-question streaming and stopping inside one batched ``generate()`` call.

transformers' ``TextStreamer`` handles a batch of one; these follow each row of a batch on its own:
its text goes to its own question, and its own limit or cancellation ends only that row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from core.answer_text import CUT_NOTE, AnswerText

__all__ = ["RowStopper", "RowStreamer"]


class RowStreamer(BaseStreamer):
    """Decodes each row's new tokens, without ``hidden_ids``, and hands the new text to that row's ``emit``."""

    def __init__(
        self,
        tokenizer: Any,
        emits: Sequence[Callable[[object], object]],
        eos_ids: set[int],
        hidden_ids: set[int],
        max_new_tokens: Sequence[int],
        on_row_done: Callable[[int], object],
    ) -> None:
        self._tokenizer = tokenizer
        self._emits = list(emits)
        self._eos = eos_ids
        self._limits = list(max_new_tokens)
        self._on_row_done = on_row_done
        self.generated = [0] * len(self._emits)  # tokens per row, end-of-sequence included
        self._drop = hidden_ids
        decode = partial(tokenizer.decode, skip_special_tokens=False)
        self._texts = [AnswerText(decode, emit) for emit in self._emits]
        self._finished = [False] * len(self._emits)
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        for row, tokens in enumerate(value.reshape(len(self._emits), -1).tolist()):
            if self._finished[row]:
                continue
            cut = False
            for token in tokens:
                self.generated[row] += 1
                if token in self._eos:
                    self._finished[row] = True
                    break
                if token not in self._drop:
                    self._texts[row].tokens.append(token)
            else:
                cut = self.generated[row] >= self._limits[row]
            if cut:
                self._finished[row] = True
            self._texts[row].flush(final=self._finished[row])
            if cut:
                self._emits[row](CUT_NOTE)
            if self._finished[row]:
                # The rest of the batch may generate on: this question's asker need not wait for it.
                self._on_row_done(row)

    def end(self) -> None:
        for row in range(len(self._emits)):
            if not self._finished[row]:
                self._finished[row] = True
                self._texts[row].flush(final=True)
                self._on_row_done(row)


class RowStopper(StoppingCriteria):
    """Ends a row at its own token limit or when its asker went away; all rows when the engine stops."""

    def __init__(
        self,
        prompt_len: int,
        max_new_tokens: Sequence[int],
        cancelled: Sequence[threading.Event],
        closing: threading.Event,
    ) -> None:
        self._prompt_len = prompt_len
        self._limits = list(max_new_tokens)
        self._cancelled = list(cancelled)
        self._closing = closing
        self._none: Any = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        generated = input_ids.shape[1] - self._prompt_len
        closing = self._closing.is_set()
        done = [closing or generated >= limit or cancelled.is_set()
                for limit, cancelled in zip(self._limits, self._cancelled, strict=True)]
        if not any(done):
            # The usual answer, kept on the device: a fresh tensor each step would be a host-to-device
            # copy, and a wait for the GPU, per token.
            if self._none is None or self._none.device != input_ids.device:
                self._none = torch.zeros(len(done), dtype=torch.bool, device=input_ids.device)
            return self._none
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
