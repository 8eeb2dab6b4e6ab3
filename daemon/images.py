"""Decode a source file into RGB pages and size them for the model.

Everything the model sees passes through here, for every backend: EXIF
orientation is applied, any mode (palette, alpha, CMYK, 16-bit, grey) becomes
RGB with transparency flattened on white, and each page is resized with
qwen-vl-utils' ``smart_resize`` to sides that are multiples of 28 within
``min_pixels``/``max_pixels``.  Because we resize ourselves, neither the
transformers processor nor a remote server resizes again, and the size the
model saw is known exactly: grounding boxes map back to the original pixels.

Pillow's decompression-bomb limit stays on; a file too large for it is a
clear ``InputError``, never a crash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.errors import InputError

log = logging.getLogger(__name__)

#: Qwen2.5-VL: 14-pixel patches merged 2x2, so image sides are multiples of 28.
FACTOR = 28


@dataclass(frozen=True)
class Page:
    """One picture as the model will see it, with the size it had originally."""

    image: Image.Image  # RGB, already resized to ``shown``
    original: tuple[int, int]  # (width, height) after EXIF rotation
    number: int = 1

    @property
    def shown(self) -> tuple[int, int]:
        return self.image.size


def load_pages(path: Path, *, min_pixels: int, max_pixels: int) -> list[Page]:
    """Decode ``path`` and size each page for the model.

    Raises:
        InputError: the file is missing, unreadable, not an image, truncated,
            or too large for Pillow's decompression-bomb limit.
    """
    image = open_image(path)
    try:
        rgb = to_rgb(image)
    finally:
        image.close()
    return [size_page(rgb, min_pixels=min_pixels, max_pixels=max_pixels)]


def open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file must fail here, not later
        return image
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file disappeared before it could be read") from exc
    except PermissionError as exc:
        raise InputError(f"{path}: permission denied") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: image is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError.
        raise InputError(f"{path}: cannot decode image: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB with any transparency flattened on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's I -> RGB conversion clips instead of scaling: scale 16 bits down to 8.
        image = image.point(lambda v: v / 257).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def shown_size(width: int, height: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) the model sees for an image of this size."""
    from qwen_vl_utils import smart_resize

    try:
        h, w = smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:  # qwen-vl-utils refuses aspect ratios over 200:1
        raise InputError(f"image of {width}x{height} cannot be shown to the model: {exc}") from exc
    return w, h


def size_page(rgb: Image.Image, *, min_pixels: int, max_pixels: int, number: int = 1) -> Page:
    w, h = shown_size(rgb.width, rgb.height, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = rgb if (w, h) == rgb.size else rgb.resize((w, h), Image.Resampling.BICUBIC)
    return Page(image=resized, original=rgb.size, number=number)
