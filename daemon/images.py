"""Decode a source file into RGB pages and size them for the model.

Everything the model sees passes through here, for every backend.

What goes in: PNG, JPEG, WebP, BMP, GIF, TIFF (every page), PDF (every page,
rasterised with PDFium through pypdfium2) and HEIC/HEIF when the optional
``pillow-heif`` is installed.  The format is told by the file's content, never
by its name, and Pillow is only allowed the decoders of that list: a file
named ``.png`` holding something else is refused, not handed to whichever of
Pillow's thirty-odd plugins claims it.  Animated GIF/WebP/PNG give their
first frame only, without ever walking the other frames.

What comes out: one ``Page`` per selected page, upright (EXIF orientation
applied), RGB (palette, alpha, CMYK, 16-bit, 32-bit and float converted; alpha
flattened on white), resized with qwen-vl-utils' ``smart_resize`` to sides
that are multiples of 28 within ``min_pixels``/``max_pixels``.  Because we
resize here, neither the transformers processor nor a remote server resizes
again, and the size the model saw is known exactly: grounding boxes map back
to the original pixels.

Memory: the target size is computed from the header before any pixel is
decoded.  JPEGs are decoded straight at a reduced scale (``Image.draft``: a
12000x9000 scan decodes as 1500x1125); PDF pages are rendered at the size
the model will see, never at full resolution; everything else is decoded
once at full size, then shrunk with ``reduce`` before any colour conversion,
so no second full-size copy is made.  A multi-page file need not be decoded
whole: ``open_pages`` measures every selected page from the headers and
decodes the first few, and ``PageSource.render`` the others later, a few at a
time (issue 24: the worker renders a long document as the model reads it).

Every failure is an ``InputError`` whose message starts with the file's path
(control characters escaped, see ``printable``).  What can never succeed for
these bytes (not an image, empty, a decompression bomb, an aspect ratio over
200:1, a format the rule does not take, no selected page) is one of the
``permanent`` subclasses in ``daemon.errors``, so the job fails at once;
anything that may be a file still being written (truncated, a damaged
header) stays a plain, retried ``InputError``.  Accepted risks:

- A non-JPEG image is decoded at full size once, up to Pillow's
  decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` x 2, ~179 MP, about
  0.7 GB for RGBA).  The limit stays on and is reported clearly; Pillow's
  *warning* at half of it is silenced, as 600 dpi A3 scans pass it
  legitimately.
- PDFium parses hostile PDFs in this process.  It is fuzzed by Google and
  pypdfium2 ships current builds, but a page with a pathological content
  stream can take long to render; the daemon's per-job handling bounds what
  follows, not the render itself.
- The symlink policy (``allowed_roots``) is checked on the file actually
  opened (``/proc/self/fd``), so swapping a symlink in between check and
  read gains nothing on Linux; elsewhere the check is on the resolved path.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from daemon.config import FORMATS, PageRanges, last_page_wanted, page_selected
from daemon.errors import (
    AspectRatioError,
    ImageTooLargeError,
    InputError,
    LinkOutsideError,
    NoPagesError,
    NotAnImageError,
    UnsupportedFormatError,
)

log = logging.getLogger(__name__)

#: Qwen2.5-VL: 14-pixel patches merged 2x2, so image sides are multiples of 28.
FACTOR = 28
#: Nominal resolution a PDF page is rasterised at (before ``max_pixels``
#: shrinks it): what "original pixels" means for a PDF's boxes and overlay.
PDF_DPI = 200
#: Pages of one file sent to the model at most.  A 100000-page TIFF or a PDF
#: whose page tree claims a million pages is refused instead of filling memory
#: with page images; a rule's ``pages:`` selects a part of a longer document.
MAX_PAGES = 500
#: Frames of a multi-page TIFF walked at most to reach the selected pages.
MAX_FRAMES = 5000

#: Pillow's decoder -> our format name.  Pillow may open only these.
_PILLOW_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "BMP": "bmp",
                   "GIF": "gif", "TIFF": "tiff", "HEIF": "heif"}
#: ISO-BMFF brands of HEIC/HEIF files (the ``ftyp`` box at offset 4).
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
#: Leading bytes of the raster formats: such a file is never taken for a PDF,
#: whatever its metadata holds.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\0", b"MM\0*", b"RIFF")
_SUPPORTED = "PNG, JPEG, WebP, BMP, GIF, TIFF, PDF or HEIC"
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}

# PDFium is not thread-safe (pypdfium2's README says so): the worker prepares
# files on several threads, so every PDFium call holds this lock.
_PDFIUM_LOCK = threading.Lock()

# The *error* at twice this limit stays; see the module docstring.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# "Corrupt EXIF data" and the like: Pillow carries on without the metadata and
# so do we; a warning on stderr per photo would only be noise in the journal.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


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


@dataclass(frozen=True)
class PageSource:
    """The selected pages of one file, measured when it was opened; ``render`` draws some of them.

    What lets a long document be read a few pages at a time (issue 24): the
    worker renders a chunk of pages as the engine takes them, not all of
    them before the first reaches the model.  Each ``render`` opens the file
    again (the same symlink policy applies) and refuses it if it is no longer
    the file measured: another inode, size or modification time.
    """

    path: Path
    pages: tuple[PageSize, ...]
    allowed_roots: tuple[Path, ...] | None
    pdf: bool
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns of the file measured

    def render(self, start: int = 0, stop: int | None = None) -> list[Page]:
        """Pages ``start`` to ``stop`` (indices into ``pages``), decoded and sized for the model.

        Raises:
            InputError: the file changed or went away since it was measured,
                or a page cannot be decoded.
        """
        sizes = self.pages[start:stop]
        if not sizes:
            return []
        with open_source(self.path, self.allowed_roots) as f:
            if _identity(f) != self.identity:
                raise InputError(f"{printable(self.path)}: changed while its pages were being read")
            return _render(self.path, f, self.pdf, sizes)


def printable(path: object) -> str:
    """``path`` for a message or a log line: control characters escaped.

    A file name may hold a newline (which would forge a second log line) or
    bytes that are not UTF-8 (which would make printing it raise); both are
    shown escaped, as ``repr`` would.
    """
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ------------------------------------------------------------------ public


def load_pages(path: Path, *, min_pixels: int, max_pixels: int, formats: Sequence[str] | None = None,
               pages: PageRanges | None = None, allowed_roots: Sequence[Path] | None = None,
               longest_side: int | None = None) -> list[Page]:
    """Decode ``path`` and size each selected page for the model.

    Args:
        path: the source file.
        min_pixels: smallest area a page is shown at (small images are enlarged).
        max_pixels: largest area a page is shown at (large images are shrunk).
        formats: accept only these formats (names of ``config.FORMATS``); None = all.
        pages: the pages of a multi-page file to keep; None = all.
        allowed_roots: resolved folders the file actually read must lie in
            (the symlink policy of ``rules.allowed_roots``); None = anywhere.
        longest_side: scale each page so that its longer side has this many
            pixels first (up or down), then size it as above: what olmOCR
            renders its pages at (1288).

    Raises:
        InputError: the file is missing, unreadable, empty, not a supported
            format, of a format the rule does not take, truncated or corrupt,
            too large for the decompression-bomb limit, of an aspect ratio the
            model cannot take, password-protected, or has none of the
            selected pages.
    """
    return open_pages(path, min_pixels=min_pixels, max_pixels=max_pixels, formats=formats, pages=pages,
                      allowed_roots=allowed_roots, longest_side=longest_side)[1]


def open_pages(path: Path, *, min_pixels: int, max_pixels: int, formats: Sequence[str] | None = None,
               pages: PageRanges | None = None, allowed_roots: Sequence[Path] | None = None,
               longest_side: int | None = None, render: int | None = None) -> tuple[PageSource, list[Page]]:
    """Measure every selected page of ``path``, and decode the first ``render`` of them now.

    Everything ``load_pages`` checks is checked here, for every selected
    page (its size, aspect ratio and pixel count come from the headers); only
    the decoding of the pages after the first ``render`` is left to
    ``PageSource.render``.

    Args:
        render: pages decoded while the file is open (the first ones); None = all.
        others: as ``load_pages``.

    Raises:
        InputError: as ``load_pages``.
    """
    with open_source(path, allowed_roots) as f:
        identity = _identity(f)
        pdf = _is_pdf(path, f)
        if pdf:
            _check_format(path, "pdf", formats)
            sizes, out = _pdf_pages(path, f, min_pixels=min_pixels, max_pixels=max_pixels, pages=pages,
                                    longest_side=longest_side, render=render)
        else:
            image = _open_pillow(path, f)
            try:
                _check_format(path, _format_of(image), formats)
                sizes, out = _image_pages(path, image, min_pixels=min_pixels, max_pixels=max_pixels, pages=pages,
                                          longest_side=longest_side, render=render)
            finally:
                image.close()
    for size in sizes:
        log.debug("%s: page %d: %dx%d shown as %dx%d", printable(path), size.number, *size.original, *size.shown)
    roots = tuple(allowed_roots) if allowed_roots is not None else None
    return PageSource(path, tuple(sizes), roots, pdf, identity), out


def pdf_page_count(path: Path, allowed_roots: Sequence[Path] | None = None) -> int | None:
    """Pages of ``path`` when it is a PDF, else None; nothing is rendered (the API's page limit).

    Raises:
        InputError: as ``load_pages`` for a file it could not open.
    """
    with open_source(path, allowed_roots) as f:
        if not _is_pdf(path, f):
            return None
        with _PDFIUM_LOCK, _pdf_document(path, f) as doc:
            return len(doc)


def open_image(path: Path, number: int = 1) -> Image.Image:
    """Page ``number`` of ``path`` at its original size, upright and RGB (for overlays).

    A PDF page is rendered at ``PDF_DPI``, the size its boxes refer to.
    """
    with open_source(path) as f:
        if _is_pdf(path, f):
            return _pdf_original(path, f, number)
        image = _open_pillow(path, f)
        try:
            if number > 1:
                _seek(path, image, number - 1)
            orientation = _orientation(image)
            _decode(path, image)
            return _detached(_transpose(to_rgb(image), orientation), image)
        finally:
            image.close()


#: Characters of one page's text layer kept at most (a hostile PDF can claim any amount).
MAX_PAGE_TEXT = 200_000


def pdf_page_text(path: Path, number: int, allowed_roots: Sequence[Path] | None = None) -> str | None:
    """The text layer of page ``number`` of a PDF (what a text-selecting viewer copies), or None.

    None when ``path`` is not a PDF (a TIFF or an image has no text layer) or
    the page has none; "" never comes back, an empty layer is None too.  The
    text is PDFium's, in the order the PDF stores it (usually reading order,
    not always): a fallback for a page the model could not read, never a
    replacement for it.

    Raises:
        InputError: the file cannot be read (as ``load_pages``).
    """
    with open_source(path, allowed_roots) as f:
        if not _is_pdf(path, f):
            return None
        with _PDFIUM_LOCK, _pdf_document(path, f) as doc:
            if not 1 <= number <= len(doc):
                raise NoPagesError(f"{printable(path)}: has no page {number}")
            page = _pdf_load_page(path, doc, number)
            try:
                textpage = _pdf_guarded(path, number, "read as text", page.get_textpage)
                try:
                    text = _pdf_guarded(path, number, "read as text", textpage.get_text_range)
                finally:
                    textpage.close()
            finally:
                page.close()
    text = text.replace("\r\n", "\n").replace("\r", "\n")[:MAX_PAGE_TEXT].strip()
    return text or None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency flattened on white; 16/32-bit and float scaled to 8 bits."""
    image = _to_eight_bit(_without_palette(image))
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    return image if image.mode == "RGB" else image.convert("RGB")


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


