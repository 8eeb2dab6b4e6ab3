"""Run matched files through the model and hand each answer to its sidecar writer.

The worker is the one place where files meet the backend:

1. *prepare* (CPU threads): decode each file into pages sized for the model
   (``daemon.images``) and render its prompt (``daemon.rules``);
2. *infer*: group the pages' requests into batches of similar size and send
   them to the backend, pages of many files together;
3. *write*: give each file its pages' answers back and write its sidecars
   (``daemon.outputs``).

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
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from daemon.backends import Answer, Backend, DeviceLostError, Request, as_device_lost
from daemon.config import Config
from daemon.documents import document_note
from daemon.errors import BackendUnavailableError, VlwatchError
from daemon.images import Page, load_pages, printable
from daemon.outputs import FolderSyncs, PageResult, Result, missing, write_result
from daemon.policies import AnswerPolicy, policy_for
from daemon.rules import Match, allowed_roots, render_prompt

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: Write errors that say the disk, not the file, is the problem (issue 10.8).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_STORAGE_WORDS = {errno.ENOSPC: "full", errno.EDQUOT: "over quota", errno.EROFS: "read-only"}


@dataclass(frozen=True)
class Prepared:
    match: Match
    pages: tuple[Page, ...]
    requests: tuple[Request, ...]
    #: what becomes of each page's answer (retries: issue 24); None = taken as it comes
    policy: AnswerPolicy | None = None


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

    def batch_size(self) -> int:
        """Requests per model call: the configured number, or an automatic one."""
        if self.config.model.batch_size is not None:
            return self.config.model.batch_size
        auto = getattr(self.backend, "auto_batch_size", None)
        return auto() if callable(auto) else 4

    # ------------------------------------------------------------ stage 1

    def prepare(self, match: Match) -> Prepared:
        """Decode and size ``match``'s file, and build one request per page."""
        rule, model = match.rule, self.config.model
        pages = load_pages(
            match.path,
            min_pixels=rule.min_pixels or model.min_pixels,
            max_pixels=rule.max_pixels or model.max_pixels,
            formats=rule.formats,
            pages=rule.pages,  # each selected page becomes its own request, batched like separate images
            allowed_roots=allowed_roots(self.config, match),
            longest_side=rule.longest_side,
        )
        prompt = render_prompt(rule, match.path)
        max_new = rule.max_new_tokens or model.max_new_tokens
        # A rule's reference images go first in every request (issue 13.5):
        # their pixels count in the batch planner like the page's own.
        refs = tuple(img for ref in rule.reference
                     for img in reference_images(ref, rule.min_pixels or model.min_pixels,
                                                 rule.max_pixels or model.max_pixels))
        requests = tuple(Request(images=(*refs, p.image), prompt=prompt, max_new_tokens=max_new) for p in pages)
        policy = policy_for(rule, len(pages))
        if policy is not None:
            requests = tuple(policy.first(i, r) for i, r in enumerate(requests))
        return Prepared(match, tuple(pages), requests, policy)

    # ------------------------------------------------------------ stages 2+3

    def process(self, matches: Sequence[Match]) -> list[Outcome]:
        """Run every match to its sidecars; return one outcome per match, in order.

        The sidecars' folders are fsynced once for the whole batch, before
        this returns (``FolderSyncs``): the caller records the jobs as done
        only after that, so a recorded job's sidecars survive a power cut.
        """
        outcomes: dict[int, Outcome] = {}
        chunk = max(1, self.batch_size()) * 4
        parts = [list(enumerate(matches[start:start + chunk], start)) for start in range(0, len(matches), chunk)]
        folders = FolderSyncs()
        try:
            # The next chunk's files are decoded on the CPU threads while this
            # chunk is on the GPU, so the GPU does not wait for image decoding.
            ahead = self._map(self._safe_prepare, [m for _, m in parts[0]]) if parts else None
            for n, part in enumerate(parts):
                current = ahead
                ahead = self._map(self._safe_prepare, [m for _, m in parts[n + 1]]) if n + 1 < len(parts) else None
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

    def _safe_prepare(self, match: Match) -> Prepared | Outcome:
        try:
            return self.prepare(match)
        except VlwatchError as exc:
            return Outcome(match, error=str(exc), permanent=bool(getattr(exc, "permanent", False)))
        except Exception as exc:  # a decoder bug must not take the daemon down
            log.exception("%s: unexpected error while reading", printable(match.path))
            return Outcome(match, error=f"{printable(match.path)}: unexpected error while reading: {printable(exc)}")

    def infer(self, prepared: Sequence[Prepared]) -> list[list[Answer] | str]:
        """Answers for each prepared file (one per page), or an error message."""
        flat = [(fi, pi, req) for fi, prep in enumerate(prepared) for pi, req in enumerate(prep.requests)]
        got: dict[tuple[int, int], Answer | str] = {}
        while flat:  # a policy may ask again for some pages: they make the next round
            again: list[tuple[int, int, Request]] = []
            for batch in self._batches(flat):
                for key, answer in self._infer_batch(batch):
                    settled = settle(prepared[key[0]], key[1], answer)
                    if isinstance(settled, Request):
                        again.append((*key, settled))
                    else:
                        got[key] = settled
            flat = again
        out: list[list[Answer] | str] = []
        for fi, prep in enumerate(prepared):
            page_answers = [got[(fi, pi)] for pi in range(len(prep.requests))]
            errors = [a for a in page_answers if isinstance(a, str)]
            out.append(errors[0] if errors else page_answers)  # type: ignore[arg-type]
        return out

    def _batches(self, flat: list[tuple[int, int, Request]]) -> Iterator[list[tuple[int, int, Request]]]:
        # Sorting by image area and output budget keeps similar requests
        # together, so left-padding wastes little of each batch.
        size = max(1, self.batch_size())
        ordered = sorted(flat, key=lambda x: (x[2].max_new_tokens, sum(i.width * i.height for i in x[2].images)))
        if getattr(self.backend, "continuous_batching", False):
            # The backend refills a slot as soon as its sequence ends: give it
            # the whole chunk, so one long answer holds up no batch of short ones.
            size = max(1, len(ordered))
        for start in range(0, len(ordered), size):
            yield ordered[start:start + size]

    def _infer_batch(self, batch: list[tuple[int, int, Request]]) -> list[tuple[tuple[int, int], Answer | str]]:
        keys = [(fi, pi) for fi, pi, _ in batch]
        requests = [r for _, _, r in batch]
        each = getattr(self.backend, "generate_each", None)
        if callable(each):  # the backend isolates failing requests itself
            try:
                got = each(requests)
            except (BackendUnavailableError, DeviceLostError):
                raise
            except Exception as exc:  # noqa: BLE001 - a backend bug: every request of the call fails with it
                _raise_if_device_lost(exc)
                log.exception("the backend failed on a batch of %d", len(batch))
                got = [exc] * len(batch)
            return [(k, error_text(a) if isinstance(a, BaseException) else a) for k, a in zip(keys, got)]
        try:
            return list(zip(keys, self.backend.generate(requests), strict=True))
        except (BackendUnavailableError, DeviceLostError):
            raise  # not this batch's fault: the caller pauses (or restarts) instead of failing files
        except Exception as exc:  # noqa: BLE001 - any exception: find the culprit, keep the rest (issue 12.3)
            _raise_if_device_lost(exc)
            if len(batch) == 1:
                return [(keys[0], error_text(exc))]
            log.warning("a batch of %d failed (%s); retrying one at a time", len(batch), error_text(exc))
            return [pair for item in batch for pair in self._infer_batch([item])]

    def finish(self, prep: Prepared, got: list[Answer] | str, started: float) -> Outcome:
        """Write ``prep``'s sidecars from its pages' answers (or record the error); never raises."""
        return self._finish(prep, got, started)

    def _finish(self, prep: Prepared, got: list[Answer] | str, started: float,
                folders: FolderSyncs | None = None) -> Outcome:
        match = prep.match
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
        quantization = "fp8" if getattr(self.backend, "precision", None) == "fp8" else None
        engine = str(getattr(self.backend, "provenance", "") or "")
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

    def submit_prepare(self, match: Match) -> "Future[Prepared | Outcome]":
        """``prepare`` on the worker's threads (continuous admission reads files ahead of the GPU)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="vlwatch-prepare")
        return self._pool.submit(self._safe_prepare, match)

    def _map(self, fn, items: Iterable[Match]) -> Iterator[Prepared | Outcome]:
        items = list(items)
        if len(items) <= 1 or self.threads <= 1:
            return map(fn, items)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vlwatch-prepare")
        return self._pool.map(fn, items)

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


def error_text(exc: BaseException) -> str:
    """What a failed request records: the message of our own errors, the type too for anything else."""
    if isinstance(exc, VlwatchError):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {printable(str(exc))}"


def _raise_if_device_lost(exc: Exception) -> None:
    """A sticky CUDA error, typed or only a message (a plugin's), is the device's fault, not the batch's."""
    if (lost := as_device_lost(exc)) is not None:
        raise lost from exc
