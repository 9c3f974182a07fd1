"""Image checks and preparation: what arrives is validated, what the model sees is normalised.

Both functions decode with Pillow and can take a while on big files: call them through
``asyncio.to_thread`` from the event loop.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import BadInput, NotAnImage, TooLarge

__all__ = ["FORMATS_NOTE", "NOT_AN_IMAGE", "ImageInfo", "ImageLimits", "inspect", "prepare", "sha256"]

NOT_AN_IMAGE = "not a PNG, JPEG, WebP, GIF or BMP image"
# What a person can do about a file we cannot read (iPhones save photos as HEIC).
FORMATS_NOTE = ("I can read PNG, JPEG, WebP, GIF and BMP images. A HEIC photo from an iPhone: send a "
                "screenshot of it, or share it as JPEG (Settings > Camera > Formats > Most Compatible).")

# Raster formats screenshots and photos come in. Anything else (SVG, PDF, ICO, EPS ...) is refused:
# fewer decoders reachable from the network, and none that runs code or fetches URLs.
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_side: int = 1536


@dataclass(frozen=True, slots=True)
class ImageInfo:
    sha256: str
    mime: str
    width: int
    height: int
    size: int


def sha256(data: bytes) -> str:
    """The id of an image everywhere: SHA-256 of the bytes as received."""
    return hashlib.sha256(data).hexdigest()


def inspect(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Validate ``data`` as one image within ``limits``; decode it fully to catch truncation."""
    if len(data) > limits.max_bytes:
        raise TooLarge(f"image is {len(data)} bytes, the limit is {limits.max_bytes}")
    with _open(data, limits) as image:
        try:
            image.load()  # decodes the first frame: truncated data fails here, not later in a job
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadInput(f"image data is broken: {exc}", code="broken_image") from None
        mime = Image.MIME.get(image.format or "", "application/octet-stream")
        return ImageInfo(sha256(data), mime, image.width, image.height, len(data))


def prepare(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode for the model: first frame, EXIF orientation applied, RGB, longest side capped."""
    with _open(data, limits) as image:
        try:
            image.load()
            frame = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadInput(f"image data is broken: {exc}", code="broken_image") from None
        rgb = _to_rgb(frame)
    rgb.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
    return rgb


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=sorted(ACCEPTED_FORMATS))
    except UnidentifiedImageError:
        raise NotAnImage(NOT_AN_IMAGE) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput("image has too many pixels (decompression bomb?)", code="image_bomb") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"image header is broken: {exc}", code="broken_image") from None
    width, height = image.size
    # Checked from the header, before any pixel is decoded: a tiny file can claim gigapixels.
    if width * height > limits.max_pixels:
        image.close()
        raise BadInput(
            f"image is {width}x{height} pixels, the limit is {limits.max_pixels} (decompression bomb?)",
            code="image_bomb",
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        # Screenshots with transparency read best on white, not on the black that convert() gives.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")
