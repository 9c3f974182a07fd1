"""Speed and memory of the in-process engine on a model of a real architecture, random weights.

Builds GLM-4.1V/4.6V-Flash's 9B shape from its config (no download; needs a CUDA GPU and
torchvision), saves it, loads it through imsight's own loader and engine in bf16 and in NF4, and
prints: parameters, weight bytes, peak GPU memory, time to first token for a 1024x768 screenshot,
a follow-up with and without the prefix cache, decode tokens/s at batch 1, 8 questions batched vs
one after another, and decode speed against the HBM-bandwidth bound. Modes: bf16, nf4, and
bf16-static / nf4-static (``static_cache_tokens = 2048``: compiled decode for single questions).
``--size tiny`` runs the same measurements on a small GLM-shaped model, and ``--quick`` on imsight's
tiny test model on the CPU (quick checks of the script; figures mean nothing).

    python bench/engine_bench.py --size 9b --modes nf4,bf16,bf16-static --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glm_model import build_glm_model

from core.engine import GenerationLimits, PreparedImage, Turn
from core.model_files import resolve
from core.transformers_engine import TransformersEngine

GiB = 2**30
QUESTION = "What does the error in this screenshot mean, and how do I fix it?"
FIRST, FIRST_ANSWER = "What is on this screen?", "A terminal with a failed build: the linker cannot find libssl."
FOLLOW_UP = "Which package do I install to fix that?"


def screenshot(n: int) -> PreparedImage:
    """A 1024x768 screenshot-like picture; each ``n`` differs (its own cache key and pixels)."""
    rng = random.Random(n)
    image = Image.new("RGB", (1024, 768), (30, 30, 36))
    draw = ImageDraw.Draw(image)
    for row in range(40):
        y = 10 + row * 19
        draw.rectangle((10, y, 10 + rng.randint(200, 1000), y + 12), fill=(rng.randint(90, 255),) * 3)
    return PreparedImage(f"shot-{n}", image)


async def timed_answer(engine: TransformersEngine, images: list[PreparedImage], turns: list[Turn], question: str,
                       new_tokens: int) -> tuple[float, str]:
    started = time.perf_counter()
    text = "".join([c async for c in engine.answer(images, turns, question, GenerationLimits(new_tokens))])
    return time.perf_counter() - started, text


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
    for name, param in model.named_parameters():
        if ".visual." in f".{name}" or "embed_tokens" in name:
            continue
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
        rendered = time.perf_counter()
        engine._answer_safely([request], engine._lookup(request))
        print(f"  render {1e3 * (rendered - started):.0f} ms, generate {1e3 * (time.perf_counter() - rendered):.0f} ms")

    shot = screenshot(999)
    for label, turns, question in (("first question", [], FIRST), ("cached follow-up", [Turn("user", FIRST),
                                   Turn("assistant", FIRST_ANSWER)], FOLLOW_UP)):
        profiler = cProfile.Profile()
        profiler.enable()
        run([shot], turns, question)
        profiler.disable()
        print(f"profile of a {label}:")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(28)


async def measure(model_dir: Path, mode: str, new_tokens: int, reps: int, *,
                  with_profile: bool = False) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = TransformersEngine(
        resolve("bench", model_dir, allow_download=False), quantization="nf4" if mode.startswith("nf4") else "none",
        dtype="bfloat16" if cuda else "float32", max_batch=8, batch_window_s=0.05,
        prefix_cache_bytes=4 * GiB, warmup=True, static_cache_tokens=2048 if mode.endswith("-static") else 0,
    )
    started = time.perf_counter()
    await engine.start()
    out: dict[str, Any] = {"mode": mode, "load_s": time.perf_counter() - started}
    model = engine.loaded.model
    if with_profile:
        await asyncio.to_thread(profile, engine)  # the engine thread is idle: nothing else touches the model
    out["weight_bytes"] = model.get_memory_footprint()
    out["estimated_weight_bytes"] = engine.loaded.estimate.weights
    out["image_tokens"] = int((engine._inputs([screenshot(0)], [], QUESTION)["input_ids"]
                               == model.config.image_token_id).sum())
    n = 100
    # First question: vision encoder + prefill + one token.
    first = [(await timed_answer(engine, [screenshot(n)], [], QUESTION, 1))[0]]
    if cuda:  # the target: load + one question
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        out["device_in_use_bytes"] = total - free
    first += [(await timed_answer(engine, [screenshot(n + i)], [], QUESTION, 1))[0] for i in range(1, reps)]
    out["ttft_first_s"] = statistics.median(first)
    # Follow-up about the same screenshot, with the prefix cache and without.
    n += reps
    turns = [Turn("user", FIRST), Turn("assistant", FIRST_ANSWER)]
    cached, recomputed = [], []
    for i in range(reps):
        await timed_answer(engine, [screenshot(n + i)], [], FIRST, 1)
        cached.append((await timed_answer(engine, [screenshot(n + i)], turns, FOLLOW_UP, 1))[0])
    budget = engine._prefixes.budget
    engine._prefixes.budget = 0
    engine._prefixes.clear()
    n += reps
    for i in range(reps):
        await timed_answer(engine, [screenshot(n + i)], [], FIRST, 1)
        recomputed.append((await timed_answer(engine, [screenshot(n + i)], turns, FOLLOW_UP, 1))[0])
    out["ttft_follow_up_cached_s"] = statistics.median(cached)
    out["ttft_follow_up_recomputed_s"] = statistics.median(recomputed)
    # Greedy output must not depend on the cache.
    n += reps
    _, plain = await timed_answer(engine, [screenshot(n)], turns, FOLLOW_UP, 16)
    engine._prefixes.budget = budget
    await timed_answer(engine, [screenshot(n)], [], FIRST, 1)
    hits = engine.stats.prefix_hits
    _, reused = await timed_answer(engine, [screenshot(n)], turns, FOLLOW_UP, 16)
    out["follow_up_identical_with_cache"] = plain == reused and engine.stats.prefix_hits == hits + 1
    out["follow_up_same_chars"] = f"{common_chars(plain, reused)}/{max(len(plain), len(reused))}"
    # Decode rate at batch 1.
    n += 1
    before = engine.stats.tokens_generated
    seconds, _ = await timed_answer(engine, [screenshot(n)], [], QUESTION, new_tokens)
    tokens = engine.stats.tokens_generated - before
    out["decode_tokens_per_s_batch1"] = (tokens - 1) / max(1e-9, seconds - out["ttft_first_s"])
    # Eight different questions: batched vs one after another.
    n += 1
    shots = [screenshot(n + i) for i in range(8)]
    before, started = engine.stats.tokens_generated, time.perf_counter()
    await asyncio.gather(*[timed_answer(engine, [s], [], f"{QUESTION} ({i})", new_tokens) for i, s in enumerate(shots)])
    batched = (engine.stats.tokens_generated - before) / (time.perf_counter() - started)
    engine.max_batch = 1
    shots = [screenshot(n + 8 + i) for i in range(8)]
    before, started = engine.stats.tokens_generated, time.perf_counter()
    for i, s in enumerate(shots):
        await timed_answer(engine, [s], [], f"{QUESTION} ({i})", new_tokens)
    sequential = (engine.stats.tokens_generated - before) / (time.perf_counter() - started)
    out["batch8_tokens_per_s"], out["sequential8_tokens_per_s"] = batched, sequential
    out["batches"] = engine.stats.batches
    if cuda:
        out["decode_bytes_per_token"] = decode_bytes(model)
    await engine.stop()
    del engine, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def report(device: str, bandwidth: float | None, params: int, results: list[dict[str, Any]]) -> str:
    lines = [f"device: {device}", f"parameters: {params / 1e9:.2f} B"]
    if bandwidth:
        lines.append(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    for r in results:
        lines.append(f"\n[{r['mode']}] loaded in {r['load_s']:.1f} s; image tokens per 1024x768 screenshot: "
                     f"{r['image_tokens']}")
        lines.append(f"  weights: {r['weight_bytes'] / 1e9:.2f} GB (estimated before loading "
                     f"{r['estimated_weight_bytes'] / 1e9:.2f} GB)")
        if "peak_allocated_bytes" in r:
            lines.append(f"  peak GPU memory, load + one question: {r['peak_allocated_bytes'] / 1e9:.2f} GB allocated "
                         f"({r['peak_allocated_bytes'] / GiB:.2f} GiB); device in use "
                         f"{r['device_in_use_bytes'] / 1e9:.2f} GB")
        first, cached, full = r["ttft_first_s"], r["ttft_follow_up_cached_s"], r["ttft_follow_up_recomputed_s"]
        lines.append(f"  time to first token, first question: {first * 1e3:.0f} ms")
        lines.append(f"  follow-up: {cached * 1e3:.0f} ms with the prefix cache ({cached / first:.0%} of the first), "
                     f"{full * 1e3:.0f} ms recomputed ({full / first:.0%}); identical output: "
                     f"{r['follow_up_identical_with_cache']} ({r['follow_up_same_chars']} characters agree)")
        lines.append(f"  decode at batch 1: {r['decode_tokens_per_s_batch1']:.1f} tokens/s")
        if bandwidth and "decode_bytes_per_token" in r:
            bound = bandwidth / r["decode_bytes_per_token"]
            lines.append(f"  HBM bound: {r['decode_bytes_per_token'] / 1e9:.2f} GB read per token -> {bound:.0f} "
                         f"tokens/s; measured is {r['decode_tokens_per_s_batch1'] / bound:.0%} of it")
        lines.append(f"  8 questions: batched {r['batch8_tokens_per_s']:.1f} tokens/s vs one after another "
                     f"{r['sequential8_tokens_per_s']:.1f} "
                     f"({r['batch8_tokens_per_s'] / r['sequential8_tokens_per_s']:.1f}x, {r['batches']} batched calls)")
    return "\n".join(lines)


async def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["9b", "tiny"], default="9b")
    parser.add_argument("--modes", default="bf16,nf4")
    parser.add_argument("--new-tokens", type=int, default=32)
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

        args.modes, args.new_tokens, args.reps = "bf16", 4, 1
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
    for mode in args.modes.split(","):
        results.append(await measure(model_dir, mode, args.new_tokens, args.reps, with_profile=args.profile))
        print(report(device, bandwidth, params, results[-1:]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"device": device, "bandwidth": bandwidth, "params": params,
                                             "results": results}, indent=1))
    print("\n" + report(device, bandwidth, params, results))


if __name__ == "__main__":
    asyncio.run(main())
