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

What is not retried: an input error that is ``permanent`` (not an image,
empty, a decompression bomb, an aspect ratio the model cannot take, a
format the rule does not take) fails the job at once (issue 10.10).  What
pauses like an unreachable backend, spending no attempts: an output disk
that refuses sidecars (ENOSPC, EDQUOT, EROFS: issue 10.8; a small probe
write tells when it takes writes again, before the model runs) and a state
database that refuses a commit (issue 10.7: the outcomes are kept in memory,
in order, and recorded once it takes writes, so no job stays ``running``).
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from daemon import hooks
from daemon.backends import Answer, Request
from daemon.config import Config, local_model_path
from daemon.errors import (
    BackendUnavailableError,
    ModelMissingError,
    StateUnavailableError,
    StorageUnavailableError,
)
from daemon.images import printable
from daemon.outputs import TEMP_PREFIX, TEMP_SUFFIX
from daemon.queue import Job, Queue, content_hash
from daemon.rules import Match, match_file
from daemon.watching import file_signature
from daemon.worker import STORAGE_ERRNOS, Worker

log = logging.getLogger(__name__)

#: Longest pause of the queue while the backend is unreachable (see ``BackendUnavailableError.max_pause``).
MAX_OUTAGE_PAUSE = BackendUnavailableError.max_pause
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

    Recording never loses an outcome (issue 10.7): a write the state database
    refuses (its disk is full, an I/O error) is kept in memory, in order, and
    applied by ``flush`` once the database takes writes again; meanwhile
    ``process`` raises ``StateUnavailableError`` so the caller pauses like
    for any outage.  Jobs therefore never stay ``running`` for want of a
    restart.

    Args:
        queue: the state database.
        on_changed: told about a source whose bytes changed since it was queued.
    """

    def __init__(self, queue: Queue, on_changed: Callable[[Path], None]) -> None:
        self.queue = queue
        self.on_changed = on_changed
        self._unrecorded: list[Callable[[], object]] = []
        self._record_lock = threading.Lock()
        self.state_error: str | None = None
        #: a folder whose disk refused a sidecar: probed before the model runs again
        self.full_folder: Path | None = None

    # ------------------------------------------------------------ recording

    def record(self, write: Callable[[], object]) -> None:
        """Apply ``write`` to the state database now, or as soon as it takes writes again."""
        with self._record_lock:
            self._unrecorded.append(write)
        self.flush()

    def release(self, job_ids: Sequence[int], not_before: float = 0.0) -> None:
        """Put jobs that never really ran back on the queue (no attempt spent)."""
        if job_ids:
            self.record(partial(self.queue.release, list(job_ids), not_before=not_before))

    def flush(self) -> bool:
        """Record what the state database refused before, in order; True when nothing is left."""
        with self._record_lock:
            while self._unrecorded:
                try:
                    self._unrecorded[0]()
                except sqlite3.OperationalError as exc:  # "database or disk is full", "disk I/O error"...
                    if self.state_error is None:
                        log.error("%s: cannot record job results (%s); %d kept in memory, retried while the "
                                  "queue is paused", self.queue.path, exc, len(self._unrecorded))
                    self.state_error = str(exc)
                    return False
                self._unrecorded.pop(0)
            if self.state_error is not None:
                self.state_error = None
                log.warning("%s: takes writes again; every job result is recorded", self.queue.path)
            return True

    def unrecorded(self) -> int:
        with self._record_lock:
            return len(self._unrecorded)

    def state_down(self) -> StateUnavailableError:
        return StateUnavailableError(f"state database {self.queue.path} refuses writes: {self.state_error}")

    # ------------------------------------------------------------ processing

    def process(self, worker: Worker, jobs: Sequence[Job]) -> BatchResult:
        """Raises ``BackendUnavailableError`` (or a subclass: output disk, state
        database) with the jobs not recorded; the caller puts them back with
        ``release`` (attempts refunded)."""
        if not self.flush():
            raise self.state_down()
        self._probe_output()
        result = BatchResult()
        config = worker.config
        ready: list[tuple[Job, Match]] = []
        for job in jobs:
            match = self._gate(config, job, result)
            if match is not None:
                ready.append((job, match))
        if not ready:
            return self._checked(result)
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
            return self._checked(result)
        finished = []
        outage: tuple[Path, str] | None = None
        for (job, _), outcome in zip(ready, outcomes, strict=True):
            if outcome.ok:
                finished.append((job.id, outcome.sidecars, outcome.seconds))
                names = ", ".join(s.name for s in outcome.sidecars)
                log.info("%s: %s done in %.1fs -> %s", job.path, job.rule, outcome.seconds, names)
                result.done += 1
                if file_signature(job.path) != job.signature:
                    self.on_changed(job.path)  # changed while it ran: its new bytes get their turn
            elif outcome.outage is not None:
                # Left running: the caller releases it with the rest of the batch.
                outage = outage or (outcome.outage, outcome.error or "output disk refuses writes")
            else:
                self._failed(config, job, outcome.error or "unknown error", outcome.seconds, result,
                             permanent=outcome.permanent)
        self.record(partial(self.queue.finish, finished))
        for job, outcome in zip((j for j, _ in ready), outcomes):  # after the commit: a hook may move the file
            if outcome.ok:
                hooks.done(config, job.rule, job.path, outcome.sidecars)
        if outage is not None:
            self.full_folder = outage[0]
            raise StorageUnavailableError(outage[1])
        self.full_folder = None
        return self._checked(result)

    def _checked(self, result: BatchResult) -> BatchResult:
        if self.unrecorded():
            raise self.state_down()
        return result

    def _probe_output(self) -> None:
        """While an output disk was full, try a small write there before running the model again.

        Running a batch through the model only to fail writing it wastes the
        GPU; a probe costs one small file.  A probe that passes lets the batch
        run (the real write may still fail, which pauses again).
        """
        folder = self.full_folder
        if folder is None:
            return
        probe = folder / f"{TEMP_PREFIX}probe-{os.getpid()}{TEMP_SUFFIX}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.write(fd, b"\0" * 65536)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in STORAGE_ERRNOS:
                probe.unlink(missing_ok=True)
                raise StorageUnavailableError(f"output disk still refuses writes: {printable(folder)} "
                                              f"({exc.strerror or exc})") from exc
            # Something else (the folder went away): let the batch find out for itself.
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass

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
        self.record(partial(self.queue.drop, job.id))
        log.info("%s: %s dropped: %s", job.path, job.rule, why)
        result.dropped += 1
        return None

    def _failed(self, config: Config, job: Job, error: str, seconds: float | None, result: BatchResult,
                *, permanent: bool = False) -> None:
        if file_signature(job.path) != job.signature:
            # The file changed (or went away) under us, e.g. a copy still in
            # progress that decoded as truncated: not a failure of these bytes.
            self.on_changed(job.path)
            self._drop(job, f"the file changed while it was processed ({error})", result)
            return
        if permanent:
            # These bytes can never succeed (not an image, a bomb...): trying
            # again only burns time (issue 10.10).  New bytes get a new job.
            self.record(partial(self.queue.fail, job.id, error, retry_at=None, seconds=seconds))
            log.error("%s: %s failed (not retried: it cannot succeed for this file's content): %s",
                      job.path, job.rule, error)
            result.failed += 1
        elif job.attempts < config.jobs.attempts:
            delay = backoff_delay(config, job.attempts)
            self.record(partial(self.queue.fail, job.id, error, retry_at=time.time() + delay, seconds=seconds))
            log.warning("%s: %s failed (attempt %d of %d), retrying in %gs: %s",
                        job.path, job.rule, job.attempts, config.jobs.attempts, delay, error)
            result.retrying += 1
        else:
            self.record(partial(self.queue.fail, job.id, error, retry_at=None, seconds=seconds))
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
        self._outage_key = "backend"
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
            except sqlite3.OperationalError as exc:  # the state disk is full (claim failed): nothing was taken
                log.error("%s: %s; trying again in 5s", self.queue.path, exc)
                self.stopping.wait(5)
            except Exception:  # a bug: log, wait, go on
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
        if not self.processor.flush():  # results the state database refused: nothing new until they are in
            self._backend_down(self.processor.state_down())
            return
        if self._outage_key == "state":
            self._backend_back()
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
        # One path for every outage: backend, output disk, state database (issue 10.7, 10.8).
        key = exc.meta_key
        if key != self._outage_key and self._outage_pause:
            self._set_meta(self._outage_key, None)
        self._outage_key = key
        self._outage_pause = min(exc.max_pause, max(exc.first_pause, self._outage_pause * 2))
        self._outage_since = self._outage_since or time.time()
        until = time.time() + self._outage_pause
        self.processor.release(self.in_hand, not_before=until)
        self.paused_until = until
        what = {"backend": "backend unavailable", "storage": "output disk refuses writes",
                "state": "state database refuses writes"}.get(key, key)
        log.warning("%s (%s); queue paused for %gs, no attempts spent", what, exc, self._outage_pause)
        self._set_meta(key, {"available": False, "error": str(exc), "retry_at": until, "since": self._outage_since})

    def _backend_back(self) -> None:
        if self._outage_pause:
            self._outage_pause, self._outage_since = 0.0, None
            log.info("%s available again; queue resumed", {"storage": "output disk", "state": "state database"}
                     .get(self._outage_key, "backend"))
            self._set_meta(self._outage_key, None)

    def _set_meta(self, key: str, value: dict[str, object] | None) -> None:
        try:
            self.queue.set_meta(key, value)
        except sqlite3.OperationalError as exc:  # the state disk is the one that is full
            log.debug("cannot record %s state: %s", key, exc)

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