def size_page(rgb: Image.Image, *, min_pixels: int, max_pixels: int, number: int = 1) -> Page:
    """An already decoded RGB picture as a ``Page`` (kept for callers holding a PIL image)."""
    w, h = shown_size(rgb.width, rgb.height, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = rgb if (w, h) == rgb.size else _resize(rgb, (w, h))
    return Page(image=resized, original=rgb.size, number=number)


# ------------------------------------------------------------- the file


@contextmanager
def open_source(path: Path, allowed_roots: Sequence[Path] | None = None) -> Iterator[BinaryIO]:
    """The regular file at ``path``, opened once: every later read is of this very file.

    ``O_NONBLOCK`` keeps a FIFO named ``x.png`` from hanging the worker on open;
    the ``fstat`` then refuses it, a folder or a device.  A file replaced
    after this point cannot change what is read.
    """
    p = printable(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise InputError(f"{p}: is a symbolic link to {printable(os.readlink(path))}, which does not exist") from exc
        raise InputError(f"{p}: file disappeared before it could be read") from exc
    except PermissionError as exc:
        raise InputError(f"{p}: permission denied: the daemon's user may not read this file") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot open: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{p}: is not a regular file (a folder, pipe, socket or device)")
        if allowed_roots is not None:
            _check_inside(path, fd, allowed_roots)
        if st.st_size == 0:
            raise NotAnImageError(f"{p}: file is empty (0 bytes)")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def _check_inside(path: Path, fd: int, roots: Sequence[Path]) -> None:
    proc = f"/proc/self/fd/{fd}"
    real = Path(os.readlink(proc)) if os.path.islink(proc) else Path(os.path.realpath(path))
    if any(real == root or root in real.parents for root in roots):
        return
    raise LinkOutsideError(f"{printable(path)}: is a symbolic link to {printable(real)}, outside every watched "
                           "folder; set follow_symlinks_out: true on the watch to read such files")


def _is_pdf(path: Path, f: BinaryIO) -> bool:
    """Whether ``f`` is a PDF; every other format is told by Pillow's own signature checks."""
    head = f.read(1024)
    f.seek(0)
    if head.startswith(_IMAGE_MAGIC):
        return False
    if b"%PDF-" in head:  # PDF readers accept junk before the header, and so does PDFium
        return True
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS and not _heif_available():
        raise UnsupportedFormatError(f"{printable(path)}: is HEIC/HEIF, which needs the optional extra: "
                         "pip install 'vlwatch[heif]'")
    return False


def _check_format(path: Path, fmt: str, formats: Sequence[str] | None) -> None:
    if formats is not None and fmt not in formats:
        raise UnsupportedFormatError(f"{printable(path)}: is {_NAMES.get(fmt, fmt)}, which this rule does not take "
                         f"(formats: {', '.join(formats)})")


def _open_pillow(path: Path, f: BinaryIO) -> Image.Image:
    p = printable(path)
    f.seek(0)
    try:
        image = Image.open(f, formats=_pillow_formats())
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{p}: image is too large to decode safely ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        f.seek(0)
        kind = "a text file" if _looks_like_text(f.read(4096)) else "not an image vlwatch can read"
        raise NotAnImageError(f"{p}: is {kind}; supported: {_SUPPORTED}") from exc
    except Exception as exc:  # a corrupt header: Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise InputError(f"{p}: cannot read image header: {_reason(exc)}") from exc
    return image


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut at the end
            return False
        text = head[:exc.start].decode("utf-8")
    return sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text)


# The worker prepares files on several threads, and the first file of a run
# would make each of them import these (torch, through qwen-vl-utils) at once;
# one at a time is safer and costs nothing after the first.
_IMPORT_LOCK = threading.Lock()


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
    if max(height, width) / min(height, width) > _MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {_MAX_RATIO}, got {max(height, width) / min(height, width)}")
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


_MAX_RATIO = 200  # qwen_vl_utils.vision_process.MAX_RATIO


@cache
def _pdfium():  # -> the pypdfium2 module
    with _IMPORT_LOCK:
        import pypdfium2

    return pypdfium2


@cache
def _pillow_formats() -> list[str]:
    with _IMPORT_LOCK:
        Image.init()
    _heif_available()
    return [name for name in _PILLOW_FORMATS if name in Image.OPEN]  # MPO comes via JPEG; HEIF if installed


@cache
def _heif_available() -> bool:
    with _IMPORT_LOCK:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            return False
        register_heif_opener()
    return True


def _format_of(image: Image.Image) -> str:
    return _PILLOW_FORMATS.get(image.format or "", "")


_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "bmp": "BMP", "gif": "GIF", "tiff": "TIFF",
          "pdf": "PDF", "heif": "HEIC/HEIF"}
