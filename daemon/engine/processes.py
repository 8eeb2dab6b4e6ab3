"""The daemon's engines: ``start_engines`` makes one per device, beyond the first in their own processes.

With one device (``model.devices`` unset) that is a plain ``WorkerLoop``
(``daemon.engine.loop``) in the daemon; with several, an ``EngineGroup`` (issue 12.5).

Two engines as threads of one process measured 1.54x one engine on two
H100s (``benchmarks/NOTES.md``, call E3): the prefill's host work (the
vision tower and the stock text forward, thousands of kernel launches per
image) needs the Python interpreter, and two engines take turns on its lock.
So with ``model.devices`` naming several, engine 0 stays in the daemon
(interactive requests and queue jobs, as with one device) and every further
device gets a **child process** ("spawn": a fresh interpreter, no copy of
the daemon's threads or CUDA state) running a ``WorkerLoop`` over the same
state file, queue jobs only.  The engines share nothing but the SQLite
queue, whose claims are transactions; each claim records its claimer
(``claimed_by``: ``engine N pid P``).

The daemon's side is here (``ChildEngines``, one supervisor thread); what
runs inside a child is ``daemon.engine.child``:

- starts the children and watches them (their exit sentinels and pipes);
- a child that dies (``kill -9``, a segfault, the OOM killer, a sticky CUDA
  error) has its claimed jobs put back on the queue with the attempt spent,
  as a daemon crash would (a file that kills its engine each time ends
  ``failed`` after ``jobs.attempts``), and is started again after a backoff
  (1 s, doubling up to ``MAX_RESTART_DELAY``; reset once a child has run
  ``HEALTHY_AFTER`` seconds).  A child that lost its GPU (sticky CUDA error)
  is restarted too, rather than the whole daemon: the error poisons that
  process's CUDA context only, a new process gets a fresh one, and engine 0
  and the intake go on undisturbed.  Engine 0 losing its GPU still ends the
  daemon non-zero (systemd restarts it), children included;
- a child sees only its own GPU (``CUDA_VISIBLE_DEVICES``, set before torch
  loads), so nothing in it can touch another engine's card;
- a child loads its model as it starts (engine 0 loads on its first job,
  as with one device): it exists only to run that GPU, and a backlog at
  start or after a restart finds it ready;
- SIGHUP: the new config goes to each child over its pipe; the child swaps
  its worker between admission sessions as engine 0 does (reusing the loaded
  model when ``model`` did not change);
- stop: each child is told to stop (the jobs in hand go back, no attempt
  spent) and is waited for until the daemon's stop grace ends; one still
  running then is killed and its jobs put back the same way.

A child never outlives the daemon: it asks Linux for SIGKILL when the thread
that started it ends (``PR_SET_PDEATHSIG``; that thread is the supervisor,
which ends only after its children), and, as a fallback elsewhere or for a
race at start, a thread of its own exits when the daemon's end of the
multiprocessing pipe closes.  Jobs it held then are ``running`` in the state
file and the next daemon start recovers them, as after any crash.

- a child that **hangs** rather than dies is treated as dead: it sends a
  heartbeat every ``BEAT`` seconds from a thread of its own, with how long
  its engine has gone without progress while busy.  No heartbeat for
  ``engine.engine_lost_after`` (120 s: well above the longest a healthy child
  holds the interpreter, loading weights or compiling; its process stopped, or a call that holds the interpreter
  never returns: a GPU kernel that never ends), or no progress for
  ``daemon.engine.loop.STALL``, and the supervisor kills it: its jobs go back
  with the attempt spent, and it starts again, as after a crash.

- a burst of arrivals (``daemon.engine.loop.BURST`` files waiting for the
  intake) is passed on to the children as it starts and ends, so that they
  too let the files reach the durable queue first (for at most
  ``MAX_YIELD``), as engine 0 does.

Deliberately not here: what a loop does with a job (``daemon.engine.loop``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the child imports the engine only once it runs (see child_main)
    from concurrent.futures import Future

    from daemon.backends import Answer, DeviceLostError, Request
    from daemon.config import Config
    from daemon.engine.loop import WorkerLoop
    from daemon.engine.outcomes import Processor
    from daemon.engine.worker import Worker
    from daemon.store.queue import Queue

from daemon.engine.child import (
    DEVICE_LOST_EXIT,
    ORPHANED_EXIT,
    EngineSpec,
    _drain,
    child_main,
    engine_config,
    owner,
)

log = logging.getLogger(__name__)

#: Longest wait before starting a child that keeps dying.
MAX_RESTART_DELAY = 60.0
#: A child that ran this long before dying is restarted after the shortest delay again.
HEALTHY_AFTER = 60.0
#: A child that exits cleanly unasked was most likely signalled with its daemon (systemd's
#: KillMode=control-group, Ctrl-C): wait this long for the daemon's own stop before restarting it.
CLEAN_EXIT_GRACE = 2.0
def spawn_context() -> Any:
    """A fresh interpreter per child: fork would copy the daemon's threads, locks and CUDA state."""
    return multiprocessing.get_context("spawn")


