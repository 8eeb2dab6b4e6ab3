"""The live feed of one admission session: what the slot engine takes between its steps (``JobFeed``).

``engine.loop.WorkerLoop`` hands a ``JobFeed`` to a backend that admits
requests itself (``serve``: the transformers backend's slot engine), which
polls it from the loop's thread:

- ``next``: interactive requests first (``WorkerLoop.submit``: the API,
  ``vlwatch ask``), then the pages of queued jobs, claimed a few at a time
  (up to ``lookahead`` pages ahead of the slots) and read on the worker's
  threads; a long document's later pages are rendered a chunk at a time as
  its earlier ones are answered, before any new job is claimed (issue 24);
- ``deliver``: each answer as its sequence ends; a file's sidecars are
  written and its job recorded (on a writer thread, off the GPU's path) when
  its last page is done, through the rule's answer policy where it has one;
- ``close``: whatever is still in hand goes back on the queue without
  spending an attempt.

It never blocks the engine, and it reaches the loop only through the loop's
public surface (``next_interactive``, ``wait_for_wake``, ``hold`` /
``let_go`` for the jobs in hand, ...).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence

from daemon.backends import Answer, Item, Request, Sizing, expected_requests
from daemon.config import Config
from daemon.engine.outcomes import Processor
from daemon.engine.worker import Outcome, Prepared, Worker, error_text, page_chunk
from daemon.errors import BackendUnavailableError, StateUnavailableError
from daemon.intake.readiness import file_signature
from daemon.intake.rules import Match, match_file
from daemon.store.queue import Job, Queue

log = logging.getLogger(__name__)


class Ask(Future[Answer]):
    """An interactive request's future: ``cancel()`` works while it runs too.

    A plain future cannot be cancelled once running; this one remembers that
    its caller (an HTTP client that hung up) gave up, and the engine drops
    the request at its next step (``JobFeed.abandoned``), freeing its slot.
    """

    def __init__(self) -> None:
        super().__init__()
        self.abandoned = threading.Event()
        self.submitted = time.monotonic()

    def cancel(self) -> bool:
        self.abandoned.set()
        return super().cancel()


@dataclass
class _OpenJob:
    job: Job
    prep: Prepared
    started: float
    answers: dict[int, Answer | BaseException] = field(default_factory=dict)


@dataclass
class _Given:
    """A stand-in worker for ``Processor.process``: the outcome is known already (continuous admission).

    The processor then does for one job what it does for a batch: checks the
    file is still the one queued, and records the outcome.
    """

    config: Config
    outcome: Outcome | None

    def process(self, matches: Sequence[Match]) -> list[Outcome]:
        if self.outcome is None:
            return [Outcome(matches[0], error="the file matched no rule when it was claimed")]
        return [self.outcome]


class EngineLoop(Protocol):
    """What the feed uses of the loop that runs it (``engine.loop.WorkerLoop``): the feed depends on this,
    not on the loop's module, so that the two stay one-way."""

    worker: Worker
    queue: Queue
    processor: Processor
    index: int  # which engine of the daemon's: engine 0 answers interactive requests
    stopping: threading.Event
    busy_since: float | None  # the loop's stall watch: set on every call the engine makes
    paused_until: float  # no claims before this (an outage)
    done: int  # files finished (status)

    @property
    def draining(self) -> bool: ...

    @property
    def replacing_worker(self) -> bool: ...

    def next_interactive(self) -> tuple[Request, Future[Answer]] | None: ...

    def interactive_waiting(self) -> bool: ...

    def wait_for_wake(self, timeout: float) -> None: ...

    def wake(self) -> None: ...

    def hold(self, job_id: int) -> None: ...

    def let_go(self, job_ids: Sequence[int] | None = None) -> None: ...


