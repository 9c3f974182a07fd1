"""Where an engine's start goes: a stack sampler on the engine thread, from the process start until
everything is captured and compiled (``settled``), split at the engine's log lines.

Prints each phase (each ends at one of the engine's log lines) with its seconds sampled by kind of
work: dynamo's tracing, its guards and frame lookups, inductor (code generation; on a restart loading
its cached code and running the compiled layers), Triton compiling, the eager layers' Python, launching
the int4 kernel, capturing CUDA graphs; then the whole start by kind, and imsight's own functions by
the time under them. Run it twice on one machine for a first start and a restart: inductor's cache
goes under ``--compile-cache``, as the daemon's goes under ``data_dir/compile-cache``; int4's quantized weights
beside it, in ``int4-cache`` (the daemon's ``data_dir/int4-cache``).

    python bench/startup_profile.py --model-dir /path/to/model [--quantization int4] [--compile-cache DIR]
    python bench/startup_profile.py --quick     # the tiny test model on the CPU (figures mean nothing)
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports: a restart's imports are part of its start

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import int4_cache  # noqa: E402
from core.model_files import resolve  # noqa: E402
from core.transformers_engine import TransformersEngine  # noqa: E402

IMPORTED = time.monotonic()  # torch, transformers' top level and imsight's engine: before the engine's start

INTERVAL_S = 0.02
# Kinds of work by the files on the engine thread's stack, the first that matches (innermost work first).
KINDS = [
    ("importing modules", ("<frozen importlib._bootstrap>",)),  # (transformers' model code, at the load)
    ("reading weights", ("safetensors",)),
    ("Triton compiling", ("triton/compiler", "async_compile")),
    ("inductor", ("torch/_inductor",)),
    ("AOT autograd", ("torch/_functorch",)),
    ("dynamo's tracing", ("torch/_dynamo/symbolic_convert", "torch/_dynamo/output_graph",
                          "torch/_dynamo/variables")),
    ("dynamo's guards and frames", ("torch/_dynamo",)),
    ("capturing CUDA graphs", ("torch/cuda/graphs",)),
    ("waiting for the GPU", ("cuda/__init__.py:synchronize",)),
    # (a Triton kernel's launch runs through triton/runtime/jit too, compiled or not: only a compile is above)
    ("Triton kernels' launches", ("triton/runtime", "triton/backends")),
    ("the int4 kernel's launches", ("core/int4",)),
    ("eager layers' Python", ("transformers/models", "transformers/modeling", "core/glm_decoder")),
]


def kind_of(stack: list[str]) -> str:
    for kind, marks in KINDS:
        if any(mark in frame for frame in stack for mark in marks):
            return kind
    return "waiting" if stack and stack[-1].endswith(":wait") else "other"


class Sampler:
    """The engine thread's stack every ``INTERVAL_S``, each sample (seconds since start, kind, stack); before
    that thread runs, the executor thread's that loads the model (``engine.start`` loads it in the loop's
    default executor)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, str, tuple[str, ...]]] = []
        self.innermost: list[str] = []  # each sample's innermost frame and its line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            threads = threading.enumerate()
            engine = (next((t for t in threads if t.name == "imsight-engine"), None)
                      or next((t for t in threads if t.name.startswith("asyncio_")), None))
            frame = sys._current_frames().get(engine.ident) if engine is not None and engine.ident else None
            stack: list[str] = []
            line = frame.f_lineno if frame is not None else 0
            while frame is not None:
                stack.append(f"{frame.f_code.co_filename.split('site-packages/')[-1]}:{frame.f_code.co_name}")
                frame = frame.f_back
            if stack:
                stack.reverse()  # outermost first
                self.samples.append((time.monotonic() - STARTED, kind_of(stack), tuple(stack)))
                self.innermost.append(f"{stack[-1]}:{line}")  # what it was running, or the call into C it was in


class Marks(logging.Handler):
    """The engine's log lines, each with its time since start: the phases' ends."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic() - STARTED, record.getMessage()))


def seconds(count: int) -> str:
    return f"{count * INTERVAL_S:.1f}"


def report(samples: list[tuple[float, str, tuple[str, ...]]], innermost: list[str], lines: list[tuple[float, str]],
           end: float) -> str:
    out = []
    edges = [0.0] + [at for at, _ in lines] + [end]
    for start, stop, line in zip(edges[:-1], edges[1:], [text for _, text in lines] + ["(settled)"], strict=True):
        kinds = collections.Counter(kind for at, kind, _ in samples if start <= at < stop)
        if kinds:
            out.append(f"    {', '.join(f'{kind} {seconds(n)}' for kind, n in kinds.most_common(5))}")
        out.append(f"{stop:7.1f} s  {line[:160]}")
    out.append("\nthe whole start, by kind (seconds sampled on the engine thread)")
    for kind, n in collections.Counter(kind for _, kind, _ in samples).most_common():
        out.append(f"  {kind}: {seconds(n)}")
    out.append("\nimsight's functions, by the time under them")
    under: collections.Counter[str] = collections.Counter()
    for _, _, stack in samples:
        under.update({frame.split("/core/")[-1] for frame in stack if "/core/" in frame})
    out.extend(f"  {function}: {seconds(n)}" for function, n in under.most_common(15))
    out.append("\nthe lines the engine thread was on (the innermost Python frame: its own work, or a call into C)")
    out.extend(f"  {line}: {seconds(n)}" for line, n in collections.Counter(innermost).most_common(20))
    return "\n".join(out)


async def profile(model: Path, quantization: str, dtype: str, device: str, compile_cache: Path | None) -> str:
    marks = Marks()
    logging.getLogger("core").addHandler(marks)
    logging.getLogger("core").setLevel(logging.INFO)
    engine = TransformersEngine(resolve("bench", model, allow_download=False), device=device,
                                quantization=quantization, dtype=dtype, compile_cache=compile_cache,
                                int4_cache=compile_cache.parent / "int4-cache" if compile_cache else None)
    marks.lines.append((IMPORTED - STARTED, "imports done (torch, transformers' top level, imsight's engine)"))
    with Sampler() as sampler:
        marks.lines.append((time.monotonic() - STARTED, "the engine's start begins"))
        await engine.start()
        ready = time.monotonic() - STARTED
        await asyncio.to_thread(engine.settled.wait)
        settled = time.monotonic() - STARTED
    await engine.stop()
    await asyncio.to_thread(int4_cache.wait)  # the quantized weights written for the next run (first start only)
    return (f"ready {ready:.1f} s after the start, everything captured and compiled after {settled:.1f} s\n"
            + report(sampler.samples, sampler.innermost, marks.lines, settled))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a model directory (the benches' GLM: glm_model.py)")
    parser.add_argument("--quantization", default="int4")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile-cache", type=Path, help="inductor's cache (default: torch's, under /tmp)")
    parser.add_argument("--quick", action="store_true", help="the tiny test model on the CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.quick:
        from core.tiny_model import build_tiny_model

        with tempfile.TemporaryDirectory(prefix="imsight-startup-") as tmp:
            model = build_tiny_model(Path(tmp) / "tiny")
            print(asyncio.run(profile(model, "none", "float32", "cpu", Path(tmp) / "compile-cache")))
        return
    if args.model_dir is None:
        parser.error("--model-dir or --quick")
    print(asyncio.run(profile(args.model_dir, args.quantization, args.dtype, "auto", args.compile_cache)))


if __name__ == "__main__":
    main()
