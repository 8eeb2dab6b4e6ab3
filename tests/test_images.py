"""Inputs (issue 6): every format end to end, colour hygiene, page ranges, memory on huge scans.

The first half runs ``daemon.images`` in process and checks pixels: what the
model is shown must be upright, RGB, flattened on white and within
``max_pixels``.  The second half runs the real ``vlwatch process`` on the
tiny checkpoint, every format in one run, multi-page PDF and TIFF included,
and a 12000x9000 scan whose peak resident memory is measured.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from daemon.config import parse_pages
from daemon.errors import InputError
from daemon.errors import printable
from daemon.images import load_pages, open_image, open_pages, open_source
from daemon.pages import MAX_PAGES, shown_size
from tests.conftest import REPO, run_vlwatch, write_config
from tests.data.make_hostile import _heic, _pages_pdf, _picture, _tiff_pages, pdf

SMALL = dict(min_pixels=3136, max_pixels=60_000)


def _save(path: Path, image: Image.Image, **kw: object) -> Path:
    image.save(path, **kw)
    return path


def _only(path: Path, **kw: object):
    pages = load_pages(path, **{**SMALL, **kw})
    assert len(pages) == 1
    return pages[0]


# ------------------------------------------------------------------ hygiene


def test_alpha_is_flattened_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # fully transparent red
    ImageDraw.Draw(image).rectangle((0, 0, 49, 99), fill=(0, 0, 255, 255))
    page = _only(_save(tmp_path / "a.png", image))
    assert page.image.mode == "RGB"
    assert page.image.getpixel((page.shown[0] - 5, 50)) == (255, 255, 255)  # not red, not black
    assert page.image.getpixel((5, 50)) == (0, 0, 255)


def test_palette_with_transparency_and_grey_alpha(tmp_path: Path) -> None:
    pal = Image.new("P", (60, 60), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    page = _only(_save(tmp_path / "p.gif", pal, transparency=1))
    assert page.image.getpixel((10, 10)) == (255, 255, 255)
    la = Image.new("LA", (60, 60), (0, 0))
    assert _only(_save(tmp_path / "la.png", la)).image.getpixel((10, 10)) == (255, 255, 255)


def test_cmyk_16_bit_float_and_bilevel_become_right_rgb(tmp_path: Path) -> None:
    red = _only(_save(tmp_path / "c.jpg", Image.new("CMYK", (64, 64), (0, 255, 255, 0)))).image.getpixel((20, 20))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    mid = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))
    assert _only(_save(tmp_path / "d.png", mid)).image.getpixel((20, 20)) == (127, 127, 127)  # scaled, not clipped
    assert _only(_save(tmp_path / "d.tif", mid)).image.getpixel((20, 20)) == (127, 127, 127)
    half = Image.fromarray(np.full((64, 64), 0.5, dtype=np.float32))
    assert _only(_save(tmp_path / "f.tif", half)).image.getpixel((20, 20)) == (127, 127, 127)
    fax = Image.new("1", (64, 64), 1)
    assert _only(_save(tmp_path / "g4.tif", fax, compression="group4")).image.getpixel((20, 20)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(stored).rectangle((0, 0, 19, 19), fill="red")  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    page = _only(_save(tmp_path / "r.jpg", stored, exif=exif.tobytes(), quality=95))
    assert page.original == (100, 200)  # upright size: boxes are in these pixels
    w, h = page.shown
    assert h > w
    r, g, b = page.image.getpixel((w - 3, 3))  # top-left went to top-right
    assert r > 200 and g < 80
    assert open_image(tmp_path / "r.jpg").size == (100, 200)


def test_sizes_are_multiples_of_28_within_max_pixels(tmp_path: Path) -> None:
    for size in [(1, 1), (3000, 20), (20, 3000), (4000, 3000), (57, 1000)]:
        page = _only(_save(tmp_path / f"{size[0]}x{size[1]}.png", Image.new("RGB", size)))
        w, h = page.shown
        assert w % 28 == 0 and h % 28 == 0 and 3136 <= w * h <= 60_000, (size, page.shown)
    # qwen-vl-utils 0.0.14 alone would give a side of 0 here
    assert shown_size(3000, 20, min_pixels=3136, max_pixels=60_000)[1] == 28


def test_first_frame_only_of_animations(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    _save(tmp_path / "a.gif", frames[0], save_all=True, append_images=frames[1:])
    _save(tmp_path / "a.webp", frames[0], save_all=True, append_images=frames[1:], lossless=True)
    _save(tmp_path / "a.png", frames[0], save_all=True, append_images=frames[1:])
    for name in ("a.gif", "a.webp", "a.png"):
        r, g, b = _only(tmp_path / name).image.getpixel((20, 20))
        assert r > 200 and g < 60, name


def test_content_decides_the_format_not_the_name(tmp_path: Path) -> None:
    assert _only(_save(tmp_path / "png-named.jpg", _picture(), format="PNG")).image.mode == "RGB"
    (tmp_path / "notes.png").write_text("shopping list\n")
    with pytest.raises(InputError, match=r"notes\.png: is a text file"):
        load_pages(tmp_path / "notes.png", **SMALL)
    _save(tmp_path / "icon.png", _picture((32, 32)), format="ICO")  # Pillow reads ICO; vlwatch does not
    with pytest.raises(InputError, match="not an image vlwatch can read"):
        load_pages(tmp_path / "icon.png", **SMALL)


# ------------------------------------------------------------ pages, formats


def test_multi_page_tiff_and_pdf_give_every_page(tmp_path: Path) -> None:
    (tmp_path / "t.tif").write_bytes(_tiff_pages(3))
    (tmp_path / "d.pdf").write_bytes(_pages_pdf(4))
    assert [p.number for p in load_pages(tmp_path / "t.tif", **SMALL)] == [1, 2, 3]
    pages = load_pages(tmp_path / "d.pdf", **SMALL)
    assert [p.number for p in pages] == [1, 2, 3, 4]
    assert pages[0].original == (472, 611)  # 170x220 pt at 200 dpi


def test_page_ranges(tmp_path: Path) -> None:
    (tmp_path / "t.tif").write_bytes(_tiff_pages(5))
    (tmp_path / "d.pdf").write_bytes(_pages_pdf(5))
    for name in ("t.tif", "d.pdf"):
        got = load_pages(tmp_path / name, pages=parse_pages("2-3,5"), **SMALL)
        assert [p.number for p in got] == [2, 3, 5], name
        assert [p.number for p in load_pages(tmp_path / name, pages=parse_pages("4-"), **SMALL)] == [4, 5]
        with pytest.raises(InputError, match="none of the rule's pages"):
            load_pages(tmp_path / name, pages=parse_pages("9-"), **SMALL)
    _save(tmp_path / "one.png", _picture())
    assert [p.number for p in load_pages(tmp_path / "one.png", pages=parse_pages("1-2"), **SMALL)] == [1]


def test_pages_rendered_later_are_the_pages_rendered_at_once(tmp_path: Path) -> None:
    # issue 24: a long document is measured whole and rendered a chunk at a time (``PageSource``)
    frames = [Image.new("RGB", (120 + 10 * i, 160), (40 * i, 255 - 40 * i, 90)) for i in range(5)]
    _save(tmp_path / "t.tif", frames[0], save_all=True, append_images=frames[1:])
    (tmp_path / "d.pdf").write_bytes(_pages_pdf(5))
    for name in ("t.tif", "d.pdf"):
        whole = load_pages(tmp_path / name, pages=parse_pages("1-2,4-5"), **SMALL)
        source, first = open_pages(tmp_path / name, pages=parse_pages("1-2,4-5"), render=1, **SMALL)
        assert [(s.number, s.original, s.shown) for s in source.pages] == \
            [(p.number, p.original, p.shown) for p in whole], name
        later = source.render(3, 4) + source.render(1, 3)  # out of order: a TIFF seeks back
        got = first + later[1:] + later[:1]
        assert [p.number for p in got] == [1, 2, 4, 5], name
        for a, b in zip(got, whole):
            assert (a.original, a.shown) == (b.original, b.shown) and a.image.tobytes() == b.image.tobytes(), name
    source, _ = open_pages(tmp_path / "d.pdf", render=0, **SMALL)
    (tmp_path / "d.pdf").write_bytes(_pages_pdf(6))  # replaced while being read: never mixed with the first
    with pytest.raises(InputError, match=r"d\.pdf: changed while its pages were being read"):
        source.render(1, 2)


def test_too_many_pages_is_refused_unless_a_range_picks_some(tmp_path: Path) -> None:
    big = pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 100000 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>"])
    (tmp_path / "big.pdf").write_bytes(big)
    with pytest.raises(InputError, match=f"more than the {MAX_PAGES}"):
        load_pages(tmp_path / "big.pdf", **SMALL)
    assert len(load_pages(tmp_path / "big.pdf", pages=parse_pages("1"), **SMALL)) == 1


def test_a_rule_can_restrict_formats(tmp_path: Path) -> None:
    (tmp_path / "d.pdf").write_bytes(_pages_pdf(1))
    _save(tmp_path / "p.png", _picture())
    assert load_pages(tmp_path / "d.pdf", formats=("pdf", "tiff"), **SMALL)
    with pytest.raises(InputError, match=r"p\.png: is PNG, which this rule does not take \(formats: pdf, tiff\)"):
        load_pages(tmp_path / "p.png", formats=("pdf", "tiff"), **SMALL)


def test_huge_pdf_page_is_rendered_small(tmp_path: Path) -> None:
    # 200 x 200 inches: at 200 dpi that would be a 1.6-gigapixel bitmap.
    (tmp_path / "poster.pdf").write_bytes(pdf([b"<< /Type /Catalog /Pages 2 0 R >>",
                                               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                                               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 14400 14400] >>"]))
    code = ("import resource; from pathlib import Path; from daemon.images import load_pages; from daemon.pages import shown_size\n"
            "shown_size(9, 9, min_pixels=1, max_pixels=100)\n"  # import qwen-vl-utils (and torch) first
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"p = load_pages(Path({str(tmp_path / 'poster.pdf')!r}), min_pixels=3136, max_pixels=1003520)\n"
            "print(p[0].shown, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    shown, grown_mb = done.stdout.rsplit(" ", 1)
    w, h = ast.literal_eval(shown)
    assert w == h and w * h <= 1003520
    assert int(grown_mb) < 100, done.stdout  # a full-size render would be gigabytes


# ------------------------------------------------------------ the file itself


def test_permission_denied_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "locked.png", _picture())
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: make open() fail as it does for everyone else
        real_open = os.open

        def deny(p, *a, **kw):
            if str(p) == str(path):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, *a, **kw)
        monkeypatch.setattr("daemon.images.os.open", deny)
    with pytest.raises(InputError, match=r"locked\.png: permission denied"):
        load_pages(path, **SMALL)


def test_deleted_or_replaced_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"gone\.png: file disappeared"):
        load_pages(tmp_path / "gone.png", **SMALL)
    (tmp_path / "now-a-folder.png").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        load_pages(tmp_path / "now-a-folder.png", **SMALL)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match="not a regular file"):  # and it did not hang on open
        load_pages(tmp_path / "pipe.png", **SMALL)
    # Replaced after opening: what is read is the file that was opened.
    first, second = _save(tmp_path / "x.png", _picture()), _save(tmp_path / "y.png", Image.new("RGB", (9, 9)))
    with open_source(first) as f:
        os.replace(second, first)
        assert Image.open(f).size == (160, 120)


def test_symlinks_out_of_the_allowed_folders_are_refused(tmp_path: Path) -> None:
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    _save(outside / "secret.png", _picture())
    _save(watched / "inside.png", _picture())
    (watched / "out.png").symlink_to(outside / "secret.png")
    (watched / "in.png").symlink_to("inside.png")
    roots = (watched.resolve(),)
    assert load_pages(watched / "in.png", allowed_roots=roots, **SMALL)
    with pytest.raises(InputError, match=r"out\.png: is a symbolic link to .*secret\.png, outside every watched"):
        load_pages(watched / "out.png", allowed_roots=roots, **SMALL)
    assert load_pages(watched / "out.png", allowed_roots=None, **SMALL)  # follow_symlinks_out: true


def test_printable_escapes_what_would_break_a_log_line() -> None:
    assert printable("/a/plain name é.png") == "/a/plain name é.png"
    assert printable("/a/new\nline.png") == "/a/new\\nline.png"
    assert printable(os.fsdecode(b"/a/\xff.png")) == "/a/\\udcff.png"


# ------------------------------------------------------- end to end (model)


@pytest.fixture
def formats_dir(tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _save(inbox / "shot.png", _picture((300, 200)))
    _save(inbox / "photo.jpg", _picture((300, 200)), quality=85)
    _save(inbox / "web.webp", _picture((300, 200)), quality=60)
    _save(inbox / "old.bmp", _picture((120, 90)))
    frames = [_picture((120, 90)), Image.new("RGB", (120, 90), "green")]
    _save(inbox / "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    (inbox / "scan.tif").write_bytes(_tiff_pages(3, (150, 200)))
    (inbox / "letter.pdf").write_bytes(_pages_pdf(2))
    if (heic := _heic()) is not None:
        (inbox / "phone.heic").write_bytes(heic)
    return inbox


def test_every_format_end_to_end(formats_dir: Path, tiny_model: Path) -> None:
    inbox = formats_dir
    config = write_config(inbox.parent, f"""
        model: {{name: {tiny_model}, max_new_tokens: 8, max_pixels: 40000, batch_size: 4}}
        include: [describe]
        watch: [{{path: ./inbox}}]
        rules:
          - name: pdf-json
            match: "*.pdf"
            task: custom
            prompt: "Read page text of $filename."
            output: json
            also: true
    """)
    files = sorted(p for p in inbox.iterdir())
    done = run_vlwatch("process", "--config", config, *files)
    assert done.returncode == 0, done.stderr
    for f in files:
        assert (inbox / f"{f.name}.describe.md").is_file(), (f.name, done.stderr)
    scan = (inbox / "scan.tif.describe.md").read_text()
    assert [line for line in scan.splitlines() if line.startswith("## Page")] == ["## Page 1", "## Page 2", "## Page 3"]
    letter = (inbox / "letter.pdf.describe.md").read_text()
    assert "## Page 1" in letter and "## Page 2" in letter and "## Page 3" not in letter
    assert "## Page" not in (inbox / "shot.png.describe.md").read_text()
    doc = json.loads((inbox / "letter.pdf.pdf-json.json").read_text())
    assert [p["page"] for p in doc["pages"]] == [1, 2] and doc["size"] == [472, 611]


def test_rule_formats_and_pages_end_to_end(formats_dir: Path, tiny_model: Path) -> None:
    inbox = formats_dir
    config = write_config(inbox.parent, f"""
        model: {{name: {tiny_model}, max_new_tokens: 6, max_pixels: 30000}}
        watch: [{{path: ./inbox}}]
        rules:
          - name: tail
            task: ocr
            formats: [tif, pdf]
            pages: "2-"
    """)
    done = run_vlwatch("process", "--config", config, inbox / "scan.tif", inbox / "letter.pdf", inbox / "shot.png")
    assert done.returncode == 1
    assert f"{inbox / 'shot.png'}: is PNG, which this rule does not take (formats: tiff, pdf)" in done.stderr
    assert not (inbox / "shot.png.tail.md").exists()
    scan = (inbox / "scan.tif.tail.md").read_text()
    assert "## Page 2" in scan and "## Page 3" in scan and "## Page 1" not in scan
    letter = (inbox / "letter.pdf.tail.md").read_text()
    assert "## Page 2" in letter and "## Page 1" not in letter  # a page picked from a longer file says which
    explained = run_vlwatch("explain", "--config", config, inbox / "scan.tif")
    assert "takes: formats tiff, pdf; pages 2-" in explained.stdout


def _peak_rss_mb(*args: str | os.PathLike[str]) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run `vlwatch ARGS` as the only child of a fresh interpreter and return its peak RSS."""
    code = ("import resource, subprocess, sys\n"
            "done = subprocess.run([sys.executable, '-m', 'daemon', *sys.argv[1:]])\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, file=sys.stderr)\n"
            "sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    peak = int(done.stderr.rsplit("PEAK ", 1)[1].split()[0])
    return peak, done


def test_12000x9000_scan_within_max_pixels_and_bounded_memory(tmp_path: Path, tiny_model: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    big = Image.linear_gradient("L").resize((12000, 9000)).convert("RGB")
    ImageDraw.Draw(big).rectangle((1000, 1000, 5000, 4000), fill=(200, 30, 30))
    big.save(inbox / "scan.png", compress_level=1)
    big.save(inbox / "scan.jpg", quality=80)
    del big
    _save(inbox / "small.png", _picture())
    config = write_config(tmp_path, f"""
        model: {{name: {tiny_model}, max_new_tokens: 4, max_pixels: 1003520}}
        include: [ocr]
        watch: [{{path: ./inbox}}]
    """)
    baseline, done = _peak_rss_mb("process", "--config", config, inbox / "small.png")
    assert done.returncode == 0, done.stderr
    for name in ("scan.png", "scan.jpg"):
        peak, done = _peak_rss_mb("-vv", "process", "--config", config, inbox / name)
        assert done.returncode == 0, done.stderr
        assert (inbox / f"{name}.ocr.md").is_file()
        assert f"{inbox / name}: page 1: 12000x9000 shown as 1148x840" in done.stderr  # 964320 <= max_pixels
        print(f"{name}: peak RSS {peak} MB (a small image: {baseline} MB)")
        # One 12000x9000 RGB decode is 309 MiB; the PNG gets that once and no
        # full-size copy after it, the JPEG is decoded at 1/8 scale.
        limit = 450 if name == "scan.png" else 100
        assert peak - baseline < limit, (name, peak, baseline)


def test_ground_on_a_pdf_maps_boxes_to_200_dpi_pixels_and_draws_the_overlay(tmp_path: Path) -> None:
    from daemon.backends import Answer
    from daemon.config_reader import parse_config
    from daemon.engine.worker import Worker
    from daemon.intake.rules import match_file

    class Boxes:
        name = model = "fixed"
        loaded = True

        def generate(self, requests):  # the whole shown page, whatever size it was shown at
            return [Answer('[{"bbox_2d": [0, 0, %d, %d], "label": "page"}]' % r.images[0].size) for r in requests]

        def unload(self) -> None:
            pass

    (tmp_path / "d.pdf").write_bytes(_pages_pdf(2))
    config = parse_config(f"include: [ground]\nwatch: [{{path: {tmp_path}}}]\nmodel: {{max_pixels: 40000}}\n",
                          tmp_path / "c.yaml")
    (outcome,) = Worker(config, Boxes(), threads=1).process(match_file(config, tmp_path / "d.pdf"))
    assert outcome.ok, outcome.error
    doc = json.loads((tmp_path / "d.pdf.ground.json").read_text())
    assert [p["page"] for p in doc["pages"]] == [1, 2]
    assert doc["pages"][1]["size"] == [472, 611] and doc["pages"][1]["boxes"][0]["bbox"] == [0, 0, 472, 611]
    with Image.open(tmp_path / "d.pdf.ground.overlay.png") as overlay:
        assert overlay.size == (472, 611)


def test_smart_resize_copy_matches_qwen_vl_utils() -> None:
    """daemon.images keeps a torch-free copy of smart_resize; pin it to the library's."""
    import random

    from qwen_vl_utils import smart_resize as upstream

    from daemon.pages import smart_resize

    rng = random.Random(7)
    cases = [(2000, 3000, 3136, 1003520), (20, 3000, 3136, 1003520), (1, 199, 3136, 50000), (9000, 12000, 3136, 1003520)]
    cases += [(rng.randint(1, 6000), rng.randint(1, 6000), rng.choice([3136, 12544]), rng.choice([50000, 1003520, 12845056]))
              for _ in range(3000)]
    for h, w, lo, hi in cases:
        try:
            expected = upstream(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        except ValueError:
            try:
                smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
            except ValueError:
                continue
            raise AssertionError(f"{h}x{w}: upstream refuses, copy accepts")
        assert smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi) == expected, (h, w, lo, hi)


def test_images_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from daemon.pages import shown_size; shown_size(3000, 2000, min_pixels=3136, max_pixels=1003520);"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
