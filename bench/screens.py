"""Screenshot-like test pictures for the benchmarks: 1024x768, lines of 'text', different per ``n``."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

__all__ = ["screenshot_image"]


def screenshot_image(n: int) -> Image.Image:
    rng = random.Random(n)
    image = Image.new("RGB", (1024, 768), (30, 30, 36))
    draw = ImageDraw.Draw(image)
    for row in range(40):
        y = 10 + row * 19
        draw.rectangle((10, y, 10 + rng.randint(200, 1000), y + 12), fill=(rng.randint(90, 255),) * 3)
    return image