# ------------------------------------------------------------------ the daemon's side


class _Child:
    """The daemon's handle on one engine process."""

    def __init__(self, index: int, device: str) -> None:
        self.index = index
        self.device = device
        self.process: Any = None
        self.conn: Connection | None = None
        self.owner = ""
        self.started = 0.0
        self.heard = 0.0  # monotonic: its last message
        self.stuck_for = 0.0  # its engine's time busy without progress, as its last heartbeat said
        self.hung = ""  # why the supervisor killed it, if it did
        self.restart_at: float | None = 0.0  # monotonic; None while running
        self.delay = 0.0
        self.restarts = 0
        self._send_lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> bool:
        with self._send_lock:
            if self.conn is None:
                return False
            try:
                self.conn.send(message)
                return True
            except (OSError, ValueError):  # it died; the supervisor hears it from the sentinel
                return False


class ChildEngines(threading.Thread):
    """The supervisor thread: engines 1..n-1 as child processes, kept running until ``stop``.

    Args:
        queue: the daemon's state database (to put back a dead child's jobs and note its state).
        config: the daemon's config; each child gets it for its device.
        devices: (index, device) of each child engine.
        on_changed: a file a child found changed while it ran (the daemon settles it again).
        stop_grace: what a child gets to finish the jobs in hand when stopped.
    """

    def __init__(self, queue: Queue, config: Config, devices: list[tuple[int, str]],
                 on_changed: Callable[[Path], None], *, engines: int, stop_grace: float,
                 backlog: Callable[[], int] = lambda: 0) -> None:
        super().__init__(name="vlwatch-engines", daemon=True)
        self.queue = queue
        self.config = config
        self.children = [_Child(i, d) for i, d in devices]
        self.on_changed = on_changed
        self.engines = engines
        self.stop_grace = stop_grace
        self.backlog = backlog
        self._burst = False
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._context = spawn_context()
        self._lock = threading.Lock()

    # -- what the engine group calls (any thread)
    # No "wake" on new jobs: a child looks at the queue at least every second anyway
    # (``WorkerLoop._idle_timeout``), engine 0 is woken at once, and a message per arrival
    # could fill the pipe of a wedged child and block the intake thread that sent it.

    def reload(self, config: Config) -> None:
        with self._lock:
            self.config = config
        for child in self.children:
            child.send(("config", config))  # the child puts it on its device (``pin_device``)

    def stop(self, deadline: float) -> None:
        """Ask every child to stop; by ``deadline`` (monotonic) the supervisor kills what is left."""
        self._stop_deadline = deadline
        self._stopping.set()
        for child in self.children:
            child.send(("stop",))
        self._poke()

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children if c.process is not None and c.process.is_alive()]

    # -- the supervisor thread
    def run(self) -> None:
        try:
            self._supervise()
        except Exception:  # a bug: the children die with this thread (PR_SET_PDEATHSIG); say why
            log.exception("engine supervisor failed; its engine processes end")
            raise
        finally:
            self._end_all()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None and child.restart_at <= now:
                    self._start(child)
            waits: list[Any] = [self._wake_r]
            for child in self.children:
                if child.process is not None:
                    waits.append(child.process.sentinel)
                    if child.conn is not None:
                        waits.append(child.conn)
            due = [c.restart_at for c in self.children if c.restart_at is not None]
            if any(c.process is not None for c in self.children):
                due.append(time.monotonic() + 1.0)  # look for a hung child every second
            timeout = max(0.05, min(due) - time.monotonic()) if due else None
            ready = wait(waits, timeout=timeout)
            if self._wake_r in ready:
                _drain(self._wake_r)
            self._tell_burst()
            for child in self.children:
                if child.conn is not None and child.conn in ready:
                    self._read(child)
                if child.process is not None and child.process.sentinel in ready and not self._stopping.is_set():
                    self._died(child)
                elif child.process is not None and not self._stopping.is_set():
                    self._kill_if_hung(child)

    def _tell_burst(self) -> None:
        """Pass the intake's burst on to the children when it starts or ends (one message each time)."""
        from daemon.engine.loop import BURST

        burst = self.backlog() >= BURST
        if burst != self._burst:
            self._burst = burst
            for child in self.children:
                child.send(("burst", burst))

    def _kill_if_hung(self, child: _Child) -> None:
        """Kill a child that stopped answering or stopped making progress; ``_died`` does the rest."""
        from daemon.engine.loop import STALL

        if child.hung:
            return  # killed already; its sentinel is due
        silent = time.monotonic() - child.heard
        if silent > self.config.engine.engine_lost_after:
            child.hung = f"stopped answering (no heartbeat for {silent:.0f}s)"
        elif child.stuck_for > STALL:
            child.hung = f"made no progress for {child.stuck_for:.0f}s"
        else:
            return
        log.error("engine %d on %s (pid %d) %s: killing it", child.index, child.device, child.process.pid,
                  child.hung)
        child.process.kill()

    def _start(self, child: _Child) -> None:
        with self._lock:
            config = engine_config(self.config, child.device)
        spec = EngineSpec(child.index, child.device, config, self.engines, os.getpid(),
                          logging.getLogger().getEffectiveLevel(), self.stop_grace)
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=child_main, args=(spec, theirs), name=f"vlwatch-engine-{child.index}",
                                        daemon=False)
        try:
            process.start()
        except Exception as exc:  # cannot even start (no memory, too many processes): try again later
            ours.close()
            theirs.close()
            self._schedule(child, f"could not be started: {exc}")
            return
        theirs.close()
        if self._burst:
            ours.send(("burst", True))
        child.process, child.conn, child.owner = process, ours, owner(child.index, process.pid)
        child.started = child.heard = time.monotonic()
        child.restart_at, child.stuck_for, child.hung = None, 0.0, ""
        log.info("engine %d on %s: process %d started", child.index, child.device, process.pid)

    def _read(self, child: _Child) -> None:
        assert child.conn is not None
        try:
            while child.conn.poll():
                message = child.conn.recv()
                child.heard = time.monotonic()
                if message[0] == "beat":
                    child.stuck_for = float(message[1])
                elif message[0] == "changed":
                    self.on_changed(Path(os.fsdecode(message[1])))
        except (EOFError, OSError):
            with child._send_lock:
                child.conn.close()
                child.conn = None  # it is ending; the sentinel says when

    def _died(self, child: _Child) -> None:
        process = child.process
        process.join()
        code = process.exitcode
        if code == 0 and self._stopping.wait(CLEAN_EXIT_GRACE):
            return  # systemd (or Ctrl-C) signalled the whole service: the daemon's stop is under way
        if self._stopping.is_set():
            return
        ran = time.monotonic() - child.started
        if child.hung:
            how = f"{child.hung} and was killed"
        else:
            how = {DEVICE_LOST_EXIT: "lost its GPU", ORPHANED_EXIT: "lost its daemon"}.get(
                code, f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}")
        error = f"engine {child.index} on {child.device} {how} while this file was in hand"
        counts = self.queue.release_claimed_by(child.owner, max_attempts=self.config.jobs.attempts, error=error)
        # Exit 0 unasked: a SIGTERM that reached it alone (it put its jobs back itself).
        log.log(logging.WARNING if code == 0 else logging.ERROR,
                "engine %d on %s (pid %d) %s; %d of its jobs back on the queue, %d failed (out of attempts)",
                child.index, child.device, process.pid, how, counts["queued"], counts["failed"])
        self._forget(child)
        if ran >= HEALTHY_AFTER:
            child.delay = 0.0
        self._schedule(child, how)

    def _schedule(self, child: _Child, why: str) -> None:
        child.delay = min(MAX_RESTART_DELAY, max(1.0, child.delay * 2))
        child.restart_at = time.monotonic() + child.delay
        child.restarts += 1
        log.warning("engine %d on %s: starting it again in %gs", child.index, child.device, child.delay)
        self._note(child, {"running": False, "error": why, "restart_at": time.time() + child.delay,
                           "restarts": child.restarts})

    def _forget(self, child: _Child) -> None:
        with child._send_lock:
            if child.conn is not None:
                child.conn.close()
            child.conn = None
        child.process.close()
        child.process = None

    def _note(self, child: _Child, state: dict[str, object]) -> None:
        try:
            self.queue.set_meta(f"engine.{child.index}", {"device": child.device, "loaded": False, "done": 0,
                                                          **state, "updated": time.time()})
        except Exception as exc:  # the state disk is full: status shows less, nothing else suffers
            log.debug("cannot record engine %d's state: %s", child.index, exc)

    def _end_all(self) -> None:
        """Wait for the children (told to stop) until the deadline; kill and put back what is left."""
        for child in self.children:
            process = child.process
            if process is None:
                continue
            process.join(max(0.0, self._stop_deadline - time.monotonic()))
            if process.exitcode is None:
                log.warning("engine %d on %s (pid %d) did not stop in time; killed, its jobs put back",
                            child.index, child.device, process.pid)
                process.kill()
                process.join()
            try:
                counts = self.queue.release_claimed_by(child.owner, max_attempts=None)
            except Exception as exc:  # the queue is being closed under a hung stop
                log.debug("engine %d: cannot put its jobs back: %s", child.index, exc)
                counts = {"queued": 0}
            if counts["queued"]:
                log.info("engine %d: %d jobs it held put back on the queue", child.index, counts["queued"])
            self._note(child, {"running": False})
            self._forget(child)

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass


