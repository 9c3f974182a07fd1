"""Where a burst's GPU time goes: the engine (int4 by default), once everything is compiled, under torch's
profiler while questions arrive: one alone, 8 at once, 8 at once with 64-token answers, 8 asked 125 ms
apart (the daemon bench's burst). For each: the wall time against the GPU's busy time (the union of its
kernels), the idle gaps, kernel time by kind (matrix products, int4 multiplies and unpacking, attention,
inductor's fused kernels, copies), the costliest kernels, and each question's asking, first token, end,
wait before its prefill and how it was prefilled. With ``--by-host`` each of the engine thread's phases runs
under a profiler label, and the GPU's idle time is summed by the phase the engine was in when each gap began
(and the host call under way): what the GPU waited for. Scenarios with answers past their first token also
give the decode stretch after the last first token (wall and GPU busy a step), and ``--steps`` replays the
captured one-row and eight-row steps and lists their kernels by kind side by side.

The profiler adds host time to every operator, so walls here run longer than without it (one question alone:
98-129 ms in the H200 runs, twentieth and twenty-first steps, against ~100 through the engine bench's timing):
compare walls only within one run, and read the GPU's busy time as the figure. Once the profiler lost kernels
(a question's busy time 48 ms where its kernels take ~69): a busy time far under the usual says so. Eight at
once are batched as their renderings end (1+5+2 or 1+3+4 ...), which moves the wall too.

    python bench/burst_profile.py                       # builds the 9B GLM shape under --work if missing
    python bench/burst_profile.py --scenarios "one alone;8 at once"
    python bench/burst_profile.py --by-host --steps     # the GPU's idle time by the engine's phase; step graphs
    python bench/burst_profile.py --quick               # imsight's tiny test model on the CPU (no kernels)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from engine_bench import QUESTION, replay_ms, screenshot
from glm_model import build_glm_model

from core.engine import GenerationLimits, Usage
from core.model_files import resolve
from core.tiny_model import build_tiny_model
from core.transformers_engine import TransformersEngine

GiB = 2**30
# A kernel's kind by its name: the first kind one of whose words it holds. Inductor's come first: their
# names list the operators they fused ("triton_red_fused__to_copy_add_int4_mma_mean_...", an RMSNorm). Then
# attention: flash's and the memory-efficient kernels' names hold "cutlass" too (their template arguments).
KINDS = (("inductor's fused", ("triton_",)),
         ("attention", ("flash", "fmha", "sdpa", "attention", "attend", "merge_slices")),
         ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
         ("int4 unpacking", ("dequantize",)), ("int4 multiplies", ("int4_mma", "int4pack")),
         ("copies", ("copy", "memcpy", "memset", "cat", "fill")))
GAP_MS = 0.3  # idle stretches at least this long are listed
# The engine thread's phases labelled under ``--by-host`` (TransformersEngine's methods).
ENGINE_PHASES = ("_take_requests", "_admit_waiting", "_lookup", "_on_device", "_encoded", "_encoded_together",
                 "_embedded", "_admit_in_slot", "_admit_follow_up", "_admit_together", "_prefill", "_seat",
                 "_first_token", "_take_slot", "_keep_prefix", "_step", "_take_tokens", "_finish")


@dataclass(frozen=True)
class Scenario:
    name: str
    questions: int
    tokens: int
    apart_s: float = 0.0


SCENARIOS = (Scenario("one alone", 1, 1), Scenario("one alone, 64 tokens", 1, 64), Scenario("8 at once", 8, 1),
             Scenario("8 at once, 64 tokens", 8, 64),
             Scenario("8 asked 125 ms apart, 64 tokens", 8, 64, 0.125))


@dataclass
class Asked:
    asked: float
    first: float
    done: float
    usage: Usage


def kind(name: str) -> str:
    low = name.lower()
    return next((label for label, words in KINDS if any(word in low for word in words)), "other")


async def ask(engine: TransformersEngine, n: int, tokens: int, delay_s: float) -> Asked:
    await asyncio.sleep(delay_s)
    usage = Usage()
    asked = time.perf_counter()
    first = None
    async for _ in engine.answer([screenshot(n)], [], f"{QUESTION} ({n})", GenerationLimits(tokens), usage=usage):
        first = first or time.perf_counter()
    done = time.perf_counter()
    return Asked(asked, first or done, done, usage)


def busy_and_gaps(spans: list[tuple[float, float]], least_ms: float = GAP_MS
                  ) -> tuple[float, list[tuple[float, float]]]:
    """Microsecond spans -> the time covered by any, and each uncovered stretch of ``least_ms`` or more (start, ms)."""
    busy, gaps = 0.0, []
    start = end = None
    for s, e in sorted(spans):
        if end is None or s > end:
            if end is not None:
                busy += end - start
                if s - end >= least_ms * 1e3:
                    gaps.append((end / 1e3, (s - end) / 1e3))
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        busy += end - start
    return busy / 1e3, gaps


class HostLog:
    """When each of the engine thread's phases (``ENGINE_PHASES``, and the stepper's launch of a step) ran, by
    ``time.perf_counter``: torch's profiler records host calls only on the thread that started it."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.ranges: list[tuple[str, float, float]] = []  # (name, start, end)
        for name in ENGINE_PHASES:
            setattr(engine, name, self._timed(name.lstrip("_"), getattr(engine, name)))
        stepper = engine._stepper  # (made by the first question: the engine has answered some by now)
        if stepper is not None:
            stepper.step = self._timed("step launch", stepper.step)  # type: ignore[method-assign]

    def _timed(self, name: str, work: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return work(*args, **kwargs)
            finally:
                self.ranges.append((name, started, time.perf_counter()))
        return run

    def since(self, t0: float) -> list[tuple[str, float, float]]:
        """The ranges from ``t0`` on, in ms after it."""
        return [(name, 1e3 * (s - t0), 1e3 * (e - t0)) for name, s, e in self.ranges if e >= t0]


def gaps_by_host(gaps: list[tuple[float, float]], ranges: list[tuple[str, float, float]]
                 ) -> list[tuple[str, float, int]]:
    """Each gap (start, ms) put down to the innermost of ``ranges`` (name, start, end; ms, one base with the
    gaps) under way when it began, ``"(none)"`` where none was: (name, ms in all, gaps), the most first."""
    totals: dict[str, list[float]] = {}
    for at, length in gaps:
        under = [(start, name) for name, start, end in ranges if start <= at < end]
        entry = totals.setdefault(max(under)[1] if under else "(none)", [0.0, 0])
        entry[0] += length
        entry[1] += 1
    return sorted(((name, ms, int(count)) for name, (ms, count) in totals.items()), key=lambda item: -item[1])


def decode_stretch(start: float, end: float, steps: int, spans: list[tuple[float, float]],
                   phases: list[tuple[str, float, float]]) -> None:
    """The stretch from ``start`` to ``end`` (ms) where every answer is past its first token: its wall and GPU busy
    time a step, and where the host's phases are timed, how often a step was launched and each phase's median."""
    inside = [(max(s, start * 1e3), min(e, end * 1e3)) for s, e in spans if e > start * 1e3 and s < end * 1e3]  # (us)
    busy, _ = busy_and_gaps(inside)
    print(f"   after the last first token: {end - start:.1f} ms, GPU busy {busy:.1f} ms: "
          f"{(end - start) / steps:.2f} / {busy / steps:.2f} ms a step ({steps} steps)")
    launches = sorted(s for name, s, _ in phases if name == "step launch" and start <= s <= end)
    if len(launches) > 2:
        durations: dict[str, list[float]] = {}
        for name, s, e in phases:
            if start <= s <= end:
                durations.setdefault(name, []).append(e - s)
        every = statistics.median(b - a for a, b in itertools.pairwise(launches))
        print(f"   ... host: a launch every {every:.2f} ms (median); median ms a call: " + ", ".join(
            f"{name} {statistics.median(values):.3f} (x{len(values)})" for name, values in durations.items()))


def report(scenario: Scenario, prof: Any, t0: float, answers: list[Asked], host: HostLog | None = None) -> None:
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    marks = [e for e in events if e.name == "burst-start"]
    base = marks[0].time_range.start if marks else 0
    spans = [(k.time_range.start - base, k.time_range.end - base) for k in kernels]
    busy, gaps = busy_and_gaps(spans)
    wall = 1e3 * (max(a.done for a in answers) - t0)
    print(f"== {scenario.name}: wall {wall:.1f} ms, GPU busy {busy:.1f} ms ({len(kernels)} kernels), "
          f"{len(gaps)} gaps of {GAP_MS} ms or more, {sum(g for _, g in gaps):.1f} ms in all")
    for at, length in gaps[:12]:
        print(f"   gap at {at:7.1f} ms: {length:5.2f} ms")
    phases = host.since(t0) if host is not None else []
    if phases:
        _, every_gap = busy_and_gaps(spans, least_ms=0.01)
        print(f"   the GPU idle {sum(g for _, g in every_gap):.1f} ms in gaps of 0.01 ms or more, by the engine's "
              "phase as each began (ms / gaps): " + ", ".join(f"{name} {ms:.1f} / {count}"
                                                     for name, ms, count in gaps_by_host(every_gap, phases)))
    if scenario.tokens > 1:
        decode_stretch(1e3 * (max(a.first for a in answers) - t0), wall, scenario.tokens - 1, spans, phases)
    by_kind, by_name = kernel_tables(kernels)
    if kernels:
        print("   by kind (ms / kernels): " + ", ".join(f"{name} {ms:.1f} / {count}" for name, (ms, count)
                                                     in sorted(by_kind.items(), key=lambda item: -item[1][0])))
        for name, (ms, count) in sorted(by_name.items(), key=lambda item: -item[1][0])[:12]:
            print(f"   {ms:8.2f} ms {count:6d}x  {name}")
    else:
        print("   no GPU kernels (the CPU)")
    for a in sorted(answers, key=lambda a: a.first):
        print(f"   asked at {1e3 * (a.asked - t0):6.1f}, first token {1e3 * (a.first - t0):6.1f}, "
              f"done {1e3 * (a.done - t0):6.1f} ms; waited {1e3 * a.usage.waited_s:.1f} ms, "
              f"prefill: {a.usage.prefill}")


def kernel_tables(kernels: list[Any], per: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Profiled kernels summed by kind and by name (its first 90 characters): ``[ms, count]`` each, over ``per``."""
    by_kind: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for k in kernels:
        for table, key in ((by_kind, kind(k.name)), (by_name, k.name[:90])):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += k.device_time / 1e3 / per
            entry[1] += 1
    return by_kind, by_name


def step_graphs(engine: TransformersEngine, span: int = 2048, replays: int = 10) -> None:
    """The captured one-row and eight-row decode steps replayed: back to back, then under the profiler, kernel
    time by kind and the costliest kernels (ms a replay, one column a row count)."""
    stepper, kv = engine._stepper, engine._kv
    if stepper is None or kv is None or not stepper.use_graphs:
        print("== step graphs: none captured here")
        return
    tables: dict[int, tuple[dict[str, list[float]], dict[str, list[float]]]] = {}
    with torch.inference_mode():  # the engine's tensors are inference tensors
        saved = kv.positions.clone()
        for rows in (1, 8):
            graph = stepper._graphs.get(("step", rows, span))
            if graph is None:
                continue
            print(f"== step graph, {rows} row(s) at span {span}: back to back {replay_ms(graph, replays)} ms a replay")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(replays):
                    graph.replay()
                torch.cuda.synchronize()
            tables[rows] = kernel_tables([e for e in prof.events()
                                          if e.device_type == torch.autograd.DeviceType.CUDA], replays)
        kv.positions.copy_(saved)
    totals = {rows: sum(ms for ms, _ in by_kind.values()) for rows, (by_kind, _) in tables.items()}
    print(f"== step graphs at span {span}, ms of kernels a replay: "
          + ", ".join(f"{rows} row(s) {ms:.3f}" for rows, ms in totals.items()))
    for which in (0, 1):  # by kind, then by name
        columns = [table[which] for table in tables.values()]
        keys = sorted({k for c in columns for k in c}, key=lambda k: -max(c.get(k, [0.0])[0] for c in columns))
        for key in keys[:16]:
            print("   " + " ".join(f"{c.get(key, [0.0])[0]:7.3f}" for c in columns) + f"  {key}")


async def measure(engine: TransformersEngine, scenario: Scenario, first_image: int, host: HostLog | None = None
                  ) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("burst-start"):
            t0 = time.perf_counter()
        answers = await asyncio.gather(*[ask(engine, first_image + i, scenario.tokens, scenario.apart_s * i)
                                         for i in range(scenario.questions)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    report(scenario, prof, t0, list(answers), host)


async def settled_engine(model_dir: Path | None, work: Path, quantization: str, *, quick: bool,
                         own_kernels: bool = True) -> TransformersEngine:
    """The engine as a burst meets it once idle (everything compiled): the 9B GLM shape (built under ``work``
    if missing), or with ``quick`` imsight's tiny test model on the CPU. 8 slots, no batch window;
    ``own_kernels=False``: transformers' decoder layers and vision blocks, compiled (``[engine] decoder_kernels``
    and ``vision_kernels``)."""
    if quick:
        model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    elif model_dir is None:
        model_dir = work / "glm-9b"
        if not (model_dir / "config.json").exists():
            build_glm_model(model_dir, "9b", device="cuda")
    cuda = torch.cuda.is_available()
    engine = TransformersEngine(resolve("bench", model_dir, allow_download=False),
                                quantization="none" if quick else quantization,
                                dtype="bfloat16" if cuda else "float32", max_batch=8, batch_window_s=0.0,
                                prefix_cache_bytes=4 * GiB, warmup=True, decoder_kernels=own_kernels,
                                vision_kernels=own_kernels)
    started = time.perf_counter()
    await engine.start()
    await asyncio.to_thread(engine.settled.wait)
    print(f"everything compiled {time.perf_counter() - started:.1f} s after the start", flush=True)
    return engine


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="measure this model directory instead of building one")
    parser.add_argument("--work", type=Path, default=Path("/tmp/imsight-bench"))
    parser.add_argument("--quantization", default="int4")
    parser.add_argument("--scenarios", default=";".join(s.name for s in SCENARIOS),
                        help="separated by ';', of: " + "; ".join(s.name for s in SCENARIOS))
    parser.add_argument("--by-host", action="store_true", help="the GPU's idle time by the engine's phase")
    parser.add_argument("--steps", action="store_true", help="the captured 1- and 8-row steps' kernels by kind")
    parser.add_argument("--quick", action="store_true", help="imsight's tiny test model on the CPU: a check of the "
                                                             "script, its figures mean nothing")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.scenarios.split(";")]
    scenarios = [s for s in SCENARIOS if s.name in wanted]
    if len(scenarios) != len(wanted):
        parser.error(f"unknown scenario in {args.scenarios!r}")
    engine = await settled_engine(args.model_dir, args.work, args.quantization, quick=args.quick)
    n = 1000
    for warm in (1, 1, 1, 8):  # each path once before it is measured
        await asyncio.gather(*[ask(engine, n + i, 4, 0.0) for i in range(warm)])
        n += warm
    if args.steps:
        step_graphs(engine)
    host = HostLog(engine) if args.by_host else None
    for scenario in scenarios:
        await measure(engine, scenario, n, host)
        n += scenario.questions
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
