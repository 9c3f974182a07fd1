"""The vision encoder two ways, alternating in one process: transformers' SDPA way (the images' lengths
read from the GPU three times in every block) and imsight's (``core/vision_attention.py``: once a run).

Prints, for one screenshot and for eight (1024x768: GLM-4.6V-Flash's 3,996 patches each): each way's
median time with its range, whether the outputs are the same bit for bit, and the host reads a run.
``--compiled`` adds a third way, imsight's with each block through ``torch.compile`` as the engine runs it
once idle (``core/compiled_vision.py``); ``--kernels`` adds imsight's blocks through its own kernels
(``core/glm_vision.py``, nothing compiled: the engine's default). Each way's output is compared with the
same tower in float32 (where the model is narrower) and with eager; ``--profile`` then runs each way once
under the profiler.

    python bench/vision_encoder.py                        # GLM-4.6V-Flash's shape, random weights (GPU)
    python bench/vision_encoder.py --model-dir DIR        # a GLM-4V-shaped model directory
    python bench/vision_encoder.py --compiled --kernels   # all four ways
    python bench/vision_encoder.py --quick                # the tiny GLM shape on the CPU (figures mean nothing;
                                                          # --kernels under Triton's interpreter)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

if "--quick" in sys.argv and "--kernels" in sys.argv:  # Triton reads it once, when first imported (by torch's)
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glm_model import build_glm_model, tiny_glm

from core import glm_vision, vision_attention
from core.compiled_vision import CompiledVision, vision_blocks
from core.model_files import resolve
from core.model_loading import load

SCREENSHOT_GRID = (1, 54, 74)  # a 1024x768 screenshot through GLM-4.6V-Flash's processor: 999 image tokens


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (on a GPU, each waits for the GPU to catch up)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func in (torch.Tensor.tolist, torch.Tensor.item)
        return func(*args, **(kwargs or {}))


def tower(args: argparse.Namespace) -> Any:
    """The model whose vision tower is measured, loaded as the engine loads it (int4 on a GPU: the vision
    tower itself stays at full width)."""
    if args.quick:
        return tiny_glm()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = args.work / "glm-9b"
        if not (model_dir / "config.json").exists():
            build_glm_model(model_dir, "9b", device="cuda")
    return load(resolve("bench", model_dir, allow_download=False)).model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def encode(visual: Any, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return visual(pixels, grid_thw=grid).pooler_output  # type: ignore[no-any-return]


def off(out: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.float()
    return float((out.float() - exact).abs().max() / exact.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imsight-bench"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the tiny GLM shape on the CPU, a few seconds")
    parser.add_argument("--compiled", action="store_true",
                        help="a third way: imsight's with its blocks compiled, as the engine runs them once idle")
    parser.add_argument("--kernels", action="store_true",
                        help="a fourth way: imsight's blocks through its own kernels (the engine's default)")
    parser.add_argument("--profile", action="store_true",
                        help="then each way once more for one image under the profiler: its costliest kernels")
    args = parser.parse_args()
    model = tower(args)
    visual = model.model.visual
    config = visual.config
    weight = next(visual.parameters())
    grid_one = (1, 4, 4) if args.quick else SCREENSHOT_GRID  # (the interpreter: a program a token and head)
    inputs = {}
    for count in (1, 8):
        grid = torch.tensor([grid_one] * count, device=weight.device)
        pixels = vision_attention.random_patches(config, grid.cpu(), seed=count)
        inputs[count] = (pixels.to(device=weight.device, dtype=weight.dtype), grid)
    if not vision_attention.install(model):
        raise SystemExit("imsight's way does not install on this model's vision tower")
    own_blocks: dict[Any, Any] = {}
    if args.kernels:  # installed, then taken off again: put on for that way's runs only
        if not glm_vision.install(model):
            raise SystemExit("imsight's blocks do not install on this model's vision tower")
        own_blocks = {block: vars(block).pop("forward") for block in vision_blocks(model)}
    reference = None
    if weight.dtype != torch.float32:  # how far each way is from the same tower in float32 (copied unwrapped)
        reference = copy.deepcopy(visual).float()
        reference.config._attn_implementation = vision_attention.NAME
    # Each way: the attention implementation, and what a run goes through (None: called as it is).
    ways: dict[str, tuple[str, Any]] = {"transformers' SDPA way": ("sdpa", None),
                                        "imsight's": (vision_attention.NAME, None)}
    if args.compiled:  # the blocks through torch.compile, the attention eager, as the engine compiles them
        vision = CompiledVision()
        with torch.inference_mode():
            if not vision.compile(model, lambda: [visual(pixels, grid_thw=grid) for pixels, grid in inputs.values()]):
                raise SystemExit("the vision encoder's blocks do not compile here")
        ways["imsight's, blocks compiled"] = (vision_attention.NAME, vision.run)
    if own_blocks:
        def through_kernels(run: Any) -> Any:
            before = {block: vars(block).get("forward") for block in own_blocks}  # (the compiled way's dispatcher)
            for block, forward in own_blocks.items():
                block.forward = forward
            try:
                return run()
            finally:
                for block, forward in before.items():
                    if forward is None:
                        del block.forward
                    else:
                        block.forward = forward

        ways["imsight's blocks, its kernels"] = (vision_attention.NAME, through_kernels)
    reps, warm = (2, 0) if args.quick else (args.reps, 3)
    print(f"device: {weight.device}, {weight.dtype}; {reps} runs a way, alternating, after {warm}")
    with torch.inference_mode():
        for count, (pixels, grid) in inputs.items():
            times: dict[str, list[float]] = {way: [] for way in ways}
            outputs: dict[str, torch.Tensor] = {}
            reads: dict[str, int] = {}
            for rep in range(reps + warm):
                for way, (name, through) in ways.items():
                    config._attn_implementation = name
                    run = partial(encode, visual, pixels, grid)
                    if rep == 0 and through is None:  # counted apart: the mode sees every torch call
                        with HostReads() as counted:
                            outputs[way] = run()
                        reads[way] = counted.count
                    sync()
                    started = time.perf_counter()
                    out = run() if through is None else through(run)
                    sync()
                    outputs.setdefault(way, out)
                    if rep >= warm:
                        times[way].append((time.perf_counter() - started) * 1e3)
            figures = "; ".join(f"{way} {statistics.median(t):.1f} ms ({min(t):.1f}-{max(t):.1f})"
                                + (f", {reads[way]} host reads" if way in reads else "") for way, t in times.items())
            own, *others = outputs.values()
            same = torch.equal(own, others[0])
            print(f"{count} image(s) of {grid_one[1] * grid_one[2]} patches: {figures}; same output: {same}")
            exact = reference(pixels.float(), grid_thw=grid).pooler_output if reference is not None else own
            for way, out in outputs.items():  # against float32 where the tower is narrower; against eager
                print(f"  {way}: largest difference from {'float32' if reference is not None else 'eager'} "
                      f"{off(out, exact):.2e} of the largest output"
                      + (f", from eager {off(out, own):.2e}" if reference is not None else ""))
        if args.profile:
            from engine_bench import profiled

            pixels, grid = inputs[1]
            for way, (name, through) in ways.items():
                config._attn_implementation = name
                run = partial(encode, visual, pixels, grid)
                print(f"{way}, one image, profiled: {profiled(run if through is None else partial(through, run))}")


if __name__ == "__main__":
    main()
