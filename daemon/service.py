"""The daemon (``vlwatch run``) and the queue commands (``scan``, ``status``, ``retry``).

``run`` composes the stages: it loads the config, opens the state database
(taking its lock: one daemon per state file), puts back jobs a crash left
``running``, starts the watchers and the settler, tells systemd it is ready,
catches up on files that arrived while nobody watched, and runs a worker
thread that claims batches from the queue and hands them to the worker.  The
main thread only waits for signals and talks to systemd:

- SIGTERM / SIGINT: stop watching and claiming, let the batch in hand finish
  (at most ``STOP_GRACE`` seconds, else its jobs go back on the queue), exit 0;
- SIGHUP: load the config again; if it is invalid, log every problem and
  keep the running one;
- systemd (``Type=notify``): ``READY=1`` once the watchers are up, ``STATUS=``
  with the queue counts, ``WATCHDOG=1`` while every thread is healthy,
  ``STOPPING=1``.

Failures: a file that fails is retried ``jobs.attempts`` times with
exponential backoff (``jobs.backoff``, doubling) and then marked failed with
its reason; the file itself is never touched.  A backend that cannot be
reached at all (``BackendUnavailableError``) is not the files' fault: the
queue pauses, backing off up to ``MAX_OUTAGE_PAUSE``, without spending any
job's attempts.  A job whose source was deleted or moved away before it ran
is dropped; one whose source changed is dropped and the file goes back to
the settler, so the new bytes are queued once they are complete.

Deliberately not here: the watching, readiness, queue and model code (their
own modules); this one decides only what happens when.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import functools
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

from daemon.backends import Backend, create_backend
from daemon.config import Config, WatchConfig, load_config, local_model_path
from daemon.errors import BackendUnavailableError, ConfigError, ExitCode, ModelMissingError, VlwatchError
from daemon.queue import Candidate, Job, Queue, StateLock, content_hash, safe_text
from daemon.rules import Match, match_file, watch_for
from daemon.scanning import (
    Progress,
    Work,
    enqueue_in_chunks,
    find_work,
    output_dirs_inside,
    remove_stale_temp,
    rule_names,
    sidecar_fresh,
    sidecar_missing,
    sidecars_written,
)
from daemon.scheduler import Scheduler
from daemon.watching import Arrival, Kind, Settler, Watcher, file_signature, is_ignored, overflowed
from daemon.worker import Worker

log = logging.getLogger(__name__)

#: Longest a stop waits for the batch in hand before putting it back on the queue.
STOP_GRACE = 20.0
#: A batch running longer than this is a hang: the systemd watchdog stops being fed.
STALL = 1800.0
#: Longest pause of the queue while the backend is unreachable.
MAX_OUTAGE_PAUSE = 300.0
#: Files waiting to settle plus files queued per second that make a burst:
#: the worker then lets the intake get them onto the durable queue first...
BURST = 200
#: ...but never waits longer than this before running a batch anyway.
MAX_YIELD = 10.0
#: How often STATUS= is refreshed.
STATUS_EVERY = 5.0


# ------------------------------------------------------------------ systemd


def sd_notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``STATUS=...``) to systemd, if it is listening.

    The protocol is one datagram to the AF_UNIX socket named in
    ``$NOTIFY_SOCKET`` (sd_notify(3)); that is all ``sdnotify`` or
    ``systemd-python`` would do, so neither is a dependency (the latter needs
    libsystemd headers to build).  A leading ``@`` names an abstract socket.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        # Non-blocking: a listener that stopped reading must never stall the
        # main loop (its queue holds only net.unix.max_dgram_qlen datagrams).
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", message, exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when systemd wants none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


# ------------------------------------------------------------------ helpers


def check_model(config: Config) -> None:
    """Fail at start, with the way out, when the local weights are missing."""
    if config.model.backend == "transformers" and local_model_path(config.model.name) is None:
        from daemon.backends.transformers import missing_model_message

        raise ModelMissingError(missing_model_message(config.model.name))


class Roots:
    """Which watch a path belongs to (``rules.watch_for``), with its root and the output dirs to skip."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._extra = {w: (Path(os.path.normpath(w.path.absolute())), output_dirs_inside(w, config))
                       for w in config.watch}

    def find(self, path: Path) -> tuple[WatchConfig, Path, list[Path]] | None:
        watch = watch_for(self._config, path)
        if watch is None:
            return None
        root, skip = self._extra[watch]
        return watch, root, skip


