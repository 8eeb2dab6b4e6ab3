"""The bundled ``olmocr`` pack (issue 24): olmOCR-2's prompt and answers, retries, whole documents.

Most tests run the real worker (decoding, sizing, the answer policy, the
sidecar writer) on real PDFs in tmp_path, with ``tests/olmocr_backend.py``: a
plugin backend, registered like any backend, that answers like olmOCR-2 from
the colour of the page it is shown (valid, rotated, valid only when hot,
never valid, failing).  One test runs the daemon on the tiny random-weight
checkpoint, whose answers are never valid: every page must fall back cleanly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from daemon.answers.frontmatter import PageFrontMatter, parse_page
from daemon.config_reader import load_config
from daemon.engine.worker import Worker
from daemon.errors import ConfigError
from daemon.intake.rules import match_file
from tests.conftest import Daemon, REPO, run_vlwatch, write_config
from tests.olmocr_backend import OlmocrStub, front, page_pdf

LADDER = [0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0]


def split(sidecar: Path) -> tuple[dict, str]:
    """The document front matter and the body of an olmocr sidecar."""
    text = sidecar.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def run_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pages: list[tuple[str, str | None]],
             rule_extra: str = "") -> tuple[Path, list[dict], object]:
    """Write a PDF of ``pages``, run it through the olmocr rule with the stub; (sidecar, request log, outcome)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "doc.pdf").write_bytes(page_pdf(pages))
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("VLWATCH_OLMOCR_LOG", str(log))
    rules = "include: [olmocr]" if not rule_extra else (
        "rules: [{name: olmocr-own, task: ocr, answers: olmocr, max_new_tokens: 8000, prompt: 'Read $filename.'"
        + rule_extra + "}]")
    config = load_config(write_config(tmp_path, f"""
        model: {{backend: olmocr-stub, name: stub-olmocr}}
        state: ./state.db
        watch: [{{path: ./inbox}}]
        {rules}
    """))
    worker = Worker(config, OlmocrStub(config.model), threads=1)
    try:
        [outcome] = worker.process(match_file(config, inbox / "doc.pdf"))
    finally:
        worker.close()
    assert outcome.ok, outcome.error
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    return outcome.sidecars[0], requests, outcome


def by_colour(requests: list[dict], name: str) -> list[dict]:
    return [r for r in requests if r["colour"] == name]


# ------------------------------------------------------------ the answers


def test_front_matter_is_parsed_and_checked_as_olmocr_does() -> None:
    got = parse_page(front(table=True) + "Hello\n\n<table></table>\n")
    assert got.valid and got.text == "Hello\n\n<table></table>"
    assert got.front_matter == PageFrontMatter("en", True, 0, True, False)
    # olmOCR's FrontMatterParser takes "true"/"false" strings and numeric strings
    loose = parse_page("---\nprimary_language: null\nis_rotation_valid: 'false'\nrotation_correction: '90'\n"
                       "is_table: false\nis_diagram: true\n---\n")
    assert loose.front_matter == PageFrontMatter(None, False, 90, False, True) and loose.text == ""
    # YAML 1.1 reads Norwegian's code as false: it stays "no"
    assert parse_page(front(language="no") + "Hei").front_matter.primary_language == "no"
    bad = {
        "just text": "does not start with a YAML front matter",
        "---\nprimary_language: en\n": "never closed",
        "---\n[unclosed\n---\ntext": "not YAML",
        "---\n- a list\n---\n": "not a mapping",
        front().replace("is_table: False\n", ""): "lacks is_table",
        front().replace("---\n", "---\nconfidence: 0.9\n", 1): "unexpected fields: confidence",
        front(rotation=45): "rotation_correction is not 0, 90, 180 or 270",
        front().replace("is_diagram: False", "is_diagram: maybe"): "is_diagram not true or false",
        front(language='"en\\n---\\nx: 1"'): "primary_language is not a language code",
        "---\n" + "a: b\n" * 1000 + "---\n": "longer than",
    }
    for answer, why in bad.items():
        parsed = parse_page(answer)
        assert not parsed.valid and parsed.front_matter is None and why in parsed.problem, (answer[:40], parsed.problem)


# ------------------------------------------------------------ the pack, page by page


