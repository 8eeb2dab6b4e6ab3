"""What a page is once decoded, and how big the model sees it.

The vocabulary ``images`` (files, raster formats) and ``pdf`` (PDF pages
through PDFium) both hand back: a ``Page`` (RGB pixels at the size the model
sees, and the size the page had originally, which grounding boxes map back
to), a ``PageSize`` (the same, known before any pixel is decoded), and the
arithmetic between the two: qwen-vl-utils' ``smart_resize`` to sides that
are multiples of 28 within ``min_pixels``/``max_pixels``.  Plus the few
helpers both decoders word their messages and resize with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from daemon.config import PageRanges
from daemon.errors import AspectRatioError, printable

#: Qwen2.5-VL: 14-pixel patches merged 2x2, so image sides are multiples of 28.
FACTOR = 28
#: Pages of one file sent to the model at most.  A 100000-page TIFF or a PDF
#: whose page tree claims a million pages is refused instead of filling memory
#: with page images; a rule's ``pages:`` selects a part of a longer document.
MAX_PAGES = 500
MAX_RATIO = 200  # qwen_vl_utils.vision_process.MAX_RATIO


@dataclass(frozen=True)
class Page:
    """One picture as the model will see it, with the size it had originally."""

    image: Image.Image  # RGB, already resized to ``shown``
    original: tuple[int, int]  # (width, height) after EXIF rotation; PDF: at PDF_DPI
    number: int = 1

    @property
    def shown(self) -> tuple[int, int]:
        return self.image.size


@dataclass(frozen=True)
class PageSize:
    """One selected page as the model will see it, known before any of its pixels is decoded."""

    number: int
    original: tuple[int, int]  # as ``Page.original``
    shown: tuple[int, int]  # as ``Page.shown``


def shown_size(width: int, height: int, *, min_pixels: int, max_pixels: int,
               longest_side: int | None = None) -> tuple[int, int]:
    """(width, height) the model sees for an image of this size.

    With ``longest_side``, the image is first scaled (up or down, aspect kept)
    so that its longer side is that long, as olmOCR renders a page; the
    result is then sized within ``min_pixels``/``max_pixels`` as any image.
    """
    if longest_side is not None and max(width, height) > 0:
        scale = longest_side / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    try:
        h, w = smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:  # qwen-vl-utils refuses aspect ratios over 200:1
        raise AspectRatioError(f"image of {width}x{height} cannot be shown to the model: {exc}") from exc
    # qwen-vl-utils 0.0.14 floors the short side of a thin strip it shrinks to
    # 0 (3000x20 -> 2996x0); transformers' own copy clamps it to one factor.
    if h < FACTOR:
        h, w = FACTOR, min(w, max(FACTOR, max_pixels // FACTOR // FACTOR * FACTOR))
    if w < FACTOR:
        w, h = FACTOR, min(h, max(FACTOR, max_pixels // FACTOR // FACTOR * FACTOR))
    return w, h


def smart_resize(height: int, width: int, factor: int, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """qwen-vl-utils 0.0.14's ``smart_resize``, line for line.

    Why a copy: importing ``qwen_vl_utils`` imports torch and torchvision
    (about 650 MB resident) for this arithmetic alone, which a watcher-only
    process, a daemon on the ``openai`` backend, or ``vlwatch explain`` should
    not pay.  ``tests/test_images.py`` pins this copy to the library's function
    over thousands of sizes, so a change upstream fails the tests instead of
    silently moving grounding boxes.
    """
    max_pixels = max_pixels if max_pixels is not None else 16384 * factor**2
    min_pixels = min_pixels if min_pixels is not None else 4 * factor**2
    if max_pixels < min_pixels:
        raise ValueError("The max_pixels of image must be greater than or equal to min_pixels.")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` at ``size`` (bicubic), shrunk by an integer factor first where it shrinks a lot."""
    if image.size == size:
        return image
    # reducing_gap: shrink by an integer factor first (box filter, cheap, no
    # full-size copy), then resample; 3.0 is indistinguishable from a plain
    # resize.  Only where both sides shrink that much (Pillow divides by zero
    # on a strip shrunk one way and enlarged the other) and the mode has reduce().
    gap = 3.0
    shrinks = min(image.width / size[0], image.height / size[1]) >= 2 * gap
    if not shrinks or image.mode.startswith("I;16"):
        return image.resize(size, Image.Resampling.BICUBIC)
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=gap)


def reason(exc: BaseException) -> str:
    """``exc`` as the end of a message: escaped, at most 200 characters."""
    text = str(exc) or type(exc).__name__
    return printable(text if len(text) <= 200 else text[:197] + "...")


def ranges(pages: PageRanges | None) -> str:
    """A rule's ``pages:`` as a message shows it: "1-3,5", or "all"."""
    if pages is None:
        return "all"
    return ",".join(f"{a}" if a == b else f"{a}-{b or ''}" for a, b in pages)