# ----------------------------------------------------------------- processing


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

    def _step(self) -> None:
        self._swap_worker()
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


# ---------------------------------------------------------------- the daemon


class Daemon:
    """``vlwatch run``: every stage wired together, driven by signals."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.config_path = config.source
        self.rule_names = rule_names(config)
        self._roots = Roots(config)
        self.lock = StateLock(config.state)
        self.queue: Queue | None = None
        self.settler = Settler(self._deliver)
        self.watcher = self._new_watcher()
        self.loop: WorkerLoop | None = None
        self.scheduler = Scheduler(rescan=lambda: self.catch_up("rescan"), idle_check=self._idle_check,
                                   prune=self._prune)
        self._stopping = threading.Event()
        self._scan_lock = threading.Lock()
        self._arrived: collections.deque[tuple[float, int]] = collections.deque()

    # -- start
    def start(self) -> None:
        if not self.lock.acquire():
            pid = self.lock.holder()
            raise VlwatchError(f"another vlwatch (pid {pid}) is already working on {self.config.state}; "
                               "one daemon per state file")
        self.queue = Queue(self.config.state)
        recovered = self.queue.recover(self.config.jobs.attempts, written=lambda j: sidecars_written(j, self.config))
        if any(recovered.values()):
            log.info("recovered interrupted jobs: %(queued)d queued again, %(done)d done, %(failed)d failed", recovered)
        self.queue.set_meta("daemon", {"pid": os.getpid(), "started": time.time(), "config": str(self.config_path)})
        worker = Worker(self.config, create_backend(self.config.model))
        self.loop = WorkerLoop(self.queue, worker, Processor(self.queue, self._requeue_changed),
                               backlog=self._intake_load)
        self.loop._note_model_state()
        self.settler.start()
        self.watcher.start(self.config.watch)
        self.loop.start()
        self.scheduler.start(self.config)
        log.info("watching %d folders with %d rules; state %s", len(self.watcher.roots), len(self.config.rules),
                 self.config.state)
        sd_notify("READY=1\nSTATUS=" + self.status_line())
        self._background(lambda: self.catch_up("catch-up"), "vlwatch-catchup")

    def _new_watcher(self) -> Watcher:
        return Watcher(self._offer, self.settler.forget, self.settler.forget_under)

    # -- the main thread
    def serve(self, signals: int) -> int:
        """Start, then wait for signals until told to stop; return the exit code.

        Args:
            signals: the read end of the pipe the signal handlers write to
                (``caught_signals``), set up before anything slow happens.
        """
        self.start()
        return self._main_loop(signals)

    def _main_loop(self, read_fd: int) -> int:
        ping = watchdog_interval()
        tick = min(1.0, ping) if ping else 1.0
        last_status = last_ping = 0.0
        stalled = False
        while True:
            ready, _, _ = select.select([read_fd], [], [], tick)
            for signum in self._signals(read_fd if ready else None):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    return self.shutdown()
                if signum == signal.SIGHUP:
                    self.reload()
                    last_status = 0.0
            health = self.health()
            if health == "dead":
                self.shutdown()
                return ExitCode.FAILED
            if health == "stalled" and not stalled:
                log.error("a batch has run for over %ds: treating the worker as hung", STALL)
            stalled = health == "stalled"
            if ping and not stalled and time.monotonic() - last_ping >= ping:
                last_ping = time.monotonic()
                sd_notify("WATCHDOG=1")
            if overflowed():
                log.warning("inotify dropped events; rescanning the watched folders")
                self._background(lambda: self.catch_up("rescan"), "vlwatch-rescan")
            if time.monotonic() - last_status >= STATUS_EVERY:
                last_status = time.monotonic()
                sd_notify("STATUS=" + self.status_line())

    @staticmethod
    def _signals(read_fd: int | None) -> list[int]:
        if read_fd is None:
            return []
        try:
            return list(os.read(read_fd, 64))
        except BlockingIOError:
            return []

    def health(self) -> str:
        """ok, stalled (a batch is taking too long) or dead (a thread is gone)."""
        assert self.loop is not None
        if not (self.loop.is_alive() and self.settler.alive and self.watcher.alive()):
            log.critical("a daemon thread died (worker %s, settler %s, observers %s); exiting",
                         self.loop.is_alive(), self.settler.alive, self.watcher.alive())
            return "dead"
        busy = self.loop.busy_since
        if busy is not None and time.monotonic() - busy > STALL:
            return "stalled"
        return "ok"

    def status_line(self) -> str:
        assert self.queue is not None
        c = self.queue.counts()
        line = f"queued {c['queued']}, running {c['running']}, done {c['done']}, failed {c['failed']}"
        if self.loop is not None:
            line += "; model loaded" if getattr(self.loop.worker.backend, "loaded", False) else "; model not loaded"
            if self.loop.paused_until > time.time():
                line += "; backend unavailable"
        return line

    # -- stop
    def shutdown(self) -> int:
        sd_notify("STOPPING=1")
        self._stopping.set()
        self.watcher.stop()
        self.scheduler.shutdown()
        self.settler.stop()
        assert self.loop is not None and self.queue is not None
        self.loop.stop()
        self.loop.join(STOP_GRACE)
        hung = self.loop.is_alive()
        if hung:
            in_hand = list(self.loop.in_hand)
            self.queue.release(in_hand)
            log.warning("the batch in hand did not finish within %gs; %d jobs put back on the queue",
                        STOP_GRACE, len(in_hand))
        else:
            self.loop.worker.close()
        self.queue.close()
        self.lock.release()
        log.info("stopped")
        if hung:
            # The worker thread is stuck in the model; don't wait for it (or
            # for its thread pool at interpreter exit): the stop is bounded.
            logging.shutdown()
            os._exit(0)
        return ExitCode.OK

    # -- reload
    def reload(self) -> None:
        """SIGHUP: apply the config file as it is now, or keep the running one if it is invalid."""
        path = self.config_path
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("%s: reload rejected (%d problems); keeping the running config", path, len(exc.problems))
            for problem in exc.problems:
                log.error("%s", problem)
            return
        except VlwatchError as exc:
            log.error("%s: reload rejected; keeping the running config: %s", path, exc)
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        self.apply(new)

    def apply(self, new: Config) -> None:
        old = self.config
        assert self.loop is not None
        if new.state != old.state:
            log.warning("state: moving to %s needs a restart; still using %s", new.state, old.state)
            new = replace(new, state=old.state)
        backend: Backend = self.loop.worker.backend
        if new.model != old.model:
            backend = create_backend(new.model)
        self.rule_names = self.rule_names | rule_names(new)
        self._roots = Roots(new)
        self.config = new
        self.loop.replace_worker(Worker(new, backend))
        if new.watch != old.watch:
            # New observers first, then a catch-up, so no file falls into the
            # gap while watches are re-created (paperless-ngx #13011).
            self.watcher.stop()
            self.watcher = self._new_watcher()
            self.watcher.start(new.watch)
            self._background(lambda: self.catch_up("catch-up"), "vlwatch-catchup")
        self.scheduler.apply(new)
        log.info("%s: reloaded: %d rules, %d watched folders", self.config_path, len(new.rules), len(new.watch))

    # -- intake: watcher events -> settler -> queue
    def _offer(self, path: Path, kind: Kind) -> None:
        if self.settler.note(path, kind):
            return  # already tracked: only its timing changes
        accepted = self._accept(path)
        if accepted is not None:
            settle, matches = accepted
            self.settler.note(path, kind, settle, data=(self.config, matches))

    def _accept(self, path: Path) -> tuple[float, list[Match]] | None:
        """(settle time, matching rules) for a new path that may become a job, else None."""
        config = self.config
        found = self._roots.find(path)
        if found is None:
            return None
        watch, root, skip = found
        if is_ignored(path, root, self.rule_names, skip):
            log.debug("%s: ignored", path)
            return None
        matches = match_file(config, path)
        if not matches:
            log.debug("%s: no rule matches", path)
            return None
        return watch.settle, matches

    def _deliver(self, arrivals: list[Arrival]) -> None:
        """Ready files from the settler: hash once, queue a job per matching rule, one commit."""
        assert self.queue is not None and self.loop is not None
        config = self.config
        batch: list[Candidate] = []
        for arrival in arrivals:
            matches = self._matches_now(config, arrival)
            if not matches:
                continue
            try:
                digest = content_hash(arrival.path)
            except OSError:
                continue  # gone already
            seen_at = time.time()
            for m in matches:
                if self._came_with_its_sidecar(m, arrival):
                    continue
                batch.append(Candidate(arrival.path, m.rule.name, digest, arrival.size, arrival.mtime_ns,
                                       redo=functools.partial(sidecar_missing, m), seen_at=seen_at))
        jobs = self.queue.enqueue(batch)
        self._arrived.append((time.monotonic(), len(arrivals)))
        for job in jobs:
            log.info("%s: queued for %s", job.path, job.rule)
        if jobs:
            self.loop.wake()

    def _came_with_its_sidecar(self, match: Match, arrival: Arrival) -> bool:
        """A file new to the queue whose sidecars are already there and newer: a processed
        folder renamed or moved in.  The same rule as the scan's for sidecars with no job."""
        assert self.queue is not None
        if not sidecar_fresh(match, arrival.mtime_ns):
            return False
        if self.queue.latest(match.path, match.rule.name) is not None:
            return False  # known: the queue decides by content hash
        log.info("%s: %s sidecar already present and newer; not queued", arrival.path, match.rule.name)
        return True

    def _intake_load(self) -> int:
        """Files waiting to settle plus the rate of files queued lately (per second): a burst if large."""
        horizon = time.monotonic() - 0.5
        while self._arrived and self._arrived[0][0] < horizon:
            self._arrived.popleft()
        return self.settler.pending() + 2 * sum(n for _, n in self._arrived)

    def _matches_now(self, config: Config, arrival: Arrival) -> list[Match]:
        """The rules matched when the file was first seen, unless a reload changed them since."""
        if isinstance(arrival.data, tuple) and arrival.data[0] is config:
            return arrival.data[1]
        return match_file(config, arrival.path) if self._roots.find(arrival.path) is not None else []

    def _requeue_changed(self, path: Path) -> None:
        accepted = self._accept(path)
        if accepted is not None:
            self.settler.note(path, "changed", accepted[0], data=(self.config, accepted[1]))

    # -- chores
    def catch_up(self, why: str) -> None:
        """Queue files without an up-to-date sidecar; recent ones go through the settler first."""
        if not self._scan_lock.acquire(blocking=False):
            return  # one is running already
        try:
            self._catch_up(why)
        finally:
            self._scan_lock.release()

    def _catch_up(self, why: str) -> None:
        assert self.queue is not None and self.loop is not None
        if why == "rescan":
            self.watcher.ensure()
        config = self.config
        progress = Progress(why, tty=False)
        now = time.time()
        settled: list[Work] = []
        queued = 0
        for work in find_work(config, self.queue, progress=progress, stop=self._stopping,
                              on_ignored=remove_stale_temp):
            watch = watch_for(config, work.match.path)
            settle = watch.settle if watch else 0.0
            if now - work.mtime_ns / 1e9 < settle:
                self.settler.note(work.match.path, "changed", settle)  # may still be being written
                continue
            settled.append(work)
            if len(settled) >= 500:
                queued += self._enqueue_works(settled)
                settled = []
        queued += self._enqueue_works(settled)
        progress.close()
        log.info("%s: %d files scanned, %d jobs queued", why, progress.count, queued)

    def _enqueue_works(self, works: list[Work]) -> int:
        assert self.queue is not None and self.loop is not None
        jobs = enqueue_in_chunks(self.queue, works)
        reasons = {(str(w.match.path), w.match.rule.name): w.reason for w in works}
        for job in jobs:
            log.info("%s: queued for %s (sidecar %s)", job.path, job.rule, reasons.get((str(job.path), job.rule), "missing"))
        if jobs:
            self.loop.wake()
        return len(jobs)

    def _idle_check(self) -> None:
        assert self.loop is not None
        self.loop.unload_if_idle(self.config.model.idle_unload)

    def _prune(self) -> None:
        assert self.queue is not None
        n = self.queue.prune(self.config.jobs.keep_history)
        if n:
            log.info("pruned %d finished jobs older than %gs", n, self.config.jobs.keep_history)

    def _background(self, fn: Callable[[], None], name: str) -> None:
        def guarded() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s failed", name)

        threading.Thread(target=guarded, name=name, daemon=True).start()


