"""What 8 chats asking 125 ms apart take when each one's prefill holds the GPU for P ms: a model of the
engine's turns (no GPU, no model), to read ``daemon_bench.py``'s 8-chat figure against (target 5: all within
1.3x one answer).

The engine prefills a newcomer as soon as its prompt is rendered, between two decode steps, and the running
answers' steps wait meanwhile: a prefill holds the GPU for P ms (vision encoder, captured prompt, the host
work between them), a step for ``step_ms`` plus ``row_ms`` a row, every answer is ``tokens`` long. Fitted to
the H200's daemon run (bench/RESULTS.md, nineteenth step: P = 82 gives 868 ... 378 ms against the measured
0.90 ... 0.39 s), it says how small P must be for a target, and what other turn-taking would give: a minimum
gap between prefills (``--gaps``), or a prefill split into pieces with a step between each (``--pieces``).

    python bench/burst_model.py                    # the slowest chat against one answer for P = 30 ... 82 ms
    python bench/burst_model.py --prefill-ms 82 --gaps 0 60 80 --pieces 1 4
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Burst:
    prefill_ms: float = 82.0
    step_ms: float = 4.2
    row_ms: float = 0.06
    tokens: int = 64
    chats: int = 8
    apart_ms: float = 125.0
    render_ms: float = 20.0  # before the engine sees the question (counted in its answer's time)


def answer_times(burst: Burst, *, gap_ms: float = 0.0, pieces: int = 1) -> list[float]:
    """Each chat's answer time (ms, from its asking), in asking order. ``gap_ms``: a prefill waits until the
    running answers have decoded that long since the last one; ``pieces``: a prefill in that many parts,
    one decode step between each."""
    now, last_prefill = 0.0, float("-inf")
    ready = [n * burst.apart_ms + burst.render_ms for n in range(burst.chats)]  # prompt rendered
    waiting: list[int] = []
    left: dict[int, int] = {}  # answering chat -> tokens still to come
    done: dict[int, float] = {}
    prefilling, parts = -1, 0
    arrived = 0
    while len(done) < burst.chats:
        while arrived < burst.chats and ready[arrived] <= now:
            waiting.append(arrived)
            arrived += 1
        if prefilling < 0 and waiting and (not left or now - last_prefill >= gap_ms):
            prefilling, parts = waiting.pop(0), pieces
        if prefilling >= 0:
            now += burst.prefill_ms / pieces
            parts -= 1
            if parts == 0:
                left[prefilling], prefilling, last_prefill = burst.tokens - 1, -1, now
                continue  # its first token is out; the next turn is a step
        if left:
            now += burst.step_ms + burst.row_ms * (len(left) - 1)
            for chat in list(left):
                left[chat] -= 1
                if not left[chat]:
                    done[chat] = now - chat * burst.apart_ms
                    del left[chat]
        elif prefilling < 0:
            now = ready[arrived]
    return [done[n] for n in range(burst.chats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-ms", type=float, nargs="+", default=[30, 45, 70, 82])
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0], help="least ms of decoding between prefills")
    parser.add_argument("--pieces", type=int, nargs="+", default=[1], help="parts a prefill is split into")
    args = parser.parse_args()
    for prefill in args.prefill_ms:
        burst = Burst(prefill_ms=prefill)
        one = answer_times(Burst(prefill_ms=prefill, chats=1))[0]
        for gap in args.gaps:
            for pieces in args.pieces:
                times = answer_times(burst, gap_ms=gap, pieces=pieces)
                each = ", ".join(f"{t:.0f}" for t in times)
                print(f"prefill {prefill:g} ms, gap {gap:g} ms, {pieces} piece(s): one answer {one:.0f} ms; "
                      f"8 chats {each} ms; slowest = {max(times) / one:.2f}x one answer")


if __name__ == "__main__":
    main()
