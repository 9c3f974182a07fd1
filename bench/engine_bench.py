"""Speed and memory of the in-process engine on a model of a real architecture, random weights.

Builds GLM-4.1V/4.6V-Flash's 9B shape from its config (no download; needs a CUDA GPU and
torchvision), saves it, loads it through imsight's own loader and engine in bf16 and in NF4, and
prints every target of the GPU-speed work as a ratio against bare ``generate()`` in the same run (on a
copy of the model loaded the same way before the engine starts: nothing the engine puts into its model
reaches it): time to first token, a cached follow-up, decode tokens/s at batch 1 (and
against the HBM-bandwidth bound), greedy output equal to generate()'s, 8 questions arriving 200 ms
apart, 8 at once vs one, start-up time and memory. Modes: bf16, nf4, int4 (the default
engine: GLM's decoder layers and vision blocks through imsight's kernels, the step captured), int4-compiled
(transformers' layers and blocks compiled instead, as before ``core.glm_decoder`` and ``core.glm_vision``), and
bf16-unfused / nf4-unfused / int4-unfused (captured, not compiled); int4-tinygemm: int4 with torch's int4
kernel for decode instead of imsight's (``core.int4_mma``), to compare the two in one run; a ``-model-prefill``
suffix (int4-model-prefill, say): first questions prefilled by the model's own forward (compiled layers) instead of the
stepper's captured one; a ``-unpacked`` suffix (int4-unpacked): int4 with every weight kept unpacked as
well (``[engine] unpacked_weights``), so prefills read it instead of unpacking it; a ``-sdpa-tails`` suffix
(int4-sdpa-tails): follow-ups' tails through SDPA (cuDNN) instead of the split-KV kernel
(``step_attention.tail_attention``), as before the twenty-sixth step.
Several modes are measured one after another, each in a process of its own (a second mode in the same
process ran its CPU-bound parts slower), and reported together at the end.
``--size tiny`` runs the same measurements on a small GLM-shaped model, and ``--quick`` on imsight's
tiny test model on the CPU (quick checks of the script; figures mean nothing).

    python bench/engine_bench.py --size 9b --modes int4,nf4,bf16 --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glm_model import build_glm_model
from screens import screenshot_image

from core.engine import GenerationLimits, PreparedImage, Turn
from core.model_files import resolve
from core.model_loading import LoadedModel, load
from core.prompt_inputs import rendered
from core.transformers_engine import TransformersEngine

GiB = 2**30
# a mode's weights; "-unfused": not compiled
_QUANTIZATION = {"bf16": "none", "nf4": "nf4", "int4": "int4", "fp8": "fp8"}
STAGGERED_ROUNDS = 3
LONG_ROUNDS = 3  # one answer, then 8 at once, at --long-tokens: how a burst is batched moves its ratio by ~0.3x
QUESTION = "What does the error in this screenshot mean, and how do I fix it?"
FIRST, FIRST_ANSWER = "What is on this screen?", "A terminal with a failed build: the linker cannot find libssl."
FOLLOW_UP = "Which package do I install to fix that?"
# The bench's tokenizer is byte-level: the follow-up above is ~110 new tokens, where GLM's own tokenizer
# makes ~30 of it. This one is ~30 bytes, the length of a real follow-up's tail.
SHORT_ANSWER, SHORT_FOLLOW_UP = "libssl is missing.", "How?"


def screenshot(n: int) -> PreparedImage:
    """A 1024x768 screenshot-like picture; each ``n`` differs (its own cache key and pixels)."""
    return PreparedImage(f"shot-{n}", screenshot_image(n))


def common_chars(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy moves (read + write), the practical HBM ceiling."""
    import torch

    src = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * GiB * 10 / seconds


