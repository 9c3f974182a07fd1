"""Image checks and preparation with real encoders and decoders."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from core.errors import BadInput, NotAnImage, TooLarge
from core.images import ImageLimits, inspect, prepare, sha256
from helpers import png

LIMITS = ImageLimits(max_bytes=2**20, max_pixels=10_000_000, max_side=64)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_accepted_formats(fmt):
    data = _encode(Image.new("RGB", (30, 20), (1, 2, 3)), fmt)
    info = inspect(data, LIMITS)
    assert (info.width, info.height, info.size, info.sha256) == (30, 20, len(data), sha256(data))
    assert info.mime.startswith("image/")


@pytest.mark.parametrize(("data", "error"), [
    (b"", NotAnImage),
    (b"GIF89a" + b"\0" * 4, BadInput),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", NotAnImage),
    (b"%PDF-1.7\n", NotAnImage),
    (png()[:50], BadInput),
    (_encode(Image.new("RGB", (200, 200)), "JPEG")[:300], BadInput),
    (_encode(Image.new("L", (4000, 3000)), "PNG"), BadInput),  # 12 MP > 10 MP
    (png() + b"\0" * 2**20, TooLarge),
])
def test_refused(data, error):
    with pytest.raises(error):
        inspect(data, LIMITS)


def test_prepare_applies_exif_orientation_and_scales_down():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 100, 100))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    prepared = prepare(_encode(image, "JPEG", exif=exif), LIMITS)
    assert prepared.size == (32, 64)  # portrait after rotation, longest side capped at 64
    assert prepared.mode == "RGB"
    top, bottom = prepared.getpixel((16, 4)), prepared.getpixel((16, 60))
    assert sum(top) > 600 and sum(bottom) < 100  # the white half is on top after rotating


def test_transparency_becomes_white_not_black():
    data = _encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    assert prepare(data, LIMITS).getpixel((4, 4)) == (255, 255, 255)


def test_animated_images_use_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    assert prepare(out.getvalue(), LIMITS).getpixel((8, 8))[0] > 200
