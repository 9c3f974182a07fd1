"""The language model's attention on a GPU: decode steps' one-token queries and follow-ups' tails go to the
split-KV kernel, prompts prefilled from their first token to SDPA's causal path, the rest to the model's own
function.

A decode step's attention (one new token a row, a bool mask over its slot) is latency, not bytes:
through SDPA a row is two K/V heads' worth of programs walking the whole span (see
``core.split_kv_attention``).

A prompt's attention (a first question prefilled into the staging row, or several left-padded into one
batch) comes with a mask: causal, and the padding hidden. With a mask SDPA takes its masked kernels
(cuDNN, or the memory-efficient one under the engine's prefill settings), computes every query against
every key, and transformers first repeats the grouped K/V heads for every query head. Each row's real
tokens attended causally without one compute the same for those tokens (what padding gets is never read)
through flash attention, skipping the masked half, on the grouped heads as they are. H200, int4, one
1,152-token screenshot prompt: 1.4 ms of attention over 40 layers against 6.3 with the mask; several
left-padded together, ~2.9 ms a question against 6.8 (bench/RESULTS.md, twenty-first step).

A follow-up's tail (8 to 256 new tokens over its cached prefix, masked) goes to the split-KV kernel too, as
that many one-token rows (``tail_attention``): a layer's tail attention 2-15x faster than SDPA's cuDNN kernel up
to 128 tokens, about even at 256 (H200, bench/RESULTS.md, twenty-sixth step), and nothing to plan at start.
Everything else (the vision encoder, any other mask) keeps the function the model was loaded with. Installed
in transformers' attention registry, the way it offers to replace an implementation, by the engine when it
makes its decode step on a GPU, after each way has matched SDPA once on this device; removed when the engine
stops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["StepAttention", "causal_rows", "fits", "fits_tail", "prompt_call", "prompts_attended_causally",
           "reference", "tail_attention", "tail_reference", "without_cudnn"]

log = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)
# The longest tail ``tail_attention`` takes: the stepper's longest captured one (``Stepper.tails``), and about where
# it stops being faster than SDPA's cuDNN kernel (H200: 0.91-1.02x at 256 tokens; bench/RESULTS.md, twenty-sixth step).
TAIL_TOKENS = 256


def _triton_runs(query: torch.Tensor) -> bool:
    # Under Triton's interpreter the kernel runs on the CPU (the tests), in float32 too.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return query.device.type == "cpu"
    return query.is_cuda and query.dtype in _HALF


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any) -> bool:
    """Whether ``split_kv_attention`` computes this call exactly as SDPA would: one query token a row,
    a plain bool mask over the positions, grouped heads, no dropout, soft-capping, window or sinks."""
    rows, heads, tokens, dim = query.shape
    return (tokens == 1 and _triton_runs(query)
            and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and tuple(mask.shape) == (rows, 1, 1, key.shape[2]) and mask.stride(-1) == 1
            and key.shape == value.shape and key.shape[0] == rows and heads % key.shape[1] == 0
            and 16 <= dim <= 256 and dim & (dim - 1) == 0
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and not kwargs.get("dropout") and kwargs.get("softcap") is None
            and kwargs.get("sliding_window") is None and kwargs.get("s_aux") is None
            and not kwargs.get("output_attentions"))


def fits_tail(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any) -> bool:
    """Whether ``tail_attention`` computes this call exactly as SDPA would: one row's new tokens (a follow-up's
    tail, up to ``TAIL_TOKENS``) after positions already cached, a plain bool mask for each, and what ``fits``
    asks of a decode step otherwise."""
    rows, _heads, tokens, _dim = query.shape
    return (rows == 1 and 1 < tokens <= TAIL_TOKENS and tokens < key.shape[2]
            and isinstance(mask, torch.Tensor) and tuple(mask.shape) == (1, 1, tokens, key.shape[2])
            and fits(query[:, :, :1], key, value, mask[:, :, :1], **kwargs))


def tail_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """One row's ``tokens`` new queries (``[1, heads, tokens, dim]``) through ``split_kv_attention`` as that many
    rows of one token over the same keys and values (views: nothing copied), each with its own line of ``mask``
    (``[1, 1, tokens, span]``); ``[1, tokens, heads, dim]``, as transformers' attention functions return it.

    The tail's masked call otherwise goes to SDPA, after transformers repeats each K/V head for its 16 query heads
    (a mask rules out the grouped-head path), on cuDNN, which would plan each of the 24 captured tail shapes at
    start."""
    from core.split_kv_attention import split_kv_attention

    _, heads, tokens, dim = query.shape
    return split_kv_attention(*_as_rows(query, key, value, mask), scale).view(1, tokens, heads, dim)


def _as_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row's tail as a decode step's arguments: a row of one query token for each of its tokens, each over the
    row's keys and values (zero-stride views) with its own line of the mask."""
    rows = (query.shape[2], *key.shape[1:])
    return query.transpose(0, 2), key.expand(rows), value.expand(rows), mask[0, 0, :, None, None]


