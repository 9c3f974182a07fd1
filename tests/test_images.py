"""Image checks and preparation with real encoders and decoders."""

from __future__ import annotations

import io
import struct
import zlib

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


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny compressed row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _gif_claiming(width: int, height: int) -> bytes:
    """An animated-GIF header with a huge logical screen and one 1x1 frame."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00" * 6
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


@pytest.mark.parametrize("data", [_png_claiming(100_000, 100_000), _png_claiming(2**31 - 1, 1),
                                  _gif_claiming(65_535, 65_535)])
def test_decompression_bombs_are_refused_from_the_header_alone(data):
    assert len(data) < 200  # the point of a bomb: tiny file, gigapixels claimed
    with pytest.raises(BadInput) as refused:
        inspect(data, LIMITS)
    assert refused.value.code == "image_bomb"
