"""One document sent over HTTP, read by the model through the shared engine, as Markdown and text.

What the docling-compatible routes (``convert``) and Open WebUI's external
loader (``extract``) have in common: bytes in, Markdown out.

- The type is told by the bytes (``daemon.images.load_pages``, the decoder
  folder files go through: same allow-list, bomb limit, EXIF rotation, PDF
  pages), never by the file name or the ``Content-Type`` a client sends;
  the bytes are decoded from an anonymous in-memory file (``memfd``).
- The rule is the document rule: ``olmocr`` when the config includes it,
  else ``ocr``, else the bundled ``ocr`` pack's rule as it ships.  Its
  prompt, sizes, formats, reference images and ``max_new_tokens`` apply as
  they do to a folder file.  The client's file name is only ever a
  ``$filename`` in the prompt, passed through ``render_prompt`` (which
  neutralises it) and shown back in the answer.
- Each page becomes one request to the engine through ``WorkerLoop.submit``,
  the path the chat API takes: interactive, ahead of the folder backlog,
  dropped if cancelled before it starts.  No second engine path exists.
- The answers are cleaned as a ``.md`` sidecar's are (``clean_markdown``,
  raw HTML escaped unless the rule says ``raw_html``), a leading YAML front
  matter (olmOCR's per-page metadata) dropped, and the pages joined.
  ``text`` is that Markdown without its markup (markdown-it-py's tokens),
  ``html`` it rendered with raw HTML off.

Nothing is written to disk here and no sidecar is made: the answer goes
back to the client only.  Accepted limits: ``MAX_PAGES`` pages of one
document (the rest are reported, a ``page_range`` picks others); the
decoded pages of a document sit in memory until its answers are in.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from daemon.backends import Answer, Request
from daemon.config import Config, Rule, bundled_packs
from daemon.errors import BackendUnavailableError, InputError, VlwatchError
from daemon.images import Page, load_pages, printable
from daemon.rules import render_prompt
from daemon.server.chat import in_memory
from daemon.engine.worker import error_text, reference_images

if TYPE_CHECKING:
    from daemon.engine.loop import WorkerLoop

#: Pages of one document read at most; a longer one is answered for these
#: and says so (``partial_success``); ``page_range`` picks other pages.
MAX_PAGES = 100
#: The rules tried for documents, in order (``olmocr`` comes from its pack when included).
DOCUMENT_RULES = ("olmocr", "ocr")
#: The output formats made; docling's others (json, doctags) are answered "not supported".
FORMATS = ("md", "text", "html")


@dataclass(frozen=True)
class Upload:
    """A document from a client: its bytes and the name it gave (shown back; never tells the type)."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Options:
    """The conversion options vlwatch honours (docling's others are accepted and ignored)."""

    to_formats: tuple[str, ...] = ("md",)
    page_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Converted:
    """The outcome of one document, in the terms of docling-serve's answer."""

    filename: str
    status: str  # success | partial_success | failure (docling's ConversionStatus)
    md: str | None = None
    text: str | None = None
    html: str | None = None
    errors: tuple[dict[str, str], ...] = ()
    pages: int = 0
    seconds: float = 0.0
    rule: str = ""
    #: the failure was the input's (unreadable, unsupported): 4xx-worthy for /process
    input_error: bool = False
    #: the model could not be reached: 503-worthy
    unavailable: bool = False


def error_item(message: str, component: str = "user_input") -> dict[str, str]:
    """One entry of ``errors``, in docling's ErrorItem shape."""
    return {"component_type": component, "module_name": "vlwatch", "error_message": message}


def safe_name(name: str | None) -> str:
    """The last part of a client's file name, printable and at most 200 characters ("document" if none)."""
    base = re.split(r"[\\/]", name or "")[-1].strip()
    base = "".join(c for c in base if c.isprintable())[:200]
    return base or "document"


# ------------------------------------------------------------------- rule


def document_rule(config: Config) -> Rule:
    """The rule documents are read with: ``olmocr`` if included, else ``ocr``, else the bundled ``ocr``."""
    for name in DOCUMENT_RULES:
        rule = config.rule(name)
        if rule is not None:
            return rule
    return _bundled_ocr()


@functools.cache
def _bundled_ocr() -> Rule:
    # The pack's own text, so the API reads documents with the same prompt a folder would.
    pack = bundled_packs().get("ocr")
    prompt = "Read all the text in this image ($filename) and write it out as Markdown."
    if pack is not None:
        doc = yaml.safe_load(pack.read_text(encoding="utf-8")) or {}
        for rule in doc.get("rules") or ():
            if isinstance(rule, dict) and rule.get("name") == "ocr" and isinstance(rule.get("prompt"), str):
                prompt = rule["prompt"]
    return Rule(name="ocr", match=("*",), task="ocr", prompt=prompt, output="md")