assert set(_NAMES) == set(FORMATS)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return printable(text if len(text) <= 200 else text[:197] + "...")


# ------------------------------------------------------------- raster images


def _image_pages(path: Path, image: Image.Image, *, min_pixels: int, max_pixels: int,
                 pages: PageRanges | None, longest_side: int | None = None,
                 render: int | None = None) -> tuple[list[PageSize], list[Page]]:
    sizes: list[PageSize] = []
    for number in _frames(path, image, _format_of(image), pages):
        if len(sizes) == MAX_PAGES:
            raise ImageTooLargeError(f"{printable(path)}: has more than {MAX_PAGES} pages; "
                             "give the rule a `pages:` range to take part of it")
        sizes.append(_frame_size(path, image, number, min_pixels=min_pixels, max_pixels=max_pixels,
                                 longest_side=longest_side))
    if not sizes:
        raise NoPagesError(f"{printable(path)}: none of the rule's pages ({_ranges(pages)}) exist in this file")
    return sizes, _frame_pages(path, image, sizes[:render])


def _frame_pages(path: Path, image: Image.Image, sizes: Sequence[PageSize]) -> list[Page]:
    out = []
    for size in sizes:
        if image.tell() != size.number - 1:  # only a TIFF has pages past its first frame
            _seek(path, image, size.number - 1)
        out.append(_frame_page(path, image, size))
    return out