# ---------------------------------------------------------------- the daemon's engines


def start_engines(queue: Queue, config: Config, processor: Processor, *, backlog: Callable[[], int] = lambda: 0,
                  make_backend: Callable[[Any, Any], Any] | None = None,
                  stop_grace: float = 20.0) -> WorkerLoop | EngineGroup:
    """The daemon's engine(s) for ``config``: a WorkerLoop, or an EngineGroup of one per device.

    With one device (``model.devices`` unset, or one entry) this is the
    WorkerLoop it always was, in this process.  With several, engine 0 is a
    WorkerLoop here and every other device gets its own process
    (``daemon.engine.processes``): engines as threads of one process take turns
    on the interpreter during prefill (1.54x on two H100s, NOTES.md call E3).
    """
    from daemon.backends import create_backend, engine_devices
    from daemon.engine.loop import WorkerLoop
    from daemon.engine.worker import Worker

    make_backend = make_backend or create_backend
    devices = engine_devices(config.model)
    first = engine_config(config, devices[0])
    loop = WorkerLoop(queue, Worker(first, make_backend(first.model, first.engine)), processor, backlog, index=0,
                      device=devices[0], engines=len(devices))
    if len(devices) == 1:
        return loop
    queue.owner = owner(0, os.getpid())
    children = ChildEngines(queue, config, [(i, str(d)) for i, d in enumerate(devices) if i > 0],
                            processor.on_changed, engines=len(devices), stop_grace=max(1.0, stop_grace - 2.0),
                            backlog=backlog)
    return EngineGroup(loop, children, make_backend, stop_grace=stop_grace)