@contextlib.contextmanager
def caught_signals() -> Iterator[int]:
    """SIGTERM, SIGINT and SIGHUP written to a pipe (its read end is yielded).

    Set up first thing, so a stop that arrives while the config loads is
    not lost, and handled by the main loop (``signal.set_wakeup_fd``), so no
    work happens inside a signal handler.  SIGUSR1 prints every thread's
    stack to the log: the way to see where a daemon that seems stuck waits.
    """
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(write_fd)
    handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        yield read_fd
    finally:
        faulthandler.unregister(signal.SIGUSR1)
        signal.set_wakeup_fd(old_wakeup)
        for s, h in handlers.items():
            signal.signal(s, h)
        os.close(read_fd)
        os.close(write_fd)


def run(config_path: str | os.PathLike[str] | None) -> int:
    """``vlwatch run``: the daemon in the foreground until SIGTERM/SIGINT."""
    with caught_signals() as signals:
        config = load_config(config_path)
        for warning in config.warnings:
            log.warning("%s", warning)
        check_model(config)
        return Daemon(config).serve(signals)


# ------------------------------------------------------------------- scan


def scan(config: Config, dry_run: bool = False) -> int:
    """``vlwatch scan``: queue files with missing or stale sidecars, and process them.

    With a daemon running on the same state file, the jobs are left to it;
    otherwise this process takes the state lock and works the queue itself.
    """
    tty = sys.stderr.isatty()
    with Queue(config.state) as queue:
        progress = Progress("scanning", tty=tty)
        works = list(find_work(config, queue, progress=progress))
        progress.close()
        if dry_run:
            for w in works:
                print(f"{w.reason}\t{w.match.rule.name}\t{safe_text(str(w.match.path))}")
            print(f"{len(works)} files need processing ({progress.count} scanned)", file=sys.stderr)
            return ExitCode.OK
        now = time.time()
        ready: list[Work] = []
        for w in works:
            if now - w.mtime_ns / 1e9 < _settle_of(config, w.match.path):
                log.warning("%s: still being written (changed less than settle ago); skipped", w.match.path)
            else:
                ready.append(w)
        jobs = enqueue_in_chunks(queue, ready)
        log.info("scan: %d files scanned, %d jobs queued", progress.count, len(jobs))
        lock = StateLock(config.state)
        if not lock.acquire():
            print(f"queued {len(jobs)} jobs; the running daemon (pid {lock.holder()}) will process them")
            return ExitCode.OK
        try:
            check_model(config)
            return _drain(config, queue, tty)
        finally:
            lock.release()


