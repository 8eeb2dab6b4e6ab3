"""One document sent over HTTP, read by the model through the shared engine, as Markdown and text.

What the docling-compatible routes (``convert``) and Open WebUI's external
loader (``extract``) have in common: bytes in, Markdown out.

- The type is told by the bytes (``daemon.images.open_pages``, the decoder
  folder files go through: same allow-list, bomb limit, EXIF rotation, PDF
  pages), never by the file name or the ``Content-Type`` a client sends;
  the bytes are decoded from an anonymous in-memory file (``memfd``).
- The rule is the document rule: ``olmocr`` when the config includes it,
  else ``ocr``, else the bundled ``ocr`` pack's rule as it ships.  Its
  prompt, sizes (``longest_side`` too), formats, reference images,
  ``max_new_tokens`` and answer policy apply as they do to a folder file:
  an ``olmocr`` page is asked prompt-first, again up its temperature ladder
  while its answer is not valid, turned when the model says so, and falls
  back to the PDF's text layer (else its last answer) when no try was
  valid, named in ``errors``.  The client's file name is only ever a
  ``$filename`` in the prompt, passed through ``render_prompt`` (which
  neutralises it) and shown back in the answer.
- Each page becomes one request to the engine through ``WorkerLoop.submit``,
  the path the chat API takes: interactive, ahead of the folder backlog,
  dropped if cancelled.  No second engine path exists.  At most
  ``IN_FLIGHT`` pages of a document are decoded at a time; each page done
  lets the next one be decoded.
- The answers are cleaned as a ``.md`` sidecar's are (``clean_markdown``,
  raw HTML escaped unless the rule says ``raw_html``), a leading YAML front
  matter (olmOCR's per-page metadata) dropped, and the pages joined.
  ``text`` is that Markdown without its markup (markdown-it-py's tokens),
  ``html`` it rendered with raw HTML off.

Nothing is written to disk here and no sidecar is made: the answer goes
back to the client only.  Accepted limits: ``MAX_PAGES`` pages of one
document (the rest are reported, a ``page_range`` picks others); the
document's bytes stay in memory until its answers are in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from daemon.backends import Answer, Request
from daemon.config import Config, Rule, bundled_packs
from daemon.engine.worker import MAX_CHUNK, error_text, reference_images
from daemon.errors import BackendUnavailableError, InputError, VlwatchError
from daemon.errors import printable
from daemon.images import PageSource, open_pages, pdf_page_text
from daemon.pages import Page
from daemon.intake.rules import render_prompt
from daemon.policies import AnswerPolicy, PageAnswer, policy_for
from daemon.server.chat import in_memory
from daemon.server.formats import markdown_html, markdown_text

if TYPE_CHECKING:
    from daemon.engine.loop import WorkerLoop

log = logging.getLogger(__name__)

#: Pages of one document read at most; a longer one is answered for these
#: and says so (``partial_success``); ``page_range`` picks other pages.
MAX_PAGES = 100
#: Pages of one document in the engine at once (asked, or asked again by the rule's policy): the
#: next page is decoded when one is done, so a long PDF holds at most this many decoded pages
#: (~4 MB each at olmOCR's 1288 pixels), as a folder document holds two chunks of ``MAX_CHUNK``.
IN_FLIGHT = MAX_CHUNK
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

    ``start`` measures the document (CPU: call it off the event loop),
    decodes its first ``IN_FLIGHT`` pages and submits them; each page whose
    answer is final lets the next one be decoded and submitted, on
    ``renderer``'s threads, never on the engine's.  Each page's answer goes
    through the rule's answer policy as a folder file's does
    (``policies.policy_for``: olmOCR's prompt, temperature ladder and
    rotation for an ``olmocr`` rule; one retry of a failed page of a longer
    document otherwise); an ``olmocr`` page that never gives a valid answer
    takes the PDF's own text layer, as its sidecar would.  ``cancel`` drops
    the pages not answered yet and ends the conversion as a failure.
    """

    def __init__(self, loop: "WorkerLoop", config: Config, upload: Upload, options: Options, *,
                 renderer: Executor) -> None:
        self.loop = loop
        self.config = config
        self.upload = upload
        self.options = options
        self.name = safe_name(upload.name)
        self.rule = document_rule(config)
        self.future: Future[Converted] = Future()
        self.pages_total = 0
        self._renderer = renderer
        self._started = time.monotonic()
        # Re-entrant: a future already done when ``_ask`` adds its callback runs it at once, lock held.
        self._lock = threading.RLock()
        self._errors: list[dict[str, str]] = []
        self._file = contextlib.ExitStack()  # the document as a path (memfd), until the conversion ends
        self._path: Path | None = None
        self._source: PageSource | None = None
        self._policy: AnswerPolicy | None = None
        self._make: Callable[[int, Page], Request] | None = None
        self._next = 0  # the next page (index into the source's pages) to decode
        self._asking: dict[int, Future[Answer]] = {}  # pages in the engine: their current request
        self._final: dict[int, Answer | BaseException] = {}
        self._gathering = False  # the last page is in: one thread puts the document together

    # ----------------------------------------------------------- public

    def start(self) -> None:
        """Measure the document and hand its first pages to the engine (never raises: failures end ``future``)."""
        try:
            self._start()
        except Exception as exc:  # noqa: BLE001 - a decoder bug fails this document, not the server
            self._end(self._failed(f"{self.name}: unexpected error while reading: {printable(exc)}",
                                   component="document_backend"))

    def cancel(self, why: str = "cancelled") -> None:
        """End now as a failure saying ``why``; pages not answered yet never reach the model (again)."""
        with self._lock:
            asking = list(self._asking.values())
        self._end(self._failed(f"{self.name}: {why}", component="pipeline"))  # first: the pages' ends are moot
        for f in asking:
            f.cancel()  # the engine drops a cancelled request, before it starts or at its next step

    # ------------------------------------------------------------ steps

    def _start(self) -> None:
        rule, model = self.rule, self.config.model
        min_px, max_px = rule.min_pixels or model.min_pixels, rule.max_pixels or model.max_pixels
        first, last = self.options.page_range or (1, None)
        wanted_last = first + MAX_PAGES if last is None else min(last, first + MAX_PAGES)  # one more: is there more?
        try:
            path = self._path = self._file.enter_context(in_memory(self.upload.data))
            self.upload = Upload(self.upload.name, b"")  # the memfd holds the bytes now
            try:
                source, pages = open_pages(path, min_pixels=min_px, max_pixels=max_px, formats=rule.formats,
                                           pages=((first, wanted_last),), longest_side=rule.longest_side,
                                           render=IN_FLIGHT)
            except InputError as exc:
                self._end(self._failed(_named(str(exc), path, self.name), input_error=True))
                return
            refs = tuple(img for ref in rule.reference for img in reference_images(ref, min_px, max_px))
        except VlwatchError as exc:  # a reference image of the rule is missing
            self._end(self._failed(str(exc), component="pipeline"))
            return
        if len(source.pages) > MAX_PAGES:
            source = replace(source, pages=source.pages[:MAX_PAGES])
            self._errors.append(error_item(
                f"{self.name}: only pages {first}-{first + MAX_PAGES - 1} were read (at most {MAX_PAGES} per "
                "request); send page_range for the others"))
        prompt = render_prompt(rule, Path(self.name))
        max_new = rule.max_new_tokens or model.max_new_tokens
        policy = policy_for(rule, len(source.pages))

        def make(index: int, page: Page) -> Request:
            request = Request(images=(*refs, page.image), prompt=prompt, max_new_tokens=max_new)
            return policy.first(index, request) if policy is not None else request

        self._source, self._policy, self._make = source, policy, make
        self.pages_total = len(source.pages)
        with self._lock:
            if self.future.done():  # cancelled while decoding
                return
            for index, page in enumerate(pages):
                self._ask(index, make(index, page))
            self._next = len(pages)

    def _ask(self, index: int, request: Request) -> None:
        """Send page ``index``'s next request (the lock held)."""
        f = self.loop.submit(request)
        self._asking[index] = f
        f.add_done_callback(functools.partial(self._answered, index))

    def _answered(self, index: int, f: Future[Answer]) -> None:
        # On the engine's thread: what follows (a policy's rotated page, the next page's
        # decoding, the whole document's Markdown) is CPU work for the renderer's threads.
        if not self.future.done():
            try:
                self._renderer.submit(self._settle, index, f)
            except RuntimeError:  # the renderer is shut down: the server is stopping
                self.cancel("the server is stopping")

    def _settle(self, index: int, f: Future[Answer]) -> None:
        try:
            got: Answer | BaseException = CancelledError() if f.cancelled() else (f.exception() or f.result())
            out = self._policy.settle(index, got) if self._policy is not None else got
            with self._lock:
                if self.future.done():
                    return
                if isinstance(out, Request):
                    self._ask(index, out)  # asked again: a retry, or the page turned
                    return
                del self._asking[index]
                self._final[index] = out
            self._refill()
            with self._lock:
                if self.future.done() or self._gathering or len(self._final) < self.pages_total \
                        or self._source is None:
                    return
                self._gathering = True
                source, final = self._source, dict(self._final)
            self._end(self._gather(source, final))
        except Exception as exc:  # noqa: BLE001 - a bug here fails this document, not the server
            log.exception("convert %s: page %d", self.name, index + 1)
            self._end(self._failed(f"{self.name}: unexpected error: {printable(exc)}", component="pipeline"))

    def _refill(self) -> None:
        """Decode and send the next page while fewer than ``IN_FLIGHT`` are in the engine."""
        while True:
            with self._lock:
                source, make = self._source, self._make
                if source is None or make is None or self.future.done() or self._next >= self.pages_total \
                        or len(self._asking) >= IN_FLIGHT:
                    return
                index = self._next
                self._next += 1
            try:
                # Outside the lock (it may take a while): a document closed meanwhile by ``cancel``
                # is refused here, as another file (``PageSource.render`` checks its identity).
                (page,) = source.render(index, index + 1)
            except InputError as exc:  # this page will not decode: the others still may
                with self._lock:
                    self._final[index] = exc
                continue
            with self._lock:
                if self.future.done():
                    return
                self._ask(index, make(index, page))

    def _gather(self, source: PageSource, final: dict[int, Answer | BaseException]) -> Converted:
        texts: list[str] = []
        errors = list(self._errors)
        notes: list[dict[str, str]] = []  # pages read another way: said, but the document is whole
        ok = 0
        unavailable = False
        for index, size in enumerate(source.pages):
            got, n = final[index], size.number
            if isinstance(got, CancelledError):
                errors.append(error_item(f"page {n}: cancelled", "pipeline"))
            elif isinstance(got, InputError):
                errors.append(error_item(f"page {n}: {_named(str(got), self._path, self.name)}"))
            elif isinstance(got, BaseException):
                unavailable = unavailable or isinstance(got, BackendUnavailableError)
                errors.append(error_item(f"page {n}: the model failed: {error_text(got)}", "model"))
            elif isinstance(got, PageAnswer) and not got.valid:
                text, whose = self._stand_in(source, n, got)
                if text is None:
                    errors.append(error_item(f"page {n}: {got.problem}", "model"))
                    continue
                notes.append(error_item(f"page {n}: {got.problem}; its text is {whose}", "model"))
                texts.append(text)
                ok += 1
            else:
                texts.append(page_markdown(self.rule, got))
                ok += 1
        pages = len(source.pages)
        if ok == 0:
            return Converted(self.name, "failure", errors=(*errors, *notes), pages=pages,
                             seconds=self._elapsed(), rule=self.rule.name, unavailable=unavailable)
        md = "\n\n".join(t.strip("\n") for t in texts if t.strip()) + "\n"
        status = "success" if ok == pages and not errors else "partial_success"
        return self._formats(Converted(self.name, status, md=md, errors=(*errors, *notes), pages=pages,
                                       seconds=self._elapsed(), rule=self.rule.name))

    def _stand_in(self, source: PageSource, number: int, got: PageAnswer) -> tuple[str | None, str]:
        """The text of a page that gave no valid answer, and whose it is (None: it has none).

        An ``olmocr`` page takes the PDF's text layer, as olmOCR does and as
        its sidecar would.  Without one, a client still wants the page read:
        the model's last answer (a stock model often writes good text with no
        front matter) rather than a hole; a ``.md`` sidecar would mark the page
        missing, but an API answer has no front matter to say so in.
        """
        text = self._text_layer(source, number) if self.rule.answers == "olmocr" else None
        if text is not None:
            return _escaped(self.rule, text), "the PDF's own text layer"
        if got.text.strip():
            return page_markdown(self.rule, got), "the model's last answer, not a valid one"
        return None, ""

    def _text_layer(self, source: PageSource, number: int) -> str | None:
        """Page ``number``'s text from the PDF itself (None: not a PDF, no text there, or unreadable)."""
        if not source.pdf or self._path is None:
            return None
        with self._lock:  # the memfd stays open meanwhile: ``_end`` closes it under this lock
            if self.future.done():
                return None
            try:
                text = pdf_page_text(self._path, number)
            except VlwatchError as exc:
                log.warning("convert %s: page %d: no text layer to fall back on: %s", self.name, number, exc)
                return None
        if text is not None:
            log.warning("convert %s: page %d: no valid answer; took the PDF's text layer", self.name, number)
        return text

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
            # The task is kept a while for its result: not its pages, policy or bytes.
            self._source = self._policy = self._make = None
            self._final.clear()
            self._file.close()

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._started, 3)