def _frames(path: Path, image: Image.Image, fmt: str, pages: PageRanges | None) -> Iterator[int]:
    """The selected page numbers, with ``image`` positioned on each in turn.

    Only TIFF pages are pages: an animated GIF, WebP or PNG is one picture
    and only its first frame is used, without walking the others (a GIF of
    thousands of frames costs no more than one).
    """
    if fmt != "tiff":
        if page_selected(1, pages):
            yield 1
        return
    last = last_page_wanted(pages)
    number = 1
    while True:
        if page_selected(number, pages):
            yield number
        if (last is not None and number >= last) or number >= MAX_FRAMES:
            return
        try:
            image.seek(number)
        except EOFError:
            return
        except Exception as exc:
            raise InputError(f"{printable(path)}: page {number + 1} cannot be read: {_reason(exc)}") from exc
        number += 1


def _seek(path: Path, image: Image.Image, frame: int) -> None:
    try:
        image.seek(frame)
    except EOFError as exc:
        raise NoPagesError(f"{printable(path)}: has no page {frame + 1}") from exc
    except Exception as exc:
        raise InputError(f"{printable(path)}: page {frame + 1} cannot be read: {_reason(exc)}") from exc


def _frame_size(path: Path, image: Image.Image, number: int, *, min_pixels: int, max_pixels: int,
                longest_side: int | None = None) -> PageSize:
    """The sizes of the current frame of ``image``, from its header alone."""
    _check_bomb(path, image.size)
    turned = _orientation(image) in (5, 6, 7, 8)
    width, height = image.size
    original = (height, width) if turned else (width, height)
    try:
        shown = shown_size(*original, min_pixels=min_pixels, max_pixels=max_pixels, longest_side=longest_side)
    except InputError as exc:
        raise type(exc)(f"{printable(path)}: {exc}") from None  # keep the kind: permanent or not
    return PageSize(number, original, shown)


