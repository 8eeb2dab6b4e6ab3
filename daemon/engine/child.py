"""What runs inside an engine process (``daemon.engine.processes`` starts and watches them).

A child engine is a ``WorkerLoop`` (``daemon.engine.loop``) on one GPU over the
daemon's state file, queue jobs only, in a fresh interpreter ("spawn"):

- it sees only its own GPU (``pin_device``: ``CUDA_VISIBLE_DEVICES``, set
  before torch loads);
- it never outlives the daemon (``die_with_parent``: ``PR_SET_PDEATHSIG``,
  and a thread that exits when the daemon's end of the pipe closes);
- it loads its model as it starts, then takes what the daemon sends over its
  pipe: a new config (SIGHUP), the intake's bursts, stop;
- it sends a heartbeat every ``BEAT`` seconds from a thread of its own, with
  how long its engine has been busy without progress (the daemon kills a
  child it stops hearing from, or one stuck past ``daemon.engine.loop.STALL``);
- on stop (a message, SIGTERM or SIGINT) the jobs in hand go back on the
  queue without an attempt spent; losing its GPU exits ``DEVICE_LOST_EXIT``.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the child imports the engine only once it runs (see child_main)
    from daemon.config import Config
    from daemon.store.queue import Queue

log = logging.getLogger(__name__)

#: Exit code of a child whose GPU is lost (a sticky CUDA error): restarted like any other death.
DEVICE_LOST_EXIT = 3
#: Exit code of a child that found its daemon gone.
ORPHANED_EXIT = 4
#: How often a child looks whether its model has been idle long enough to unload.
IDLE_CHECK = 5.0
#: prctl(2) option: the signal sent to this process when its parent thread ends.
PR_SET_PDEATHSIG = 1
#: Seconds between a child's heartbeats.
BEAT = 5.0


def die_with_parent(parent_pid: int) -> None:
    """Make sure this child process ends when the process that started it does.

    Linux: ``PR_SET_PDEATHSIG`` SIGKILL, effective at once even if the parent
    is wedged.  Then, for a parent that died before the call and for other
    systems, a thread exits the process when the parent's end of the pipe
    multiprocessing keeps for it closes.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError) as exc:  # no libc prctl: the pipe below still works
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
    if os.getppid() != parent_pid:  # the parent died before prctl could watch it
        os._exit(ORPHANED_EXIT)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), name="vlwatch-parent-watch",
                         daemon=True).start()


def _exit_when_gone(sentinel: int) -> None:
    wait([sentinel])
    os._exit(ORPHANED_EXIT)


def pin_device(device: str) -> str:
    """In a child, before torch loads: let it see only its own GPU; the name to use for it then.

    ``cuda:N`` becomes ``CUDA_VISIBLE_DEVICES`` = the Nth of the GPUs the daemon sees (its own
    ``CUDA_VISIBLE_DEVICES`` honoured) and ``cuda:0`` inside the child, so nothing in the
    process (a default stream, a stray context, a default-device tensor) can touch another
    engine's card.  Other devices (``cpu``) are left as they are.
    """
    prefix, _, number = device.partition(":")
    if prefix != "cuda" or not number.isdigit():
        return device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else []
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[int(number)] if int(number) < len(ids) else number
    return "cuda:0"


def child_logging(level: int, name: str) -> None:
    """The daemon's log format in a child (spawn starts without it), each line naming the engine."""
    from daemon.logs import setup_logging  # the one place that sets the format

    setup_logging(0)
    root = logging.getLogger()
    root.setLevel(level)

    def tag(record: logging.LogRecord) -> bool:
        record.name = f"{record.name} [{name}]"
        return True

    for handler in root.handlers:
        handler.addFilter(tag)


def owner(index: int, pid: int) -> str:
    """What ``claimed_by`` records for the jobs an engine claims."""
    return f"engine {index} pid {pid}"


def engine_config(config: Config, device: str | None) -> Config:
    """``config`` for the engine on ``device``: one device, no ``devices`` list."""
    if device is None:
        return config
    return replace(config, model=replace(config.model, device=device, devices=()))


@dataclass(frozen=True)
class EngineSpec:
    """What a child needs to run an engine (pickled to it by spawn)."""

    index: int
    device: str
    config: Config  # already for this device (``engine_config``)
    engines: int  # how many the daemon runs (for status)
    parent_pid: int
    log_level: int
    stop_grace: float


