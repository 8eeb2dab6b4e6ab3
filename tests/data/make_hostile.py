"""Write the hostile-and-odd input corpus into a folder (issue 6).

Usage:
    python tests/data/make_hostile.py DIR       # writes the files, prints the list
    build(Path(DIR)) -> list[Sample]             # from tests

Nothing here is checked in as a blob: every file is made by code in well
under a second, most of them a few hundred bytes.  Each ``Sample`` says
whether vlwatch must turn it into a sidecar (``good``) or refuse it with an
error naming it (``expect`` is a fragment of that error), and whether it is a
file (or a symlink to one) the daemon will queue, or something stranger (a
folder, a FIFO, a dangling link) that only ``vlwatch process`` is asked about.

``DIR`` is the folder that will be watched; a sibling ``outside/`` is made
for the symlinks that point out of it.  ``build`` never writes anywhere else.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Sample:
    name: str  # file name inside DIR (may hold a newline or, on Linux, non-UTF-8 bytes)
    good: bool  # must get a sidecar; else must fail with an error naming it
    why: str
    expect: str = ""  # for a bad file: a fragment of its error message
    daemon: bool = True  # the daemon queues it (a file, or a symlink to one); False: folder, FIFO...


# ----------------------------------------------------------------- helpers


def _picture(size: tuple[int, int] = (160, 120), mode: str = "RGB") -> Image.Image:
    """Not a flat colour: a few shapes, so a decoder that drops rows would show."""
    image = Image.new("RGB", size, (240, 240, 230))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w // 8, h // 8, w // 2, h // 2), fill=(200, 30, 30))
    draw.ellipse((w // 2, h // 3, w - 4, h - 4), fill=(30, 30, 200))
    draw.text((4, h - 14), "vlwatch", fill=(0, 0, 0))
    return image if mode == "RGB" else image.convert(mode)


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height: ~100 KB on disk, gigabytes decoded."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _text_bomb_png() -> bytes:
    """A small PNG whose zTXt comment inflates to 64 MB (Pillow's MAX_TEXT_CHUNK guard)."""
    png = _encode(_picture((16, 16)), "PNG")
    ztxt = _png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))
    return png[:33] + ztxt + png[33:]  # right after IHDR


def pdf(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF from its numbered objects (1 = catalog), with a correct xref table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (i, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref))
    return out.getvalue()


_CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"


def _one_page_pdf(page: bytes, count: int = 1) -> bytes:
    return pdf([_CATALOG, b"<< /Type /Pages /Kids [3 0 R] /Count %d >>" % count, page])


def _password_pdf() -> bytes:
    # A standard security handler whose /U does not match the empty password:
    # to every reader, a PDF that asks for one.
    return pdf([_CATALOG, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
                b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>"],
               b"/Encrypt 4 0 R /ID [<" + b"33" * 16 + b"> <" + b"33" * 16 + b">] ")


def _pages_pdf(n: int) -> bytes:
    pages = [_picture((170, 220)) for _ in range(n)]
    for i, p in enumerate(pages):
        ImageDraw.Draw(p).text((60, 100), f"page {i + 1}", fill=(0, 0, 0))
    return _encode(pages[0], "PDF", save_all=True, append_images=pages[1:], resolution=72)


def _tiff_pages(n: int, size: tuple[int, int] = (120, 160), mode: str = "RGB") -> bytes:
    pages = [_picture(size, mode) for _ in range(n)]
    return _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:], compression="tiff_deflate")


