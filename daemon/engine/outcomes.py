"""What became of each job: runs claimed jobs through a worker and records it (done, retried, failed, dropped).

``Processor`` is shared by the daemon's worker thread (``engine.WorkerLoop``)
and ``vlwatch scan``.  A file that fails is retried ``jobs.attempts`` times
with exponential backoff (``backoff_delay``) and then marked failed with its
reason; the file itself is never touched.  An input error that is
``permanent`` fails the job at once.  A job whose source was deleted or moved
away before it ran is dropped; one whose source changed is dropped and the
file goes back to the settler.  An output disk that refuses sidecars and a
state database that refuses a commit pause the queue without spending
attempts (see ``Processor``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from daemon import hooks
from daemon.backends import DeviceLostError
from daemon.config import Config
from daemon.engine.worker import STORAGE_ERRNOS, Worker
from daemon.errors import (
    BackendUnavailableError,
    ModelMissingError,
    StateUnavailableError,
    StorageUnavailableError,
    plural,
)
from daemon.errors import printable
from daemon.intake.readiness import file_signature
from daemon.intake.rules import Match, match_file
from daemon.intake.sidecars import TEMP_PREFIX, TEMP_SUFFIX
from daemon.store.keys import content_hash
from daemon.store.queue import Job, Queue

log = logging.getLogger(__name__)


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

    def __init__(self, queue: Queue, on_changed: Callable[[Path], None],
                 on_result: Callable[[BatchResult], None] | None = None) -> None:
        self.queue = queue
        self.on_changed = on_changed
        #: told what became of each batch's jobs (``vlwatch scan``'s progress and summary)
        self.on_result = on_result
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
        except (BackendUnavailableError, DeviceLostError):
            raise  # the machine's problem; a lost device ends the engine (``WorkerLoop``)
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
                finished.append((job.id, outcome.sidecars, outcome.seconds, outcome.note))
                names = ", ".join(s.name for s in outcome.sidecars)
                log.info("%s: %s done in %.1fs -> %s", job.path, job.rule, outcome.seconds, names)
                if outcome.note:
                    log.warning("%s: %s: %s", job.path, job.rule, outcome.note)
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
        if self.on_result is not None:
            self.on_result(result)
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
            log.error("%s: %s failed after %s: %s", job.path, job.rule, plural(job.attempts, "attempt"), error)
            hooks.failed(config, job.rule, job.path, error)
            result.failed += 1