def decode_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: the language model and head, not the vision tower.

    The embedding table is excluded (a step reads one row of it).
    """
    total = 0
    # Buffers too: int4 weights are buffers (packed int32, scales and zeros).
    for name, param in [*model.named_parameters(), *model.named_buffers()]:
        if ".visual." in f".{name}" or "embed_tokens" in name or name.endswith(".unpacked"):
            continue  # (int4's weights kept unpacked: read by prefills, not by decode steps)
        total += param.numel() * param.element_size()
    return total


def profile(engine: TransformersEngine) -> None:
    """Where the time of a first question and of a cached follow-up goes, on this thread."""
    import cProfile
    import pstats
    import threading

    from core.transformers_engine import _Request

    def run(images: list[PreparedImage], turns: list[Turn], question: str) -> None:
        request = _Request(images, turns, question, GenerationLimits(1), lambda _item: None, threading.Event())
        started = time.perf_counter()
        engine._render(request)
        render_done = time.perf_counter()
        engine._answer_safely(request, engine._lookup(request))
        print(f"  render {1e3 * (render_done - started):.0f} ms, generate "
              f"{1e3 * (time.perf_counter() - render_done):.0f} ms")

    shot = screenshot(999)
    for label, turns, question in (("first question", [], FIRST), ("cached follow-up", [Turn("user", FIRST),
                                   Turn("assistant", FIRST_ANSWER)], FOLLOW_UP)):
        profiler = cProfile.Profile()
        profiler.enable()
        run([shot], turns, question)
        profiler.disable()
        print(f"profile of a {label}:")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(28)


def step_anatomy(engine: TransformersEngine) -> dict[str, Any]:
    """Where a decode step's time goes: one graph replay back to back (no Python between), the kernels
    one eager step launches and their summed GPU time. Against the engine's own tokens/s, this says
    how much is kernels, how much the loop around them."""
    import torch

    stepper, kv = engine._stepper, engine._kv
    if stepper is None or kv is None or not stepper.use_graphs:
        return {}
    graph = stepper._graphs[("step", 1, 1024)]
    with torch.inference_mode():  # the engine's tensors are inference tensors: touched only in this mode
        saved = kv.positions.clone()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        replay_s = (time.perf_counter() - started) / 50
        by_shape = {f"{size}x{span}": replay_ms(each)  # how a step's GPU time grows with rows and span
                    for (kind, size, span), each in stepper._graphs.items() if kind == "step" and span <= 4096}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            stepper._eager("step", 1, 1024)
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as replayed:
            graph.replay()  # the step as it runs: compiled layers, captured
            torch.cuda.synchronize()
        sdpa_by_shape = _steps_with_sdpa(engine, [(1, 2048), (8, 2048), (1, 4096)])
        others = {f"{kind} {size}x{span}": _replay_profile(stepper._graphs[(kind, size, span)])
                  for kind, size, span in (("tail", 32, 2048), ("tail", 128, 2048), ("prefill", 1152, 2048))
                  if (kind, size, span) in stepper._graphs}
        kv.positions.copy_(saved)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    kinds = [e for e in prof.key_averages() if e.device_time_total > 0]
    top = sorted(kinds, key=lambda e: -e.device_time_total)[:6]
    most = sorted(kinds, key=lambda e: -e.count)[:12]
    in_graph = [e for e in replayed.key_averages() if e.device_time_total > 0]
    return {"graph_kernels": sum(e.count for e in in_graph),
            "graph_kernel_ms": round(sum(e.device_time_total for e in in_graph) / 1e3, 2),
            "graph_top": [(e.key[:60], round(e.device_time_total / 1e3, 3), e.count)
                          for e in sorted(in_graph, key=lambda e: -e.device_time_total)[:14]],
            "replay_ms": replay_s * 1e3, "replay_ms_by_rows_x_span": by_shape, "sdpa_replay_ms": sdpa_by_shape,
            "other_graphs": others,
            "kernels_per_step": len(kernels), "kernel_ms": gpu_us / 1e3,
            "top_kernels": [(e.key[:60], round(e.device_time_total / 1e3, 2), e.count) for e in top],
            "most_launched": [(e.key[:70], e.count, round(e.device_time_total / 1e3, 3)) for e in most]}


def _steps_with_sdpa(engine: TransformersEngine, shapes: list[tuple[int, int]]) -> dict[str, float]:
    """The same steps captured again with SDPA as their attention instead of the split-KV kernel, and
    replayed: the kernel's share of a step, in one process (nothing is compiled anew: attention
    stays outside the compiled layers)."""

    stepper, attention = engine._stepper, engine._step_attention
    if stepper is None or attention is None:
        return {}
    attention.enabled = False
    try:
        replay = {}
        for rows, span in shapes:
            graph = stepper._capture(("step", rows, span), "step" in stepper.fused_kinds)
            assert graph is not None
            replay[f"{rows}x{span}"] = replay_ms(graph)
        return replay
    finally:
        attention.enabled = True


def _replay_profile(graph: Any) -> dict[str, Any]:
    """A captured forward (a follow-up's tail, a first question's prompt): its replay's milliseconds, and
    the kernels in it, the largest first (name, ms, count)."""
    import torch

    replayed = replay_ms(graph)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kinds = [e for e in prof.key_averages() if e.device_time_total > 0]
    return {"replay_ms": replayed, "kernels": sum(e.count for e in kinds),
            "kernel_ms": round(sum(e.device_time_total for e in kinds) / 1e3, 2),
            "top": [(e.key[:50], round(e.device_time_total / 1e3, 2), e.count)
                    for e in sorted(kinds, key=lambda e: -e.device_time_total)[:12]]}


def replay_ms(graph: Any, times: int = 10) -> float:
    """Milliseconds a replay of ``graph``, back to back (after one to warm up)."""
    import torch

    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(times):
        graph.replay()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) * 1e3 / times, 2)


@contextlib.contextmanager
def timed_parts(parts: dict[str, float], calls: list[tuple[Any, str, str]]) -> Iterator[None]:
    """While inside, each ``(owner, attribute, label)`` call adds its seconds (to the GPU's end) to
    ``parts[label]``; the owners' own methods come back after. Only the engine thread waits for the GPU: a
    render runs on a thread of its own, and a CUDA call from there while the engine thread captures a graph fails
    both (the landed vision blocks' first engine bench ended there, RESULTS.md twenty-fourth step)."""
    def timed(label: str, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            on_engine = threading.current_thread().name == "imsight-engine"
            if on_engine:
                sync()
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                if on_engine:
                    sync()
                parts[label] = parts.get(label, 0.0) + time.perf_counter() - started
        return run

    saved = [(owner, name, vars(owner).get(name)) for owner, name, _label in calls]
    for owner, name, label in calls:
        setattr(owner, name, timed(label, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, own in reversed(saved):
            if own is None:
                delattr(owner, name)  # the class's method shows through again
            else:
                setattr(owner, name, own)


async def first_token_anatomy(engine: TransformersEngine, image: PreparedImage) -> dict[str, float]:
    """Where a first question's time to first token goes inside the engine (each part timed to the GPU's end);
    bare generate()'s two parts come from ``baseline``."""
    parts: dict[str, float] = {}
    calls = [(engine, name, name.strip("_")) for name in ("_render", "_encoded", "_embedded", "_seat")]
    calls.append((engine.loaded.model, "forward", "prefill forward"))
    if engine._stepper is not None:  # the captured prefill (the model's forward is not called then)
        calls.append((engine._stepper, "prefill", "captured prefill"))
    with timed_parts(parts, calls):
        parts["whole (through answer())"] = (await first_chunk(engine, [image], [], QUESTION, 1))[0]
        await asyncio.sleep(0.5)  # the engine thread is still in the parts after the first token

    return {k: round(v * 1e3, 1) for k, v in parts.items()}


async def follow_up_anatomy(engine: TransformersEngine, image: PreparedImage, answer: str, question: str
                            ) -> dict[str, float]:
    """Where a cached follow-up's time to first token goes (each part timed to the GPU's end), and how
    many new tokens its tail had: ``question`` about ``image`` after a first question about it and
    ``answer``."""
    parts: dict[str, float] = {}
    turns = [Turn("user", FIRST), Turn("assistant", answer)]
    await first_chunk(engine, [image], [], FIRST, 1)
    calls = [(engine, name, name.strip("_")) for name in ("_render", "_on_device", "_lookup", "_seat",
                                                         "_keep_prefix")]
    if engine._kv is not None and engine._stepper is not None:
        calls += [(engine._kv, "place", "prefix into the staging row"), (engine._stepper, "prefill_tail", "tail")]
    lookup = engine._lookup
    tails: list[int] = []

    def looked_up(request: Any) -> Any:
        hit = lookup(request)
        if hit is not None:
            tails.append(int(request.inputs["input_ids"].shape[1]) - hit[1])
        return hit

    engine._lookup = looked_up  # type: ignore[method-assign]
    try:
        with timed_parts(parts, calls):
            parts["whole (through answer())"] = (await first_chunk(engine, [image], turns, question, 1))[0]
            await asyncio.sleep(0.5)  # the engine thread is still in the parts after the first token
    finally:
        del engine._lookup
    out = {k: round(v * 1e3, 1) for k, v in parts.items()}
    out["tail tokens"] = float(tails[0]) if tails else -1.0
    return out


def prefill_kernels(engine: TransformersEngine, image: PreparedImage) -> dict[str, float]:
    """Milliseconds of one first-question prefill through the model's own forward (pixels in, a fresh
    cache): as the engine runs it for prompts its captured forward does not take (compiled layers once
    compiled, the attention kernels it allows for prefill), and eager layers with torch's default
    attention choice (cuDNN included). The captured forward's own time is in ``first_token_anatomy``."""
    import statistics

    import torch
    from transformers import DynamicCache

    model = engine.loaded.model
    inputs = engine._inputs([image], [], QUESTION)

    def eager() -> None:
        model(**inputs, use_cache=True, logits_to_keep=1, **{engine._cache_kw: DynamicCache(config=model.config)})

    out: dict[str, float] = {}
    for label, forward in (("model's forward as the engine runs it", lambda: engine_prefill(engine, inputs)),
                           ("eager, default kernels", eager)):
        times = []
        for _ in range(4):
            with torch.inference_mode():
                sync()
                started = time.perf_counter()
                forward()
                sync()
            times.append(time.perf_counter() - started)
        out[label] = round(1e3 * statistics.median(times[1:]), 1)
    return out


def engine_prefill(engine: TransformersEngine, inputs: Any) -> None:
    """A first question's prefill through the model's own forward as the engine runs it (its own code;
    prompts over the captured sizes, or before their graphs are made)."""
    engine._prefilled(lambda: engine._prefill(inputs))


def prefill_anatomy(engine: TransformersEngine, image: PreparedImage) -> dict[str, Any]:
    """Where one first-question prefill's time goes, the engine's forward (vision encoder included) and
    the vision encoder alone: wall time against the GPU time of the kernels launched (the rest is the GPU
    waiting on Python), the kernels that take the most, and the operators whose own CPU time is the largest."""
    import torch

    inputs = engine._inputs([image], [], QUESTION)
    runs = {"forward": partial(engine_prefill, engine, inputs)}
    if engine._encodes_ahead:  # the vision encoder alone, as the engine runs it before the forward
        runs["vision encoder"] = lambda: engine._vision_encoder(dict(inputs))
    out = {}
    with torch.inference_mode():
        for part, run in runs.items():
            run()  # (warm)
            out[part] = profiled(run)
    return out


def profiled(run: Any) -> dict[str, Any]:
    """``run`` once under the profiler: its wall time against the GPU time of the kernels it launched (the rest
    is the GPU waiting on Python), the kernels that take the most, the operators with the most CPU time."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        run()
        sync()
        wall_ms = (time.perf_counter() - started) * 1e3
    return _profiled(prof, wall_ms)


def _profiled(prof: Any, wall_ms: float) -> dict[str, Any]:
    """A profile in a few numbers: wall and kernel time, the costliest kernels and CPU operators."""
    import torch

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    averages = prof.key_averages()
    on_gpu = sorted((e for e in averages if e.device_time_total > 0), key=lambda e: -e.device_time_total)[:10]
    on_cpu = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:10]
    return {"wall_ms": round(wall_ms, 1), "kernels": len(kernels),
            "kernel_ms": round(sum(e.device_time for e in kernels) / 1e3, 1),
            "top_gpu": [(e.key[:60], round(e.device_time_total / 1e3, 2), e.count) for e in on_gpu],
            "top_cpu_self": [(e.key[:60], round(e.self_cpu_time_total / 1e3, 2), e.count) for e in on_cpu]}


def bare_inputs(loaded: LoadedModel, images: list[PreparedImage], turns: list[Turn], question: str) -> Any:
    """The prompt rendered as the engine renders it (``prompt_inputs.rendered``), without its memo of the images'
    pixels, on the model's device."""
    inputs = rendered(loaded.processor, images, turns, question)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.pixel_dtype)
    return inputs.to(loaded.model.device)


def bare_generate(loaded: LoadedModel, images: list[PreparedImage], turns: list[Turn], question: str,
                  new_tokens: int) -> tuple[float, list[int]]:
    """The baseline: plain ``model.generate()``, prompt rendered by the processor. Returns seconds (processing
    included) and the new token ids."""
    import torch

    started = time.perf_counter()
    inputs = bare_inputs(loaded, images, turns, question)
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    sync()
    return time.perf_counter() - started, out[0, inputs["input_ids"].shape[1]:].tolist()


def bare_greedy(loaded: LoadedModel, image: PreparedImage, new_tokens: int) -> tuple[list[int], list[float]]:
    """``bare_generate``'s answer ids, with the gap between its two highest logits at each token: where the engine's
    answer parts from it, a gap of a rounding's size says the two round differently; a wide one, a wrong token."""
    import torch

    inputs = bare_inputs(loaded, [image], [], QUESTION)
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True)
    gaps = [float(top[0] - top[1]) for top in (scores[0].float().topk(2).values for scores in out.scores)]
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), gaps


GREEDY_IMAGE = 10_000  # the screenshot both answer for the greedy comparison (the others' numbers stay below it)


def baseline(model_dir: Path, mode: str, new_tokens: int, reps: int) -> dict[str, Any]:
    """Bare ``generate()``'s figures, on a copy of the model of its own: loaded as the engine loads it (the same
    files, quantization and dtype) and freed before the engine starts, so nothing the engine's start puts into its
    model or into transformers (its layers' and vision blocks' forwards and graphs, the attention registry, the
    rotary) reaches it, and its memory is not in the engine's peaks. (Until the twenty-fifth step it ran on the
    engine's own model after the start: through imsight's layers and kernels.)"""
    import torch

    cuda = torch.cuda.is_available()
    loaded = load(resolve("bench", model_dir, allow_download=False), quantization=_QUANTIZATION[mode.split("-")[0]],
                  dtype="bfloat16" if cuda else "float32")
    out: dict[str, Any] = {}
    try:
        n = 100
        out["bare_ttft_s"] = statistics.median([bare_generate(loaded, [screenshot(n + i)], [], QUESTION, 1)[0]
                                                for i in range(reps)])
        seconds, _ = bare_generate(loaded, [screenshot(n)], [], QUESTION, new_tokens)
        out["bare_decode_tokens_per_s"] = (new_tokens - 1) / max(1e-9, seconds - out["bare_ttft_s"])
        started = time.perf_counter()
        inputs = bare_inputs(loaded, [screenshot(n + reps)], [], QUESTION)
        processor = time.perf_counter() - started
        with torch.inference_mode():
            sync()
            started = time.perf_counter()
            loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False)
            sync()
        out["bare_parts_ms"] = {"bare: processor": round(processor * 1e3, 1),
                                "bare: generate(1 token)": round((time.perf_counter() - started) * 1e3, 1)}
        out["bare_ids"], out["bare_gaps"] = bare_greedy(loaded, screenshot(GREEDY_IMAGE), new_tokens)
        again, _ = bare_greedy(loaded, screenshot(GREEDY_IMAGE), new_tokens)
        # Is it repeatable? (A random-weight model's logits are near ties: kernel nondeterminism shows.)
        out["bare_repeats_tokens"] = next((i for i, (a, b) in enumerate(zip(out["bare_ids"], again, strict=False))
                                           if a != b), len(again))
    finally:
        del loaded
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


async def first_chunk(engine: TransformersEngine, images: list[PreparedImage], turns: list[Turn], question: str,
                      new_tokens: int) -> tuple[float, float, str]:
    """Seconds to the first streamed text and to the end, and the text."""
    started = time.perf_counter()
    first = None
    parts = []
    async for chunk in engine.answer(images, turns, question, GenerationLimits(new_tokens)):
        first = first or time.perf_counter() - started
        parts.append(chunk)
    return first or 0.0, time.perf_counter() - started, "".join(parts)


async def measure(model_dir: Path, mode: str, new_tokens: int, reps: int, *,
                  with_profile: bool = False, long_tokens: int = 0) -> dict[str, Any]:
    import torch

    import core.decode_loop
    import core.int4_weights
    import core.step_attention
    from core.answer_text import CUT_NOTE

    cuda = torch.cuda.is_available()
    bare_figures = await asyncio.to_thread(baseline, model_dir, mode, new_tokens, reps)  # (freed before the engine)
    bare_ids = bare_figures.pop("bare_ids")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    use_mma_kernel, prefill_sizes = core.int4_weights.use_mma_kernel, core.decode_loop.PREFILL_SIZES
    if mode.endswith("-tinygemm"):  # the load's switch to imsight's decode kernel, left out
        core.int4_weights.use_mma_kernel = lambda model: None
    if mode.endswith("-model-prefill"):  # no captured first-question prefill (the stepper is made at start)
        core.decode_loop.PREFILL_SIZES = ()
    step_attention = core.step_attention.StepAttention
    install = vars(step_attention)["install"]
    if mode.endswith("-sdpa-tails"):  # (installed at the start's warm-up, before any tail is captured)
        step_attention.install = partial(step_attention.install, tails=False)  # type: ignore[method-assign]
    engine = TransformersEngine(
        resolve("bench", model_dir, allow_download=False), quantization=_QUANTIZATION[mode.split("-")[0]],
        compile_decode=not mode.endswith("-unfused"), decoder_kernels=not mode.endswith("-compiled"),
        vision_kernels=not mode.endswith("-compiled"),
        dtype="bfloat16" if cuda else "float32", max_batch=8, batch_window_s=0.0,
        prefix_cache_bytes=4 * GiB, warmup=True, unpacked_weights=mode.endswith("-unpacked"),
    )
    started = time.perf_counter()
    try:
        await engine.start()  # load, warm-up, slots and CUDA graph capture
    finally:
        core.int4_weights.use_mma_kernel, core.decode_loop.PREFILL_SIZES = use_mma_kernel, prefill_sizes
        step_attention.install = install  # type: ignore[method-assign]  # (the classmethod itself, as it was)
    out: dict[str, Any] = {"mode": mode, "start_s": time.perf_counter() - started}
    await asyncio.to_thread(engine.settled.wait)  # the compiled decode step comes while idle, after start
    out["compiled_s"] = time.perf_counter() - started
    if cuda:  # capturing the longest prompts' graphs peaks above a question (H200, int4: 10.65 vs 10.47 GB)
        out["startup_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    model = engine.loaded.model
    if with_profile:
        await asyncio.to_thread(profile, engine)
    out["weight_bytes"] = model.get_memory_footprint()
    out["kv_slot_bytes"] = engine._kv.nbytes if engine._kv is not None else 0
    out["graphs"] = bool(engine._stepper and engine._stepper.use_graphs)
    gauges = engine.measurements()
    out["own_kernels"] = ", ".join(name for name in ("decoder_kernels", "vision_kernels") if gauges[name]) or "none"
    out["step_attention"] = ("SDPA" if engine._step_attention is None else "split-KV kernel"
                             + (", follow-ups' tails too" if engine._step_attention.tails else ""))
    out["image_tokens"] = int((engine._inputs([screenshot(0)], [], QUESTION)["input_ids"]
                               == model.config.image_token_id).sum())
    out.update(bare_figures)
    n = 100 + reps  # (after the baseline's images: each the engine meets is new to it)
    # -- first question -----------------------------------------------------------------------------
    firsts = []
    for i in range(reps):
        if i == 0 and cuda:
            torch.cuda.reset_peak_memory_stats()  # the loaded model's memory stays in the peak: it is allocated
        ttft, _, _ = await first_chunk(engine, [screenshot(n + i)], [], QUESTION, 1)
        firsts.append(ttft)
        if i == 0 and cuda:
            out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    out["ttft_first_s"] = statistics.median(firsts)
    out["ttft_anatomy_ms"] = {**await first_token_anatomy(engine, screenshot(n + reps)), **out.pop("bare_parts_ms")}
    out["prefill_forward_ms"] = await asyncio.to_thread(prefill_kernels, engine, screenshot(n + reps))
    try:
        out["prefill_anatomy"] = await asyncio.to_thread(prefill_anatomy, engine, screenshot(n + reps))
    except Exception as exc:  # a profiler that cannot run here must not cost the other figures
        out["prefill_anatomy"] = {"error": repr(exc)}
    out["follow_up_anatomy_ms"] = await follow_up_anatomy(engine, screenshot(n + reps + 2), FIRST_ANSWER, FOLLOW_UP)
    out["short_follow_up_anatomy_ms"] = await follow_up_anatomy(engine, screenshot(n + reps + 3), SHORT_ANSWER,
                                                                SHORT_FOLLOW_UP)
    n += 4  # the anatomies' four images
    # -- follow-ups: cached prefix vs recomputed ---------------------------------------------------------
    n += reps
    turns = [Turn("user", FIRST), Turn("assistant", FIRST_ANSWER)]
    cached, recomputed = [], []
    for i in range(reps):
        await first_chunk(engine, [screenshot(n + i)], [], FIRST, 1)
        cached.append((await first_chunk(engine, [screenshot(n + i)], turns, FOLLOW_UP, 1))[0])
    budget = engine._prefixes.budget
    engine._prefixes.budget = 0
    engine._prefixes.clear()
    n += reps
    for i in range(reps):
        await first_chunk(engine, [screenshot(n + i)], [], FIRST, 1)
        recomputed.append((await first_chunk(engine, [screenshot(n + i)], turns, FOLLOW_UP, 1))[0])
    engine._prefixes.budget = budget
    out["ttft_follow_up_cached_s"] = statistics.median(cached)
    out["ttft_follow_up_recomputed_s"] = statistics.median(recomputed)
    # -- decode, one question -----------------------------------------------------------------------
    n += reps
    ttft, total, _ = await first_chunk(engine, [screenshot(n)], [], QUESTION, new_tokens)
    out["decode_tokens_per_s_batch1"] = (new_tokens - 1) / max(1e-9, total - ttft)
    # -- quality: greedy output, engine vs bare generate() ------------------------------------------------
    _, _, text = await first_chunk(engine, [screenshot(GREEDY_IMAGE)], [], QUESTION, new_tokens)
    shown = [t for t in bare_ids if t not in engine._hidden_ids]
    if any(t in engine._eos for t in shown):
        shown = shown[:next(i for i, t in enumerate(shown) if t in engine._eos)]
    bare = engine.loaded.processor.tokenizer.decode(shown, skip_special_tokens=False)
    mine = text.removesuffix(CUT_NOTE)
    out["same_as_generate"] = mine == bare
    common = common_chars(mine, bare)
    out["same_chars"] = f"{common}/{max(len(mine), len(bare))}"
    out["compared_tokens"] = len(bare_ids)
    decode = engine.loaded.processor.tokenizer.decode
    out["same_tokens"] = max((k for k in range(len(shown) + 1) if len(decode(shown[:k])) <= common), default=0)
    places = [i for i, t in enumerate(bare_ids) if t not in engine._hidden_ids]  # ``shown``'s tokens in bare_ids
    gaps = out.pop("bare_gaps")
    out["parted_gap"] = gaps[places[out["same_tokens"]]] if out["same_tokens"] < len(shown) else None
    out["median_gap"] = statistics.median(gaps) if gaps else 0.0
    # Is the engine repeatable? (bare generate(): ``baseline``)
    budget, engine._prefixes.budget = engine._prefixes.budget, 0
    engine._prefixes.clear()  # asked again from scratch, not as a follow-up from the cached prefix
    _, _, text_again = await first_chunk(engine, [screenshot(GREEDY_IMAGE)], [], QUESTION, new_tokens)
    engine._prefixes.budget = budget
    out["engine_repeats_chars"] = common_chars(text, text_again)
    # -- continuous batching: 8 questions arriving 200 ms apart, in rounds (one round has measured 2x the
    # others': a figure taken once says little) ----------------------------------------------------------
    n += 1

    async def late(asked: TransformersEngine, i: int) -> tuple[float, float, str]:
        await asyncio.sleep(0.2 * i)
        return await first_chunk(asked, [screenshot(n + i)], [], f"{QUESTION} ({i})", new_tokens)

    out["staggered_rounds_s"] = []
    for _ in range(STAGGERED_ROUNDS):
        arrivals = await asyncio.gather(*[late(engine, i) for i in range(8)])
        out["staggered_rounds_s"].append([a[0] for a in arrivals])
        n += 8
    # -- 8 at once vs one answer's tokens/s -----------------------------------------------------------
    batches = engine.stats.prefill_batches
    before, started = engine.stats.tokens_generated, time.perf_counter()
    eight = await asyncio.gather(*[first_chunk(engine, [screenshot(n + i)], [], f"{QUESTION} ({i})", new_tokens)
                                   for i in range(8)])
    generated = engine.stats.tokens_generated - before
    out["batch8_tokens_per_s"] = generated / (time.perf_counter() - started)
    out["batch8_first_tokens_s"] = max(e[0] for e in eight)  # all eight prefilled (rendered, encoded, prefilled)
    out["batch8_each_first_token_s"] = sorted(e[0] for e in eight)  # how the eight prefills went
    out["batch8_prefill_batches"] = engine.stats.prefill_batches - batches
    out["slot_prefills"], out["questions"] = engine.stats.slot_prefills, engine.stats.questions
    # After the last one's first token all eight decode together (their prefills before that).
    out["batch8_decode_tokens_per_s"] = (generated - 8) / max(1e-9, max(e[1] for e in eight) - max(e[0] for e in eight))
    before, started = engine.stats.tokens_generated, time.perf_counter()
    await first_chunk(engine, [screenshot(n + 9)], [], QUESTION, new_tokens)
    out["single_tokens_per_s"] = (engine.stats.tokens_generated - before) / (time.perf_counter() - started)
    if long_tokens:  # the same at a longer answer (the prefills weigh less against the decode), over rounds
        n += 10
        rounds: list[tuple[float, float]] = []
        for _ in range(LONG_ROUNDS):
            rates = []
            for count in (1, 8):
                before, started = engine.stats.tokens_generated, time.perf_counter()
                await asyncio.gather(*[first_chunk(engine, [screenshot(n + i)], [], f"{QUESTION} ({i})", long_tokens)
                                       for i in range(count)])
                rates.append((engine.stats.tokens_generated - before) / (time.perf_counter() - started))
                n += count
            rounds.append((rates[0], rates[1]))
        out["long_rounds"] = rounds  # (one answer's tokens/s, 8 at once's) each round
        out["long_single_tokens_per_s"] = statistics.median(single for single, _ in rounds)
        out["long_batch8_tokens_per_s"] = statistics.median(eight for _, eight in rounds)
        out["long_tokens"] = long_tokens
    if cuda:
        out["decode_bytes_per_token"] = decode_bytes(model)
        free, total = torch.cuda.mem_get_info()
        out["device_in_use_bytes"] = total - free
        try:
            out |= await asyncio.to_thread(step_anatomy, engine)  # the engine is idle: its thread waits
        except Exception as exc:  # a profiler that cannot run here must not cost the figures above
            out["anatomy_error"] = repr(exc)
    await engine.stop()  # (one mode a process: several modes are each measured apart, measure_apart)
    return out


def report(device: str, bandwidth: float | None, params: int, results: list[dict[str, Any]]) -> str:
    lines = [f"device: {device}", f"parameters: {params / 1e9:.2f} B"]
    if bandwidth:
        lines.append(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    for r in results:
        lines.append(f"\n[{r['mode']}] started in {r['start_s']:.1f} s (load, warm-up, CUDA graphs: {r['graphs']}), "
                     f"everything captured and compiled {r['compiled_s']:.1f} s after the start; "
                     f"image tokens per 1024x768 screenshot: {r['image_tokens']}; "
                     f"decode steps' attention: {r.get('step_attention')}; imsight's kernels: {r['own_kernels']}")
        lines.append(f"  weights {r['weight_bytes'] / 1e9:.2f} GB + KV slots {r['kv_slot_bytes'] / 1e9:.2f} GB"
                     + (f"; peak allocated, load + one question {r['peak_allocated_bytes'] / 1e9:.2f} GB"
                        f" (while starting: {r['startup_peak_allocated_bytes'] / 1e9:.2f} GB)"
                        if "peak_allocated_bytes" in r else ""))
        first, bare = r["ttft_first_s"], r["bare_ttft_s"]
        lines.append(f"  time to first token: {first * 1e3:.0f} ms vs bare generate() {bare * 1e3:.0f} ms "
                     f"(ratio {first / bare:.2f}, target <= 1.0)")
        lines.append("  first token, by part (ms): " + ", ".join(f"{k} {v}" for k, v in r["ttft_anatomy_ms"].items()))
        lines.append(f"  first questions prefilled by the captured forward: {r['slot_prefills']} "
                     f"(of {r['questions']} questions so far, follow-ups and batches included)")
        lines.append("  prefill through the model's own forward (ms): "
                     + ", ".join(f"{k} {v}" for k, v in r["prefill_forward_ms"].items()))
        if anatomy := r.get("prefill_anatomy"):
            lines.append(f"  prefill forward under the profiler: {anatomy}")
        cached, full = r["ttft_follow_up_cached_s"], r["ttft_follow_up_recomputed_s"]
        lines.append(f"  cached follow-up: {cached * 1e3:.0f} ms = {cached / first:.0%} of the first (target <= 30%); "
                     f"recomputed {full * 1e3:.0f} ms")
        for label, key in (("cached follow-up", "follow_up_anatomy_ms"),
                           ("a short one (a real tokenizer's tail length)", "short_follow_up_anatomy_ms")):
            lines.append(f"  {label}, by part (ms): " + ", ".join(f"{k} {v}" for k, v in r[key].items()))
        dec, bare_dec = r["decode_tokens_per_s_batch1"], r["bare_decode_tokens_per_s"]
        lines.append(f"  decode, one question: {dec:.1f} tokens/s vs bare generate() {bare_dec:.1f} "
                     f"({dec / bare_dec:.1f}x)")
        if bandwidth and "decode_bytes_per_token" in r:
            bound = bandwidth / r["decode_bytes_per_token"]
            lines.append(f"  HBM bound: {r['decode_bytes_per_token'] / 1e9:.2f} GB read per token -> {bound:.0f} "
                         f"tokens/s; measured is {dec / bound:.0%} of it")
        lines.append(f"  greedy output equals bare generate() over {r['compared_tokens']} tokens: "
                     f"{r['same_as_generate']} (the first {r['same_tokens']} tokens, {r['same_chars']} characters, "
                     f"agree); bare generate() twice agrees for {r['bare_repeats_tokens']} tokens, the engine twice "
                     f"for {r['engine_repeats_chars']} characters")
        if r.get("parted_gap") is not None:
            lines.append(f"  where they part, bare generate()'s two likeliest tokens are {r['parted_gap']:.3f} apart "
                         f"in logits (over its answer the median gap is {r['median_gap']:.3f})")
        for staggered in r["staggered_rounds_s"]:
            lines.append(f"  8 questions 200 ms apart: time to first token up to {max(staggered) / first:.1f}x the "
                         "idle one (target <= 2x); in arrival order (ms): "
                         + ", ".join(f"{t * 1e3:.0f}" for t in staggered))
        if "anatomy_error" in r:
            lines.append(f"  step anatomy failed: {r['anatomy_error']}")
        if "replay_ms" in r:
            lines.append(f"  one step (batch 1, span 1024): graph replay {r['replay_ms']:.2f} ms back to back; "
                         f"{r['kernels_per_step']} kernels, {r['kernel_ms']:.2f} ms of GPU time summed; top: "
                         + "; ".join(f"{k} {ms} ms x{n}" for k, ms, n in r["top_kernels"]))
            lines.append("  most launched: " + "; ".join(f"{k} x{n} {ms} ms" for k, n, ms in r["most_launched"]))
            lines.append("  step replay (ms) by rows x span: "
                         + ", ".join(f"{k} {v}" for k, v in r["replay_ms_by_rows_x_span"].items()))
            if r.get("graph_kernels"):
                lines.append(f"  the step replayed (batch 1, span 1024): {r['graph_kernels']} kernels, "
                             f"{r['graph_kernel_ms']} ms of GPU time summed; top: "
                             + "; ".join(f"{k} {ms} ms x{n}" for k, ms, n in r["graph_top"]))
            if r.get("sdpa_replay_ms"):
                lines.append("  the same steps with SDPA as their attention (ms): "
                             + ", ".join(f"{k} {v}" for k, v in r["sdpa_replay_ms"].items()))
            for name, graph in r.get("other_graphs", {}).items():
                lines.append(f"  the {name} forward replayed: {graph['replay_ms']} ms, {graph['kernels']} kernels, "
                             f"{graph['kernel_ms']} ms of GPU time summed; top: "
                             + "; ".join(f"{k} {ms} ms x{n}" for k, ms, n in graph["top"]))
        batch8, single = r["batch8_tokens_per_s"], r["single_tokens_per_s"]
        lines.append(f"  8 at once: {batch8:.1f} tokens/s vs one answer {single:.1f} "
                     f"({batch8 / single:.1f}x, target >= 6x); once all 8 are decoding: "
                     f"{r['batch8_decode_tokens_per_s']:.1f} tokens/s; all 8 first tokens after "
                     f"{r['batch8_first_tokens_s'] * 1e3:.0f} ms ({r['batch8_prefill_batches']} forwards "
                     "prefilled several together; each first token after "
                     f"{', '.join(f'{t * 1e3:.0f}' for t in r['batch8_each_first_token_s'])} ms)")
        if "long_tokens" in r:
            long8, long1 = r["long_batch8_tokens_per_s"], r["long_single_tokens_per_s"]
            ratios = [eight / single for single, eight in r.get("long_rounds", [(long1, long8)])]
            lines.append(f"  8 at once, {r['long_tokens']}-token answers: {statistics.median(ratios):.1f}x one answer "
                         f"(median of {len(ratios)} rounds: {', '.join(f'{x:.2f}x' for x in ratios)}; target >= 6x); "
                         f"tokens/s (medians) {long8:.1f} vs {long1:.1f}")
    return "\n".join(lines)


def measure_apart(model_dir: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` for one of several modes, in a process of its own. In one process the second mode's CPU-bound
    parts ran slower (H200, eighteenth step: the vision encoder's wall 53 ms against 38 for the same kernels, the
    model's own prefill 166 ms against 81), though the first engine was stopped and dynamo reset: modes
    measured one after another in one process were not measured alike."""
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        out = Path(tmp) / "results.json"
        command = [sys.executable, __file__, "--modes", mode, "--model-dir", str(model_dir), "--json", str(out),
                   "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
                   "--long-tokens", str(args.long_tokens), *(["--profile"] if args.profile else [])]
        done = subprocess.run(command, check=False)  # its report goes straight to this one's output
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"[{mode}] failed (exit {done.returncode}), above")
        result: dict[str, Any] = json.loads(out.read_text())["results"][0]
        return result


async def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["9b", "tiny"], default="9b")
    parser.add_argument("--modes", default="int4,nf4,bf16")  # int4: what a GPU gets by default
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=300, help="8 at once again at this answer length (0: not)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imsight-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="profile one question and follow-up first")
    parser.add_argument("--model-dir", type=Path, help="measure this model directory instead of building one")
    parser.add_argument("--quick", action="store_true",
                        help="seconds on the CPU, tiny test model (the tests run it; figures mean nothing)")
    args = parser.parse_args()
    if args.quick:
        from core.tiny_model import build_tiny_model

        # two modes: each measured in a process of its own, as several modes are
        args.modes, args.new_tokens, args.reps, args.long_tokens = "bf16,bf16-unfused", 4, 1, 8
        args.model_dir = args.model_dir or args.work / "tiny-llava"
        if not (args.model_dir / "config.json").exists():
            build_tiny_model(args.model_dir)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    model_dir = args.model_dir or args.work / f"glm-{args.size}"
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        build_glm_model(model_dir, args.size, device="cuda" if cuda else "cpu")
        print(f"built and saved the random {args.size} model in {time.perf_counter() - started:.1f} s", flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForImageTextToText.from_config(
            AutoConfig.from_pretrained(model_dir)).parameters())
    bandwidth = copy_bandwidth() if cuda else None
    results = []
    modes = args.modes.split(",")
    for mode in modes:
        if len(modes) > 1:
            sys.stdout.flush()
            results.append(measure_apart(model_dir, mode, args))  # (which prints its own report)
        else:
            results.append(await measure(model_dir, mode, args.new_tokens, args.reps, with_profile=args.profile,
                                         long_tokens=args.long_tokens))
            print(report(device, bandwidth, params, results[-1:]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"device": device, "bandwidth": bandwidth, "params": params,
                                             "results": results}, indent=1))
    if len(modes) > 1:
        print("\n" + report(device, bandwidth, params, results))


if __name__ == "__main__":
    asyncio.run(main())