class _Link:
    """The child's end of its pipe, used by several threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the daemon is gone: the parent watch ends us
                pass


def child_main(spec: EngineSpec, conn: Connection) -> None:
    """The child process: a WorkerLoop on ``spec.device`` over the shared state file, until told to stop."""
    config = engine_config(spec.config, pin_device(spec.device))  # before anything imports torch
    die_with_parent(spec.parent_pid)
    name = f"engine {spec.index}"
    child_logging(spec.log_level, name)
    # SIGTERM (systemd signals the whole cgroup at stop) and SIGINT (Ctrl-C signals the
    # terminal's process group) mean stop, like the daemon's message: jobs in hand go back.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    stop_signal = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_signal.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon reloads and sends us the config

    from daemon.backends import create_backend
    from daemon.config import load_plugins
    from daemon.engine.loop import WorkerLoop
    from daemon.engine.outcomes import Processor
    from daemon.engine.worker import Worker
    from daemon.store.queue import Queue

    load_plugins()  # a backend a plugin registers ($VLWATCH_PLUGINS), as the daemon's config loading did
    link = _Link(conn)
    queue = Queue(config.state)
    queue.owner = owner(spec.index, os.getpid())
    processor = Processor(queue, lambda path: link.send(("changed", os.fsencode(path))))
    loop = WorkerLoop(queue, Worker(config, create_backend(config.model, config.engine)), processor, index=spec.index,
                      device=spec.device, engines=spec.engines)
    loop._note_model_state()
    log.info("%s on %s started (pid %d)", name, spec.device, os.getpid())
    threading.Thread(target=_heartbeat, args=(link, loop, min(BEAT, config.engine.engine_lost_after / 4)), name="vlwatch-heartbeat",
                     daemon=True).start()
    _load(loop)
    loop.start()
    last_idle_check = time.monotonic()
    while loop.is_alive() and not stop_signal.is_set():
        ready = wait([conn, wake_r], timeout=min(1.0, IDLE_CHECK))
        if wake_r in ready:
            _drain(wake_r)
        if conn in ready:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the daemon is gone
            if message[0] == "stop":
                break
            if message[0] == "config":
                config = _swap_config(loop, config, engine_config(message[1], config.model.device))
            if message[0] == "burst":
                _follow_burst(loop, message[1])
        if time.monotonic() - last_idle_check >= IDLE_CHECK:
            last_idle_check = time.monotonic()
            loop.unload_if_idle(config.model.idle_unload)
    code = _stop_child(loop, queue, spec.stop_grace)
    logging.shutdown()
    # os._exit: the model's threads (torch, the worker's pools) must not hold up the
    # exit; everything that matters is committed in the state file by now.
    os._exit(code)


def _follow_burst(loop: Any, burst: bool) -> None:
    """The daemon's intake has a burst of arrivals (or no more): yield to it as engine 0 does."""
    from daemon.engine.loop import BURST

    loop._backlog = (lambda: BURST) if burst else (lambda: 0)


def _heartbeat(link: _Link, loop: Any, every: float) -> None:
    """Tell the daemon this process is alive, and how long its engine has been busy without progress."""
    while True:
        busy = loop.busy_since
        link.send(("beat", 0.0 if busy is None else time.monotonic() - busy))
        time.sleep(every)


def _load(loop: Any) -> None:
    """Load the model now, not on the first job: this process exists only to run it on its GPU,
    and a backlog at start (or after a restart) then finds every engine ready.  A load that
    fails is tried again on the first job, where the loop handles it (the queue pauses)."""
    try:
        loop.worker.backend.load()
    except Exception as exc:
        log.warning("engine %d: the model did not load at start (%s); trying again on the first job", loop.index, exc)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _swap_config(loop: Any, old: Config, new: Config) -> Config:
    """After the daemon's reload: the same model stays loaded; a changed one is made anew."""
    from daemon.backends import create_backend
    from daemon.engine.worker import Worker

    same = new.model == old.model and new.engine == old.engine
    loop.replace_worker(Worker(new, loop.worker.backend if same else create_backend(new.model, new.engine)))
    log.info("engine %d: config reloaded: %d rules%s", loop.index, len(new.rules), "" if same else ", a new model")
    return new


def _stop_child(loop: Any, queue: Queue, grace: float) -> int:
    loop.stop()
    loop.join(grace)
    if loop.is_alive():  # stuck in the model: what it holds goes back; the process ends anyway
        queue.release(list(loop.in_hand))
        log.warning("engine %d: the batch in hand did not finish within %gs; put back on the queue",
                    loop.index, grace)
    else:
        loop.worker.close()
    loop.processor.flush()
    fatal = loop.fatal is not None
    queue.close()
    log.info("engine %d stopped%s", loop.index, " (GPU lost)" if fatal else "")
    return DEVICE_LOST_EXIT if fatal else 0
