"""The in-process engine end to end on whatever device is here (CUDA when present).

Builds the tiny test model, loads it the way a real model is loaded (device_map, dtype chosen by
`device = "auto"`), and answers questions about generated images, streaming. The model is random,
so the numbers say nothing about a real model's speed; what this shows is that the code path
(device placement, bf16 weights fed float32 pixels, streaming from the owner thread) works there.

    python bench/engine_smoke.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from PIL import Image

from core.engine import GenerationLimits, PreparedImage, Turn
from core.model_files import resolve
from core.tiny_model import build_tiny_model
from core.transformers_engine import TransformersEngine


async def main() -> None:
    import torch

    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "tiny")
        engine = TransformersEngine(resolve("unused", path, allow_download=False), device="auto")
        start = time.perf_counter()
        await engine.start()
        model = engine.loaded.model
        print(f"loaded in {time.perf_counter() - start:.2f}s on {engine.device}, "
              f"weights {next(model.parameters()).dtype}, vision tower "
              f"{next(model.model.vision_tower.parameters()).dtype}")
        limits = GenerationLimits(max_new_tokens=64)
        answers = []
        for color in ((255, 0, 0), (0, 0, 255)):
            image = PreparedImage(str(color), Image.new("RGB", (640, 480), color))
            start = time.perf_counter()
            first = None
            chunks = []
            async for chunk in engine.answer([image], [Turn("user", "What?"), Turn("assistant", "A")], "Why?", limits):
                first = first or time.perf_counter() - start
                chunks.append(chunk)
            answers.append("".join(chunks))
            print(f"image {color}: first chunk {1000 * (first or 0):.1f} ms, "
                  f"all {1000 * (time.perf_counter() - start):.1f} ms, {len(answers[-1])} characters")
        print(f"answers differ by image: {answers[0] != answers[1]}")
        await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
