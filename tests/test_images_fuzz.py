"""Fuzz the image loading: any bytes give pages or an ``InputError``, never another exception.

Two hypothesis targets, brief enough for CI (about 100 examples each):
random bytes behind each format's signature, and valid files of every format
mutated (bytes flipped, cut, spliced).  Whatever comes out must be usable:
RGB pages within ``max_pixels`` with sides that are multiples of 28.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from daemon.errors import InputError
from daemon.images import load_pages
from tests.data.make_hostile import _gif_frames, _pages_pdf, _picture, _tiff_pages

MAX_PIXELS = 40_000
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


SEEDS: dict[str, bytes] = {
    "png": _encode(_picture((64, 48), "RGBA"), "PNG"),
    "jpeg": _encode(_picture((64, 48)), "JPEG", quality=70),
    "webp": _encode(_picture((64, 48)), "WEBP", quality=50),
    "bmp": _encode(_picture((24, 16)), "BMP"),
    "gif": _gif_frames(3),
    "tiff": _tiff_pages(2, (24, 16)),
    "pdf": _pages_pdf(1),
}
SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8 ", b"BM", b"GIF89a", b"II*\0",
              b"MM\0*", b"%PDF-1.4\n", b"\0\0\0\x18ftypheic", b""]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check(folder: Path, data: bytes) -> None:
    path = folder / "input.bin"
    path.write_bytes(data)
    try:
        pages = load_pages(path, min_pixels=3136, max_pixels=MAX_PIXELS)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    assert pages
    for page in pages:
        w, h = page.shown
        assert page.image.mode == "RGB" and w % 28 == 0 and h % 28 == 0 and w * h <= MAX_PIXELS


@FUZZ
@given(signature=st.sampled_from(SIGNATURES), body=st.binary(max_size=2048))
def test_random_bytes(fuzz_dir: Path, signature: bytes, body: bytes) -> None:
    _check(fuzz_dir, signature + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "zero":
            data[at:at + draw(st.integers(1, 16))] = b"\0" * 4
    return bytes(data)


@FUZZ
@given(data=mutated())
def test_mutated_valid_files(fuzz_dir: Path, data: bytes) -> None:
    _check(fuzz_dir, data)
