"""The engine: runs queued jobs through the model and records what became of each.

``WorkerLoop`` is the thread that owns the backend; ``outcomes.Processor``
records each job's outcome (done, retried with backoff, failed, dropped).
``vlwatch scan`` runs the same loop in its own thread until the queue is
drained (``WorkerLoop.drain``): one job loop for the daemon and the scan.

Continuous admission: with a backend that admits requests itself
(``serve``: the transformers backend's slot engine), the loop hands it a
``JobFeed``: interactive requests (``submit``: the API, ``vlwatch ask``)
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Sequence

from daemon.backends import Answer, Backend, DeviceLostError, Item, Request, Sizing, as_device_lost, expected_requests
from daemon.config import Config, local_model_path
from daemon.engine.outcomes import Processor
from daemon.engine.worker import Outcome, Prepared, Worker, error_text, page_chunk
from daemon.errors import (
    BackendUnavailableError,
    ModelMissingError,
    StateUnavailableError,
)
from daemon.intake.readiness import file_signature
from daemon.intake.rules import Match, match_file
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


class Ask(Future[Answer]):
    """An interactive request's future: ``cancel()`` works while it runs too.

    A plain future cannot be cancelled once running; this one remembers that
    its caller (an HTTP client that hung up) gave up, and the engine drops
    the request at its next step (``JobFeed.abandoned``), freeing its slot.
    """

    def __init__(self) -> None:
        super().__init__()
        self.abandoned = threading.Event()

    def cancel(self) -> bool:
        self.abandoned.set()
        return super().cancel()


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

    def __init__(self, loop: WorkerLoop, lookahead: int | None = None) -> None:
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
        while self.loop._interactive:
            request, future = self.loop._interactive.popleft()
            if future.set_running_or_notify_cancel():
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
        return bool(self.loop._interactive or self.ready or self.preparing or self.rendering
                    or self._pages_left()) or (
            self._may_have_more and self.loop.paused_until <= time.time() and self.outage is None)

    def wait(self, timeout: float) -> None:
        self.loop._wake.wait(timeout)
        self.loop._wake.clear()

    def stopping(self) -> bool:
        return self.loop.stopping.is_set() or self.loop._next_worker is not None

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
        with self.loop._in_hand_lock:
            self.loop.in_hand = []
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
            future.add_done_callback(lambda _: self.loop._wake.set())
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
            with self.loop._in_hand_lock:
                self.loop.in_hand.append(job.id)
            matches = match_file(config, job.path, job.rule) if file_signature(job.path) is not None else []
            if not matches:  # gone, or its rule removed: the processor drops it and says why
                self._writer.submit(self._record, job, None, None)
                continue
            future = self.worker.submit_prepare(matches[0])
            future.add_done_callback(lambda _: self.loop._wake.set())
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
            with self.loop._in_hand_lock:
                if job.id in self.loop.in_hand:
                    self.loop.in_hand.remove(job.id)

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
        with self.loop._in_hand_lock:
            self.loop.in_hand = [j for j in self.loop.in_hand if j not in job_ids]


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
