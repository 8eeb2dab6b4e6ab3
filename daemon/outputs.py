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
model says is executed or used as a path, and no answer can make a writer
raise: JSON nested past any stack is kept as text only, and lone surrogates
(a server's ``\udcff`` escapes) are written as U+FFFD.

Where a sidecar may go (issue 6): only inside the watch root (beside the
image) or the watch's ``output_dir``.  The name is built from the image's own
file name and the rule name (a plain word, checked by the config loader), so
it has no ``/`` to climb with; the folder is checked twice before writing:
lexically (``..``) and physically, folder by folder, so a sub-folder that is
a symlink pointing out of the allowed tree is refused rather than written
through.  Sidecars are created mode 0664 minus the umask (never
world-writable) and never more readable than their source image: the OCR of
a private scan stays private.  Accepted risk: a folder swapped for a symlink
between the check and the rename; the temporary file is opened with
``O_NOFOLLOW`` and renamed within one folder, which narrows that to folders
the attacker can already write.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
from datetime import datetime, timezone
from pathlib import Path

from PIL import ImageDraw, ImageFont

from daemon import answers
from daemon.controls import for_file
from daemon.documents import document_markdown
from daemon.errors import VlwatchError
from daemon.errors import printable
from daemon.intake.rules import Match
from daemon.results import PageResult, Result, missing

# Naming (what a sidecar is called, whether a name is ours) lives in daemon.intake.sidecars.
from daemon.intake.sidecars import OVERLAY, _lexical, sidecar_path, temp_name

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ naming


def checked_sidecar_path(match: Match, ext: str) -> Path:
    """``sidecar_path``, once its folder is known to lie inside the allowed tree (and exists).

    Raises:
        VlwatchError: the folder is, or leads through a symlink to, a place
            outside the watch root (or ``output_dir``).
    """
    path = sidecar_path(match, ext)
    base = _lexical(match.output_dir if match.output_dir is not None else match.root)
    folder = path.parent
    if folder != base and base not in folder.parents:
        raise _outside(match, folder, folder, base)
    _make_folder(base)
    real_base = Path(os.path.realpath(base))
    current = base
    for part in folder.relative_to(base).parts:
        current = current / part
        try:
            os.mkdir(current, 0o775)
        except FileExistsError:
            pass
        real = Path(os.path.realpath(current))
        if real != real_base and real_base not in real.parents:
            raise _outside(match, current, real, base)
    return path


def _outside(match: Match, folder: Path, real: Path, base: Path) -> VlwatchError:
    via = "" if real == folder else f" (it leads to {printable(real)})"
    return VlwatchError(f"{printable(match.path)}: refusing to write a sidecar into {printable(folder)}{via}: "
                        f"outside {printable(base)}; a symlinked folder? set output_dir to write elsewhere")


def _make_folder(folder: Path) -> None:
    """``mkdir -p`` with 0775 at every level (pathlib's makes parents 0777 minus umask)."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        try:
            os.mkdir(f, 0o775)
        except FileExistsError:
            pass


# ----------------------------------------------------------------- writing


class FolderSyncs:
    """Folders whose renames are still to be made durable: one ``fsync`` each for a whole batch.

    ``atomic_write`` fsyncs the folder after each rename so that the rename
    survives a power cut.  A batch of sidecars in one folder needs that only
    once, after the last rename and before any of their jobs is recorded as
    done: the folder's fsync makes every rename in it durable (issue 10.21:
    during a burst, each fsync of ours also forced the journal commit of the
    files still being written into that folder).  The worker's batch path
    (``Worker.process``) gathers its renames here and syncs them before it
    returns, and the engine records the outcomes only after that.
    """

    def __init__(self) -> None:
        self._folders: dict[Path, None] = {}  # insertion-ordered set

    def add(self, folder: Path) -> None:
        self._folders[folder] = None

    def __len__(self) -> int:
        return len(self._folders)

    def sync(self) -> None:
        """fsync every folder gathered so far (at most once each), and forget them."""
        folders, self._folders = list(self._folders), {}
        for folder in folders:
            _fsync_dir(folder)


def write_result(result: Result, folders: FolderSyncs | None = None) -> list[Path]:
    """Write every sidecar of ``result``; return their paths.

    Args:
        folders: given, the folders of the renames are left for the caller to
            fsync (``FolderSyncs.sync``) before the job is recorded as done;
            otherwise each is fsynced here.
    """
    rule = result.match.rule
    if rule.answers == "olmocr":
        return [_write_document(result, folders)]
    if rule.task == "ground":
        return _write_ground(result, folders)
    if rule.output == "html":
        return [_write_html(result, folders)]
    if rule.output == "json":
        return [_write_json(result, folders)]
    return [_write_markdown(result, folders)]


def _write_markdown(result: Result, folders: FolderSyncs | None = None) -> Path:
    parts = []
    multi = _paged(result)
    for page in result.pages:
        if (why := missing(page)) is not None:  # the page's request failed: the others are kept (issue 24)
            parts.append(f"## Page {page.number}\n\n*[vlwatch: this page is missing: "
                         f"{_inert_markdown(_one_line(why), False)}]*\n")
            continue
        text = _inert_markdown(answers.clean_markdown(page.answer.text), result.match.rule.raw_html)
        if not page.answer.finished:
            _warn_truncated(result, page)
            text += "\n<!-- vlwatch: the answer was cut off at max_new_tokens -->\n"
        if getattr(page.answer, "looped", False):  # issue 12.4
            text += "\n<!-- vlwatch: the model kept repeating itself; stopped early (a retry looped too) -->\n"
        parts.append(f"## Page {page.number}\n\n{text}" if multi else text)
    parts.append(provenance_comment(result))
    path = checked_sidecar_path(result.match, "md")
    atomic_write(path, _utf8("\n".join(parts)), like=result.match.path, folders=folders)
    return path


def _write_document(result: Result, folders: FolderSyncs | None = None) -> Path:
    """A whole document read with olmOCR-2 answers: one front matter, the pages' text (issue 24)."""
    text = document_markdown(result, result.roots) + "\n" + provenance_comment(result)
    path = checked_sidecar_path(result.match, "md")
    atomic_write(path, _utf8(text), like=result.match.path, folders=folders)
    return path