class EngineGroup:
    """Engine 0 (a WorkerLoop here) and the child engine processes; looks like one WorkerLoop to the service.

    Each engine claims jobs as its own slots free up (claims are
    transactions on the shared queue).  Interactive requests (the API,
    ``ask``) go to engine 0, the one in this process.  A child that dies is
    the supervisor's business (its jobs back, a restart): the group stays
    alive while engine 0 and the supervisor are.
    """

    def __init__(self, first: WorkerLoop, children: ChildEngines, make_backend: Callable[[Any, Any], Any], *,
                 stop_grace: float = 20.0) -> None:
        self.first = first
        self.children = children
        self._make_backend = make_backend
        self._stop_grace = stop_grace

    # -- what the service and the API use of a WorkerLoop
    @property
    def worker(self) -> Worker:
        return self.first.worker

    @property
    def processor(self) -> Processor:
        return self.first.processor

    @property
    def busy_since(self) -> float | None:
        return self.first.busy_since

    @property
    def paused_until(self) -> float:
        return self.first.paused_until

    @property
    def in_hand(self) -> list[int]:
        return self.first.in_hand

    @property
    def fatal(self) -> DeviceLostError | None:
        return self.first.fatal

    def submit(self, request: Request) -> Future[Answer]:
        return self.first.submit(request)

    def start(self) -> None:
        self.first.start()
        self.children.start()

    def is_alive(self) -> bool:
        return self.first.is_alive() and self.children.is_alive()

    def stop(self) -> None:
        self.first.stop()
        self.children.stop(time.monotonic() + self._stop_grace)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self.first.join(timeout)
        # The supervisor ends once its children have (it kills any past the stop's deadline).
        self.children.join(None if deadline is None else max(0.0, deadline - time.monotonic()) + 5.0)

    def wake(self) -> None:
        self.first.wake()  # the children look at the queue every second (ChildEngines)

    def unload_if_idle(self, idle_unload: float) -> None:
        self.first.unload_if_idle(idle_unload)  # each child looks after its own

    def _note_model_state(self) -> None:
        self.first._note_model_state()

    def replace_worker(self, worker: Worker) -> None:
        """After a reload: engine 0 takes ``worker`` (on its device); each child gets the new config."""
        from daemon.engine.worker import Worker

        full = worker.config
        config = engine_config(full, self.first.device)
        # The service made a new backend only for a new model; engine 0's goes on its own device.
        same = worker.backend is self.first.worker.backend
        self.first.replace_worker(Worker(config, worker.backend if same
                                         else self._make_backend(config.model, config.engine)))
        self.children.reload(full)

    def pids(self) -> list[int]:
        """The child engines' process ids (tests: none survives a stop)."""
        return self.children.pids()