def test_every_kind_of_page_ends_in_one_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar, requests, outcome = run_pack(tmp_path, monkeypatch, [
        ("red", "red layer"), ("green", None), ("blue", None), ("grey", "Grey text layer"), ("yellow", None)])
    assert sidecar.name == "doc.pdf.olmocr.md"

    # olmOCR's request: its prompt before the page, 8000 new tokens, longest side 1288
    assert all(r["prompt_first"] and r["max_new_tokens"] == 8000 for r in requests)
    assert by_colour(requests, "red")[0]["size"] == [1288, 868]
    assert [r["temperature"] for r in by_colour(requests, "red")] == [0.1]
    # the rotated page was asked again turned by 90 degrees: the marker moved, the sides swapped
    green = by_colour(requests, "green")
    assert [(r["size"], r["marker"]) for r in green] == [([1288, 868], "top-left"), ([868, 1288], "bottom-left")]
    # temperatures rise along olmOCR's ladder until an answer is valid, or the ladder ends
    assert [r["temperature"] for r in by_colour(requests, "blue")] == LADDER[:4]
    assert [r["temperature"] for r in by_colour(requests, "grey")] == LADDER
    assert [r["temperature"] for r in by_colour(requests, "yellow")] == LADDER

    meta, body = split(sidecar)
    assert meta["source"] == "doc.pdf" and meta["pages"] == 5 and meta["rule"] == "olmocr"
    assert meta["primary_languages"] == ["en", "de"]
    assert meta["rotated_pages"] == {2: 90}
    assert meta["table_pages"] == [1] and meta["diagram_pages"] == []
    assert meta["fallback_pages"] == [4]
    [missing] = meta["missing_pages"]
    assert missing["page"] == 5 and "rejected the request" in missing["reason"] and "no text layer" in missing["reason"]
    # the pages' text in order; no page's own front matter in the body
    order = [body.index(t) for t in ("Text of the red page", "Text of the green page", "Text of the blue page",
                                     "Grey text layer", "page 5 missing")]
    assert order == sorted(order)
    assert "primary_language" not in body and "sideways" not in body and "red layer" not in body
    assert "<!-- page 4: from the PDF's text layer, not the model" in body
    assert "<table><tr><td>1</td></tr></table>" in body  # olmOCR's HTML tables are kept (bare tags only)
    # the job's record says which pages have no answer of the model, and why
    assert "page 4: no valid answer in 8 tries" in outcome.note and "page 5:" in outcome.note