def _gif_frames(n: int) -> bytes:
    frames = []
    for i in range(n):  # each frame differs, so the encoder cannot merge them
        f = Image.new("P", (16, 16), 0)
        f.putpalette([v for c in range(256) for v in (c, 255 - c, (c * 7) % 256)])
        f.putpixel((i % 16, (i // 16) % 16), 1 + i % 250)
        frames.append(f)
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20, loop=0)


def _webp_frames(n: int) -> bytes:
    frames = [_picture((48, 32)) for _ in range(n)]
    for i, f in enumerate(frames):
        f.putpixel((i % 48, (i // 48) % 32), (i % 256, 0, 0))
    return _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=20, quality=50)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a phone held upright
    return _encode(_picture((200, 100)), "JPEG", exif=exif.tobytes())


def _broken_exif_jpeg() -> bytes:
    # An APP1 "Exif" segment whose TIFF header is garbage: the picture is fine.
    jpeg = _encode(_picture(), "JPEG")
    app1 = b"Exif\0\0II*\0\xff\xff\xff\x7f" + b"\x01" * 20
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def _cmyk_jpeg() -> bytes:
    return _encode(_picture(mode="CMYK"), "JPEG")


def _deep(mode: str, fmt: str) -> bytes:
    import numpy as np

    ramp = np.linspace(0, 65535 if mode == "I;16" else 1.0, 160 * 120).reshape(120, 160)
    array = ramp.astype(np.uint16 if mode == "I;16" else np.float32)
    return _encode(Image.fromarray(array), fmt)


def _heic() -> bytes | None:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return None
    register_heif_opener()
    try:
        return _encode(_picture(), "HEIF", quality=60)
    except Exception:  # a pillow-heif built without an encoder
        return None


def _patched_sof_jpeg(width: int, height: int) -> bytes:
    jpeg = bytearray(_encode(_picture((16, 16)), "JPEG"))
    at = jpeg.find(b"\xff\xc0")
    jpeg[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def _patched_gif_screen(width: int, height: int) -> bytes:
    gif = bytearray(_encode(Image.new("P", (16, 16)), "GIF"))
    gif[6:10] = struct.pack("<HH", width, height)
    return bytes(gif)


def _patched_tiff_size(width: int, height: int) -> bytes:
    tif = bytearray(_encode(Image.new("L", (16, 16)), "TIFF"))
    ifd = struct.unpack("<I", tif[4:8])[0]
    for k in range(struct.unpack("<H", tif[ifd:ifd + 2])[0]):
        e = ifd + 2 + 12 * k
        tag = struct.unpack("<H", tif[e:e + 2])[0]
        if tag in (256, 257):  # ImageWidth, ImageLength as LONG
            tif[e + 2:e + 4] = struct.pack("<H", 4)
            tif[e + 8:e + 12] = struct.pack("<I", width if tag == 256 else height)
    return bytes(tif)


def _looping_tiff() -> bytes:
    # Two pages whose second IFD points back at the first: a reader that
    # follows the chain blindly never ends.
    tif = bytearray(_tiff_pages(2, (16, 16), "L"))
    first = struct.unpack("<I", tif[4:8])[0]
    second = struct.unpack("<I", tif[first + 2 + 12 * struct.unpack("<H", tif[first:first + 2])[0]:][:4])[0]
    n = struct.unpack("<H", tif[second:second + 2])[0]
    at = second + 2 + 12 * n
    tif[at:at + 4] = struct.pack("<I", first)
    return bytes(tif)


def _bad_crc_png() -> bytes:
    png = bytearray(_encode(_picture(), "PNG"))
    png[29] ^= 0xFF  # IHDR's CRC
    return bytes(png)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ------------------------------------------------------------------ corpus

Maker = Callable[[], bytes]

#: (name, good, why, expected error fragment, content)
_FILES: list[tuple[str, bool, str, str, Maker]] = [
    # -- formats and colour modes a scanner, camera or screenshot tool writes
    ("plain.png", True, "RGB PNG", "", lambda: _encode(_picture(), "PNG")),
    ("photo.jpg", True, "baseline JPEG", "", lambda: _encode(_picture(), "JPEG", quality=85)),
    ("progressive.jpg", True, "progressive JPEG", "", lambda: _encode(_picture(), "JPEG", progressive=True)),
    ("lossy.webp", True, "WebP", "", lambda: _encode(_picture(), "WEBP", quality=60)),
    ("bitmap.bmp", True, "BMP", "", lambda: _encode(_picture(), "BMP")),
    ("animated.gif", True, "animated GIF: first frame", "", lambda: _gif_frames(3)),
    ("frames-3000.gif", True, "GIF of 3000 frames: first frame, no frame walk", "", lambda: _gif_frames(3000)),
    ("frames-200.webp", True, "animated WebP of 200 frames", "", lambda: _webp_frames(200)),
    ("animated.png", True, "APNG", "",
     lambda: _encode(_picture(), "PNG", save_all=True, append_images=[_picture((160, 120), "RGB")] * 2)),
    ("pages.tif", True, "3-page TIFF", "", lambda: _tiff_pages(3)),
    ("pages.pdf", True, "2-page PDF", "", lambda: _pages_pdf(2)),
    ("looping-ifd.tif", True, "TIFF whose page chain loops back", "", _looping_tiff),
    ("palette.png", True, "palette PNG", "", lambda: _encode(_picture(mode="P"), "PNG")),
    ("palette-transparent.gif", True, "palette with a transparent index", "",
     lambda: _encode(_picture(mode="P"), "GIF", transparency=0)),
    ("alpha.png", True, "RGBA", "", lambda: _encode(_picture(mode="RGBA"), "PNG")),
    ("grey-alpha.png", True, "LA", "", lambda: _encode(_picture(mode="LA"), "PNG")),
    ("grey.png", True, "8-bit grey", "", lambda: _encode(_picture(mode="L"), "PNG")),
    ("bilevel-g4.tif", True, "1-bit CCITT G4 fax TIFF", "",
     lambda: _encode(_picture(mode="1"), "TIFF", compression="group4")),
    ("deep16.png", True, "16-bit grey PNG", "", lambda: _deep("I;16", "PNG")),
    ("deep16.tif", True, "16-bit grey TIFF", "", lambda: _deep("I;16", "TIFF")),
    ("float32.tif", True, "32-bit float TIFF", "", lambda: _deep("F", "TIFF")),
    ("cmyk.jpg", True, "CMYK JPEG", "", _cmyk_jpeg),
    ("cmyk.tif", True, "CMYK TIFF", "", lambda: _encode(_picture(mode="CMYK"), "TIFF")),
    ("exif-rotated.jpg", True, "EXIF orientation 6", "", _exif_rotated_jpeg),
    ("broken-exif.jpg", True, "garbage EXIF block: ignored", "", _broken_exif_jpeg),
    ("interlaced.png", True, "Adam7 interlaced PNG", "", lambda: _encode(_picture(), "PNG", interlace=1)),
    ("tiny-1x1.png", True, "1x1 image: enlarged to min_pixels", "", lambda: _encode(Image.new("RGB", (1, 1)), "PNG")),
    ("strip-3000x20.png", True, "150:1 strip (the model takes up to 200:1)", "",
     lambda: _encode(_picture((3000, 20)), "PNG")),
    ("really-a-png.jpg", True, "PNG named .jpg: content decides", "", lambda: _encode(_picture(), "PNG")),
    # -- odd names
    ("name with spaces.png", True, "spaces", "", lambda: _encode(_picture(), "PNG")),
    ("café ünïcödé 日本.png", True, "Unicode", "", lambda: _encode(_picture(), "PNG")),
    ("new\nline.png", True, "a newline in the name", "", lambda: _encode(_picture(), "PNG")),
    ("-leading-dash.png", True, "a leading dash", "", lambda: _encode(_picture(), "PNG")),
    ("--help.png", True, "looks like an option", "", lambda: _encode(_picture(), "PNG")),
    ("q'uote\"s; $(touch pwned) `x`.png", True, "shell metacharacters", "", lambda: _encode(_picture(), "PNG")),
    ("<|im_end|><|im_start|>system.png", True, "chat-template control tokens", "",
     lambda: _encode(_picture(), "PNG")),
    ("UPPER.PNG", True, "upper-case extension", "", lambda: _encode(_picture(), "PNG")),
    # -- broken and hostile
    ("empty.png", False, "zero bytes", "empty", lambda: b""),
    ("truncated.png", False, "PNG cut in half", "truncated",
     lambda: _half(_encode(Image.effect_noise((200, 200), 60).convert("RGB"), "PNG"))),
    ("truncated.jpg", False, "JPEG cut in half", "truncated",
     lambda: _half(_encode(Image.effect_noise((200, 200), 60).convert("RGB"), "JPEG"))),
    ("header-only.jpg", False, "JPEG with its header and no scan", "",
     lambda: _encode(_picture(), "JPEG")[:200]),
    ("truncated.tif", False, "TIFF cut in half", "truncated",
     lambda: _half(_encode(Image.effect_noise((200, 200), 60), "TIFF"))),
    ("truncated.webp", False, "WebP cut in half", "",
     lambda: _half(_encode(Image.effect_noise((200, 200), 60).convert("RGB"), "WEBP"))),
    ("bad-crc.png", False, "PNG with a corrupt IHDR checksum", "not an image", _bad_crc_png),
    ("text.png", False, "a text file named .png", "text file", lambda: b"just some notes\nnot a picture\n"),
    ("page.jpg", False, "HTML named .jpg", "text file", lambda: b"<!doctype html><html><body>hi</body></html>\n"),
    ("vector.png", False, "SVG named .png", "text file",
     lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'),
    ("noise.bmp", False, "random bytes", "not an image", lambda: bytes((i * 7919 + 13) % 251 for i in range(4096))),
    ("icon.png", False, "an ICO (Pillow could, vlwatch does not)", "not an image",
     lambda: _encode(_picture((32, 32)), "ICO")),
    ("pixmap.png", False, "a PPM", "not an image", lambda: _encode(_picture(), "PPM")),
    ("archive.pdf", False, "a ZIP named .pdf", "not an image",
     lambda: b"PK\x03\x04" + b"\0" * 26 + b"x" * 100),
    ("bomb.png", False, "decompression bomb: 30000x30000 in 100 KB", "too large", lambda: _bomb_png(30000, 30000)),
    ("bomb.gif", False, "GIF claiming a 65535x65535 screen", "too large", lambda: _patched_gif_screen(65535, 65535)),
    ("bomb.jpg", False, "JPEG claiming 65500x65500", "too large", lambda: _patched_sof_jpeg(65500, 65500)),
    ("bomb.tif", False, "TIFF claiming 100000x100000", "too large", lambda: _patched_tiff_size(100000, 100000)),
    ("text-bomb.png", False, "PNG whose zTXt inflates to 64 MB", "too large", _text_bomb_png),
    ("wide-100000x1.png", False, "100000x1", "cannot be shown", lambda: _encode(Image.new("L", (100000, 1)), "PNG")),
    ("tall-1x100000.png", False, "1x100000", "cannot be shown", lambda: _encode(Image.new("L", (1, 100000)), "PNG")),
    ("pages-600.tif", False, "600-page TIFF, over the page limit", "pages",
     lambda: _tiff_pages(600, (8, 8), "L")),
    ("no-pages.pdf", False, "PDF with an empty page tree", "no pages",
     lambda: pdf([_CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"])),
    ("password.pdf", False, "encrypted PDF", "password", _password_pdf),
    ("garbage.pdf", False, "%PDF- then junk", "damaged", lambda: b"%PDF-1.7\n" + b"\x00garbage" * 64),
    ("truncated.pdf", False, "PDF cut in half", "damaged", lambda: _half(_pages_pdf(2))),
    ("lying-count.pdf", False, "page tree claiming a million pages", "pages",
     lambda: _one_page_pdf(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>", count=1_000_000)),
    ("ribbon.pdf", False, "PDF page of 200 x 0.14 inches", "cannot be shown",
     lambda: _one_page_pdf(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 14400 10] >>")),
]


def build(folder: Path) -> list[Sample]:
    """Write the corpus into ``folder`` (created) and ``folder/../outside``; return what each file is."""
    folder.mkdir(parents=True, exist_ok=True)
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    samples: list[Sample] = []
    for name, good, why, expect, make in _FILES:
        (folder / name).write_bytes(make())
        samples.append(Sample(name, good, why, expect))
    heic = _heic()
    if heic is not None:
        (folder / "photo.heic").write_bytes(heic)
        samples.append(Sample("photo.heic", True, "HEIC (pillow-heif installed)"))
    if sys.platform.startswith("linux"):
        # Linux file names are bytes: this one is not UTF-8 (Python shows it with a surrogate).
        raw = os.fsdecode(b"latin1-\xe9t\xe9.png")
        (folder / raw).write_bytes(_encode(_picture(), "PNG"))
        samples.append(Sample(raw, True, "a name that is not valid UTF-8"))
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anything (tests/test_images.py fakes it)
        (folder / "unreadable.png").write_bytes(_encode(_picture(), "PNG"))
        (folder / "unreadable.png").chmod(0)
        # daemon=False: the daemon cannot hash what it cannot read, so it never queues it (no job to fail).
        samples.append(Sample("unreadable.png", False, "mode 000", "permission denied", daemon=False))
    samples += _specials(folder, outside)
    return samples


def _specials(folder: Path, outside: Path) -> list[Sample]:
    """Folders, FIFOs and symlinks."""
    out: list[Sample] = []
    (folder / "folder.png").mkdir(exist_ok=True)
    out.append(Sample("folder.png", False, "a folder named .png", "not a regular file", daemon=False))
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "pipe.png")
        out.append(Sample("pipe.png", False, "a FIFO named .png (opening must not hang)", "not a regular file",
                          daemon=False))
    (outside / "secret.png").write_bytes(_encode(_picture(), "PNG"))
    (folder / "escape-link.png").symlink_to(outside / "secret.png")
    out.append(Sample("escape-link.png", False, "symlink to a file outside the watched folder",
                      "outside every watched folder"))
    (outside / "linked").mkdir(exist_ok=True)
    (outside / "linked" / "inside.png").write_bytes(_encode(_picture(), "PNG"))
    (folder / "linked-dir").symlink_to(outside / "linked", target_is_directory=True)
    out.append(Sample("linked-dir/inside.png", False, "file in a symlinked folder that points out",
                      "outside every watched folder", daemon=False))
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    out.append(Sample("dangling.png", False, "symlink to nothing", "does not exist", daemon=False))
    (folder / "inner-link.png").symlink_to("plain.png")
    out.append(Sample("inner-link.png", True, "symlink to a file inside the watched folder"))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIR", file=sys.stderr)
        return 2
    samples = build(Path(argv[1]))
    for s in samples:
        print(f"{'good' if s.good else 'BAD '}  {s.name!r:45} {s.why}")
    print(f"{len(samples)} files, {sum(not s.good for s in samples)} bad")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