def _frame_page(path: Path, image: Image.Image, size: PageSize) -> Page:
    """Decode the current frame of ``image`` straight to the size the model sees."""
    p = printable(path)
    _check_bomb(path, image.size)
    orientation = _orientation(image)
    shown = size.shown
    target = (shown[1], shown[0]) if orientation in (5, 6, 7, 8) else shown  # in the stored (unrotated) orientation
    if image.format in ("JPEG", "MPO") and size.number == 1:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for free, never below target.
        image.draft(None, target)
    _decode(path, image)
    try:
        small = _resize(_without_palette(image), target)
        rgb = _detached(_transpose(to_rgb(small), orientation), image)
    except InputError:
        raise
    except Exception as exc:  # an exotic mode Pillow cannot convert
        raise InputError(f"{p}: cannot convert {image.mode} pixels to RGB: {_reason(exc)}") from exc
    return Page(image=rgb, original=size.original, number=size.number)


def _decode(path: Path, image: Image.Image) -> None:
    """Decode now: a truncated or corrupt file must fail here, as an ``InputError``."""
    p = printable(path)
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{p}: image is too large to decode safely ({exc})") from exc
    except MemoryError as exc:
        raise InputError(f"{p}: not enough memory to decode an image of {image.size[0]}x{image.size[1]}") from exc
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, ValueError...
        raise InputError(f"{p}: cannot decode image: {_reason(exc)}") from exc


