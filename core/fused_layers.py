"""The decoder layers through ``torch.compile``, for decode steps and first questions' prefill.

A captured decode step still runs every kernel the eager layer launches: for GLM-4.6V-Flash about
65 a layer (each RMSNorm alone is eight: upcast, square, mean, add, rsqrt, multiply, downcast,
scale; the partial rotary another dozen), 2,600 a token, each a few microseconds however little it
does. Inductor fuses those into a handful of kernels a layer; the graph then replays those.

Compiled per layer, not as the whole model: the layers share one code object, so one compilation
serves all of them (regional compilation), in seconds instead of minutes. Only forwards inside
``active()`` take the compiled ones: the decode loop's steps, and a first question's prefill once
compiled (its cache is a ``prefill_cache``, whose update stays eager like the slot cache's). The
same holds there: measured on the H200, an eager prefill of a 1,000-token screenshot question
launches ~2,600 small kernels and the GPU waits on Python (149 ms for 1,072 tokens, 144 for 523;
compiled, 83 and 61).

Attention itself stays eager: the slot cache's update (``SlotKV.update`` is
``torch.compiler.disable``d) and the attention function. Measured on the H200 with it compiled:
transformers then repeats the grouped K/V heads for every query head (under dynamo it skips its
one-token "pack GQA" path), a copy per layer that grows with rows x span; 8 questions at once fell
from 324 to 70 tokens/s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental import _config as fx_config  # (its ``patch`` is made at import: untyped)

from core.errors import one_line

__all__ = ["FusedLayers", "compile_summary", "decoder_layers", "keep_compiled_code_in", "prefill_cache"]

log = logging.getLogger(__name__)

# The layer breaks its graph where attention calls the cache's update and the attention function (both
# kept eager, below), four calls deep (checkpointing wrapper, deprecation wrapper, layer, attention).
# By default dynamo then gives up on each enclosing frame in turn and traces it again from its start
# down to the break: the same layer code traced four times per shape. Nested graph breaks (torch >= 2.9)
# resume inside the frame that broke instead: on the H200 (GLM-4.6V-Flash) the decode step's compiling
# went from 14-17 graphs and 19-36 s of tracing to 8 graphs and 4-10 s, and everything the engine
# compiles was done 99-158 s after a first start instead of 186-191 (bench/RESULTS.md, fourteenth step).
# Duck sizing off: dynamo would otherwise assume two sizes that happen to be equal when traced (2 rows,
# 2 K/V heads) always are, a recompile once they differ.
_TRACE_ONCE = {"nested_graph_breaks": True} if hasattr(torch._dynamo.config, "nested_graph_breaks") else {}


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The language model's decoder layers, or ``[]`` where this model does not name them the usual way."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


class FusedLayers:
    """Each layer's forward, compiled; used while ``active()``, the eager one otherwise."""

    def __init__(self, layers: list[torch.nn.Module], *, cache_dir: Path | None = None) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._attention = getattr(getattr(getattr(layers[0], "self_attn", None), "config", None),
                                  "_attn_implementation", None) if layers else None
        self._replaced: Callable[..., Any] | None = None
        if self._attention in ALL_ATTENTION_FUNCTIONS:
            # The registry's own way to replace an implementation (here: the same one, never compiled;
            # the decode steps' own where the engine installed it, core/step_attention.py).
            self._replaced = ALL_ATTENTION_FUNCTIONS[self._attention]
            ALL_ATTENTION_FUNCTIONS[self._attention] = torch.compiler.disable(self._replaced)  # type: ignore[no-untyped-call]
        if cache_dir is not None:
            keep_compiled_code_in(cache_dir)
        self._active = False
        self._layers = layers
        for layer in layers:
            eager = layer.forward
            # Sizes symbolic from the start: the rows, tokens and spans of every bucket share a few graphs
            # (one, and another where a size is 1), well inside dynamo's 8 recompiles a function.
            layer.forward = self._dispatch(eager, torch.compile(eager, dynamic=True))

    def _dispatch(self, eager: Callable[..., Any], fused: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return (fused if self._active else eager)(*args, **kwargs)
        return forward

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        # Each attention layer hands its ``layer_idx`` to the cache: a constant to dynamo by default,
        # so one recompile a layer until dynamo's limit (8), and eager layers after that. As a
        # symbolic int it is one more input of the same graph. Past the limit anyway: an error
        # (the engine then keeps the unfused step and says so), not a silent half-compiled step.
        # Decode steps and prefill take a few graphs each (their caches differ): room for both.
        settings: dict[str, Any] = {"allow_unspec_int_on_nn_module": True, "fail_on_recompile_limit_hit": True,
                                    "recompile_limit": 16, **_TRACE_ONCE}
        with torch._dynamo.config.patch(settings), fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            self._active = True
            try:
                yield
            finally:
                self._active = False

    def compiles(self, what: str, work: Callable[[], object]) -> bool:
        """Whether ``work`` ran through the compiled layers (compiling them for its shapes); logged as ``what``."""
        started = time.monotonic()
        try:
            with self.active():
                work()
        except Exception as exc:
            log.warning("cannot compile %s (%s); it runs eagerly", what, one_line(exc))
            return False
        log.info("%s compiled in %.1fs", what, time.monotonic() - started)
        return True

    def remove(self) -> None:
        """The eager layers back (when a compiled one cannot run or be captured here)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for layer in self._layers:
            vars(layer).pop("forward", None)
        if self._replaced is not None:
            ALL_ATTENTION_FUNCTIONS[self._attention] = self._replaced


def keep_compiled_code_in(directory: Path) -> None:
    """Inductor's caches (graphs, kernels) under ``directory``: a restart with the same model and settings
    skips the code generation (~40 s of a first start on the H200). An operator's own
    ``TORCHINDUCTOR_CACHE_DIR`` wins. torch sets that variable itself, to its default under /tmp, as soon
    as ``torch._dynamo`` is imported (long before an engine starts): that value is replaced, or the cache
    would stay in /tmp, which the systemd unit's ``PrivateTmp`` empties at every restart."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory.resolve())


def prefill_cache(config: Any) -> Any:
    """A ``DynamicCache`` for one question's prefill whose ``update`` stays eager inside compiled layers:
    traced, its per-layer lists would make each layer index a recompile."""
    return _prefill_cache_class()(config=config)


@functools.cache
def _prefill_cache_class() -> type:
    from transformers import DynamicCache

    class PrefillCache(DynamicCache):
        @torch.compiler.disable  # type: ignore[untyped-decorator]
        def update(self, *args: Any, **kwargs: Any) -> Any:
            return super().update(*args, **kwargs)

    return PrefillCache


def compile_summary() -> str:
    """What compiling cost in this process, and what inductor's caches spared (for the start-up log)."""
    from torch._dynamo.utils import compile_times, counters

    table = compile_times(repr="csv", aggregate=True)
    names, values = table if isinstance(table, tuple) else ([], [])
    spent = {str(name): float(str(value)) for name, value in zip(names, values, strict=True)}
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return (f"{counters['stats']['unique_graphs']} graphs, {spent.get('_compile.compile_inner', 0.0):.1f}s "
            f"(tracing {spent.get('bytecode_tracing', 0.0):.1f}s, "
            f"code generation {spent.get('OutputGraph.call_user_compiler', 0.0):.1f}s); "
            f"inductor cache {inductor['fxgraph_cache_hit']} hits, {inductor['fxgraph_cache_miss']} misses; "
            f"autograd cache {aot['autograd_cache_hit']} hits")