class JobFeed:
    """The live ``Feed`` of one admission session: interactive requests, then queued jobs' pages.

    Called from the backend's GPU loop; never blocks it: jobs are claimed a
    few at a time (up to ``lookahead`` pages ahead of the slots) and read on
    the worker's threads; finished files are written and recorded on a writer
    thread.  Whatever is still in hand at the end goes back on the queue
    without spending an attempt (``close``).
    """

    #: Least time between two claims that found nothing (each is a SQLite transaction).
    CLAIM_EVERY = 0.25

    def __init__(self, loop: EngineLoop, lookahead: int | None = None) -> None:
        self.loop = loop
        self.worker = loop.worker
        self.queue = loop.queue
        size = max(1, self.worker.batch_size())
        self.lookahead = lookahead or min(64, size) + 4
        self.chunk = page_chunk(size)  # pages of one document rendered together
        self.asks: dict[Hashable, Future[Answer]] = {}
        self.open: dict[int, _OpenJob] = {}
        self.ready: collections.deque[Item] = collections.deque()
        self.preparing: list[tuple[Job, Future[Prepared | Outcome]]] = []
        #: open documents whose next chunk is being rendered
        self.rendering: list[tuple[int, Prepared, Future[int]]] = []
        self.claimed = 0
        self._may_have_more = True
        self._last_empty_claim = 0.0
        self._asks_seen = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="vlwatch-writer")
        self._lock = threading.Lock()  # open / in_hand, shared with the writer thread
        #: an output disk or the state database that refused the writer (issues 10.7, 10.8): no
        #: new jobs are claimed, and the loop pauses the queue once the backend hands back
        self.outage: BackendUnavailableError | None = None

    # -- the Feed protocol (GPU thread)
    def sizing(self) -> Sizing:
        return Sizing(expected=expected_requests(self.worker.config))

    def next(self, urgent_only: bool = False) -> Item | None:
        self.loop.busy_since = time.monotonic()
        while (waiting := self.loop.next_interactive()) is not None:
            request, future = waiting
            if future.set_running_or_notify_cancel():
                if isinstance(future, Ask):
                    log.debug("an interactive request taken by the engine %.3f s after it was submitted",
                              time.monotonic() - future.submitted)
                self._asks_seen += 1
                key = ("ask", self._asks_seen)
                self.asks[key] = future
                return Item(key, request, urgent=True)
        if urgent_only or self.stopping():
            return None
        self._collect()
        if len(self.ready) + self._preparing_pages() < self.lookahead:
            self._render_more()  # the documents in hand first: a document's pages stay together
            self._top_up()
            self._collect()
        return self.ready.popleft() if self.ready else None

    def more(self) -> bool:
        if self.stopping():
            return False
        return bool(self.loop.interactive_waiting() or self.ready or self.preparing or self.rendering
                    or self._pages_left()) or (
            self._may_have_more and self.loop.paused_until <= time.time() and self.outage is None)

    def wait(self, timeout: float) -> None:
        self.loop.wait_for_wake(timeout)

    def stopping(self) -> bool:
        return self.loop.stopping.is_set() or self.loop.replacing_worker

    def interactive(self) -> bool:
        # Engine 0 (in the daemon's process) answers the API and `ask`; the child engines of further
        # GPUs run queued jobs only, so they keep no slots back for interactive requests, and neither
        # does a drain (`scan`, `process` without a daemon): no question comes through it.
        return self.loop.index == 0 and not self.loop.draining

    def abandoned(self, key: Hashable) -> bool:
        future = self.asks.get(key)
        return isinstance(future, Ask) and future.abandoned.is_set()

    def deliver(self, key: Hashable, result: Answer | BaseException) -> None:
        self.loop.busy_since = time.monotonic()
        future = self.asks.pop(key, None)
        if future is not None:
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
            return
        job_id, page = key  # type: ignore[misc]
        with self._lock:
            opened = self.open.get(job_id)
            if opened is None:
                return
            if opened.prep.policy is not None:  # the rule's answer policy may ask again (issue 24)
                result = opened.prep.policy.settle(page, result)
                if isinstance(result, Request):
                    self.ready.appendleft(Item(key, result))  # first in line: the document finishes sooner
                    return
            opened.answers[page] = result
            opened.prep.done()  # the page's image is let go; its document's next chunk may come
            if len(opened.answers) < opened.prep.count:
                return  # a multi-page file is done when its last page is
            del self.open[job_id]
        self._writer.submit(self._finish, opened)

    def put_back(self, keys: Sequence[Hashable]) -> None:
        jobs = set()
        for key in keys:
            future = self.asks.pop(key, None)
            if future is not None:
                future.set_exception(BackendUnavailableError("the daemon is stopping"))
            else:
                jobs.add(key[0])  # type: ignore[index]
        self._release([j for j in jobs])

    # -- for the loop
    def job_ids(self) -> list[int]:
        with self._lock:
            return list(self.open) + [j.id for j, _ in self.preparing]

    def drop_jobs_objects(self) -> list[Job]:
        """Forget every job in hand (the caller records them) and return them."""
        with self._lock:
            jobs = [o.job for o in self.open.values()] + [j for j, _ in self.preparing]
            self.open.clear()
        for _, future in self.preparing:
            future.cancel()
        self.preparing.clear()
        self.rendering.clear()
        self.ready.clear()
        self.loop.let_go()
        return jobs

    def drop_jobs(self) -> list[int]:
        return [j.id for j in self.drop_jobs_objects()]

    def fail_asks(self, exc: BaseException) -> None:
        for future in self.asks.values():
            future.set_exception(exc)
        self.asks.clear()

    def fail_everything(self, error: str) -> None:
        jobs = self.drop_jobs_objects()
        for job in jobs:
            self._record(job, None, error)
        self.fail_asks(BackendUnavailableError(error))

    def close(self) -> None:
        """End of the session: wait for the writer; what is still in hand goes back on the queue."""
        self._writer.shutdown(wait=True)
        self._release(self.job_ids())
        self.fail_asks(BackendUnavailableError("the request was not answered (the engine stopped)"))

    # -- inside
    def _preparing_pages(self) -> int:
        # one page per file until it is read (most files have one), a chunk per document rendering
        return len(self.preparing) + sum(min(prep.chunk, prep.count) for _, prep, _ in self.rendering)

    def _pages_left(self) -> bool:
        with self._lock:
            return any(o.prep.left() for o in self.open.values())

    def _render_more(self) -> None:
        """Have the next chunk of open documents that may take one rendered, within the lookahead (issue 24)."""
        busy = {job_id for job_id, _, _ in self.rendering}
        with self._lock:
            due = [(job_id, o.prep) for job_id, o in self.open.items() if job_id not in busy and o.prep.due()]
        room = self.lookahead - len(self.ready) - self._preparing_pages()
        for job_id, prep in due:
            if room <= 0:
                break
            room -= min(prep.chunk, prep.count)
            future = self.worker.submit_render(prep)
            future.add_done_callback(lambda _: self.loop.wake())
            self.rendering.append((job_id, prep, future))

    def _top_up(self) -> None:
        if self.loop.paused_until > time.time() or self.outage is not None:
            return
        if not self._may_have_more and time.monotonic() - self._last_empty_claim < self.CLAIM_EVERY:
            return
        want = self.lookahead - len(self.ready) - self._preparing_pages()
        jobs = self.queue.claim(want)
        self.claimed += len(jobs)
        self._may_have_more = len(jobs) == want
        if not jobs:
            self._last_empty_claim = time.monotonic()
        config = self.worker.config
        for job in jobs:
            self.loop.hold(job.id)
            matches = match_file(config, job.path, job.rule) if file_signature(job.path) is not None else []
            if not matches:  # gone, or its rule removed: the processor drops it and says why
                self._writer.submit(self._record, job, None, None)
                continue
            future = self.worker.submit_prepare(matches[0])
            future.add_done_callback(lambda _: self.loop.wake())
            self.preparing.append((job, future))

    def _collect(self) -> None:
        """Pages of files that have been read become ready; files that could not be read are recorded."""
        still = []
        for job, future in self.preparing:
            if not future.done():
                still.append((job, future))
                continue
            try:
                got = future.result()
            except Exception as exc:  # _safe_prepare catches everything; belt and braces
                self._writer.submit(self._record, job, None, error_text(exc))
                continue
            if isinstance(got, Outcome):
                self._writer.submit(self._record, job, got, None)
                continue
            if not got.count:
                self._writer.submit(self._finish, _OpenJob(job, got, time.monotonic()))
                continue
            with self._lock:
                self.open[job.id] = _OpenJob(job, got, time.monotonic())
            self.ready.extend(Item((job.id, i), r) for i, r in got.take())
        self.preparing = still
        rendering = []
        for job_id, prep, future in self.rendering:
            if not future.done():
                rendering.append((job_id, prep, future))
                continue
            with self._lock:
                opened = self.open.get(job_id)
                if opened is None or opened.prep is not prep:
                    continue  # put back or failed meanwhile
                if prep.failed is not None:  # a later page cannot be read: the file fails, as at prepare
                    del self.open[job_id]
            if prep.failed is not None:
                self.ready = collections.deque(i for i in self.ready if i.key[0] != job_id)  # type: ignore[index]
                self._writer.submit(self._finish, opened)
                continue
            self.ready.extend(Item((job_id, i), r) for i, r in prep.take())
        self.rendering = rendering

    def _finish(self, opened: _OpenJob) -> None:
        """Writer thread: sidecars for a file whose pages are all answered, then its record."""
        pages = [opened.answers.get(i) for i in range(opened.prep.count)]
        errors = [a for a in pages if isinstance(a, BaseException) or a is None]
        got: list[Answer] | str = error_text(errors[0]) if errors and errors[0] is not None else \
            ("no answer" if errors else pages)  # type: ignore[assignment]
        outcome = self.worker.finish(opened.prep, got, opened.started)
        self._record(opened.job, outcome, None)
        if outcome.ok:
            self.loop.done += 1

    def _record(self, job: Job, outcome: Outcome | None, error: str | None) -> None:
        """Writer thread: the processor checks the job's file and records ``outcome`` (or ``error``)."""
        try:
            if error is not None:
                matches = match_file(self.worker.config, job.path, job.rule)
                outcome = Outcome(matches[0], error=error) if matches else None
            self.loop.processor.process(_Given(self.worker.config, outcome), [job])
        except BackendUnavailableError as exc:
            # The output disk is full (the job never really ran: back on the queue, no attempt
            # spent) or the state database refused the commit (the processor keeps the outcome
            # and records it once it can): either way the queue pauses (issues 10.7, 10.8).
            self.outage = self.outage or exc
            if not isinstance(exc, StateUnavailableError):
                self.loop.processor.release([job.id])
        except Exception:  # a bug: the job stays running and is recovered at the next start
            log.exception("%s: could not record the outcome", job.path)
        finally:
            self.loop.let_go([job.id])

    def _release(self, job_ids: Sequence[int]) -> None:
        if not job_ids:
            return
        with self._lock:
            for job_id in job_ids:
                self.open.pop(job_id, None)
        self.preparing = [(j, f) for j, f in self.preparing if j.id not in job_ids]
        self.rendering = [(j, p, f) for j, p, f in self.rendering if j not in job_ids]
        self.ready = collections.deque(i for i in self.ready if i.key[0] not in job_ids)  # type: ignore[index]
        self.queue.release(job_ids)
        self.loop.let_go(job_ids)
