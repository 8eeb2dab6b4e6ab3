"""The engine: runs queued jobs through the model and records what became of each.

``WorkerLoop`` is the thread that owns the backend: it claims jobs from the
durable queue and hands them to the ``Worker``; ``Processor`` records each
job's outcome (done, retried with backoff, failed, dropped).  ``vlwatch
scan`` uses ``Processor`` too, without the thread.

Failures: a file that fails is retried ``jobs.attempts`` times with
exponential backoff (``jobs.backoff``, doubling) and then marked failed with
its reason; the file itself is never touched.  A backend that cannot be
reached at all (``BackendUnavailableError``) is not the files' fault: the
queue pauses, backing off up to ``MAX_OUTAGE_PAUSE``, without spending any
job's attempts.  A job whose source was deleted or moved away before it ran
is dropped; one whose source changed is dropped and the file goes back to
the settler, so the new bytes are queued once they are complete.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from daemon import hooks
from daemon.backends import Answer, Request
from daemon.config import Config, local_model_path
from daemon.errors import BackendUnavailableError, ModelMissingError
from daemon.queue import Job, Queue, content_hash
from daemon.rules import Match, match_file
from daemon.watching import file_signature
from daemon.worker import Worker

log = logging.getLogger(__name__)

#: Longest pause of the queue while the backend is unreachable.
MAX_OUTAGE_PAUSE = 300.0
#: Files waiting to settle plus files queued per second that make a burst:
#: the worker then lets the intake get them onto the durable queue first...
BURST = 200
#: ...but never waits longer than this before running a batch anyway.
MAX_YIELD = 10.0


def check_model(config: Config) -> None:
    """Fail at start, with the way out, when the local weights are missing."""
    if config.model.backend == "transformers" and local_model_path(config.model.name) is None:
        from daemon.backends.transformers import missing_model_message

        raise ModelMissingError(missing_model_message(config.model.name))




def backoff_delay(config: Config, attempts: int) -> float:
    """Wait before try ``attempts + 1``: ``jobs.backoff``, doubling each time."""
    return config.jobs.backoff * (2 ** max(0, attempts - 1))


@dataclass
class BatchResult:
    done: int = 0
    failed: int = 0
    retrying: int = 0
    dropped: int = 0


class Processor:
    """Runs claimed jobs through a worker and records what became of each.

    Shared by the daemon's worker thread and ``vlwatch scan``.

    Args:
        queue: the state database.
        on_changed: told about a source whose bytes changed since it was queued.
    """

    def __init__(self, queue: Queue, on_changed: Callable[[Path], None]) -> None:
        self.queue = queue
        self.on_changed = on_changed

    def process(self, worker: Worker, jobs: Sequence[Job]) -> BatchResult:
        """Raises ``BackendUnavailableError`` after putting the jobs back (attempts refunded)."""
        result = BatchResult()
        config = worker.config
        ready: list[tuple[Job, Match]] = []
        for job in jobs:
            match = self._gate(config, job, result)
            if match is not None:
                ready.append((job, match))
        if not ready:
            return result
        try:
            outcomes = worker.process([m for _, m in ready])
        except BackendUnavailableError:
            raise
        except ModelMissingError as exc:
            # The weights went away under a running daemon: the machine's
            # problem, not the files'; pause like an unreachable server.
            raise BackendUnavailableError(str(exc)) from exc
        except Exception as exc:  # a model crash fails this batch's files, not the daemon
            log.exception("the worker failed on a batch of %d", len(ready))
            for job, _ in ready:
                self._failed(config, job, f"unexpected error: {exc}", None, result)
            return result
        finished = []
        for (job, _), outcome in zip(ready, outcomes, strict=True):
            if outcome.ok:
                finished.append((job.id, outcome.sidecars, outcome.seconds))
                names = ", ".join(s.name for s in outcome.sidecars)
                log.info("%s: %s done in %.1fs -> %s", job.path, job.rule, outcome.seconds, names)
                result.done += 1
                if file_signature(job.path) != job.signature:
                    self.on_changed(job.path)  # changed while it ran: its new bytes get their turn
            else:
                self._failed(config, job, outcome.error or "unknown error", outcome.seconds, result)
        self.queue.finish(finished)
        for job, outcome in zip((j for j, _ in ready), outcomes):  # after the commit: a hook may move the file
            if outcome.ok:
                hooks.done(config, job.rule, job.path, outcome.sidecars)
        return result

    def _gate(self, config: Config, job: Job, result: BatchResult) -> Match | None:
        """The job's match if it should run now; drop it (and say why) if not."""
        sig = file_signature(job.path)
        if sig is None:
            return self._drop(job, "the file was deleted or moved away before it was processed", result)
        matches = match_file(config, job.path, job.rule)
        if not matches:
            return self._drop(job, f"rule {job.rule!r} is no longer configured", result)
        if sig != job.signature:
            try:
                same = content_hash(job.path) == job.hash
            except OSError:
                same = False
            if not same:
                self.on_changed(job.path)
                return self._drop(job, "the file changed since it was queued; queued again once it settles", result)
        return matches[0]

    def _drop(self, job: Job, why: str, result: BatchResult) -> None:
        self.queue.drop(job.id)
        log.info("%s: %s dropped: %s", job.path, job.rule, why)
        result.dropped += 1
        return None

    def _failed(self, config: Config, job: Job, error: str, seconds: float | None, result: BatchResult) -> None:
        if file_signature(job.path) != job.signature:
            # The file changed (or went away) under us, e.g. a copy still in
            # progress that decoded as truncated: not a failure of these bytes.
            self.on_changed(job.path)
            self._drop(job, f"the file changed while it was processed ({error})", result)
            return
        if job.attempts < config.jobs.attempts:
            delay = backoff_delay(config, job.attempts)
            self.queue.fail(job.id, error, retry_at=time.time() + delay, seconds=seconds)
            log.warning("%s: %s failed (attempt %d of %d), retrying in %gs: %s",
                        job.path, job.rule, job.attempts, config.jobs.attempts, delay, error)
            result.retrying += 1
        else:
            self.queue.fail(job.id, error, retry_at=None, seconds=seconds)
            log.error("%s: %s failed after %d attempts: %s", job.path, job.rule, job.attempts, error)
            hooks.failed(config, job.rule, job.path, error)
            result.failed += 1