def _detached(result: Image.Image, source: Image.Image) -> Image.Image:
    # Every step may hand back its input unchanged; a page must not share
    # pixels with the file-backed image that is closed after decoding.
    return result.copy() if result is source else result


def _check_bomb(path: Path, size: tuple[int, int]) -> None:
    # Pillow checks the first frame on open; later TIFF pages are checked here.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > 2 * limit:
        raise ImageTooLargeError(f"{printable(path)}: image is too large to decode safely ({size[0]}x{size[1]} = "
                         f"{size[0] * size[1]} pixels, over the limit of {2 * limit}; "
                         "a decompression bomb, or a scan too big for vlwatch)")


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # malformed EXIF is common and never worth failing a file for
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _transpose(image: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _without_palette(image: Image.Image) -> Image.Image:
    """Modes that resize badly (palette, 1-bit) become plain ones first."""
    if image.mode in ("P", "PA"):
        alpha = image.mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if alpha else "RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
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


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey as 8-bit grey.

    Pillow's own conversion clips (every 16-bit value above 255 turns white),
    so values are scaled: 16-bit data by 1/257, float in 0..1 by 255, anything
    else by its own range.
    """
    if image.mode.startswith("I;16"):
        return image.point(lambda v: v / 257).convert("L")
    if image.mode not in ("I", "F"):
        return image
    lo, hi = image.getextrema()
    if image.mode == "F" and 0 <= lo and hi <= 1:
        scale, offset = 255.0, 0.0
    elif 0 <= lo and hi <= 255:
        scale, offset = 1.0, 0.0
    elif 0 <= lo and hi <= 65535:
        scale, offset = 1 / 257, 0.0
    else:
        span = (hi - lo) or 1
        scale, offset = 255 / span, -lo * 255 / span
    if not (math.isfinite(scale) and math.isfinite(offset)):
        scale, offset = 0.0, 0.0
    return image.convert("F").point(lambda v: v * scale + offset).convert("L")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when there is one (Pillow's plain formula is crude)."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            converted = ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                                  ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except Exception as exc:  # a broken profile, or Pillow built without LittleCMS
            log.debug("CMYK ICC conversion failed (%s); using the plain formula", exc)
    return image.convert("RGB")


def _ranges(pages: PageRanges | None) -> str:
    if pages is None:
        return "all"
    return ",".join(f"{a}" if a == b else f"{a}-{b or ''}" for a, b in pages)


# ------------------------------------------------------------------- PDF


def _pdf_pages(path: Path, f: BinaryIO, *, min_pixels: int, max_pixels: int, pages: PageRanges | None,
               longest_side: int | None = None,
               render: int | None = None) -> tuple[list[PageSize], list[Page]]:
    with _PDFIUM_LOCK, _pdf_document(path, f) as doc:
        count = len(doc)
        if count == 0:
            raise NoPagesError(f"{printable(path)}: PDF has no pages")
        numbers = _selected(count, pages)
        if len(numbers) > MAX_PAGES:
            raise ImageTooLargeError(f"{printable(path)}: has {count} pages, more than the {MAX_PAGES} vlwatch takes "
                             "from one file; give the rule a `pages:` range to take part of it")
        if not numbers:
            raise NoPagesError(f"{printable(path)}: has {count} page{'s' if count != 1 else ''}; "
                             f"none of the rule's pages ({_ranges(pages)}) exist")
        sizes = [_pdf_size(path, doc, n, min_pixels=min_pixels, max_pixels=max_pixels, longest_side=longest_side)
                 for n in numbers]
        return sizes, [_pdf_page(path, doc, size) for size in sizes[:render]]


def _render(path: Path, f: BinaryIO, pdf: bool, sizes: Sequence[PageSize]) -> list[Page]:
    """``sizes``' pages of the file open as ``f`` (measured by ``open_pages``)."""
    if pdf:
        with _PDFIUM_LOCK, _pdf_document(path, f) as doc:
            return [_pdf_page(path, doc, size) for size in sizes]
    image = _open_pillow(path, f)
    try:
        return _frame_pages(path, image, sizes)
    finally:
        image.close()


def _identity(f: BinaryIO) -> tuple[int, int, int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _pdf_guarded(path: Path, number: int, what: str, fn, *args):
    """``fn(*args)``, with anything PDFium raises on a hostile page turned into an ``InputError``."""
    try:
        return fn(*args)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{printable(path)}: page {number} of the PDF cannot be {what}: {_reason(exc)}") from exc


def _selected(count: int, pages: PageRanges | None) -> range | list[int]:
    """The page numbers of a ``count``-page document that ``pages`` selects, in order.

    At most MAX_PAGES + 1 are listed: a page tree may claim a million pages.
    """
    if pages is None:
        return range(1, count + 1)
    out: list[int] = []
    for first, last in sorted(pages):
        start = max(first, out[-1] + 1 if out else 1)
        stop = min(count, last if last is not None else count)
        out.extend(range(start, min(stop, start + MAX_PAGES) + 1))
        if len(out) > MAX_PAGES:
            break
    return out


@contextmanager
def _pdf_document(path: Path, f: BinaryIO) -> Iterator["object"]:
    pdfium = _pdfium()
    p = printable(path)
    try:
        doc = pdfium.PdfDocument(f)
    except pdfium.PdfiumError as exc:
        # PDFium's error code is process-global and not reset by a failure
        # that does not set it (a PDF without pages leaves the previous
        # file's "incorrect password"), so the file itself tells encryption.
        if _has_encrypt_entry(f):
            raise UnsupportedFormatError(f"{p}: PDF is password-protected (or encrypted in a way PDFium cannot "
                                         "open); vlwatch cannot read it") from exc
        # Damaged may mean still being copied: transient, retried.
        raise InputError(f"{p}: PDF cannot be read: it is damaged, not really a PDF, or has no pages") from exc
    try:
        yield doc
    finally:
        doc.close()


def _has_encrypt_entry(f: BinaryIO) -> bool:
    f.seek(0)
    tail = b""
    while chunk := f.read(1 << 20):
        if b"/Encrypt" in tail + chunk:
            return True
        tail = chunk[-16:]
    return False


def _pdf_size(path: Path, doc: object, number: int, *, min_pixels: int, max_pixels: int,
              longest_side: int | None = None) -> PageSize:
    """The sizes of page ``number``, from the page tree alone (nothing is parsed or drawn)."""
    # FPDF_GetPageSizeByIndexF: the size ``PdfPage.get_size`` gives, rotation applied, without loading the page.
    points = _pdf_guarded(path, number, "read", doc.get_page_size, number - 1)  # type: ignore[attr-defined]
    original = _pdf_nominal(path, points, number)
    try:
        shown = shown_size(*original, min_pixels=min_pixels, max_pixels=max_pixels, longest_side=longest_side)
    except InputError as exc:
        raise type(exc)(f"{printable(path)}: page {number}: {exc}") from None  # keep the kind: permanent or not
    return PageSize(number, original, shown)


def _pdf_page(path: Path, doc: object, size: PageSize) -> Page:
    page = _pdf_load_page(path, doc, size.number)
    try:
        image = _pdf_render(path, page, size.number, size.shown)
    finally:
        page.close()
    return Page(image=_resize(image, size.shown), original=size.original, number=size.number)


def _pdf_original(path: Path, f: BinaryIO, number: int) -> Image.Image:
    with _PDFIUM_LOCK, _pdf_document(path, f) as doc:
        if not 1 <= number <= len(doc):
            raise NoPagesError(f"{printable(path)}: has no page {number}")
        page = _pdf_load_page(path, doc, number)
        try:
            size = _pdf_nominal(path, _pdf_guarded(path, number, "measured", page.get_size), number)
            return _resize(_pdf_render(path, page, number, size), size)
        finally:
            page.close()


def _pdf_load_page(path: Path, doc: object, number: int):  # -> pypdfium2.PdfPage
    try:
        return doc[number - 1]  # type: ignore[index]
    except Exception as exc:  # PdfiumError: a page tree that lies about its pages
        raise InputError(f"{printable(path)}: page {number} of the PDF cannot be read: {_reason(exc)}") from exc


def _pdf_nominal(path: Path, points: tuple[float, float], number: int) -> tuple[int, int]:
    """A page's size in pixels at PDF_DPI (from its size in points, rotation applied), shrunk to
    Pillow's pixel limit if it is enormous."""
    w_pt, h_pt = points
    if not (math.isfinite(w_pt) and math.isfinite(h_pt)) or w_pt <= 0 or h_pt <= 0:
        raise InputError(f"{printable(path)}: page {number} of the PDF has no size")
    dpi = float(PDF_DPI)
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    area = (w_pt * dpi / 72) * (h_pt * dpi / 72)
    if area > limit:
        dpi *= math.sqrt(limit / area)
    return max(1, round(w_pt * dpi / 72)), max(1, round(h_pt * dpi / 72))


def _pdf_render(path: Path, page, number: int, size: tuple[int, int]) -> Image.Image:
    """Render at (a hair over) ``size``, so a huge page never makes a huge bitmap."""
    w_pt, h_pt = _pdf_guarded(path, number, "measured", page.get_size)
    scale = max(size[0] / w_pt, size[1] / h_pt)
    try:
        bitmap = page.render(scale=scale, fill_color=(255, 255, 255, 255), draw_annots=True)
        try:
            image = bitmap.to_pil()
            if image.readonly or image.mode != "RGB":  # shares PDFium's buffer: copy it out
                image = image.convert("RGB")
        finally:
            bitmap.close()
    except Exception as exc:
        raise InputError(f"{printable(path)}: page {number} of the PDF cannot be rendered: {_reason(exc)}") from exc
    return image