def _one_line(text: str) -> str:
    return " ".join(_text(text).split())[:500]


def _inert_markdown(text: str, raw_html: bool) -> str:
    """The model's Markdown with its raw HTML escaped, unless the rule says ``raw_html: true`` (issue 10.14)."""
    return text if raw_html else answers.escape_raw_html(text)


def provenance_comment(result: Result) -> str:
    """The last line of a ``.md`` sidecar: which rule, model and engine options made it, and when (issue 11.10).

    An HTML comment, so it shows in no rendered view and sits after the
    text, out of the way of anyone who only wants the answer (``head -n -1``,
    or ``sed '$d'``, drops it).  Nothing in it can close the comment early.
    """
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    engine = f"{result.engine}; " if result.engine else ""
    fields = f"rule {result.match.rule.name}; model {result.model}{_quantized(result)}; {engine}{when}"
    return f"<!-- vlwatch: {_comment_safe(fields)} -->\n"


def _quantized(result: Result) -> str:
    return f" ({result.quantization})" if result.quantization else ""


def _comment_safe(text: str) -> str:
    # "--" may not appear inside an HTML comment, and ">" could end it early in lax parsers.
    return _text(text).replace("--", "- -").replace(">", ")").replace("\n", " ")


def _write_html(result: Result, folders: FolderSyncs | None = None) -> Path:
    rule, match = result.match.rule, result.match
    bodies = []
    for page in result.pages:
        if missing(page) is not None:
            continue
        html = answers.extract_html(page.answer.text, title=_text(match.path.name),
                                     csp=answers.CSP if rule.csp else None)
        for w in html.warnings:
            log.warning("%s: %s: %s", match.path, rule.name, w)
        document = html.document
        if not page.answer.finished or html.truncated:
            _warn_truncated(result, page)
            document = mark_cut_off(document, visible=not html.found_html)
        bodies.append(document)
    # Multi-page inputs are rare for screenshot->code; the first page answered is the sidecar.
    if not bodies:
        raise VlwatchError(f"{printable(match.path)}: no page has an answer")
    document = bodies[0]
    if result.engine:
        # What made it, as a .md sidecar's last line: a comment (nothing renders it) just inside the
        # closing </html>, so the file stays one complete document.
        document = _before_closing_html(document.rstrip("\n"), provenance_comment(result))
    path = checked_sidecar_path(match, "html")
    atomic_write(path, _utf8(document), like=match.path, folders=folders)
    return path


