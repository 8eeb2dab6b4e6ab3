"""The daemon (``vlwatch run``): its lifecycle, signals and systemd.

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

What happens to each job (retries, outages, dropped jobs) is the engine's
(``daemon.engine.loop``); ``scan``, ``status`` and ``retry`` are ``daemon.commands``.

Deliberately not here: the watching, readiness, queue and model code (their
own modules), and what becomes of a file the watcher sees
(``intake.arrivals``); this one decides only what happens when.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from daemon.backends import Backend, create_backend
from daemon.config import Config, Snapshot
from daemon.config_reader import load_config
from daemon.engine.loop import STALL, WorkerLoop, check_model
from daemon.engine.outcomes import Processor
from daemon.engine.processes import EngineGroup, start_engines
from daemon.engine.worker import Worker
from daemon.errors import (
    ConfigError,
    ExitCode,
    VlwatchError,
    plural,
)
from daemon.intake.arrivals import Arrivals, log_queued
from daemon.intake.rules import forget_real_roots
from daemon.intake.scanning import (
    Progress,
    Work,
    enqueue_in_chunks,
    find_work,
    remove_stale_temp,
    sidecars_written,
)
from daemon.intake.watching import Watcher, overflowed
from daemon.periodic import Periodic
from daemon.store.queue import Queue
from daemon.store.state import StateLock

log = logging.getLogger(__name__)

#: Longest a stop waits for the batch in hand before putting it back on the queue.
STOP_GRACE = 20.0
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


# ---------------------------------------------------------------- the daemon


class Daemon:
    """``vlwatch run``: every stage wired together, driven by signals."""

    def __init__(self, config: Config) -> None:
        #: config, rule names and watch roots, swapped whole by ``apply`` (issue 10.17):
        #: a reader takes ``self.snapshot`` once and uses only that.
        self.snapshot = Snapshot.of(config)
        self.config_path = config.source
        self.lock = StateLock(config.state)
        self.queue: Queue | None = None
        #: the watcher's events -> settled files -> queued jobs (``intake.arrivals``)
        self.arrivals = Arrivals(lambda: self.snapshot, wake=self._wake_engines)
        self.watcher = self._new_watcher()
        self.loop: WorkerLoop | EngineGroup | None = None
        self.api = None  # daemon.server.serve.ApiServer once started
        self.periodic = Periodic(rescan=lambda: self.catch_up("rescan"), idle_check=self._idle_check,
                                   prune=self._prune)
        self._stopping = threading.Event()
        self._scan_lock = threading.Lock()
        self._scanning = False  # a catch-up or rescan is walking the folders
        self._scan_again: str | None = None  # asked for while one ran: run another after it
        self._threads: list[threading.Thread] = []  # catch-up and rescans: joined before the queue closes

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
        for key in self.queue.meta():  # a previous run's engines (it may have had more devices)
            if key.startswith("engine."):
                self.queue.set_meta(key, None)
        # One engine, or one per device (model.devices): engine 0 here, the others in processes
        # of their own (daemon.engine.processes); the group looks like one WorkerLoop.
        self.loop = start_engines(self.queue, self.config, Processor(self.queue, self.arrivals.requeue_changed),
                                  backlog=self.arrivals.load, stop_grace=STOP_GRACE)
        self.loop._note_model_state()
        self.arrivals.start(self.queue)
        self.watcher.start(self.config.watch)
        self.loop.start()
        self.periodic.start(self.config)
        self._start_api()
        log.info("watching %d folders with %d rules; state %s", len(self.watcher.roots), len(self.config.rules),
                 self.config.state)
        sd_notify("READY=1\nSTATUS=" + self.status_line())
        self._background(lambda: self.catch_up("catch-up"), "vlwatch-catchup")

    def _start_api(self) -> None:
        """The HTTP API (``daemon.server``), unless ``api.listen`` is null; where clients find it is in the state."""
        assert self.queue is not None
        listening = None
        if self.config.api.listen is not None:
            from daemon.server.serve import ApiServer

            self.api = ApiServer(lambda: self.config, self.loop)
            if self.api.start():
                listening = {"listen": self.api.listen, "pid": os.getpid(),
                             "token": self.config.api.token_env is not None}
        self.queue.set_meta("api", listening)

    @property
    def config(self) -> Config:
        return self.snapshot.config

    def _new_watcher(self) -> Watcher:
        settler = self.arrivals.settler
        return Watcher(self.arrivals.offer, settler.forget, settler.forget_under,
                       on_watched=self._now_watched, on_overflow=self._overflowed, backlog=settler.ready_backlog)

    def _wake_engines(self) -> None:
        if self.loop is not None:
            self.loop.wake()

    def _now_watched(self, roots: list[Path]) -> None:
        """A folder missing at start appeared and is watched now: catch up on what is already in it."""
        if not self._stopping.is_set():
            self._background(lambda: self.catch_up("catch-up"), "vlwatch-catchup")

    def _overflowed(self) -> None:
        """inotify dropped events (issue 10.18): rescan, or rescan again after the running one."""
        if not self._stopping.is_set():
            log.warning("inotify dropped events; rescanning the watched folders")
            self._background(lambda: self.catch_up("rescan"), "vlwatch-rescan")

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
            if overflowed():  # watchdog versions without the overflow hook: its log line
                self._overflowed()
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
        settler = self.arrivals.settler
        if not (self.loop.is_alive() and settler.alive and self.watcher.alive()):
            log.critical("a daemon thread died (worker %s, settler %s, observers %s); exiting",
                         self.loop.is_alive(), settler.alive, self.watcher.alive())
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
            line += "; model loaded" if self.loop.worker.backend.loaded else "; model not loaded"
            if self.loop.paused_until > time.time():
                line += "; backend unavailable"
        return line

    # -- stop
    def shutdown(self) -> int:
        sd_notify("STOPPING=1")
        self._stopping.set()
        if self.api is not None:
            self.api.stop()  # no new requests; those in flight get GRACE seconds
        self.watcher.stop()
        self.periodic.shutdown()
        self.arrivals.stop()
        assert self.loop is not None and self.queue is not None
        self.loop.stop()
        # Catch-up and rescans stop at the next file once _stopping is set;
        # they use the queue, so they end before it closes (issue 10.19).
        deadline = time.monotonic() + STOP_GRACE
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self.loop.join(max(0.0, deadline - time.monotonic()))
        # Engine 0, the one in this process; child engines were waited for (or killed) by the join.
        hung = (self.loop.first if isinstance(self.loop, EngineGroup) else self.loop).is_alive()
        if hung:
            in_hand = list(self.loop.in_hand)
            self.queue.release(in_hand)
            log.warning("the batch in hand did not finish within %gs; %d jobs put back on the queue",
                        STOP_GRACE, len(in_hand))
        else:
            self.loop.worker.close()
        self.loop.processor.flush()  # results the state disk refused earlier, if it takes them now
        with contextlib.suppress(Exception):
            self.queue.set_meta("api", None)
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
            log.error("%s: reload rejected (%s); keeping the running config", path, plural(len(exc.problems), "problem"))
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
        if new.api != old.api:
            log.warning("api: a change of api.listen or api.token_env needs a restart; still serving the old one")
            new = replace(new, api=old.api)
        if new.model.devices != old.model.devices:
            log.warning("model.devices: a change of the engines' devices needs a restart; still running %s",
                        ", ".join(old.model.devices) or old.model.device)
            new = replace(new, model=replace(new.model, devices=old.model.devices))
        backend: Backend = self.loop.worker.backend
        if new.model != old.model or new.engine != old.engine:
            backend = create_backend(new.model, new.engine)
        self.snapshot = Snapshot.of(new)  # one assignment: every reader sees all old or all new
        self.loop.replace_worker(Worker(new, backend))
        if new.watch != old.watch:
            # New observers first, then the old ones stopped, then a catch-up
            # (issue 10.6): at every moment some observer watches each folder,
            # and the scan finds what arrived while the new ones started.
            watcher, self.watcher = self.watcher, self._new_watcher()
            self.watcher.start(new.watch)
            watcher.stop()
            self._background(lambda: self.catch_up("catch-up"), "vlwatch-catchup")
        self.periodic.apply(new)
        log.info("%s: reloaded: %d rules, %d watched folders", self.config_path, len(new.rules), len(new.watch))

    # -- chores
    def catch_up(self, why: str) -> None:
        """Queue files without an up-to-date sidecar; recent ones go through the settler first.

        One walk at a time.  Asked for while one runs (an overflow during a
        rescan, a reload during a catch-up), it is not folded into the
        running walk, which may have passed the folder already: another walk
        follows, until one runs with nothing asked meanwhile (issues 10.6, 10.18).
        """
        with self._scan_lock:
            if self._scanning:
                self._scan_again = why
                return
            self._scanning = True
        try:
            while not self._stopping.is_set():
                self._catch_up(why)
                with self._scan_lock:
                    if self._scan_again is None:
                        break
                    why, self._scan_again = self._scan_again, None
                log.info("%s: asked for again while the last one ran; walking the folders again", why)
        finally:
            with self._scan_lock:
                self._scanning, self._scan_again = False, None

    def _catch_up(self, why: str) -> None:
        assert self.queue is not None and self.loop is not None
        if why == "rescan":
            self.watcher.ensure()
        forget_real_roots()  # a root that is a symlink may point elsewhere now (rules.real_roots)
        snapshot = self.snapshot
        config = snapshot.config
        progress = Progress(why, tty=False)
        now = time.time()
        settled: list[Work] = []
        queued = 0
        for work in find_work(config, self.queue, progress=progress, stop=self._stopping,
                              on_ignored=remove_stale_temp):
            found = snapshot.find(work.match.path)
            settle = found[0].settle if found else 0.0
            if now - work.mtime_ns / 1e9 < settle:
                self.arrivals.settler.note(work.match.path, "changed", settle)  # may still be being written
                continue
            settled.append(work)
            if len(settled) >= 500:
                queued += self._enqueue_works(settled)
                settled = []
        queued += self._enqueue_works(settled)
        progress.close()
        log.info("%s: %s scanned, %s queued", why, plural(progress.count, "file"), plural(queued, "job"))

    def _enqueue_works(self, works: list[Work]) -> int:
        assert self.queue is not None and self.loop is not None
        jobs = enqueue_in_chunks(self.queue, works)
        reasons = {(str(w.match.path), w.match.rule.name): w.reason for w in works}
        log_queued(jobs, lambda job: f"sidecar {reasons.get((str(job.path), job.rule), 'missing')}")
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
            except Exception as exc:
                if self._stopping.is_set():  # one that outlived the stop's grace: the queue is gone
                    log.debug("%s stopped: %s", name, exc)
                else:
                    log.exception("%s failed", name)

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()


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