# ---------------------------------------------------------------- the worker


class WorkerLoop(threading.Thread):
    """Claims batches from the queue and runs them, until told to stop.

    Args:
        queue: the state database.
        worker: the worker for the current config (swapped by ``replace_worker``).
        processor: records results.
    """

    def __init__(self, queue: Queue, worker: Worker, processor: Processor,
                 backlog: Callable[[], int] = lambda: 0) -> None:
        super().__init__(name="vlwatch-worker", daemon=True)
        self.queue = queue
        self.worker = worker
        self.processor = processor
        self._backlog = backlog
        self._yielding_since: float | None = None
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._next_worker: Worker | None = None
        self.in_hand: list[int] = []  # ids of claimed jobs not yet recorded
        self.busy_since: float | None = None
        self.last_work = time.monotonic()
        self.batch_lock = threading.Lock()  # held while the backend is in use
        self.paused_until = 0.0
        self._outage_pause = 0.0
        self._outage_since: float | None = None
        self._model_loaded: bool | None = None
        self._interactive: collections.deque[tuple[Request, Future[Answer]]] = collections.deque()

    def submit(self, request: Request) -> Future[Answer]:
        """Answer ``request`` ahead of the folder backlog (the API, ``vlwatch ask``).

        The future fails with the backend's exception (``BackendUnavailableError``
        when it cannot be reached); ``future.cancel()`` before it starts drops it.
        """
        future: Future[Answer] = Future()
        self._interactive.append((request, future))
        self._wake.set()
        return future

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def replace_worker(self, worker: Worker) -> None:
        """Use ``worker`` from the next batch on (after a reload)."""
        self._next_worker = worker
        self._wake.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception:  # e.g. the state disk is full: log, wait, go on
                log.exception("worker loop error; retrying in 5s")
                self.stopping.wait(5)
        while self._interactive:
            _, future = self._interactive.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(BackendUnavailableError("the daemon is stopping"))

    def _step(self) -> None:
        self._swap_worker()
        if self._interactive:
            self._serve_interactive()
            return
        now = time.time()
        if self.paused_until > now:
            self._sleep(self.paused_until - now)
            return
        size = max(1, self.worker.batch_size())
        if self.queue.due_count() == 0:
            self._sleep(self._idle_timeout())
            return
        self._fill(size)
        if self.stopping.is_set():
            return
        if self._yield_to_intake():
            self._sleep(0.05)
            return
        jobs = self.queue.claim(size)
        self.in_hand = [j.id for j in jobs]
        if jobs:
            self._run(jobs)

    def _serve_interactive(self) -> None:
        # First version: interactive requests run between folder batches, one
        # at a time (issue 12 replaces this with admission into free slots).
        with self.batch_lock:
            self.busy_since = time.monotonic()
            try:
                while self._interactive and not self.stopping.is_set():
                    request, future = self._interactive.popleft()
                    if future.set_running_or_notify_cancel():
                        _answer_one(self.worker, request, future)
            finally:
                self.busy_since = None
                self.last_work = time.monotonic()
        self._note_model_state()

    def _yield_to_intake(self) -> bool:
        """During a burst of arrivals, let them reach the durable queue before processing.

        Queued is what survives a crash; the model can start a few seconds
        later.  Bounded by ``MAX_YIELD``, so a steady stream never starves it.
        """
        if self._backlog() < BURST:
            self._yielding_since = None
            return False
        now = time.monotonic()
        if self._yielding_since is None:
            self._yielding_since = now
        if now - self._yielding_since < MAX_YIELD:
            return True
        self._yielding_since = None
        return False

    def _fill(self, size: int) -> None:
        """Wait up to ``jobs.batch_wait`` for a full batch, so files arriving together share one."""
        deadline = time.monotonic() + self.worker.config.jobs.batch_wait
        while not self.stopping.is_set() and self.queue.due_count() < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)
            self._wake.clear()

    def _run(self, jobs: list[Job]) -> None:
        with self.batch_lock:
            self.busy_since = time.monotonic()
            try:
                self.processor.process(self.worker, jobs)
                self._backend_back()
            except BackendUnavailableError as exc:
                self._backend_down(exc)
            finally:
                self.in_hand = []
                self.busy_since = None
                self.last_work = time.monotonic()
        self._note_model_state()

    def _backend_down(self, exc: BackendUnavailableError) -> None:
        self._outage_pause = min(MAX_OUTAGE_PAUSE, max(5.0, self._outage_pause * 2))
        self._outage_since = self._outage_since or time.time()
        until = time.time() + self._outage_pause
        self.queue.release(self.in_hand, not_before=until)
        self.paused_until = until
        log.warning("backend unavailable (%s); queue paused for %gs, no attempts spent", exc, self._outage_pause)
        self.queue.set_meta("backend", {"available": False, "error": str(exc), "retry_at": until,
                                        "since": self._outage_since})

    def _backend_back(self) -> None:
        if self._outage_pause:
            self._outage_pause, self._outage_since = 0.0, None
            log.info("backend available again; queue resumed")
            self.queue.set_meta("backend", None)

    def _note_model_state(self) -> None:
        loaded = bool(getattr(self.worker.backend, "loaded", False))
        if loaded != self._model_loaded:
            self._model_loaded = loaded
            backend = self.worker.backend
            self.queue.set_meta("model", {"backend": backend.name, "model": backend.model, "loaded": loaded,
                                          "since": time.time()})

    def unload_if_idle(self, idle_unload: float) -> None:
        """Free the model's memory after ``idle_unload`` seconds without a batch."""
        backend = self.worker.backend
        if idle_unload <= 0 or not getattr(backend, "loaded", False):
            return
        if time.monotonic() - self.last_work < idle_unload or not self.batch_lock.acquire(blocking=False):
            return
        try:
            backend.unload()
            log.info("model %s unloaded after %gs idle; it loads again on the next file", backend.model, idle_unload)
        finally:
            self.batch_lock.release()
        self._note_model_state()

    def _swap_worker(self) -> None:
        new, self._next_worker = self._next_worker, None
        if new is None:
            return
        old = self.worker
        self.worker = new
        old.close()
        if old.backend is not new.backend:
            unload = getattr(old.backend, "unload", None)
            if callable(unload):
                unload()
        self._model_loaded = None
        self._note_model_state()

    def _idle_timeout(self) -> float:
        # Other processes (`vlwatch retry`, `scan`) add jobs without waking
        # us, and retries come due by the clock: look again at least every second.
        due = self.queue.next_due()
        return 1.0 if due is None else max(0.05, min(1.0, due - time.time()))

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(max(0.0, seconds))
        self._wake.clear()


def _answer_one(worker: Worker, request: Request, future: Future[Answer]) -> None:
    """Run one interactive request; whatever the backend streamed, the client gets the whole text."""
    sent: list[str] = []
    if request.stream is not None:
        client = request.stream

        def stream(piece: str) -> None:
            sent.append(piece)
            client(piece)

        request = replace(request, stream=stream)
    try:
        [answer] = worker.backend.generate([request])
    except Exception as exc:  # the caller (an HTTP request) reports it; the daemon goes on
        future.set_exception(exc)
        return
    if request.stream is not None:
        rest = answer.text[len("".join(sent)):]
        if rest:
            request.stream(rest)
    future.set_result(answer)
