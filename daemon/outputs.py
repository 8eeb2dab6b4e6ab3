"""Turn model answers into sidecar files, written atomically.

A sidecar is named ``<image file name>.<rule>.<md|html|json>`` beside the
image, or under the watch's ``output_dir`` mirroring sub-folders; a ``ground``
rule adds ``<image>.<rule>.overlay.png``.  Each is written to a temporary
``.vlwatch-*.tmp`` name in the same folder, fsynced and renamed, so a reader
never sees a partial file and the watcher can recognise (and ignore) both the
temporary names and the finished outputs.

What the model says never fails a job: an answer with no usable boxes still
gives a ``ground`` sidecar (empty list, raw answer kept, a warning logged);
an answer with no HTML still gives a complete ``code`` document.  Nothing the
model says is executed or used as a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from daemon import answers
from daemon.backends import Answer
from daemon.rules import Match

log = logging.getLogger(__name__)

TEMP_PREFIX = ".vlwatch-"
TEMP_SUFFIX = ".tmp"
OVERLAY = "overlay.png"


@dataclass(frozen=True)
class PageResult:
    number: int
    answer: Answer
    original: tuple[int, int]  # (width, height) of the page as decoded
    shown: tuple[int, int]  # (width, height) the model saw


@dataclass(frozen=True)
class Result:
    match: Match
    pages: tuple[PageResult, ...]
    backend: str
    model: str


# ------------------------------------------------------------------ naming


def sidecar_path(match: Match, ext: str) -> Path:
    """Where the sidecar of ``match`` with extension ``ext`` (md, html, json, overlay.png) goes."""
    name = f"{match.path.name}.{match.rule.name}.{ext}"
    if match.output_dir is None:
        return match.path.parent / name
    try:
        sub = match.path.parent.relative_to(match.root)
    except ValueError:
        sub = Path()
    return match.output_dir / sub / name


def planned_sidecars(match: Match) -> list[Path]:
    paths = [sidecar_path(match, match.rule.output)]
    if match.rule.task == "ground":
        paths.append(sidecar_path(match, OVERLAY))
    return paths


def is_output_name(name: str, rule_names: set[str] | frozenset[str]) -> bool:
    """Whether a file name is one of ours: a sidecar, an overlay or a temporary file.

    Checked before any rule sees a file, so the daemon never feeds on itself.
    """
    if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
        return True
    m = _OUTPUT_NAME.match(name)
    return bool(m) and m.group("rule") in rule_names


_OUTPUT_NAME = re.compile(r"^.+\.(?P<rule>[A-Za-z0-9][A-Za-z0-9_.-]*?)\.(?:md|html|json|overlay\.png)$")


# ----------------------------------------------------------------- writing


def write_result(result: Result) -> list[Path]:
    """Write every sidecar of ``result``; return their paths."""
    rule = result.match.rule
    if rule.task == "ground":
        return _write_ground(result)
    if rule.output == "html":
        return [_write_html(result)]
    if rule.output == "json":
        return [_write_json(result)]
    return [_write_markdown(result)]


def _write_markdown(result: Result) -> Path:
    parts = []
    multi = len(result.pages) > 1
    for page in result.pages:
        text = answers.clean_markdown(page.answer.text)
        if not page.answer.finished:
            _warn_truncated(result, page)
            text += "\n<!-- vlwatch: the answer was cut off at max_new_tokens -->\n"
        parts.append(f"## Page {page.number}\n\n{text}" if multi else text)
    path = sidecar_path(result.match, "md")
    atomic_write(path, "\n".join(parts).encode("utf-8"))
    return path


def _write_html(result: Result) -> Path:
    rule, match = result.match.rule, result.match
    bodies = []
    for page in result.pages:
        html = answers.extract_html(page.answer.text, title=match.path.name)
        for w in html.warnings:
            log.warning("%s: %s: %s", match.path, rule.name, w)
        if not page.answer.finished:
            _warn_truncated(result, page)
        bodies.append(html.document)
    # Multi-page inputs are rare for screenshot->code; the first page's page is the sidecar.
    document = bodies[0]
    if rule.csp:
        document = answers.add_csp(document)
    path = sidecar_path(match, "html")
    atomic_write(path, document.encode("utf-8"))
    return path


def _header(result: Result) -> dict[str, object]:
    m = result.match
    first = result.pages[0]
    return {
        "source": m.path.name,
        "size": list(first.original),
        "rule": m.rule.name,
        "task": m.rule.task,
        "backend": result.backend,
        "model": result.model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json(result: Result) -> Path:
    doc = _header(result)
    pages = []
    for page in result.pages:
        pages.append({"page": page.number, "answer": page.answer.text, "data": _json_or_none(page.answer.text),
                      "truncated": not page.answer.finished})
    if len(pages) == 1:
        doc.update({k: v for k, v in pages[0].items() if k != "page"})
    else:
        doc["pages"] = pages
    path = sidecar_path(result.match, "json")
    atomic_write(path, _dump(doc))
    return path


def _write_ground(result: Result) -> list[Path]:
    match = result.match
    doc = _header(result)
    doc["objects"] = match.rule.objects
    pages = []
    for page in result.pages:
        boxes = ground_boxes(page)
        for w in boxes["warnings"]:
            log.warning("%s: %s: %s", match.path, match.rule.name, w)
        if not page.answer.finished:
            _warn_truncated(result, page)
        pages.append({"page": page.number, "size": list(page.original), "shown_size": list(page.shown), **boxes})
    if len(pages) == 1:
        doc.update({k: v for k, v in pages[0].items() if k not in ("page", "size")})
    else:
        doc["pages"] = pages
    path = sidecar_path(match, "json")
    overlay = sidecar_path(match, OVERLAY)
    first_boxes = pages[0]["boxes"]
    atomic_write(overlay, draw_overlay(match.path, first_boxes))
    atomic_write(path, _dump(doc))
    return [path, overlay]


def ground_boxes(page: PageResult) -> dict[str, object]:
    """Boxes of one page in ORIGINAL pixels, with the raw answer and any warnings."""
    parsed = answers.parse_boxes(page.answer.text)
    warnings = list(parsed.warnings)
    boxes = []
    for box in parsed.boxes:
        mapped = answers.map_box(box.bbox, page.shown, page.original)
        if mapped is None:
            warnings.append(f"dropped box {box.label!r}: empty after clamping to the image")
            continue
        boxes.append({"label": box.label, "bbox": list(mapped)})
    if not boxes and not any("no usable" in w for w in warnings):
        warnings.append("the answer held no usable boxes")
    return {"boxes": boxes, "raw_answer": page.answer.text, "warnings": warnings, "truncated": not page.answer.finished}


def draw_overlay(source: Path, boxes: list[dict]) -> bytes:
    """The original image with each box and its label drawn, as PNG bytes."""
    from io import BytesIO

    from daemon.images import open_image, to_rgb

    image = to_rgb(open_image(source))
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 400))
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 60)))
    for i, box in enumerate(boxes):
        colour = _PALETTE[i % len(_PALETTE)]
        x1, y1, x2, y2 = box["bbox"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = str(box["label"])[:60]
        tx, ty = x1 + width, max(0, y1 - font.size - 2 * width)
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(bbox, fill=colour)
        draw.text((tx, ty), label, fill="white", font=font)
    out = BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46a0a0", "#f032e6", "#808000", "#000075"]


def _warn_truncated(result: Result, page: PageResult) -> None:
    log.warning("%s: %s: answer cut off at max_new_tokens (page %d)", result.match.path, result.match.rule.name, page.number)


def _json_or_none(text: str) -> object:
    body = text.strip()
    fenced = re.search(r"```(?:json)?\s*\n(.*?)(?:```|$)", body, re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        return json.loads(body)
    except ValueError:
        return None


def _dump(doc: dict[str, object]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file.

    The temporary file is created with mode 0666 minus the umask (mkstemp's
    0600 would surprise a user sharing the folder), written, fsynced and
    renamed over ``path``; then the folder is fsynced so the rename survives
    a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