def _settle_of(config: Config, path: Path) -> float:
    watch = watch_for(config, path)
    return watch.settle if watch else 0.0


def _drain(config: Config, queue: Queue, tty: bool) -> int:
    """Process every due job now, with progress; exit 1 if any failed."""
    queue.recover(config.jobs.attempts, written=lambda j: sidecars_written(j, config))
    total = queue.due_count()
    if total == 0:
        print("nothing to process")
        return ExitCode.OK
    worker = Worker(config, create_backend(config.model))
    processor = Processor(queue, on_changed=lambda p: log.warning("%s: changed while queued; run scan again", p))
    summary = BatchResult()
    progress = Progress("processing", total, tty=tty)
    try:
        while jobs := queue.claim(max(1, worker.batch_size())):
            try:
                r = processor.process(worker, jobs)
            except BackendUnavailableError as exc:
                queue.release([j.id for j in jobs])
                print(f"vlwatch: backend unavailable: {exc}; {queue.due_count()} jobs left queued", file=sys.stderr)
                return ExitCode.FAILED
            for k in ("done", "failed", "retrying", "dropped"):
                setattr(summary, k, getattr(summary, k) + getattr(r, k))
            progress.update(len(jobs))
    finally:
        progress.close()
        worker.close()
    print(f"processed {summary.done + summary.failed + summary.retrying} files: {summary.done} done, "
          f"{summary.failed + summary.retrying} failed ({summary.retrying} will be retried)"
          + (f", {summary.dropped} dropped" if summary.dropped else ""))
    return ExitCode.FAILED if summary.failed or summary.retrying else ExitCode.OK


