"""Sidecar writing: names, atomicity, box mapping to original pixels, overlays."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

from PIL import Image

from daemon.backends import Answer
from daemon.config import Rule
from daemon.pages import shown_size
from daemon.intake.rules import Match
from daemon.intake.sidecars import (
    is_output_name,
    optional_sidecars,
    planned_sidecars,
    sidecar_path,
)
from daemon.outputs import write_result
from daemon.results import PageResult, Result

GROUND = Rule(name="ground", match=("*.png",), task="ground", prompt="p", output="json")
CODE = Rule(name="code", match=("*.png",), task="code", prompt="p", output="html")


def test_boxes_map_from_shown_to_original_pixels(tmp_path: Path) -> None:
    source = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), "white").save(source)
    shown = shown_size(3000, 2000, min_pixels=3136, max_pixels=1003520)
    assert shown == (1204, 812)  # qwen-vl-utils smart_resize: multiples of 28 within max_pixels
    # a box covering the shown image's central quarter, one clamped past the edge,
    # one malformed, one empty after clamping
    text = ('```json\n[{"bbox_2d": [301, 203, 903, 609], "label": "centre"},\n'
            ' {"bbox_2d": [1100, 700, 1250, 900], "label": "edge"},\n'
            ' {"bbox_2d": [1, 2, 3], "label": "bad"},\n'
            ' {"bbox_2d": [1210, 820, 1400, 950], "label": "outside"}]\n```')
    page = PageResult(number=1, answer=Answer(text), original=(3000, 2000), shown=shown)
    match = Match(source, GROUND, tmp_path)
    paths = write_result(Result(match, (page,), backend="transformers", model="m"))
    assert paths == [tmp_path / "big.png.ground.json", tmp_path / "big.png.ground.overlay.png"]
    doc = json.loads(paths[0].read_text())
    assert doc["size"] == [3000, 2000] and doc["shown_size"] == [1204, 812]
    sx, sy = 3000 / 1204, 2000 / 812
    assert doc["boxes"][0] == {"label": "centre", "bbox": [round(301 * sx), round(203 * sy), round(903 * sx), round(609 * sy)]}
    assert doc["boxes"][0]["bbox"] == [750, 500, 2250, 1500]
    assert doc["boxes"][1] == {"label": "edge", "bbox": [round(1100 * sx), round(700 * sy), 3000, 2000]}
    assert len(doc["boxes"]) == 2
    assert any("bad" in w or "length" in w or "4" in w for w in doc["warnings"])
    with Image.open(paths[1]) as overlay:
        assert overlay.size == (3000, 2000)
        assert overlay.getpixel((750, 1000)) != (255, 255, 255)  # the left edge of the centre box is drawn


def test_no_usable_boxes_still_gives_a_sidecar(tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    Image.new("RGB", (100, 80)).save(source)
    page = PageResult(1, Answer("I cannot see any objects.", finished=True), (100, 80), (112, 84))
    overlay = tmp_path / "a.png.ground.overlay.png"
    overlay.write_bytes(b"an overlay from an earlier answer with boxes")
    (path,) = write_result(Result(Match(source, GROUND, tmp_path), (page,), "transformers", "m"))
    doc = json.loads(path.read_text())
    assert doc["boxes"] == [] and doc["raw_answer"] == "I cannot see any objects." and doc["warnings"]
    # issue 11.10: zero boxes, no overlay (and none left over from before)
    assert not overlay.exists()


def test_md_sidecar_ends_with_its_provenance(tmp_path: Path) -> None:
    # issue 11.10: model, rule and time, in a trailing comment out of the text's way
    source = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(source)
    rule = Rule("notes", ("*.png",), "describe", "p", "md")
    page = PageResult(1, Answer("# Title\n\nSome text."), (10, 10), (28, 28))
    (path,) = write_result(Result(Match(source, rule, tmp_path), (page,), "transformers", "Qwen/Some--Model>x"))
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# Title", "", "Some text."]
    assert re.fullmatch(r"<!-- vlwatch: rule notes; model Qwen/Some- -Model\)x; \d{4}-\d\d-\d\dT[\d:]+\+00:00 -->",
                        lines[-1]), lines[-1]
    assert "-->" not in "\n".join(lines[:-1]) and lines[-1].count("--") == 2  # the comment closes only at its end


def test_cut_off_html_is_marked(tmp_path: Path) -> None:
    # issue 11.10: the fallback page (no HTML in the answer) says it was cut off, visibly
    source = tmp_path / "shot.png"
    Image.new("RGB", (10, 10)).save(source)
    cut = PageResult(1, Answer("The page shows a login form with", finished=False), (10, 10), (28, 28))
    (path,) = write_result(Result(Match(source, CODE, tmp_path), (cut,), "transformers", "m"))
    html = path.read_text()
    assert "<!-- vlwatch: the answer was cut off at max_new_tokens -->" in html
    assert "[vlwatch: the answer was cut off" in html and html.index("cut off") < html.lower().index("</body>")
    whole = PageResult(1, Answer("The page shows a login form."), (10, 10), (28, 28))
    (path,) = write_result(Result(Match(source, CODE, tmp_path), (whole,), "transformers", "m"))
    assert "cut off" not in path.read_text()


def test_a_box_stays_visible_on_an_object_of_its_own_colour(tmp_path: Path) -> None:
    # issue 11.10: the outline carries a contrasting rim
    from daemon.outputs import _PALETTE, draw_overlay

    for colour in _PALETTE[:3]:
        rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        source = tmp_path / "same.png"
        Image.new("RGB", (400, 300), rgb).save(source)
        png = draw_overlay(source, [{"label": "x", "bbox": [100, 100, 300, 200]}])
        with Image.open(io.BytesIO(png)) as drawn:
            edge = [drawn.getpixel((x, 150)) for x in range(95, 106)]
        assert any(sum(abs(a - b) for a, b in zip(p, rgb)) > 200 for p in edge), (colour, edge)


def test_html_gets_csp_and_output_dir_mirrors_subfolders(tmp_path: Path) -> None:
    root, out = tmp_path / "watched", tmp_path / "out"
    source = root / "sub" / "shot.png"
    source.parent.mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(source)
    match = Match(source, CODE, root, output_dir=out)
    answer = Answer("Here:\n```html\n<html><head><base href='http://evil/'></head><body><img src='http://evil/x.png'></body></html>\n```")
    (path,) = write_result(Result(match, (PageResult(1, answer, (10, 10), (28, 28)),), "transformers", "m"))
    assert path == out / "sub" / "shot.png.code.html"
    html = path.read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html and "<base" not in html


def test_sidecars_are_not_world_writable_and_honour_umask(tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(source)
    old = os.umask(0o027)
    try:
        (path,) = write_result(Result(Match(source, CODE, tmp_path), (PageResult(1, Answer("x"), (10, 10), (28, 28)),), "t", "m"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_own_outputs_are_recognised() -> None:
    rules = {"ocr", "ground", "code", "invoice-ocr"}
    for name in ["a.png.ocr.md", "a.png.ground.json", "a.png.ground.overlay.png", "x y.jpg.code.html",
                 "scan.tif.invoice-ocr.md", ".vlwatch-0a1b2c3d4e5f.tmp"]:
        assert is_output_name(name, rules), name
    for name in ["a.png", "report.md", "overlay.png", "a.png.other.md", "notes.json"]:
        assert not is_output_name(name, rules), name


def test_planned_sidecars(tmp_path: Path) -> None:
    m = Match(tmp_path / "p.jpg", GROUND, tmp_path)
    assert planned_sidecars(m) == [tmp_path / "p.jpg.ground.json"]
    assert optional_sidecars(m) == [tmp_path / "p.jpg.ground.overlay.png"]  # issue 11.10: only with boxes
    assert sidecar_path(Match(tmp_path / "p.jpg", CODE, tmp_path), "html") == tmp_path / "p.jpg.code.html"


def test_csp_can_be_switched_off_by_a_rule(tmp_path: Path) -> None:
    from dataclasses import replace

    source = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(source)
    open_rule = replace(CODE, name="code-open", csp=False)
    answer = Answer("```html\n<html><head></head><body>hi</body></html>\n```")
    (path,) = write_result(Result(Match(source, open_rule, tmp_path), (PageResult(1, answer, (10, 10), (28, 28)),), "t", "m"))
    assert "Content-Security-Policy" not in path.read_text()


def test_a_batch_fsyncs_each_sidecar_folder_once_after_its_renames(tmp_path: Path, monkeypatch) -> None:
    # issue 10.21: one folder fsync per batch, not one per sidecar (during a burst each of ours also
    # forced the journal commit of the files still being written there); still after every rename of
    # that folder and before the worker hands the outcomes back to be recorded as done
    import tests.stub_backend  # noqa: F401  registers the "stub" backend
    from daemon import outputs
    from daemon.config_reader import parse_config
    from daemon.engine.worker import Worker
    from daemon.intake.rules import match_file
    from tests.stub_backend import StubBackend

    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    config = parse_config(f"model: {{backend: stub, name: stub-model}}\nstate: {tmp_path}/state.db\n"
                          f"watch: [{{path: {inbox}}}]\n"
                          "rules: [{name: desc, task: custom, prompt: 'Describe $filename', output: md}]\n",
                          tmp_path / "config.yaml")
    files = [inbox / f"a{i}.png" for i in range(6)] + [inbox / "sub" / f"b{i}.png" for i in range(4)]
    for i, f in enumerate(files):
        Image.new("RGB", (40 + i, 30), "white").save(f)
    events: list[tuple[str, str]] = []
    replace, fsync_dir, fsync = os.replace, outputs._fsync_dir, os.fsync
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (events.append(("rename", str(Path(b).parent))),
                                                             replace(a, b))[1])
    monkeypatch.setattr(outputs, "_fsync_dir", lambda d: (events.append(("sync folder", str(d))), fsync_dir(d))[1])
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: (events.append(("fsync", "")), fsync(fd))[1])
    worker = Worker(config, StubBackend(config.model), threads=1)
    try:
        outcomes = worker.process([m for f in files for m in match_file(config, f)])
        assert all(o.ok for o in outcomes) and len(outcomes) == len(files)
        synced = [d for what, d in events if what == "sync folder"]
        assert sorted(synced) == sorted([str(inbox), str(inbox / "sub")])  # once each, not once per sidecar
        last_rename = max(i for i, (what, _) in enumerate(events) if what == "rename")
        assert all(i > last_rename for i, (what, _) in enumerate(events) if what == "sync folder")
        # every sidecar's own bytes, as before (plus the two folders': _fsync_dir calls os.fsync too)
        assert sum(what == "fsync" for what, _ in events) == len(files) + 2
        # one file at a time (the live engine's path) still syncs its folder itself
        events.clear()
        prep = worker.prepare(match_file(config, files[0])[0])
        assert worker.finish(prep, worker.infer([prep])[0], 0.0).ok
        assert [what for what, _ in events] == ["fsync", "rename", "sync folder", "fsync"]
    finally:
        worker.close()


HOSTILE = "red \x1b[31malert\x07 \x1b]0;pwned\x07 csi\x9b2J del\x7f ok\ttab\r\nnext\x00line\x06\x11"


def _controls(data: bytes) -> set[int]:
    text = data.decode("utf-8")
    return {ord(c) for c in text if (ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0}


def test_no_sidecar_carries_control_characters(tmp_path: Path) -> None:
    # issue 27: model text is hostile; sidecars are read with cat
    source = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(source)
    rules = [Rule("notes", ("*.png",), "describe", "p", "md"), CODE,
             Rule("data", ("*.png",), "custom", "p", "json"), GROUND]
    for rule in rules:
        page = PageResult(1, Answer(HOSTILE), (10, 10), (28, 28))
        for path in write_result(Result(Match(source, rule, tmp_path), (page,), "transformers", "m")):
            if path.suffix == ".png":
                continue
            data = path.read_bytes()
            assert _controls(data) == set(), (path.name, _controls(data))
            if rule.output == "md":
                text = data.decode()
                assert "red \ufffd[31malert\ufffd" in text and "ok\ttab\nnext\ufffdline" in text
