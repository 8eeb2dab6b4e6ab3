"""Conversion tasks, as docling-serve's async endpoints see them: held in memory, bounded, expiring.

Every conversion, synchronous or not, is a ``Task`` here, so one bound
covers them all: at most ``MAX_RUNNING`` documents in flight (more are
refused with a 503 that says so), at most ``MAX_TASKS`` held, and a
finished task's result is kept ``KEEP`` seconds, then forgotten (a
``/v1/result`` after that is a 404, as for an unknown id).  A synchronous
request forgets its task as soon as it has answered.

Why memory and not the state database: a task is a client's request in
flight, not a file's history.  Its result belongs to a client that is
polling for it now; after a restart that client gets a 404 and sends the
document again, which is what docling-serve's own default does too (its
``local`` engine keeps tasks and results in dicts of the server process:
docling-jobkit's ``LocalOrchestrator``; only its RQ and Ray engines use
Redis).  Keeping them out of SQLite also keeps document text out of the
state file, which lives longer than any client cares.

Decoding runs on ``DECODERS`` threads of this store (never on the event
loop): a document's start on one pool, its pages' answers (a retry, the
next page decoded) on another, so one document's start does not hold up
the pages of those already in the engine's interactive queue
(``documents.Conversion``).  When a task ends, its ``callbacks`` are POSTed
its status by ``daemon.webhooks`` (docling-serve's shape: ``task_id`` and a
``task_completed`` progress), never from the engine's thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from daemon import webhooks
from daemon.config import Config
from daemon.errors import VlwatchError
from daemon.server.context import ApiError
from daemon.server.documents import Conversion, Converted, Options, Upload

if TYPE_CHECKING:
    from daemon.engine.loop import WorkerLoop

log = logging.getLogger(__name__)

#: Documents being converted at once (decoding or waiting for the model).
MAX_RUNNING = 32
#: Tasks held at once, finished ones included.
MAX_TASKS = 1000
#: Seconds a finished task's result stays available.
KEEP = 3600.0
#: Threads decoding documents (PDF rasterising is CPU work).
DECODERS = 2


@dataclass(frozen=True)
class Callback:
    """A URL to POST a task's status to when it ends, with the extra headers the client asked for."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()


class Task:
    """One document's conversion, from the request that sent it to its result."""

    def __init__(self, conversion: Conversion, callbacks: tuple[Callback, ...]) -> None:
        self.id = str(uuid.uuid4())
        self.conversion = conversion
        self.callbacks = callbacks
        self.created = time.monotonic()
        self.started = False
        self.finished_at: float | None = None

    @property
    def result(self) -> Converted | None:
        """The outcome once it is there."""
        f = self.conversion.future
        return f.result() if f.done() else None

    @property
    def status(self) -> str:
        """docling's task_status: pending, started, then success, partial_success or failure."""
        result = self.result
        if result is not None:
            return result.status
        return "started" if self.started else "pending"

    def meta(self) -> dict[str, int]:
        """docling's task_meta (counts of documents: vlwatch takes one per task)."""
        result = self.result
        return {"num_docs": 1, "num_processed": int(result is not None),
                "num_succeeded": int(result is not None and result.status != "failure"),
                "num_failed": int(result is not None and result.status == "failure")}


class TaskStore:
    """The tasks of one API server (``app.state.tasks``)."""

    def __init__(self) -> None:
        self._tasks: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(DECODERS, thread_name_prefix="vlwatch-convert")
        # A page's answer, its retry and the next page's decoding: not behind whole documents' starts.
        self._pages = ThreadPoolExecutor(DECODERS, thread_name_prefix="vlwatch-pages")

    def start(self, loop: "WorkerLoop", config: Config, upload: Upload, options: Options, *,
              callbacks: tuple[Callback, ...] = (), fetch: Callable[[], bytes] | None = None) -> Task:
        """Accept a document and start converting it.

        Args:
            fetch: given, the document's bytes are got by calling it first
                (on a decoding thread): an ``http`` source.

        Raises:
            ApiError: 503 when ``MAX_RUNNING`` documents are in flight or
                ``MAX_TASKS`` are held and none has finished.
        """
        conversion = Conversion(loop, config, upload, options, renderer=self._pages)
        task = Task(conversion, callbacks)
        with self._lock:
            self._sweep()
            running = sum(1 for t in self._tasks.values() if t.result is None)
            if running >= MAX_RUNNING:
                raise ApiError(503, f"{running} documents are being converted already (at most {MAX_RUNNING}); "
                                    "try again when one is done", code="busy")
            if len(self._tasks) >= MAX_TASKS and not self._drop_oldest_finished():
                raise ApiError(503, f"{MAX_TASKS} tasks are held; fetch or wait for their results", code="busy")
            self._tasks[task.id] = task
        conversion.future.add_done_callback(lambda _: self._finished(task))
        self._pool.submit(self._run, task, fetch)
        return task

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            self._sweep()
            return self._tasks.get(task_id)

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)

    def position(self, task: Task) -> int | None:
        """1 for the next pending task to start, 2 after it...; None once started."""
        if task.started or task.result is not None:
            return None
        with self._lock:
            ahead = [t for t in self._tasks.values() if not t.started and t.result is None and t.created <= task.created]
        return len(ahead)

    # ------------------------------------------------------------ inside

    def _run(self, task: Task, fetch: Callable[[], bytes] | None) -> None:
        conversion = task.conversion
        if conversion.future.done():  # cancelled while waiting for a decoding thread
            return
        if fetch is not None:
            try:
                conversion.upload = Upload(conversion.upload.name, fetch())
            except VlwatchError as exc:
                conversion.cancel(str(exc))
                return
        task.started = True
        conversion.start()

    def _finished(self, task: Task) -> None:
        task.finished_at = time.monotonic()
        result = task.result
        assert result is not None
        why = f": {result.errors[-1]['error_message']}" if result.errors else ""  # names are printable (safe_name)
        log.info("convert %s: %s (%s, %d pages, %.1fs)%s", task.id, result.status, result.rule, result.pages,
                 result.seconds, why)
        for cb in task.callbacks:
            ended = "failure" if result.status == "failure" else "success"
            webhooks.send(cb.url, callback_payload(task.id, result.status, ended), headers=dict(cb.headers),
                          what=f"callback of task {task.id}")

    def _sweep(self) -> None:
        now = time.monotonic()
        for task_id in [i for i, t in self._tasks.items() if t.finished_at is not None and now - t.finished_at > KEEP]:
            del self._tasks[task_id]

    def _drop_oldest_finished(self) -> bool:
        for task_id, t in self._tasks.items():
            if t.finished_at is not None:
                del self._tasks[task_id]
                return True
        return False


def callback_payload(task_id: str, status: str, ended: str) -> dict[str, Any]:
    """What a callback URL receives: docling-serve's ProgressCallbackRequest for a finished task."""
    return {"task_id": task_id, "task_status": status,
            "progress": {"kind": "task_completed", "task_status": ended}}