# ---------------------------------------------------------------- running


class Conversion:
    """One document on its way through the engine; ``future`` gives its ``Converted``.

    ``start`` decodes (CPU: call it off the event loop) and submits one
    request per page; the answers are gathered on whichever thread finishes
    the last page.  ``cancel`` drops the pages not started yet and ends the
    conversion as a failure.
    """

    def __init__(self, loop: "WorkerLoop", config: Config, upload: Upload, options: Options) -> None:
        self.loop = loop
        self.config = config
        self.upload = upload
        self.options = options
        self.name = safe_name(upload.name)
        self.rule = document_rule(config)
        self.future: Future[Converted] = Future()
        self.pages_total = 0
        self.pages_done = 0
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._parts: list[Future[Answer]] = []
        self._errors: list[dict[str, str]] = []
        self._pages: list[Page] = []

    # ----------------------------------------------------------- public

    def start(self) -> None:
        """Decode the document and hand its pages to the engine (never raises: failures end ``future``)."""
        try:
            self._start()
        except Exception as exc:  # noqa: BLE001 - a decoder bug fails this document, not the server
            self._end(self._failed(f"{self.name}: unexpected error while reading: {printable(exc)}",
                                   component="document_backend"))

    def cancel(self, why: str = "cancelled") -> None:
        """End now as a failure saying ``why``; pages not started yet never reach the model."""
        with self._lock:
            parts = list(self._parts)
        self._end(self._failed(f"{self.name}: {why}", component="pipeline"))  # first: the pages' ends are moot
        for f in parts:
            f.cancel()  # the engine skips a cancelled request (WorkerLoop.submit)

    # ------------------------------------------------------------ steps

    def _start(self) -> None:
        rule, model = self.rule, self.config.model
        min_px, max_px = rule.min_pixels or model.min_pixels, rule.max_pixels or model.max_pixels
        first, last = self.options.page_range or (1, None)
        wanted_last = first + MAX_PAGES if last is None else min(last, first + MAX_PAGES)  # one more: is there more?
        try:
            with in_memory(self.upload.data) as path:
                try:
                    pages = load_pages(path, min_pixels=min_px, max_pixels=max_px, formats=rule.formats,
                                       pages=((first, wanted_last),))
                except InputError as exc:
                    self._end(self._failed(_named(str(exc), path, self.name), input_error=True))
                    return
            refs = tuple(img for ref in rule.reference for img in reference_images(ref, min_px, max_px))
        except VlwatchError as exc:  # a reference image of the rule is missing
            self._end(self._failed(str(exc), component="pipeline"))
            return
        if len(pages) > MAX_PAGES:
            pages = pages[:MAX_PAGES]
            self._errors.append(error_item(
                f"{self.name}: only pages {first}-{first + MAX_PAGES - 1} were read (at most {MAX_PAGES} per "
                "request); send page_range for the others"))
        prompt = render_prompt(rule, Path(self.name))
        max_new = rule.max_new_tokens or model.max_new_tokens
        self._pages = pages
        self.pages_total = len(pages)
        with self._lock:
            if self.future.done():  # cancelled while decoding
                return
            for page in pages:
                f = self.loop.submit(Request(images=(*refs, page.image), prompt=prompt, max_new_tokens=max_new))
                self._parts.append(f)
        for f in list(self._parts):
            f.add_done_callback(self._page_done)

    def _page_done(self, _: Future[Answer]) -> None:
        with self._lock:
            self.pages_done += 1
            if self.pages_done < len(self._parts) or self.future.done():
                return
        self._end(self._gather())

    def _gather(self) -> Converted:
        texts: list[str] = []
        errors = list(self._errors)
        ok = 0
        unavailable = False
        for page, f in zip(self._pages, self._parts):
            if f.cancelled():
                errors.append(error_item(f"page {page.number}: cancelled", "pipeline"))
                continue
            exc = f.exception()
            if exc is not None:
                unavailable = unavailable or isinstance(exc, BackendUnavailableError)
                errors.append(error_item(f"page {page.number}: the model failed: {error_text(exc)}", "model"))
                continue
            texts.append(page_markdown(self.rule, f.result()))
            ok += 1
        if ok == 0:
            return Converted(self.name, "failure", errors=tuple(errors), pages=len(self._pages),
                             seconds=self._elapsed(), rule=self.rule.name, unavailable=unavailable)
        md = "\n\n".join(t.strip("\n") for t in texts if t.strip()) + "\n"
        status = "success" if ok == len(self._pages) and not errors else "partial_success"
        return self._formats(Converted(self.name, status, md=md, errors=tuple(errors), pages=len(self._pages),
                                       seconds=self._elapsed(), rule=self.rule.name))

    def _formats(self, done: Converted) -> Converted:
        """Keep the formats asked for; name the ones vlwatch does not make."""
        assert done.md is not None
        asked = self.options.to_formats
        errors = list(done.errors)
        for fmt in asked:
            if fmt not in FORMATS:
                errors.append(error_item(f"to_formats: {fmt!r} is not supported by vlwatch "
                                         f"(it makes {', '.join(FORMATS)})"))
        made = [f for f in asked if f in FORMATS]
        status = done.status if len(made) == len(asked) else ("partial_success" if made else "failure")
        return Converted(
            done.filename, status,
            md=done.md if "md" in made else None,
            text=markdown_text(done.md) if "text" in made else None,
            html=markdown_html(done.md, done.filename) if "html" in made else None,
            errors=tuple(errors), pages=done.pages, seconds=done.seconds, rule=done.rule)

    def _failed(self, message: str, *, component: str = "user_input", input_error: bool = False) -> Converted:
        return Converted(self.name, "failure", errors=(*self._errors, error_item(message, component)),
                         pages=self.pages_total, seconds=self._elapsed(), rule=self.rule.name,
                         input_error=input_error)

    def _end(self, result: Converted) -> None:
        with self._lock:
            if self.future.done():
                return
            self.future.set_result(result)
            # The task is kept a while for its result: not its pages or bytes.
            self._pages = []
            self.upload = Upload(self.upload.name, b"")

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._started, 3)