def _escaped(rule: Rule, text: str) -> str:
    """A page's text layer as Markdown a client can take: raw HTML escaped unless the rule says ``raw_html``."""
    from daemon import answers

    body = answers.clean_markdown(text)
    return body if rule.raw_html else answers.escape_raw_html(body)


def _named(message: str, path: Path | None, name: str) -> str:
    """A decoder message about the memfd path, told about the client's file name instead."""
    return message if path is None else message.replace(printable(path), name, 1)


# ----------------------------------------------------------------- answers

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n((?:[A-Za-z_][\w-]*[ \t]*:.*\n)+)---[ \t]*(?:\n|\Z)")


def page_markdown(rule: Rule, answer: Answer) -> str:
    """One page's answer as a ``.md`` sidecar would hold it (no provenance line), front matter dropped."""
    from daemon import answers

    text = answers.clean_markdown(answer.text)
    text = _FRONT_MATTER.sub("", text, count=1).lstrip("\n")
    if not rule.raw_html:
        # olmOCR-2 writes tables as HTML: their bare tags stay, as in the rule's sidecar (``daemon.documents``).
        text = answers.escape_raw_html(text, keep_tables=rule.answers == "olmocr")
    if not answer.finished:
        text += "\n<!-- vlwatch: the answer was cut off at max_new_tokens -->\n"
    return text