def prompt_call(query: torch.Tensor, key: torch.Tensor, mask: Any, rows: int) -> bool:
    """Whether a call inside ``StepAttention.causal_prompts`` is the prompts' own attention: their rows, as
    many keys as queries, a bool mask (the vision encoder's calls inside a prefill pass none)."""
    return (query.shape[0] == rows and query.shape[2] == key.shape[2] > 1
            and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool)


def causal_rows(sdpa: Callable[..., Any], module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                starts: list[int], **kwargs: Any) -> torch.Tensor:
    """``sdpa`` (transformers' function) on each row's tokens from ``starts[row]`` on, causally, without a
    mask; ``[rows, tokens, heads, dim]`` as it returns, zeros before each row's start."""
    causal = {**kwargs, "is_causal": True}
    with without_cudnn():
        if starts == [0] * len(starts):
            return sdpa(module, query, key, value, None, **causal)[0]  # type: ignore[no-any-return]
        output = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        for row, start in enumerate(starts):
            part = sdpa(module, query[row:row + 1, :, start:], key[row:row + 1, :, start:],
                        value[row:row + 1, :, start:], None, **causal)[0]
            output[row, start:] = part[0]
    return output


def without_cudnn() -> contextlib.AbstractContextManager[None]:
    """SDPA without cuDNN's kernels, which it picks on Hopper: cuDNN plans every new shape (45-65 ms, ~0.8 s for a
    process's first). The causal path takes flash here: the captured prompts alone are 19 shapes, ~1 s of every
    start, for 1.2 ms a screenshot prompt over 40 layers (1.5 against 2.7 ms: bench/RESULTS.md, twenty-fifth
    step); the engine runs everything it does not capture this way too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def tail_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """What ``tail_attention`` must return, in float32: ``reference`` for each of the tail's tokens as a row of
    its own over the same keys and values, ``[1, tokens, heads, dim]``."""
    _, heads, tokens, dim = query.shape
    return reference(*_as_rows(query, key, value, mask), scale).view(1, tokens, heads, dim)


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    """What ``split_kv_attention`` must return, in float32: SDPA with each K/V head repeated for its
    query heads, ``[rows, 1, heads, dim]`` (the start-up check and the bench compare against it)."""
    groups = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(groups, 1), value.float().repeat_interleave(groups, 1),
        attn_mask=mask, scale=scale).transpose(1, 2)


class StepAttention:
    """Replaces the registry's ``name`` implementation by one that sends what ``fits`` to the kernel, and
    prompts' own calls inside ``causal_prompts`` to SDPA's causal path."""

    def __init__(self, name: str) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from core.split_kv_attention import split_kv_attention

        self._name = name
        self._original: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS[name]
        original = self._original
        # False: everything to the original (benchmarks compare the two in one process; steps captured
        # as CUDA graphs keep what they were captured with).
        self.enabled = True
        self.causal = True  # as ``enabled``, for ``causal_prompts``
        # Follow-ups' tails through ``tail_attention`` too (set by ``install`` after a check).
        self.tails = False
        self._starts: list[int] | None = None  # inside ``causal_prompts``

        # The registry's calling convention: the mask positional (decoder layers) or by name (vision blocks).
        def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
            starts = self._starts
            if starts is not None and prompt_call(query, key, attention_mask, len(starts)):
                return causal_rows(original, module, query, key, value, starts, **kwargs), None
            scale = kwargs.get("scaling") or 1 / math.sqrt(query.shape[-1])
            if self.enabled and fits(query, key, value, attention_mask, **kwargs):
                return split_kv_attention(query, key, value, attention_mask, scale), None
            if self.enabled and self.tails and fits_tail(query, key, value, attention_mask, **kwargs):
                return tail_attention(query, key, value, attention_mask, scale), None
            return original(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]

        ALL_ATTENTION_FUNCTIONS[name] = attention

    @classmethod
    def install(cls, model: Any, kv_heads: int, dim: int, *, device: torch.device, dtype: torch.dtype,
                tails: bool = True) -> StepAttention | None:
        """Where the kernel runs and agrees with SDPA on this device, at the model's head shapes; else
        None (the model's own attention stays). Follow-ups' tails go through it too where that agrees as well;
        ``tails=False`` leaves them to SDPA (``bench/engine_bench.py``'s ``-sdpa-tails`` modes)."""
        config = getattr(model, "config", None)
        text = getattr(config, "text_config", config)
        name = getattr(text, "_attn_implementation", None)
        if name != "sdpa":
            return None  # eager, flash-attention ...: their own kernels, not second-guessed
        probe = _Probe(getattr(text, "num_attention_heads", kv_heads), kv_heads, dim, device=device, dtype=dtype)
        if not probe.fits():
            return None  # a CPU, or shapes the kernel does not take
        try:
            installed = cls(name)
            agrees = probe.agrees()
        except Exception as exc:  # no Triton, or one that cannot build the kernel for this GPU
            log.info("decode steps' attention stays SDPA: the split-KV kernel is unavailable here (%s)", exc)
            return None
        if not agrees:
            installed.remove()
            log.warning("decode steps' attention stays SDPA: the split-KV kernel disagrees with it here")
            return None
        installed.causal = probe.causal_agrees(installed._original)
        if tails:
            installed.tails = probe.tail_agrees()
            if not installed.tails:
                log.warning("follow-ups' tails stay SDPA: the split-KV kernel disagrees with it on them here")
        log.info("decode steps' attention: the split-KV kernel; prompts': %s", "SDPA's causal path, no mask"
                 if installed.causal else "SDPA with their mask (the causal path disagrees with it here)")
        return installed

    @contextlib.contextmanager
    def causal_prompts(self, starts: list[int]) -> Iterator[None]:
        """Around a forward over prompts from their first tokens, one a row, row r's first real token at
        ``starts[r]`` (left padding before it): each token attends to itself and the row's real tokens
        before it, the mask every square call of theirs passes; those calls go to ``causal_rows``. A
        prompt padded after its end (``Stepper.prefill``) starts at 0: its padding sees the prompt, as
        through the mask."""
        self._starts = list(starts) if self.causal else None
        try:
            yield
        finally:
            self._starts = None

    def remove(self) -> None:
        """The implementation it replaced, back in the registry."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[self._name] = self._original


def prompts_attended_causally(attention: StepAttention | None, starts: list[int]
                              ) -> contextlib.AbstractContextManager[None]:
    """``attention.causal_prompts(starts)`` where the engine's attention is installed; else nothing changes
    (the prompts keep their mask)."""
    return attention.causal_prompts(starts) if attention is not None else contextlib.nullcontext()


class _Probe:
    """One call the kernel must get right before it is used: grouped heads, a ragged mask (a row that
    sees one position, one that sees half, one that sees all), several slices a row."""

    def __init__(self, heads: int, kv_heads: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> None:
        generator = torch.Generator(device="cpu").manual_seed(0)
        rows, span = 3, 700

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        self.query, self.key, self.value = (draw(rows, heads, 1, dim), draw(rows, kv_heads, span, dim),
                                            draw(rows, kv_heads, span, dim))
        self.prompt = draw(1, heads, 96, dim)  # a prompt's queries, for ``causal_agrees``
        self.tail = draw(1, heads, 5, dim)  # a follow-up's new tokens after the first row's 300 positions
        lengths = torch.tensor([1, span // 2, span], device=device)
        self.mask = (torch.arange(span, device=device)[None, :] < lengths[:, None])[:, None, None, :]

    def fits(self) -> bool:
        return fits(self.query, self.key, self.value, self.mask)

    def agrees(self) -> bool:
        from core.split_kv_attention import split_kv_attention

        scale = self.query.shape[-1] ** -0.5
        got = split_kv_attention(self.query, self.key, self.value, self.mask, scale).float()
        return _close(got, reference(self.query, self.key, self.value, self.mask, scale))

    def tail_agrees(self) -> bool:
        """Whether ``tail_attention`` gives a follow-up's tail what SDPA does, on this device."""
        scale = self.query.shape[-1] ** -0.5
        tokens, span, device = self.tail.shape[2], self.key.shape[2], self.tail.device
        mask = (torch.arange(span, device=device)[None, :] <= 300 + torch.arange(tokens, device=device)[:, None])
        key, value = self.key[:1], self.value[:1]
        got = tail_attention(self.tail, key, value, mask[None, None], scale).float()
        return _close(got, tail_reference(self.tail, key, value, mask[None, None], scale))

    def causal_agrees(self, sdpa: Callable[..., Any]) -> bool:
        """Whether ``sdpa`` (transformers' SDPA function) gives a prompt's attention the same without its
        lower-triangular mask as with it, on this device."""
        query = self.prompt
        tokens = query.shape[2]
        key, value = self.key[:1, :, :tokens], self.value[:1, :, :tokens]
        mask = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).tril()[None, None]
        # What transformers' SDPA function reads from the layer calling it.
        module = SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], is_causal=True)
        scale = query.shape[-1] ** -0.5
        masked = sdpa(module, query, key, value, mask, scaling=scale)[0].float()
        if not _close(causal_rows(sdpa, module, query, key, value, [0], scaling=scale).float(), masked):
            return False
        # Two rows left-padded: the second's first 32 positions are padding, hidden from its tokens.
        start = 32
        padded = mask.expand(2, 1, tokens, tokens).clone()
        padded[1, :, :, :start] = False
        query, key, value = (torch.cat([tensor, tensor.roll(1, 2)]) for tensor in (query, key, value))
        masked = sdpa(module, query, key, value, padded, scaling=scale)[0].float()
        causal = causal_rows(sdpa, module, query, key, value, [0, start], scaling=scale).float()
        return _close(causal[:, start:], masked[:, start:])


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((got - ref).abs().max() <= 2e-2 * ref.abs().max())
