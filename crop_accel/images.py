"""Image decoding that tolerates the formats found in downloaded photo sets.

Pillow identifies the format from the file's content, so a WebP named ``.jpg`` decodes
like any other file. Every image comes out as 8-bit RGB with its EXIF orientation applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default limit (about 89 megapixels, a 9459 x 9459 image). Larger files are
# rejected from their header, before any pixel is decoded, so a decompression bomb cannot
# exhaust memory.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageLoadError(Exception):
    """An image file that cannot be decoded; ``reason`` is the decoder's message."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode ``path`` into an RGB image, raising ImageLoadError on any failure.

    With ``min_side``, JPEG decoding may use DCT scaling to skip resolution that is not
    needed, and the result is downscaled so that its shorter side is ``min_side`` pixels.
    Images already smaller are returned at their own size.
    """
    try:
        with Image.open(path) as image:
            _check_pixel_count(image)

            # Multi-frame files (MPO, GIF, TIFF): Image.open starts at the first frame.
            if min_side is not None and image.format == "JPEG":
                image.draft("RGB", _draft_size(image.size, min_side))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
    except ImageLoadError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error

    if min_side is not None:
        image = downscale_to_min_side(image, min_side)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(image)

    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")

    # Handles L, 1, P, CMYK (Pillow inverts Adobe CMYK JPEGs itself), YCbCr and LAB.
    return image.convert("RGB")


def size_at_min_side(width: int, height: int, min_side: int) -> tuple[int, int]:
    """Return (width, height) scaled so that the shorter side is ``min_side``; smaller sizes stay as they are."""
    shorter = min(width, height)
    if shorter <= min_side:
        return width, height
    scale = min_side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def downscale_to_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """Resize with bicubic filtering so that the shorter side is ``min_side``; never upscale."""
    size = size_at_min_side(*image.size, min_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _check_pixel_count(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            image.filename if hasattr(image, "filename") else "<image>",
            f"{width}x{height} pixels is above the limit of {MAX_IMAGE_PIXELS} "
            "(a possible decompression bomb); downscale the file or remove it",
        )


def _draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    # draft() picks the smallest JPEG scale (1/1, 1/2, 1/4, 1/8) that is at least the
    # requested size, so asking for the size that keeps the shorter side at min_side is safe.
    width, height = size
    scale = min_side / min(width, height)
    return (max(1, int(width * scale)), max(1, int(height * scale)))


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255, which turns most photos white.
    # Scale to 8 bits instead: integer modes by the 16-bit range when values exceed 255,
    # float images by their own minimum and maximum.
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) / (high - low or 1.0) * 255.0
    elif pixels.max() > 255:
        pixels = pixels / 257.0
    gray = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")