# ----------------------------------------------------------------- status


def status(config: Config, as_json: bool = False) -> int:
    """``vlwatch status``: queue counts, the daemon, the model, the last failures."""
    info = status_info(config)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(format_status(info))
    return ExitCode.OK


def status_info(config: Config, failures: int = 10) -> dict[str, object]:
    pid = StateLock(config.state).holder()
    info: dict[str, object] = {"state": str(config.state), "daemon": {"running": pid is not None, "pid": pid},
                               "counts": {"queued": 0, "running": 0, "done": 0, "failed": 0},
                               "model": None, "backend": None, "failures": []}
    if not config.state.exists():
        return info
    with Queue(config.state) as queue:
        meta = queue.meta()
        info["counts"] = queue.counts()
        info["failures"] = [j.as_dict() for j in queue.failures(failures)]
    model = meta.get("model")
    if model is not None and pid is None:
        model = {**model, "loaded": False, "since": None}  # nobody holds it any more
    info["model"] = model
    info["backend"] = meta.get("backend") if pid is not None else None
    return info


def format_status(info: dict) -> str:
    c = info["counts"]
    daemon = info["daemon"]
    lines = [
        f"state    {info['state']}",
        f"daemon   {'running (pid %s)' % daemon['pid'] if daemon['running'] else 'not running'}",
        f"queue    {c['queued']} queued, {c['running']} running, {c['done']} done, {c['failed']} failed",
    ]
    model = info.get("model")
    if model:
        state = "loaded" if model.get("loaded") else "not loaded"
        since = f" since {_when(model['since'])}" if model.get("since") else ""
        lines.append(f"model    {model.get('model')} ({model.get('backend')}): {state}{since}")
    backend = info.get("backend")
    if backend and not backend.get("available", True):
        lines.append(f"backend  unavailable since {_when(backend.get('since'))}: {backend.get('error')}; "
                     f"next try {_when(backend.get('retry_at'))}")
    if info["failures"]:
        lines.append("last failures:")
        for f in info["failures"]:
            lines.append(f"  #{f['id']}  {safe_text(f['path'])} [{f['rule']}] after {f['attempts']} attempts, "
                         f"{_when(f['finished_at'])}: {f['error']}")
        lines.append("(`vlwatch retry --all` or `vlwatch retry JOB_ID...` puts them back on the queue)")
    return "\n".join(lines)


def _when(ts: object) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------ retry


def retry(config: Config, ids: Sequence[int] | None) -> int:
    """``vlwatch retry``: put failed jobs (all, or these ids) back on the queue."""
    if not config.state.exists():
        print("no failed jobs (no state file yet)")
        return ExitCode.OK if ids is None else ExitCode.FAILED
    with Queue(config.state) as queue:
        jobs = queue.retry(ids)
    for job in jobs:
        print(f"requeued #{job.id} {safe_text(str(job.path))} [{job.rule}]")
    unknown = sorted(set(ids or ()) - {j.id for j in jobs})
    for job_id in unknown:
        print(f"vlwatch: job {job_id} is not a failed job", file=sys.stderr)
    if not jobs and not unknown:
        print("no failed jobs")
    return ExitCode.FAILED if unknown else ExitCode.OK