def _named(message: str, path: Path, name: str) -> str:
    """A decoder message about the memfd path, told about the client's file name instead."""
    return message.replace(printable(path), name, 1)


# ----------------------------------------------------------------- answers

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n((?:[A-Za-z_][\w-]*[ \t]*:.*\n)+)---[ \t]*(?:\n|\Z)")


def page_markdown(rule: Rule, answer: Answer) -> str:
    """One page's answer as a ``.md`` sidecar would hold it (no provenance line), front matter dropped."""
    from daemon import answers

    text = answers.clean_markdown(answer.text)
    text = _FRONT_MATTER.sub("", text, count=1).lstrip("\n")
    if not rule.raw_html:
        text = answers.escape_raw_html(text)
    if not answer.finished:
        text += "\n<!-- vlwatch: the answer was cut off at max_new_tokens -->\n"
    return text


@functools.cache
def _markdown_it() -> Any:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown_html(md: str, title: str) -> str:
    """A whole HTML document of ``md`` (raw HTML in it stays text)."""
    import html

    body = _markdown_it().render(md)
    return (f"<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"</head>\n<body>\n{body}</body>\n</html>\n")


def markdown_text(md: str) -> str:
    """``md`` as plain text: the words, lines and table rows (cells tab-separated), without Markdown's markup."""
    out: list[str] = []
    row: list[str] | None = None
    in_cell = False
    for tok in _markdown_it().parse(md):
        kind = tok.type
        if kind == "tr_open":
            row = []
        elif kind in ("th_open", "td_open"):
            in_cell = True
        elif kind in ("th_close", "td_close"):
            in_cell = False
        elif kind == "tr_close" and row is not None:
            out.append("\t".join(row) + "\n")
            row = None
        elif kind == "inline":
            piece = "".join(_inline_text(c) for c in tok.children or ())
            if in_cell and row is not None:
                row.append(piece)
            else:
                out.append(piece)
        elif kind in ("fence", "code_block"):
            out.append(tok.content.rstrip("\n") + "\n\n")
        elif kind == "paragraph_close":
            out.append("\n" if tok.hidden else "\n\n")  # hidden: a tight list's item
        elif kind in ("heading_close", "table_close", "hr", "bullet_list_close", "ordered_list_close",
                      "blockquote_close"):
            out.append("\n\n")
    text = re.sub(r"\n{3,}", "\n\n", "".join(out)).strip()
    return text + "\n" if text else ""


def _inline_text(tok: Any) -> str:
    if tok.type in ("text", "code_inline"):
        return tok.content
    if tok.type in ("softbreak", "hardbreak"):
        return "\n"
    if tok.type == "image":
        return "".join(_inline_text(c) for c in tok.children or ())
    return ""
