"""`vlwatch process`, `explain` and `pull` end to end on the tiny Qwen2.5-VL checkpoint.

These run the real command as a subprocess: config loading, rule matching,
qwen-vl-utils sizing, `from_pretrained`, the chat template, `generate` and
the sidecar writers.  The weights are random, so the text is gibberish; what
is checked is that each sidecar kind is complete and well-formed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_vlwatch, write_config


@pytest.fixture
def workspace(tmp_path: Path, tiny_model: Path) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.new("RGB", (420, 300), (200, 40, 40)).save(inbox / "shot.png")
    Image.new("RGB", (300, 500), (40, 40, 200)).save(inbox / "page one.jpg")
    config = write_config(tmp_path, f"""
        model: {{name: {tiny_model}, max_new_tokens: 12, max_pixels: 60000}}
        include: [ocr, describe, ground, code]
        watch: [{{path: ./inbox}}]
    """)
    return inbox, config


def test_each_task_writes_its_sidecar(workspace: tuple[Path, Path], tiny_model: Path) -> None:
    inbox, config = workspace
    shot = inbox / "shot.png"
    for rule in ("ocr", "describe", "ground", "code"):
        done = run_vlwatch("process", "--config", config, "--rule", rule, shot)
        assert done.returncode == 0, done.stderr
    md = (inbox / "shot.png.ocr.md").read_text()
    assert md == "" or md.endswith("\n")
    assert (inbox / "shot.png.describe.md").exists()

    ground = json.loads((inbox / "shot.png.ground.json").read_text())
    assert ground["source"] == "shot.png" and ground["size"] == [420, 300]
    assert ground["rule"] == "ground" and ground["model"] == str(tiny_model) and ground["backend"] == "transformers"
    assert isinstance(ground["boxes"], list) and "raw_answer" in ground
    w, h = ground["shown_size"]
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 60000
    # issue 11.10: the overlay exists only when the (random-weight) answer held boxes
    assert (inbox / "shot.png.ground.overlay.png").exists() == bool(ground["boxes"])
    if ground["boxes"]:
        with Image.open(inbox / "shot.png.ground.overlay.png") as overlay:
            assert overlay.size == (420, 300)

    html = (inbox / "shot.png.code.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html>") and html.rstrip().lower().endswith("</html>")
    assert 'http-equiv="Content-Security-Policy"' in html
    # the sidecars were printed, one per line
    assert not list(inbox.glob(".vlwatch-*"))  # no temp files left behind


def test_first_matching_rule_and_stdout(workspace: tuple[Path, Path]) -> None:
    inbox, config = workspace
    done = run_vlwatch("process", "--config", config, inbox / "shot.png", inbox / "page one.jpg")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(inbox / "shot.png.ocr.md"), str(inbox / "page one.jpg.ocr.md")]


def test_a_bad_file_fails_alone(workspace: tuple[Path, Path]) -> None:
    inbox, config = workspace
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (inbox / "notes.txt").write_text("hello")
    done = run_vlwatch("process", "--config", config, inbox / "broken.png", inbox / "shot.png",
                       inbox / "notes.txt", inbox / "absent.png")
    assert done.returncode == 1
    assert (inbox / "shot.png.ocr.md").exists()
    assert not (inbox / "broken.png.ocr.md").exists()
    err = done.stderr
    assert f"{inbox / 'broken.png'}" in err and "no rule matches" in err and "absent.png: no such file" in err
    assert (inbox / "broken.png").read_bytes() == b"\x89PNG\r\n\x1a\nnot really"  # left untouched


def test_unknown_rule_is_usage_error(workspace: tuple[Path, Path]) -> None:
    inbox, config = workspace
    done = run_vlwatch("process", "--config", config, "--rule", "nope", inbox / "shot.png")
    assert done.returncode == 2 and "no rule named 'nope'" in done.stderr


def test_missing_model_says_how_to_get_it(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    config = write_config(tmp_path, "model: {name: Qwen/Qwen2.5-VL-7B-Instruct}\ninclude: [ocr]\n")
    done = run_vlwatch("process", "--config", config, tmp_path / "a.png")
    assert done.returncode == 1
    assert "vlwatch pull Qwen/Qwen2.5-VL-7B-Instruct" in done.stderr and "local directory" in done.stderr
    assert not (tmp_path / "a.png.ocr.md").exists()


def test_explain_shows_rule_prompt_and_paths(workspace: tuple[Path, Path]) -> None:
    inbox, config = workspace
    done = run_vlwatch("explain", "--config", config, inbox / "shot.png")
    assert done.returncode == 0, done.stderr
    assert "rule ocr (" in done.stdout and "task ocr -> md" in done.stdout
    assert "Read all the text in this image (shot.png)" in done.stdout  # the rendered prompt
    assert f"writes: {inbox / 'shot.png.ocr.md'}" in done.stdout
    (inbox / "readme.txt").write_text("not an image")
    done = run_vlwatch("explain", "--config", config, inbox / "readme.txt")
    assert done.returncode == 1 and "no rule matches" in done.stdout


def test_pull_without_network_is_a_clear_error(tmp_path: Path) -> None:
    done = run_vlwatch("pull", "Qwen/Qwen2.5-VL-7B-Instruct", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    assert "cannot reach the Hugging Face hub" in done.stderr and "Traceback" not in done.stderr
