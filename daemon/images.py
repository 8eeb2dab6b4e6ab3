"""Decode a source file into RGB pages and size them for the model.

Everything the model sees passes through here, for every backend.  This
module opens the file (once, under the symlink policy), tells its format by
its content and decodes raster images with Pillow; a PDF's pages go to
``daemon.pdf`` (PDFium); what comes out, and the sizing arithmetic, is
``daemon.pages``'.

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
- PDFium parses hostile PDFs in this process (``daemon.pdf`` says more).
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

from daemon import pdf
from daemon.config import FORMATS, PageRanges, last_page_wanted, page_selected
from daemon.errors import (
    ImageTooLargeError,
    InputError,
    LinkOutsideError,
    NoPagesError,
    NotAnImageError,
    UnsupportedFormatError,
    printable,
)
from daemon.pages import MAX_PAGES, Page, PageSize, ranges, reason, resize, shown_size

log = logging.getLogger(__name__)

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

# The *error* at twice this limit stays; see the module docstring.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# "Corrupt EXIF data" and the like: Pillow carries on without the metadata and
# so do we; a warning on stderr per photo would only be noise in the journal.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


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
        is_pdf = _is_pdf(path, f)
        if is_pdf:
            _check_format(path, "pdf", formats)
            sizes, out = pdf.measure(path, f, min_pixels=min_pixels, max_pixels=max_pixels, pages=pages,
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
    return PageSource(path, tuple(sizes), roots, is_pdf, identity), out


def pdf_page_count(path: Path, allowed_roots: Sequence[Path] | None = None) -> int | None:
    """Pages of ``path`` when it is a PDF, else None; nothing is rendered (the API's page limit).

    Raises:
        InputError: as ``load_pages`` for a file it could not open.
    """
    with open_source(path, allowed_roots) as f:
        return pdf.count(path, f) if _is_pdf(path, f) else None


def open_image(path: Path, number: int = 1) -> Image.Image:
    """Page ``number`` of ``path`` at its original size, upright and RGB (for overlays).

    A PDF page is rendered at ``pdf.PDF_DPI``, the size its boxes refer to.
    """
    with open_source(path) as f:
        if _is_pdf(path, f):
            return pdf.original(path, f, number)
        image = _open_pillow(path, f)
        try:
            if number > 1:
                _seek(path, image, number - 1)
            orientation = _orientation(image)
            _decode(path, image)
            return _detached(_transpose(to_rgb(image), orientation), image)
        finally:
            image.close()


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
        return pdf.text(path, f, number) if _is_pdf(path, f) else None


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


def size_page(rgb: Image.Image, *, min_pixels: int, max_pixels: int, number: int = 1) -> Page:
    """An already decoded RGB picture as a ``Page`` (kept for callers holding a PIL image)."""
    w, h = shown_size(rgb.width, rgb.height, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = rgb if (w, h) == rgb.size else resize(rgb, (w, h))
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
        raise InputError(f"{p}: cannot read image header: {reason(exc)}") from exc
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
        raise NoPagesError(f"{printable(path)}: none of the rule's pages ({ranges(pages)}) exist in this file")
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
            raise InputError(f"{printable(path)}: page {number + 1} cannot be read: {reason(exc)}") from exc
        number += 1


def _seek(path: Path, image: Image.Image, frame: int) -> None:
    try:
        image.seek(frame)
    except EOFError as exc:
        raise NoPagesError(f"{printable(path)}: has no page {frame + 1}") from exc
    except Exception as exc:
        raise InputError(f"{printable(path)}: page {frame + 1} cannot be read: {reason(exc)}") from exc


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
        small = resize(_without_palette(image), target)
        rgb = _detached(_transpose(to_rgb(small), orientation), image)
    except InputError:
        raise
    except Exception as exc:  # an exotic mode Pillow cannot convert
        raise InputError(f"{p}: cannot convert {image.mode} pixels to RGB: {reason(exc)}") from exc
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
        raise InputError(f"{p}: cannot decode image: {reason(exc)}") from exc


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


# ------------------------------------------------------------- either


def _render(path: Path, f: BinaryIO, is_pdf: bool, sizes: Sequence[PageSize]) -> list[Page]:
    """``sizes``' pages of the file open as ``f`` (measured by ``open_pages``)."""
    if is_pdf:
        return pdf.render(path, f, sizes)
    image = _open_pillow(path, f)
    try:
        return _frame_pages(path, image, sizes)
    finally:
        image.close()


def _identity(f: BinaryIO) -> tuple[int, int, int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


