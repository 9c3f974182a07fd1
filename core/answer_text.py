"""Cleaning streamed model text: reasoning models think aloud before they answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

__all__ = ["CUT_NOTE", "EMIT_EVERY_S", "AnswerText", "ThinkingFilter", "without_thinking"]

# Said after an answer that hit its token limit ([engine] max_new_tokens), so a half sentence is not
# taken for the whole answer.
CUT_NOTE = "\n\n… (answer cut at the length limit)"

# Text goes out at most this often per question: chats show it in pieces anyway, and every wake-up
# of the event loop takes the GIL from the generation loop between two decode steps.
EMIT_EVERY_S = 0.05


class AnswerText:
    """One answer's tokens in, its new text out through ``emit``, at most every ``EMIT_EVERY_S``.

    The tokens are decoded whole each time, not one by one: a character split over several tokens
    comes out right (and waits while its bytes are incomplete).
    """

    def __init__(self, decode: Callable[[list[int]], str], emit: Callable[[str], object]) -> None:
        self._decode, self._emit = decode, emit
        self.tokens: list[int] = []
        self._sent = 0
        self._sent_at = 0.0

    def flush(self, *, final: bool) -> None:
        now = time.monotonic()
        if not final and now - self._sent_at < EMIT_EVERY_S:
            return
        text = self._decode(self.tokens)
        if not final and text.endswith("\ufffd"):
            return  # a character cut in the middle of its bytes: wait for the rest
        self._sent_at = now
        if len(text) > self._sent:
            self._emit(text[self._sent:])
            self._sent = len(text)

_THINK, _END_THINK = "<think>", "</think>"
_ANSWER_TAGS = ("<answer>", "</answer>")


class ThinkingFilter:
    """Drops a leading ``<think>…</think>`` block and ``<answer>`` tags from a stream of text chunks.

    GLM-4.1V-Thinking answers ``<think>…</think><answer>…</answer>``; a chat wants only the answer.
    Text that does not start with ``<think>`` passes through unchanged (apart from answer tags).
    """

    def __init__(self) -> None:
        self._state = "start"  # start -> thinking -> answering
        self._pending = ""
        self._after_thought = False  # whitespace between </think> and the answer is dropped

    def feed(self, text: str) -> str:
        self._pending += text
        out: list[str] = []
        while True:
            if self._state == "start":
                head = self._pending.lstrip()
                if head.startswith(_THINK):
                    self._state, self._pending = "thinking", head[len(_THINK):]
                elif _THINK.startswith(head):
                    return ""  # nothing yet, or the first characters of "<think>"
                else:
                    self._state = "answering"
            elif self._state == "thinking":
                end = self._pending.find(_END_THINK)
                if end < 0:
                    self._pending = self._pending[-(len(_END_THINK) - 1):]  # a tag may be cut in two
                    return ""
                self._state, self._pending = "answering", self._pending[end + len(_END_THINK):]
                self._after_thought = True
            else:
                if self._after_thought:
                    self._pending = self._pending.lstrip()
                    if not self._pending:
                        return "".join(out)
                    self._after_thought = False
                text, self._pending = _split_partial_tag(self._pending)
                for tag in _ANSWER_TAGS:
                    text = text.replace(tag, "")
                out.append(text)
                return "".join(out)

    def flush(self) -> str:
        """What is left at the end of the stream (a thought that never ended is dropped)."""
        if self._state == "answering":
            text, self._pending = self._pending, ""
            for tag in _ANSWER_TAGS:
                text = text.replace(tag, "")
            return text
        if self._state == "start":
            text, self._pending = self._pending, ""
            return text
        return ""


def _split_partial_tag(text: str) -> tuple[str, str]:
    """Hold back a tail that could be the start of an answer tag split across chunks."""
    cut = text.rfind("<")
    if cut >= 0 and any(tag.startswith(text[cut:]) and tag != text[cut:] for tag in _ANSWER_TAGS):
        return text[:cut], text[cut:]
    return text, ""


async def without_thinking(chunks: AsyncIterable[str]) -> AsyncIterator[str]:
    """``chunks`` with a leading thought and answer tags left out (what every engine streams)."""
    text = ThinkingFilter()
    async for chunk in chunks:
        if cleaned := text.feed(chunk):
            yield cleaned
    if tail := text.flush():
        yield tail
