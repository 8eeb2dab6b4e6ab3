"""The engine: runs queued jobs through the model and records what became of each.

``WorkerLoop`` is the thread that owns the backend; ``outcomes.Processor``
records each job's outcome (done, retried with backoff, failed, dropped).
``vlwatch scan`` runs the same loop in its own thread until the queue is
drained (``WorkerLoop.drain``): one job loop for the daemon and the scan.

Continuous admission: with a backend that admits requests itself
(``serve``: the transformers backend's slot engine), the loop hands it a
``feed.JobFeed``: interactive requests (``submit``: the API, ``vlwatch ask``)
first, then the pages of queued jobs, claimed a few at a time as slots free
up and decoded on the worker's threads ahead of the GPU; a long document's
later pages are rendered a chunk at a time as its earlier ones are answered,
before any new job is claimed (issue 24: ``worker.Prepared``).  Each answer
comes back as soon as its sequence ends; a file's sidecars are written (on a
writer thread, off the GPU's path) and its job recorded when its last page
is done.  Other backends (a server, plugins) get batches as before, with
interactive requests between batches.

A sticky CUDA error (``DeviceLostError``) cannot be recovered in-process:
the jobs in hand are put back with the attempt spent (so a poison file
cannot loop forever) and the loop ends; the daemon then exits non-zero and
systemd restarts it.

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
from dataclasses import replace
from typing import Callable, Sequence

from daemon.backends import Answer, Backend, DeviceLostError, Request, as_device_lost
from daemon.config import Config, local_model_path
from daemon.engine.feed import Ask, JobFeed
from daemon.engine.outcomes import Processor
from daemon.engine.worker import Worker
from daemon.errors import BackendUnavailableError, ModelMissingError
from daemon.store.queue import Job, Queue

log = logging.getLogger(__name__)

#: Longest pause of the queue while the backend is unreachable (see ``BackendUnavailableError.max_pause``).
MAX_OUTAGE_PAUSE = BackendUnavailableError.max_pause
#: Files waiting to settle plus files queued per second that make a burst:
#: the worker then lets the intake get them onto the durable queue first (the
#: watchers' inotify queue must not overflow while the engine's threads hold
#: the GIL)...  A few hundred files are queued within a second or two, and the
#: first ones as soon as they are hashed (``Settler``'s handover): holding the
#: engine for them cost a 256-file burst a second of an idle GPU (issue 22.6).
BURST = 1000
#: ...but never waits longer than this before running a batch anyway.
MAX_YIELD = 10.0
#: An engine that made no progress (no request taken or answered) for this long
#: while busy is hung: engine 0 stops feeding the systemd watchdog (the service
#: restarts), a child engine is killed and started again (``engine.processes``).
STALL = 1800.0


def check_model(config: Config) -> None:
    """Fail at start, with the way out, when the local weights are missing."""
    if config.model.backend == "transformers" and local_model_path(config.model.name) is None:
        from daemon.backends.transformers.loading import missing_model_message

        raise ModelMissingError(missing_model_message(config.model.name))


# ---------------------------------------------------------------- the worker


class WorkerLoop(threading.Thread):
    """Claims batches from the queue and runs them, until told to stop.

    Args:
        queue: the state database.
        worker: the worker for the current config (swapped by ``replace_worker``).
        processor: records results.
    """

    def __init__(self, queue: Queue, worker: Worker, processor: Processor,
                 backlog: Callable[[], int] = lambda: 0, *, index: int = 0, device: str | None = None,
                 engines: int = 1) -> None:
        super().__init__(name="vlwatch-worker" + (f"-{index}" if index else ""), daemon=True)
        self.queue = queue
        self.worker = worker
        self.index = index  # which engine of the daemon's (0 when there is one)
        self.device = device  # its device, when the daemon placed it (model.devices)
        self.engines = engines  # how many the daemon runs: each notes its state for status when several
        self.done = 0  # files finished by this engine (for status)
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
        self._model_loaded: tuple[bool, bool] | None = None  # (loaded, backend unavailable) last recorded
        self._interactive: collections.deque[tuple[Request, Future[Answer]]] = collections.deque()
        self._in_hand_lock = threading.Lock()
        #: the sticky device error that ended the loop (the daemon then exits non-zero)
        self.fatal: DeviceLostError | None = None
        #: ``drain``: run until nothing is due, and end at an outage (kept here) instead of pausing
        self._draining = False
        self.outage: BackendUnavailableError | None = None
        self._watch_backend(worker.backend)

    def _watch_backend(self, backend: Backend) -> None:
        # Record the model's state the moment it loads or unloads, not after the next batch (issue 11.6).
        backend.on_state_change = self._note_model_state

    def submit(self, request: Request) -> Future[Answer]:
        """Answer ``request`` ahead of the folder backlog (the API, ``vlwatch ask``).

        The future fails with the backend's exception (``BackendUnavailableError``
        when it cannot be reached); ``future.cancel()`` drops it, before it
        starts or (on the slot engine) at the next engine step.
        """
        future = Ask()
        self._interactive.append((request, future))
        self._wake.set()
        return future

    def wake(self) -> None:
        self._wake.set()

    # -- for the live feed (``feed.JobFeed``), which the slot engine polls from this thread
    def next_interactive(self) -> tuple[Request, Future[Answer]] | None:
        """The oldest interactive request waiting (``submit``), taken off the line; None if there is none."""
        return self._interactive.popleft() if self._interactive else None

    def interactive_waiting(self) -> bool:
        return bool(self._interactive)

    def wait_for_wake(self, timeout: float) -> None:
        """Until something arrives (a request, a job, a stop) or ``timeout`` seconds pass."""
        self._wake.wait(timeout)
        self._wake.clear()

    @property
    def replacing_worker(self) -> bool:
        """A reload handed in a new worker: the running session should end so that it takes over."""
        return self._next_worker is not None

    def hold(self, job_id: int) -> None:
        """``job_id`` is claimed and in this engine's hands until ``let_go`` (what a stop puts back)."""
        with self._in_hand_lock:
            self.in_hand.append(job_id)

    def let_go(self, job_ids: Sequence[int] | None = None) -> None:
        """These jobs (None: every one) are recorded or released: no longer in hand."""
        with self._in_hand_lock:
            gone = set(job_ids) if job_ids is not None else None
            self.in_hand = [] if gone is None else [j for j in self.in_hand if j not in gone]

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def replace_worker(self, worker: Worker) -> None:
        """Use ``worker`` from the next batch on (after a reload)."""
        self._next_worker = worker
        self._wake.set()

    @property
    def draining(self) -> bool:
        """Whether this loop ends once the queue is done (``drain``: scan, process) rather than serving on."""
        return self._draining

    @property
    def stopped_by(self) -> str | None:
        """Why ``drain`` ended with work left, in a line for a person (None: it ran to the end)."""
        if self.outage is not None:  # the server, the output disk or the state database
            return ("backend unavailable: " if self.outage.meta_key == "backend" else "") + str(self.outage)
        return None if self.fatal is None else str(self.fatal)

    def drain(self) -> None:
        """Run in this thread until no job is due and none is in hand (``vlwatch scan``), then return.

        The daemon's loop, continuous admission included; where the daemon
        would pause for an outage (backend, output disk, state database) it
        stops instead, with the jobs in hand released and ``outage`` set; a
        lost device ends it with ``fatal`` set, as in the daemon.
        """
        self._draining = True
        self.run()

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
        if self.worker.backend.on_state_change == self._note_model_state:
            self.worker.backend.on_state_change = None  # the queue it writes to may close now

    def _step(self) -> None:
        self._swap_worker()
        if self.worker.backend.capabilities.serve:
            self._step_live()
            return
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
        if self.queue.due_count(limit=1) == 0:
            self._idle()
            return
        if not self._draining:  # a scan's jobs are all queued already
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

    # ------------------------------------------------------------ continuous admission

    def _step_live(self) -> None:
        """Hand the backend a live feed until it has nothing more (or the loop is told to stop)."""
        now = time.time()
        paused = self.paused_until > now
        if not paused and not self.processor.flush():  # results the state database refused: nothing new yet
            self._backend_down(self.processor.state_down())
            paused = True
        elif not paused and self._outage_key == "state":
            self._backend_back()
        if not self._interactive:
            if paused:
                self._sleep(self.paused_until - now)
                return
            if self.queue.due_count(limit=1) == 0:
                self._idle()
                return
            if self._yield_to_intake():
                self._sleep(0.05)
                return
        feed = JobFeed(self)
        with self.batch_lock:
            self.busy_since = time.monotonic()
            try:
                self.worker.backend.serve(feed)
                feed.close()  # the writer finishes: an outage it met is known now
                if feed.outage is not None:
                    self._backend_down(feed.outage)
                elif feed.claimed:
                    self._backend_back()
            except DeviceLostError as exc:
                self._device_lost(feed, exc)
            except (BackendUnavailableError, ModelMissingError) as exc:
                # The machine's problem (server down, weights gone), not the files':
                # pause the queue without spending attempts.
                self.in_hand = feed.drop_jobs()
                feed.fail_asks(exc)
                self._backend_down(exc if isinstance(exc, BackendUnavailableError)
                                   else BackendUnavailableError(str(exc)))
            except Exception as exc:  # a bug in the backend's loop: the jobs in hand fail, the daemon goes on
                if (lost := as_device_lost(exc)) is not None:  # a plugin's sticky CUDA error, untyped
                    self._device_lost(feed, lost)
                    return
                log.exception("the engine failed")
                feed.fail_everything(f"unexpected error: {type(exc).__name__}: {exc}")
            finally:
                feed.close()
                self.in_hand = []
                self.busy_since = None
                self.last_work = time.monotonic()
        self._note_model_state()
        self._note_engine()

    def _device_lost(self, feed: JobFeed, exc: DeviceLostError) -> None:
        jobs = feed.drop_jobs_objects()
        self._jobs_lost(jobs, exc)
        feed.fail_asks(BackendUnavailableError("the GPU failed; the daemon restarts"))

    def _jobs_lost(self, jobs: list[Job], exc: DeviceLostError) -> None:
        """The device is lost: ``jobs`` go back with the attempt spent, and the loop ends (the daemon exits non-zero)."""
        log.critical("%s; the %d jobs in hand go back on the queue (attempt spent); exiting for a restart",
                     exc, len(jobs))
        error = f"the GPU failed while this file was in hand (the daemon restarted): {exc}"
        attempts = self.worker.config.jobs.attempts
        for job in jobs:
            # The attempt stays spent: a file that crashes the GPU each time fails for good.
            self.queue.fail(job.id, error, retry_at=time.time() if job.attempts < attempts else None)
        self.fatal = exc
        self.stopping.set()

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
        while not self.stopping.is_set() and self.queue.due_count(limit=size) < size:
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
            except DeviceLostError as exc:  # from generate (``Worker`` classifies any backend's error)
                self._jobs_lost(jobs, exc)
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
        if self._draining:  # a scan reports the outage and ends; the jobs stay queued, attempts kept
            self.processor.release(self.in_hand)
            self.outage = exc
            self.stopping.set()
            return
        self.processor.release(self.in_hand, not_before=until)
        self.paused_until = until
        what = {"backend": "backend unavailable", "storage": "output disk refuses writes",
                "state": "state database refuses writes"}.get(key, key)
        log.warning("%s (%s); queue paused for %gs, no attempts spent", what, exc, self._outage_pause)
        self._set_meta(key, {"available": False, "error": str(exc), "retry_at": until, "since": self._outage_since})
        self._note_model_state()

    def _backend_back(self) -> None:
        if self._outage_pause:
            self._outage_pause, self._outage_since = 0.0, None
            log.info("%s available again; queue resumed", {"storage": "output disk", "state": "state database"}
                     .get(self._outage_key, "backend"))
            self._set_meta(self._outage_key, None)

            self._note_model_state()

    def _set_meta(self, key: str, value: dict[str, object] | None) -> None:
        try:
            self.queue.set_meta(key, value)
        except sqlite3.OperationalError as exc:  # the state disk is the one that is full
            log.debug("cannot record %s state: %s", key, exc)

    def _note_model_state(self) -> None:
        """Record (for ``status``) whether the model is loaded, when that changes.

        With the backend unreachable (a server down) the model is not usable,
        whatever connections the client keeps: not "loaded" (issue 11.6).
        """
        if self._draining:
            return  # a scan's model ends with it: status tells the daemon's
        backend = self.worker.backend
        down = self._outage_since is not None
        loaded = backend.loaded and not down
        if (loaded, down) != self._model_loaded:
            self._model_loaded = (loaded, down)
            state: dict[str, object] = {"backend": backend.name, "model": backend.model, "loaded": loaded,
                                        "since": time.time(), "engine_options": self.worker.config.engine.shown()}
            device = backend.device_in_use  # issue 27: the device in use, not the configured "auto"
            if loaded and device:
                state["device"] = device
            plan = backend.plan_summary  # issue 23: "7B fp8 on 23.6 GiB: 96 slots of 1664 tokens"
            if loaded and plan:
                state["plan"] = plan
            checked = backend.touchpoints_summary  # issue 22.4: the model's private touchpoints
            if loaded and checked:
                state["touchpoints"] = checked
            if loaded and backend.provenance:
                state["in_effect"] = backend.provenance  # the engine's choices that can change answers
            if down:
                state["unavailable"] = True
            if self.index == 0:
                self.queue.set_meta("model", state)
            self._note_engine(state)

    def _note_engine(self, state: dict[str, object] | None = None) -> None:
        """Per-engine status (issue 12.5): ``engine.<index>`` in the state database's meta."""
        if self.engines < 2:
            return
        if state is None:
            loaded, down = self._model_loaded or (False, False)
            state = {"backend": self.worker.backend.name, "model": self.worker.backend.model, "loaded": loaded}
        self._set_meta(f"engine.{self.index}", {**state, "device": self.device or self.worker.config.model.device,
                                                "pid": os.getpid(), "running": True, "done": self.done,
                                                "updated": time.time()})

    def unload_if_idle(self, idle_unload: float) -> None:
        """Free the model's memory after ``idle_unload`` seconds without a batch."""
        backend = self.worker.backend
        if idle_unload <= 0 or not backend.loaded:
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
        self._watch_backend(new.backend)
        old.close()
        if old.backend is not new.backend:
            old.backend.on_state_change = None
            old.backend.unload()
            self._model_loaded = None  # a new model: its own "since" (a reload that keeps it keeps its since)
        self._note_model_state()

    def _idle(self) -> None:
        if self._draining:
            self.stopping.set()  # the scan's work is done
        else:
            self._sleep(self._idle_timeout())

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