def _before_closing_html(document: str, comment: str) -> str:
    end = document.lower().rfind("</html>")
    if end < 0:
        return document + "\n" + comment
    return document[:end].rstrip("\n") + "\n" + comment + "\n" + document[end:]


CUT_OFF_COMMENT = "<!-- vlwatch: the answer was cut off at max_new_tokens -->"


def mark_cut_off(document: str, *, visible: bool) -> str:
    """Mark an HTML sidecar whose answer was cut off (issue 11.10).

    Always a comment before ``</body>``, as the Markdown sidecars have; and
    when the page only shows the answer as text (no HTML in it), a visible
    line too, since a reader of that page would otherwise take it as whole.
    """
    note = CUT_OFF_COMMENT
    if visible:
        note += ('\n<p style="font-style: italic; color: #a00">[vlwatch: the answer was cut off at '
                 'max_new_tokens; what came before is shown above]</p>')
    at = document.lower().rfind("</body>")
    if at < 0:
        return f"{document}\n{note}\n"
    return f"{document[:at]}{note}\n{document[at:]}"


def _header(result: Result) -> dict[str, object]:
    m = result.match
    first = result.pages[0]
    return {
        "source": _text(m.path.name),
        "size": list(first.original),
        "rule": m.rule.name,
        "task": m.rule.task,
        "backend": result.backend,
        "model": result.model,
        **({"quantization": result.quantization} if result.quantization else {}),
        **({"engine": result.engine} if result.engine else {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json(result: Result, folders: FolderSyncs | None = None) -> Path:
    doc = _header(result)
    pages = []
    for page in result.pages:
        if (why := missing(page)) is not None:
            pages.append({"page": page.number, "answer": None, "data": None, "missing": _one_line(why)})
            continue
        pages.append({"page": page.number, "answer": page.answer.text, "data": _json_or_none(page.answer.text),
                      "truncated": not page.answer.finished, "looped": bool(getattr(page.answer, "looped", False))})
    if not _paged(result):
        doc.update({k: v for k, v in pages[0].items() if k != "page"})
    else:
        doc["pages"] = pages
    path = checked_sidecar_path(result.match, "json")
    atomic_write(path, _dump(doc), like=result.match.path, folders=folders)
    return path


def _write_ground(result: Result, folders: FolderSyncs | None = None) -> list[Path]:
    match = result.match
    doc = _header(result)
    doc["objects"] = match.rule.objects
    pages = []
    for page in result.pages:
        if (why := missing(page)) is not None:
            pages.append({"page": page.number, "size": list(page.original), "shown_size": list(page.shown),
                          "boxes": [], "missing": _one_line(why)})
            continue
        boxes = ground_boxes(page)
        for w in boxes["warnings"]:
            log.warning("%s: %s: %s", match.path, match.rule.name, w)
        if not page.answer.finished:
            _warn_truncated(result, page)
        pages.append({"page": page.number, "size": list(page.original), "shown_size": list(page.shown), **boxes})
    if not _paged(result):
        doc.update({k: v for k, v in pages[0].items() if k not in ("page", "size")})
    else:
        doc["pages"] = pages
    path = checked_sidecar_path(match, "json")
    overlay = checked_sidecar_path(match, OVERLAY)
    first_boxes = pages[0]["boxes"]
    written = [path]
    if first_boxes:
        # Before the JSON: the JSON sidecar is what says the job is complete.  Its
        # folder is synced at once (not deferred), so it is durable before the JSON's rename.
        atomic_write(overlay, draw_overlay(match.path, first_boxes), like=match.path)
        written.append(overlay)
    else:
        # Nothing to draw: no overlay (issue 11.10), nor one left from an earlier answer.
        overlay.unlink(missing_ok=True)
    atomic_write(path, _dump(doc), like=match.path, folders=folders)
    return written


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
    return {"boxes": boxes, "raw_answer": page.answer.text, "warnings": warnings, "truncated": not page.answer.finished,
            "looped": bool(getattr(page.answer, "looped", False))}


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
        # A rim of the contrasting shade on both sides of the coloured line, so
        # a box stays visible on an object of its own colour (issue 11.10).
        rim = _contrast(colour)
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=rim, width=width + 2)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = str(box["label"])[:60]
        tx, ty = x1 + width, max(0, y1 - font.size - 2 * width)
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(bbox, fill=colour)
        draw.text((tx, ty), label, fill="white", font=font)
    out = BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _contrast(colour: str) -> str:
    """Black for a light colour, white for a dark one (relative luminance, ITU-R BT.709)."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 110 else "#ffffff"


_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46a0a0", "#f032e6", "#808000", "#000075"]


def _paged(result: Result) -> bool:
    """Whether the sidecar is laid out by page: several pages, or one picked from a longer file."""
    return len(result.pages) > 1 or result.pages[0].number != 1


def _warn_truncated(result: Result, page: PageResult) -> None:
    log.warning("%s: %s: answer cut off at max_new_tokens (page %d)", result.match.path, result.match.rule.name, page.number)


def _json_or_none(text: str) -> object:
    body = text.strip()
    fenced = re.search(r"```(?:json)?\s*\n(.*?)(?:```|$)", body, re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # the model chose the text: "[[[[..." nests past any stack
        return None
    return value if _shallow(value) else None


def _shallow(value: object, limit: int = 64) -> bool:
    """Whether parsed JSON nests at most ``limit`` deep, so writing it back cannot recurse out."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def _text(name: str) -> str:
    """Text fit for a UTF-8 file: lone surrogates (a file name's bytes that were not UTF-8) become U+FFFD."""
    return name.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _dump(doc: dict[str, object]) -> bytes:
    return _utf8(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _utf8(text: str) -> bytes:
    # An OpenAI-compatible server may send "\udcff" escapes in its JSON: a lone
    # surrogate cannot be UTF-8, so it is written as U+FFFD, not raised on.
    # Control characters from the model become U+FFFD too (issue 27; daemon.controls).
    return for_file(_text(text)).encode("utf-8")


def atomic_write(path: Path, data: bytes, *, like: Path | None = None, folders: FolderSyncs | None = None) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file.

    The temporary file is created with mode 0664 minus the umask (mkstemp's
    0600 would surprise a user sharing the folder; 0666 would let a umask of
    0 make it world-writable) and, given ``like`` (the source image), no
    more readable than that file; it is written, fsynced and renamed over
    ``path`` (replacing a symlink there, never following it); then the folder
    is fsynced so the rename survives a power cut, or, given ``folders``,
    left there for the caller to fsync once for a whole batch.
    """
    _make_folder(path.parent)
    tmp = path.parent / temp_name(secrets.token_hex(6))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o664)
    try:
        with os.fdopen(fd, "wb") as f:
            if like is not None:
                _no_wider_than(f.fileno(), like)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if folders is not None:
        folders.add(path.parent)
    else:
        _fsync_dir(path.parent)


def _no_wider_than(fd: int, source: Path) -> None:
    try:
        source_mode = os.stat(source).st_mode
    except OSError:  # the source went away meanwhile: keep the umask's choice
        return
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    narrowed = mode & (source_mode | 0o600)
    if narrowed != mode:
        os.fchmod(fd, narrowed)


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