def test_the_ladder_is_configurable_and_a_valid_answer_ends_the_retries(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar, requests, outcome = run_pack(tmp_path, monkeypatch, [("grey", "only text"), ("blue", None)],
                                          ", temperatures: [0, 0.7]")
    assert [r["temperature"] for r in by_colour(requests, "grey")] == [0.0, 0.7]
    assert [r["temperature"] for r in by_colour(requests, "blue")] == [0.0, 0.7]  # valid at 0.7: no third
    meta, body = split(sidecar)
    assert meta["fallback_pages"] == [1] and meta["missing_pages"] == []
    assert body.index("only text") < body.index("Text of the blue page")
    assert "page 1: no valid answer in 2 tries" in outcome.note and "page 2" not in outcome.note


def test_an_image_with_no_valid_answer_is_missing_not_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from tests.olmocr_backend import COLOURS

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.new("RGB", (400, 300), COLOURS["grey"]).save(inbox / "scan.png")
    config = load_config(write_config(tmp_path, """
        model: {backend: olmocr-stub, name: stub-olmocr}
        state: ./state.db
        include: [olmocr]
        watch: [{path: ./inbox}]
    """))
    worker = Worker(config, OlmocrStub(config.model), threads=1)
    try:
        [outcome] = worker.process(match_file(config, inbox / "scan.png"))
    finally:
        worker.close()
    assert outcome.ok
    meta, body = split(inbox / "scan.png.olmocr.md")
    assert meta["pages"] == 1 and meta["fallback_pages"] == []
    assert meta["missing_pages"][0]["page"] == 1 and "no text layer" in meta["missing_pages"][0]["reason"]


def test_a_failing_page_does_not_lose_the_others_under_any_rule(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "doc.pdf").write_bytes(page_pdf([("red", None), ("yellow", None), ("blue", None)]))
    (inbox / "one.pdf").write_bytes(page_pdf([("yellow", None)]))
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("VLWATCH_OLMOCR_LOG", str(log))
    config = load_config(write_config(tmp_path, """
        model: {backend: olmocr-stub, name: stub-olmocr}
        state: ./state.db
        watch: [{path: ./inbox}]
        rules:
          - {name: text, task: ocr, prompt: "Read it.", also: true}
          - {name: data, task: custom, output: json, prompt: "Read it."}
    """))
    worker = Worker(config, OlmocrStub(config.model), threads=1)
    try:
        outcomes = worker.process(match_file(config, inbox / "doc.pdf") + match_file(config, inbox / "one.pdf"))
    finally:
        worker.close()
    doc_md, doc_json, one_md, one_json = outcomes
    assert doc_md.ok and doc_json.ok
    md = (inbox / "doc.pdf.text.md").read_text()
    assert md.index("## Page 1") < md.index("Text of the red page") < md.index("## Page 2") \
        < md.index("*[vlwatch: this page is missing: the request failed 2 times: the model rejected") \
        < md.index("## Page 3") < md.index("I think this page says: blue")
    pages = json.loads((inbox / "doc.pdf.data.json").read_text())["pages"]
    assert [p["page"] for p in pages] == [1, 2, 3] and pages[1]["answer"] is None
    assert "the model rejected the request" in pages[1]["missing"] and "blue" in pages[2]["answer"]
    assert "page 2: the request failed 2 times" in doc_md.note
    # each failing page was tried twice (both rules), the others once each
    tried = [json.loads(line)["colour"] for line in log.read_text().splitlines()]
    assert tried.count("yellow") == 2 * 2 + 1 * 2 and tried.count("red") == 2
    # a file with no page answered fails as a whole (and is retried by the queue), as before
    assert not one_md.ok and "the model rejected the request" in one_md.error
    assert not (inbox / "one.pdf.text.md").exists()


def test_config_checks_the_answer_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        model: {backend: olmocr-stub, name: x}
        rules:
          - {name: a, task: ocr, temperatures: [0.1]}
          - {name: b, task: ocr, answers: olmocr, temperatures: [0.1, 3], longest_side: 0}
          - {name: c, task: ocr, output: json, answers: olmocr}
          - {name: d, task: ocr, answers: tesseract}
    """)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "rules[0].temperatures: retries need a way to tell a bad answer" in text
    assert "rules[1].temperatures: expected a temperature from 0 to 2, got 3" in text
    assert "rules[1].longest_side" in text
    assert "rules[2].answers: olmocr answers make one Markdown document" in text
    assert "rules[3].answers" in text


def test_the_retry_keys_are_part_of_the_recipe_and_change_no_other_rule(tmp_path: Path) -> None:
    from daemon.intake.recipes import recipe_of

    def recipe(rule: str) -> str:
        config = load_config(write_config(tmp_path, f"""
            model: {{backend: olmocr-stub, name: m}}
            rules: [{rule}]
        """))
        return recipe_of(config, match_file(config, tmp_path / "a.pdf")[0])

    base = "{name: r, task: ocr, prompt: 'Read.'"
    olmocr = base + ", answers: olmocr"
    assert recipe(olmocr + "}") != recipe(olmocr + ", temperatures: [0.1, 0.2]}") != recipe(base + "}")
    assert recipe(olmocr + "}") != recipe(olmocr + ", longest_side: 1000}")
    # a rule without them keeps the recipe it had before they existed (its sidecars stay current)
    assert recipe(base + "}") == "r1:29c079e314d1c84d"


def test_the_pack_and_its_model_are_known(tmp_path: Path) -> None:
    prompt = yaml.safe_load((REPO / "rules" / "olmocr.yaml").read_text())["rules"][0]["prompt"]
    assert prompt.startswith("Attached is one page of a document that you must process. Just return the plain")
    assert prompt.endswith("primary_language, is_rotation_valid, rotation_correction, is_table, and is_diagram "
                           "parameters.")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.pdf").write_bytes(page_pdf([("red", None)]))
    config = write_config(tmp_path, """
        model: {backend: openai, name: allenai/olmOCR-2-7B-1025, base_url: "http://127.0.0.1:9/v1"}
        include: [olmocr]
        watch: [{path: ./in}]
    """)
    done = run_vlwatch("explain", "--config", config, tmp_path / "in" / "scan.pdf")
    assert done.returncode == 0, done.stderr
    assert "answers: olmocr (the prompt before the page; each page tried at temperatures 0.1, 0.1, 0.2, 0.3, " \
           "0.5, 0.8, 0.9, 1 until valid; pages at longest side 1288px)" in done.stdout
    assert f"writes: {tmp_path / 'in' / 'scan.pdf.olmocr.md'}" in done.stdout
    done = run_vlwatch("pull", "allenai/olmOCR-2-7B-1025", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot reach the Hugging Face hub to download 'allenai/olmOCR-2-7B-1025'" in done.stderr


# ------------------------------------------------------------ the real engine


def test_tiny_checkpoint_runs_the_pack_in_the_daemon_and_falls_back(tmp_path: Path, tiny_model: Path) -> None:
    # The pack's own rule, with what a CPU can afford: 2 tries of 6 tokens on small pages.
    pack = yaml.safe_load((REPO / "rules" / "olmocr.yaml").read_text())["rules"][0]
    rule = {**pack, "name": "olmocr-tiny", "max_new_tokens": 6, "temperatures": [0.1, 0.8], "longest_side": 224,
            "max_pixels": 224 * 224}
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model), "device": "cpu", "max_pixels": 50000},
        "state": "./state/state.db", "watch": [{"path": "./inbox", "settle": "0.5s"}], "rules": [rule],
        "jobs": {"batch_wait": "0.2s", "backoff": "1s"}}))
    d = Daemon(tmp_path, config)
    try:
        d.start()
        doc = inbox / "doc.pdf"
        doc.write_bytes(page_pdf([("red", "First page words"), ("grey", None)]))
        job = d.wait_done(doc, "olmocr-tiny")
        meta, body = split(inbox / "doc.pdf.olmocr-tiny.md")
        assert meta["pages"] == 2 and meta["fallback_pages"] == [1]
        assert [m["page"] for m in meta["missing_pages"]] == [2]
        assert "First page words" in body and "page 2 missing" in body
        assert job.error is not None and "page 1: no valid answer in 2 tries" in job.error
        rc, _ = d.stop()
        assert rc == 0, d.log()[-3000:]
    finally:
        d.close()

