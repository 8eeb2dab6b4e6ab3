"""PDF pages through PDFium (pypdfium2): measured from the page tree, rendered at the size the model sees.

``images`` opens the file and tells a PDF by its content; the functions here
take that open file: ``measure`` (every selected page's size, the first few
rendered), ``render`` (more of them later), ``original`` (one page at
``PDF_DPI``, for overlays), ``count`` and ``text`` (the text layer, a
fallback for a page the model could not read).  A page is never rasterised
at full resolution: PDFium draws it at (a hair over) the size the model will
see.

PDFium is not thread-safe (pypdfium2's README says so) and the worker
prepares files on several threads, so every call holds ``LOCK``.  It parses
hostile PDFs in this process: fuzzed by Google, current builds from
pypdfium2, but a pathological content stream can take long to render; the
daemon's per-job handling bounds what follows, not the render itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from daemon.config import PageRanges
from daemon.errors import ImageTooLargeError, InputError, NoPagesError, UnsupportedFormatError, printable
from daemon.pages import MAX_PAGES, Page, PageSize, ranges, reason, resize, shown_size

#: Nominal resolution a PDF page is rasterised at (before ``max_pixels``
#: shrinks it): what "original pixels" means for a PDF's boxes and overlay.
PDF_DPI = 200
#: Characters of one page's text layer kept at most (a hostile PDF can claim any amount).
MAX_PAGE_TEXT = 200_000

LOCK = threading.Lock()
# The first PDF of a run would make each preparing thread import pypdfium2 at once.
_IMPORT_LOCK = threading.Lock()


@cache
def _pdfium():  # -> the pypdfium2 module
    with _IMPORT_LOCK:
        import pypdfium2

    return pypdfium2


def measure(path: Path, f: BinaryIO, *, min_pixels: int, max_pixels: int, pages: PageRanges | None,
               longest_side: int | None = None,
               render: int | None = None) -> tuple[list[PageSize], list[Page]]:
    with LOCK, _document(path, f) as doc:
        count = len(doc)
        if count == 0:
            raise NoPagesError(f"{printable(path)}: PDF has no pages")
        numbers = _selected(count, pages)
        if len(numbers) > MAX_PAGES:
            raise ImageTooLargeError(f"{printable(path)}: has {count} pages, more than the {MAX_PAGES} vlwatch takes "
                             "from one file; give the rule a `pages:` range to take part of it")
        if not numbers:
            raise NoPagesError(f"{printable(path)}: has {count} page{'s' if count != 1 else ''}; "
                             f"none of the rule's pages ({ranges(pages)}) exist")
        sizes = [_size(path, doc, n, min_pixels=min_pixels, max_pixels=max_pixels, longest_side=longest_side)
                 for n in numbers]
        return sizes, [_page(path, doc, size) for size in sizes[:render]]


def render(path: Path, f: BinaryIO, sizes: Sequence[PageSize]) -> list[Page]:
    """``sizes``' pages of the PDF open as ``f`` (measured by ``measure``)."""
    with LOCK, _document(path, f) as doc:
        return [_page(path, doc, size) for size in sizes]


def original(path: Path, f: BinaryIO, number: int) -> Image.Image:
    with LOCK, _document(path, f) as doc:
        if not 1 <= number <= len(doc):
            raise NoPagesError(f"{printable(path)}: has no page {number}")
        page = _load_page(path, doc, number)
        try:
            size = _nominal(path, _guarded(path, number, "measured", page.get_size), number)
            return resize(_rasterise(path, page, number, size), size)
        finally:
            page.close()


def count(path: Path, f: BinaryIO) -> int:
    """Pages of the PDF open as ``f``; nothing is rendered."""
    with LOCK, _document(path, f) as doc:
        return len(doc)


def text(path: Path, f: BinaryIO, number: int) -> str | None:
    """The text layer of page ``number`` of the PDF open as ``f`` (``images.pdf_page_text``), or None."""
    with LOCK, _document(path, f) as doc:
        if not 1 <= number <= len(doc):
            raise NoPagesError(f"{printable(path)}: has no page {number}")
        page = _load_page(path, doc, number)
        try:
            textpage = _guarded(path, number, "read as text", page.get_textpage)
            try:
                found = _guarded(path, number, "read as text", textpage.get_text_range)
            finally:
                textpage.close()
        finally:
            page.close()
    found = found.replace("\r\n", "\n").replace("\r", "\n")[:MAX_PAGE_TEXT].strip()
    return found or None


def _guarded(path: Path, number: int, what: str, fn, *args):
    """``fn(*args)``, with anything PDFium raises on a hostile page turned into an ``InputError``."""
    try:
        return fn(*args)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{printable(path)}: page {number} of the PDF cannot be {what}: {reason(exc)}") from exc


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
def _document(path: Path, f: BinaryIO) -> Iterator["object"]:
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


def _size(path: Path, doc: object, number: int, *, min_pixels: int, max_pixels: int,
              longest_side: int | None = None) -> PageSize:
    """The sizes of page ``number``, from the page tree alone (nothing is parsed or drawn)."""
    # FPDF_GetPageSizeByIndexF: the size ``PdfPage.get_size`` gives, rotation applied, without loading the page.
    points = _guarded(path, number, "read", doc.get_page_size, number - 1)  # type: ignore[attr-defined]
    original = _nominal(path, points, number)
    try:
        shown = shown_size(*original, min_pixels=min_pixels, max_pixels=max_pixels, longest_side=longest_side)
    except InputError as exc:
        raise type(exc)(f"{printable(path)}: page {number}: {exc}") from None  # keep the kind: permanent or not
    return PageSize(number, original, shown)


def _page(path: Path, doc: object, size: PageSize) -> Page:
    page = _load_page(path, doc, size.number)
    try:
        image = _rasterise(path, page, size.number, size.shown)
    finally:
        page.close()
    return Page(image=resize(image, size.shown), original=size.original, number=size.number)


def _load_page(path: Path, doc: object, number: int):  # -> pypdfium2.PdfPage
    try:
        return doc[number - 1]  # type: ignore[index]
    except Exception as exc:  # PdfiumError: a page tree that lies about its pages
        raise InputError(f"{printable(path)}: page {number} of the PDF cannot be read: {reason(exc)}") from exc


def _nominal(path: Path, points: tuple[float, float], number: int) -> tuple[int, int]:
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


def _rasterise(path: Path, page, number: int, size: tuple[int, int]) -> Image.Image:
    """Render at (a hair over) ``size``, so a huge page never makes a huge bitmap."""
    w_pt, h_pt = _guarded(path, number, "measured", page.get_size)
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
        raise InputError(f"{printable(path)}: page {number} of the PDF cannot be rendered: {reason(exc)}") from exc
    return image

