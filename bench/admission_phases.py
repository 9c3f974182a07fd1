"""How eight questions asked at once are admitted: the engine (int4 by default), once everything is compiled, over
several rounds; for each round, when every first token came, and each admission's phases timed with the GPU
synchronized at their ends: a first question alone by the captured prompt (or the model's own prefill where none
fits, the CPU too); several together, the vision encoder of their images in one run, their prefill in one forward,
the whole admission (seating each row and keeping its prefix come after the first tokens, and the next admission
waits for them).

``--ab-causal`` alternates the rounds between the prompts' attention causal without a mask (as the engine runs
it, core/step_attention.py) and with the mask, in one process: the first question's captured prompt keeps
what it was captured with, so only the prompts prefilled together differ (bench/RESULTS.md, twenty-first step:
the probe this script was made from; the script itself has run only in its quick mode so far).

    python bench/admission_phases.py --rounds 6 --ab-causal   # builds the 9B GLM shape under --work if missing
    python bench/admission_phases.py --quick                  # imsight's tiny test model on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from burst_profile import ask, settled_engine

from core.transformers_engine import TransformersEngine

# The engine's methods timed, what each is called here, and how many questions a call takes.
PHASES: dict[str, tuple[str, Callable[..., int]]] = {
    "_admit_in_slot": ("captured prompt", lambda *args: 1),
    "_prefill": ("the model's own prefill", lambda *args: 1),  # (alone, where no captured prompt fits)
    "_encoded_together": ("vision encoder together", lambda group: len(group)),
    "_admit_together": ("admission together", lambda group: len(group)),
}


def timed(engine: TransformersEngine, log: list[tuple[str, int, float]]) -> None:
    """Each of ``PHASES``, and each prefill of several questions in one forward, appends its name, questions and
    ms to ``log``."""
    import core.transformers_engine as engine_module

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def wrap(name: str, questions: Callable[..., int], work: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            sync()
            started = time.perf_counter()
            out = work(*args, **kwargs)
            sync()
            log.append((name, questions(*args), 1e3 * (time.perf_counter() - started)))
            return out
        return run

    for attribute, (name, questions) in PHASES.items():
        setattr(engine, attribute, wrap(name, questions, getattr(engine, attribute)))
    engine_module.prefill_together = wrap(  # type: ignore[assignment]  # (looked up there at each call)
        "prefill together", lambda model, batch, *_: int(batch["input_ids"].shape[0]), engine_module.prefill_together)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="measure this model directory instead of building one")
    parser.add_argument("--work", type=Path, default=Path("/tmp/imsight-bench"))
    parser.add_argument("--quantization", default="int4")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ab-causal", action="store_true", help="alternate the prompts' attention causal / masked")
    parser.add_argument("--compiled", action="store_true",
                        help="transformers' decoder layers and vision blocks, compiled ([engine] decoder_kernels "
                             "= false, vision_kernels = false)")
    parser.add_argument("--quick", action="store_true", help="imsight's tiny test model on the CPU: a check of the "
                                                             "script, its figures mean nothing")
    args = parser.parse_args()
    engine = await settled_engine(args.model_dir, args.work, args.quantization, quick=args.quick,
                                  own_kernels=not args.compiled)
    attention = engine._step_attention
    if args.ab_causal and attention is None:
        print("the engine's attention is not installed here (a CPU): every round as it is")
    n = 1000
    for warm in (1, 1, 8, 8):  # each path once before it is measured
        await asyncio.gather(*[ask(engine, n + i, 4, 0.0) for i in range(warm)])
        n += warm
    log: list[tuple[str, int, float]] = []
    timed(engine, log)
    ways = (True, False) if args.ab_causal and attention is not None else (None,)
    firsts: dict[bool | None, list[float]] = {way: [] for way in ways}
    phases: dict[tuple[bool | None, str, int], list[float]] = {}
    for round_ in range(args.rounds):
        way = ways[round_ % len(ways)]
        if attention is not None and way is not None:
            attention.causal = way
        await asyncio.sleep(0.2)  # the last round's seating and prefixes done (they come after its first tokens)
        log.clear()
        started = time.perf_counter()
        answers = await asyncio.gather(*[ask(engine, n + i, 1, 0.0) for i in range(8)])
        n += 8
        times = sorted(1e3 * (a.first - started) for a in answers)
        firsts[way].append(times[-1])
        for phase, questions, ms in log:
            phases.setdefault((way, phase, questions), []).append(ms)
        print(f"round {round_}{_label(way, ' ', '')}: all first tokens after {times[-1]:.0f} ms ("
              + ", ".join(f"{t:.0f}" for t in times) + "); "
              + "; ".join(f"{phase} x{questions} {ms:.1f}" for phase, questions, ms in log), flush=True)
    for way, values in firsts.items():
        print(f"{_label(way, '', ': ')}all first tokens, median {statistics.median(values):.0f} ms of "
              f"{len(values)} rounds")
    for (way, phase, questions), values in sorted(phases.items(), key=lambda item: (item[0][1], item[0][2])):
        print(f"  {phase} x{questions}{_label(way, ' (', ')')}: median {statistics.median(values):.1f} ms of "
              f"{len(values)}")
    await engine.stop()


def _label(way: bool | None, before: str, after: str) -> str:
    """Which way a round went, where rounds alternate (``--ab-causal``); nothing where they do not."""
    return "" if way is None else f"{before}causal {'on' if way else 'off'}{after}"


if __name__ == "__main__":
    asyncio.run(main())
