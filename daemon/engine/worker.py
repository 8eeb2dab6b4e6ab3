"""Run matched files through the model and hand each answer to its sidecar writer.

The worker is the one place where files meet the backend:

1. *prepare* (CPU threads): decode each file into pages sized for the model
   (``daemon.images``) and render its prompt (``daemon.intake.rules``);
2. *infer*: group the pages' requests into batches of similar size and send
   them to the backend, pages of many files together;
3. *write*: give each file its pages' answers back and write its sidecars
   (``daemon.outputs``).

A long document is not decoded whole in step 1 (issue 24): its pages are
measured, its first chunk rendered, and each later chunk rendered (on the
CPU threads) as the engine takes the document's pages, so at most two
chunks of one document are in memory at once (``Prepared``, ``page_chunk``).

A failure is confined to its file: a file that cannot be decoded, a request
the backend fails on (whatever the exception: a batch that raises is retried
one request at a time to find the culprit), or a sidecar that cannot be
written becomes that file's ``Outcome.error``; every other file still gets
its sidecars.  Two exceptions are not one file's fault and pass through: the
backend is unreachable (``BackendUnavailableError``: the queue pauses) and the
GPU is lost (``DeviceLostError``: the daemon restarts).

The daemon's engine (``daemon.engine.loop``) uses ``prepare`` and ``finish`` one
file at a time around a backend that admits requests itself (``serve``);
``process`` is the batch path (``vlwatch scan``, server backends).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from daemon.backends import Answer, Backend, DeviceLostError, Request, as_backend, as_device_lost
from daemon.config import Config
from daemon.documents import document_note
from daemon.errors import BackendUnavailableError, VlwatchError
from daemon.errors import printable
from daemon.images import load_pages, open_pages
from daemon.pages import Page, PageSize
from daemon.intake.rules import Match, allowed_roots, render_prompt
from daemon.outputs import FolderSyncs, write_result
from daemon.policies import AnswerPolicy, policy_for
from daemon.results import PageResult, Result, missing

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: Write errors that say the disk, not the file, is the problem (issue 10.8).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_STORAGE_WORDS = {errno.ENOSPC: "full", errno.EDQUOT: "over quota", errno.EROFS: "read-only"}


#: Pages of one document rendered together, at most (issue 24): see ``page_chunk``.
MAX_CHUNK = 32


def page_chunk(batch_size: int) -> int:
    """Pages of one document rendered together: a batch's worth, at most ``MAX_CHUNK``.

    A document holds at most two chunks in memory, one in the engine and the
    next being rendered: a 300-page scan at 1.3 megapixels a page (olmOCR's
    1288-pixel pages) is about 1.2 GB of images, two chunks of 32 pages 250 MB.
    """
    return max(1, min(MAX_CHUNK, batch_size))


class Prepared:
    """A file ready for the model: its pages' sizes, and their requests made a chunk at a time.

    A long document is not rendered whole (issue 24): ``prepare`` renders its
    first ``chunk`` pages; the engine takes the requests made (``take``), has
    the next chunk rendered (``render``, on a CPU thread) once at most
    ``chunk`` of the document's pages are still unanswered (``due``), and says
    when a page's answer is final (``done``), after which nothing here holds
    the page's image.  So at most ``2 * chunk`` pages of one document are in
    memory at once, however long it is; only the answers are kept.  A file of
    one chunk or less (nearly every file) is rendered whole by ``prepare``.

    Args:
        match: the file and its rule.
        pages: every page's number and sizes, for the sidecar.
        requests: the requests made at once, for the first pages (every page's without ``rest``).
        policy: what becomes of each page's answer (retries: issue 24); None = taken as it comes.
        rest: makes the requests of pages ``start`` to ``stop`` (indices), rendering them.
        chunk: pages rendered together.
    """

    def __init__(self, match: Match, pages: Sequence[PageSize], requests: Sequence[Request],
                 policy: AnswerPolicy | None = None, *,
                 rest: Callable[[int, int], list[Request]] | None = None, chunk: int = MAX_CHUNK) -> None:
        self.match = match
        self.pages = tuple(pages)
        self.policy = policy
        #: requests to answer: one per page
        self.count = len(self.pages) if rest is not None else len(requests)
        self.chunk = max(1, chunk)
        #: why a later chunk could not be rendered: the file fails with it, as if it had at ``prepare``
        self.failed: VlwatchError | None = None
        self._rest = rest
        self._made = list(enumerate(requests))
        self._next = len(self._made)  # the first page not rendered yet
        self._open = len(self._made)  # pages rendered (or being rendered) whose answer is not final
        self._lock = threading.Lock()

    def take(self) -> list[tuple[int, Request]]:
        """The requests made and not taken yet, with their pages' indices; renders nothing."""
        with self._lock:
            made, self._made = self._made, []
        return made

    def left(self) -> bool:
        """Whether pages are still to be rendered."""
        with self._lock:
            return self.failed is None and self._next < self.count

    def due(self) -> bool:
        """Whether the next chunk may be rendered now."""
        with self._lock:
            return self._due()

    def render(self) -> int:
        """Render the next chunk, if due, and make its requests (for ``take``); how many were made.

        Never raises: a page that cannot be read sets ``failed`` (and so fails the file).
        """
        with self._lock:
            if not self._due() or self._rest is None:
                return 0
            start, stop = self._next, min(self.count, self._next + self.chunk)
            self._next = stop
            self._open += stop - start
        try:
            made = self._rest(start, stop)
        except Exception as exc:  # noqa: BLE001 - the file's error, as ``prepare``'s would be
            with self._lock:
                self.failed = reading_error(self.match, exc)
            return 0
        with self._lock:
            self._made.extend(zip(range(start, stop), made))
        return len(made)

    def done(self) -> None:
        """One page's answer is final (no retry follows): it no longer counts against the chunk."""
        with self._lock:
            self._open -= 1

    def _due(self) -> bool:
        return self.failed is None and self._next < self.count and self._open <= self.chunk


@dataclass(frozen=True)
class Outcome:
    match: Match
    sidecars: tuple[Path, ...] = ()
    error: str | None = None
    seconds: float = 0.0
    #: the error can never go away for these bytes: fail now, no retries (issue 10.10)
    permanent: bool = False
    #: the folder whose disk refused the write (full, quota, read-only): not
    #: the file's fault; the queue pauses instead of spending attempts (issue 10.8)
    outage: Path | None = None
    #: done, but with something to record: the pages of a document left without an answer (issue 24)
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def reference_images(path: Path, min_pixels: int, max_pixels: int) -> tuple["Image.Image", ...]:
    """A rule's reference image (every page of a PDF), sized like a page; decoded once per content."""
    try:
        st = path.stat()
    except OSError as exc:
        raise VlwatchError(f"reference image {printable(path)}: {exc.strerror or exc}") from exc
    return _reference_images(path, st.st_size, st.st_mtime_ns, min_pixels, max_pixels)


@functools.lru_cache(maxsize=16)
def _reference_images(path: Path, size: int, mtime_ns: int, min_pixels: int, max_pixels: int) -> tuple["Image.Image", ...]:
    try:
        pages = load_pages(path, min_pixels=min_pixels, max_pixels=max_pixels)
    except VlwatchError as exc:
        raise VlwatchError(f"reference image: {exc}") from exc
    return tuple(p.image for p in pages)


@dataclass
class Worker:
    config: Config
    backend: Backend
    threads: int = 4
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.backend = as_backend(self.backend)  # a plugin of the minimal protocol gets the typed defaults

    def batch_size(self) -> int:
        """Requests per model call: the configured number, or an automatic one."""
        if self.config.model.batch_size is not None:
            return self.config.model.batch_size
        return self.backend.auto_batch_size()

    # ------------------------------------------------------------ stage 1

    def prepare(self, match: Match, *, chunk: int | None = None) -> Prepared:
        """Measure ``match``'s file, and decode, size and make the requests of its first ``chunk`` pages.

        Args:
            chunk: pages of a document rendered together (``page_chunk``);
                default: from the configured batch size.
        """
        rule, model = match.rule, self.config.model
        chunk = chunk or page_chunk(model.batch_size or 4)  # 4: the batch of a backend without an automatic one
        source, first = open_pages(
            match.path,
            min_pixels=rule.min_pixels or model.min_pixels,
            max_pixels=rule.max_pixels or model.max_pixels,
            formats=rule.formats,
            pages=rule.pages,  # each selected page becomes its own request, batched like separate images
            allowed_roots=allowed_roots(self.config, match),
            longest_side=rule.longest_side,
            render=chunk,
        )
        prompt = render_prompt(rule, match.path)
        max_new = rule.max_new_tokens or model.max_new_tokens
        # A rule's reference images go first in every request (issue 13.5):
        # their pixels count in the batch planner like the page's own.
        refs = tuple(img for ref in rule.reference
                     for img in reference_images(ref, rule.min_pixels or model.min_pixels,
                                                 rule.max_pixels or model.max_pixels))
        policy = policy_for(rule, len(source.pages))

        def request(index: int, page: Page) -> Request:
            made = Request(images=(*refs, page.image), prompt=prompt, max_new_tokens=max_new)
            return policy.first(index, made) if policy is not None else made

        def rest(start: int, stop: int) -> list[Request]:
            return [request(i, page) for i, page in enumerate(source.render(start, stop), start)]

        return Prepared(match, source.pages, [request(i, page) for i, page in enumerate(first)], policy,
                        rest=rest, chunk=chunk)

    # ------------------------------------------------------------ stages 2+3

    def process(self, matches: Sequence[Match]) -> list[Outcome]:
        """Run every match to its sidecars; return one outcome per match, in order.

        The sidecars' folders are fsynced once for the whole batch, before
        this returns (``FolderSyncs``): the caller records the jobs as done
        only after that, so a recorded job's sidecars survive a power cut.
        """
        outcomes: dict[int, Outcome] = {}
        size = max(1, self.batch_size())
        chunk = size * 4
        parts = [list(enumerate(matches[start:start + chunk], start)) for start in range(0, len(matches), chunk)]
        prepare = functools.partial(self._safe_prepare, chunk=page_chunk(size))
        folders = FolderSyncs()
        try:
            # The next chunk's files are decoded on the CPU threads while this
            # chunk is on the GPU, so the GPU does not wait for image decoding.
            ahead = self._map(prepare, [m for _, m in parts[0]]) if parts else None
            for n, part in enumerate(parts):
                current = ahead
                ahead = self._map(prepare, [m for _, m in parts[n + 1]]) if n + 1 < len(parts) else None
                for i, outcome in self._process_chunk(part, current, folders):
                    outcomes[i] = outcome
        finally:
            folders.sync()
        return [outcomes[i] for i in range(len(matches))]

    def _process_chunk(self, part: list[tuple[int, Match]], results: Iterator[Prepared | Outcome],
                       folders: FolderSyncs | None = None) -> Iterator[tuple[int, Outcome]]:
        started = time.monotonic()
        prepared: list[tuple[int, Prepared]] = []
        for (i, match), result in zip(part, results):
            if isinstance(result, Outcome):
                yield i, result
            else:
                prepared.append((i, result))
        answers = self.infer([p for _, p in prepared])
        for (i, prep), got in zip(prepared, answers):
            yield i, self._finish(prep, got, started, folders)

    def _safe_prepare(self, match: Match, chunk: int | None = None) -> Prepared | Outcome:
        try:
            return self.prepare(match, chunk=chunk)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not take the daemon down
            error = reading_error(match, exc)
            return Outcome(match, error=str(error), permanent=bool(getattr(error, "permanent", False)))

    def infer(self, prepared: Sequence[Prepared]) -> list[list[Answer] | str]:
        """Answers for each prepared file (one per page), or an error message.

        Rounds: each sends the pages a policy asks again for and the pages
        rendered since the last; while a round is in the backend, the next
        chunk of each long document is rendered on the CPU threads (``Prepared``).
        """
        got: dict[tuple[int, int], Answer | str] = {}
        again: list[tuple[int, int, Request]] = []
        ahead: list[Future[int]] = []
        while True:
            for future in ahead:
                future.result()  # never raises: a page that cannot be read fails its file (``failed``)
            flat = [item for item in again if prepared[item[0]].failed is None]
            for fi, prep in enumerate(prepared):
                made = prep.take()
                if not made and prep.render():  # nothing rendered ahead (no CPU threads, or retries held it back)
                    made = prep.take()
                flat += [(fi, pi, req) for pi, req in made]
            if not flat:
                break
            ahead = [self._threads().submit(prep.render) for prep in prepared if prep.due()] \
                if self.threads > 1 else []
            again = []  # a policy may ask again for some pages: they make the next round
            for batch in self._batches(flat):
                for key, answer in self._infer_batch(batch):
                    prep = prepared[key[0]]
                    settled = settle(prep, key[1], answer)
                    if isinstance(settled, Request):
                        again.append((*key, settled))
                    else:
                        got[key] = settled
                        prep.done()
        out: list[list[Answer] | str] = []
        for fi, prep in enumerate(prepared):
            if prep.failed is not None:
                out.append(str(prep.failed))
                continue
            page_answers = [got[(fi, pi)] for pi in range(prep.count)]
            errors = [a for a in page_answers if isinstance(a, str)]
            out.append(errors[0] if errors else page_answers)  # type: ignore[arg-type]
        return out

    def _batches(self, flat: list[tuple[int, int, Request]]) -> Iterator[list[tuple[int, int, Request]]]:
        # Sorting by image area and output budget keeps similar requests
        # together, so left-padding wastes little of each batch.
        size = max(1, self.batch_size())
        ordered = sorted(flat, key=lambda x: (x[2].max_new_tokens, sum(i.width * i.height for i in x[2].images)))
        if self.backend.continuous_batching:
            # The backend refills a slot as soon as its sequence ends: give it
            # the whole chunk, so one long answer holds up no batch of short ones.
            size = max(1, len(ordered))
        for start in range(0, len(ordered), size):
            yield ordered[start:start + size]

    def _infer_batch(self, batch: list[tuple[int, int, Request]]) -> list[tuple[tuple[int, int], Answer | str]]:
        keys = [(fi, pi) for fi, pi, _ in batch]
        requests = [r for _, _, r in batch]
        try:  # the backend isolates failing requests itself (BaseBackend.generate_each)
            got = list(self.backend.generate_each(requests))
            if len(got) != len(requests):
                raise ValueError(f"the backend gave {len(got)} answers for {len(requests)} requests")
        except (BackendUnavailableError, DeviceLostError):
            raise  # not this batch's fault: the caller pauses (or restarts) instead of failing files
        except Exception as exc:  # noqa: BLE001 - a backend bug: every request of the call fails with it
            _raise_if_device_lost(exc)
            log.exception("the backend failed on a batch of %d", len(batch))
            got = [exc] * len(batch)
        return [(k, error_text(a) if isinstance(a, BaseException) else a) for k, a in zip(keys, got)]

    def finish(self, prep: Prepared, got: list[Answer] | str, started: float) -> Outcome:
        """Write ``prep``'s sidecars from its pages' answers (or record the error); never raises."""
        return self._finish(prep, got, started)

    def _finish(self, prep: Prepared, got: list[Answer] | str, started: float,
                folders: FolderSyncs | None = None) -> Outcome:
        match = prep.match
        if prep.failed is not None:  # a later chunk of the document could not be read
            return Outcome(match, error=str(prep.failed), permanent=bool(getattr(prep.failed, "permanent", False)),
                           seconds=time.monotonic() - started)
        if isinstance(got, str):
            return Outcome(match, error=got, seconds=time.monotonic() - started)
        pages = tuple(
            PageResult(number=page.number, answer=answer, original=page.original, shown=page.shown)
            for page, answer in zip(prep.pages, got)
        )
        if match.rule.answers is None and pages and all(missing(p) for p in pages):
            # Not one page answered: the file fails as a whole and is retried (issue 24 keeps
            # the pages that did answer; there are none).
            return Outcome(match, error=missing(pages[0]), seconds=time.monotonic() - started)
        roots = allowed_roots(self.config, match)
        # FP8 weights change the text: the sidecar says so (issue 23); so can the engine's other
        # choices (a local engine says them; others have none).
        quantization = "fp8" if self.backend.precision == "fp8" else None
        engine = self.backend.provenance
        result = Result(match=match, pages=pages, backend=self.backend.name, model=self.backend.model,
                        roots=tuple(roots) if roots is not None else None, quantization=quantization, engine=engine)
        try:
            sidecars = write_result(result, folders)
        except VlwatchError as exc:  # a sidecar path that would leave the allowed folders
            return Outcome(match, error=str(exc), seconds=time.monotonic() - started)
        except OSError as exc:
            if exc.errno in STORAGE_ERRNOS:
                folder = Path(os.fsdecode(exc.filename)).parent if exc.filename else match.path.parent
                return Outcome(match, error=f"output disk {_STORAGE_WORDS[exc.errno]}: {printable(folder)} "
                                            f"({exc.strerror or exc})",
                               seconds=time.monotonic() - started, outage=folder)
            return Outcome(match, error=f"{printable(match.path)}: cannot write sidecar: {printable(exc)}",
                           seconds=time.monotonic() - started)
        except Exception as exc:  # a writer bug on some answer must fail this file only, not its batch
            log.exception("%s: unexpected error while writing sidecars", printable(match.path))
            return Outcome(match, error=f"{printable(match.path)}: unexpected error while writing sidecars: "
                                        f"{printable(exc)}", seconds=time.monotonic() - started)
        return Outcome(match, sidecars=tuple(sidecars), seconds=time.monotonic() - started,
                       note=document_note(result))

    # ------------------------------------------------------------ plumbing

    def submit_prepare(self, match: Match, chunk: int | None = None) -> "Future[Prepared | Outcome]":
        """``prepare`` on the worker's threads (continuous admission reads files ahead of the GPU)."""
        return self._threads().submit(self._safe_prepare, match, chunk)

    def submit_render(self, prep: Prepared) -> "Future[int]":
        """``prep.render`` on the worker's threads: a document's next chunk, ahead of the GPU."""
        return self._threads().submit(prep.render)

    def _map(self, fn, items: Iterable[Match]) -> Iterator[Prepared | Outcome]:
        items = list(items)
        if len(items) <= 1 or self.threads <= 1:
            return map(fn, items)
        return self._threads().map(fn, items)

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="vlwatch-prepare")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def settle(prep: Prepared, index: int, answer: Answer | str) -> Answer | str | Request:
    """Page ``index``'s answer (or error text) after ``prep``'s answer policy: final, or the next request."""
    if prep.policy is None:
        return answer
    got = prep.policy.settle(index, VlwatchError(answer) if isinstance(answer, str) else answer)
    return error_text(got) if isinstance(got, BaseException) else got


def reading_error(match: Match, exc: Exception) -> VlwatchError:
    """What reading ``match``'s file failed with, as the file's error; a decoder bug is logged with its traceback."""
    if isinstance(exc, VlwatchError):
        return exc
    log.error("%s: unexpected error while reading", printable(match.path), exc_info=exc)
    return VlwatchError(f"{printable(match.path)}: unexpected error while reading: {printable(exc)}")


def error_text(exc: BaseException) -> str:
    """What a failed request records: the message of our own errors, the type too for anything else."""
    if isinstance(exc, VlwatchError):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {printable(str(exc))}"


def _raise_if_device_lost(exc: Exception) -> None:
    """A sticky CUDA error, typed or only a message (a plugin's), is the device's fault, not the batch's."""
    if (lost := as_device_lost(exc)) is not None:
        raise lost from exc
