"""``vlwatch process``: these files now, through the running daemon when there is one.

While a daemon works the state file, the files are handed to it and this
waits for their jobs: one model in memory, and no file done twice (issue
11.1).  The hand-off goes through the daemon's API (``POST /api/v1/jobs``,
issue 13.4) when it answers, and otherwise (``api.listen: null``, a socket
this user cannot reach) straight onto the durable queue in the state file,
which the daemon polls.  Either way the jobs go ahead of the folder backlog
(``PRIORITY``).  Without a daemon (or with ``--local``) the model is loaded
here.

The API takes only files inside a watched folder: the daemon (often another
user, with other rights) reads the file and writes a sidecar beside it.  A
file elsewhere still goes through the state file when this user may write
it (as before there was an API: whoever may write the queue may add to it
anyway); otherwise it is refused with a hint to use ``--local``.

``submit`` is the one hand-off, for both ways in: the API route calls it
with ``watched_only`` and ``absolute_only``, the CLI's state-file hand-off
with ``stale`` (``vlwatch process`` also redoes a sidecar older than its
file).  It deliberately does not wait; ``wait_for`` does, over the queue or
the API alike.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from daemon.backends import create_backend
from daemon.config import Config
from daemon.engine.loop import WorkerLoop, check_model
from daemon.engine.outcomes import Processor
from daemon.engine.worker import Worker
from daemon.errors import ExitCode, VlwatchError, plural
from daemon.errors import printable
from daemon.intake.readiness import file_signature
from daemon.intake.recipes import recipe_of
from daemon.intake.rules import match_file, normalised, watch_for
from daemon.intake.sidecars import sidecar_fresh, sidecar_missing
from daemon.store.keys import content_hash, safe_text
from daemon.store.queue import HANDED_OVER, Candidate, Job, Queue
from daemon.store.state import StateLock

if TYPE_CHECKING:
    import httpx

    from daemon.intake.rules import Match

log = logging.getLogger(__name__)

#: Files handed over go ahead of the folder backlog (issue 13.4).
PRIORITY = HANDED_OVER
#: Why the API refuses a file (``submit`` with ``watched_only``); the CLI recognises it.
OUTSIDE = "not inside a watched folder"
#: Paths per ``POST /api/v1/jobs`` (the route takes at most 10,000).
API_CHUNK = 1000


@dataclass(frozen=True)
class Submitted:
    """One (file, rule) handed over: the job that covers it now, or why there is none."""

    path: Path
    rule: str | None = None
    job_id: int | None = None  # new, or the one already queued, running or done for these bytes
    state: str | None = None  # that job's state
    queued: bool = False  # a new job was queued for it by this call
    error: str | None = None  # the problem alone; ``path`` names the file

    def as_dict(self) -> dict[str, object]:
        """What ``POST /api/v1/jobs`` answers for it."""
        return {"path": safe_text(str(self.path)), "rule": self.rule, "job": self.job_id, "state": self.state,
                "queued": self.queued, "error": self.error}


def check_rule(config: Config, rule: str | None) -> None:
    """Raise ``VlwatchError`` (exit 2) when ``rule`` names no rule."""
    if rule is not None and config.rule(rule) is None:
        names = ", ".join(r.name for r in config.rules)
        raise VlwatchError(f"no rule named {rule!r} (defined: {names})", ExitCode.USAGE)


def submit(config: Config, queue: Queue, paths: Sequence[str | Path], rule: str | None = None, *,
           force: bool = False, stale: bool = False, watched_only: bool = False, absolute_only: bool = False,
           priority: int = PRIORITY) -> list[Submitted]:
    """Queue these files now, ahead of the folder backlog, for the running daemon (issues 11.1, 13.4).

    What ``POST /api/v1/jobs`` and ``vlwatch process`` (through the state
    file) both call.  Queueing is the queue's idempotent ``enqueue``, in one
    transaction: a file already queued or running is covered by that job
    (moved ahead too), and one whose sidecar is up to date for its bytes is
    not queued again (its finished job is returned) unless ``force``.

    Args:
        config: the config in force.
        queue: the state file's queue.
        paths: the files, in order; each gives one entry per matching rule, or one with its error.
        rule: run this rule instead of matching (it must exist).
        force: queue again even when an up-to-date sidecar exists.
        stale: also redo a sidecar older than its file (``vlwatch process``); otherwise
            only a missing sidecar redoes a file whose bytes were done.
        watched_only: refuse files outside every watched folder (the API: the daemon
            would read them, and write beside them, with its own rights).
        absolute_only: refuse relative paths (the API: relative to what?).
        priority: claimed before jobs of lower priority (the folder backlog is 0).

    Raises:
        VlwatchError: ``rule`` names no rule (exit 2).
    """
    check_rule(config, rule)
    out: list[Submitted] = []  # in the order given; entries without job_id/state until queued
    candidates: list[Candidate] = []
    now = time.time()
    for given in paths:
        path = normalised(Path(given))
        if absolute_only and not Path(given).is_absolute():
            out.append(Submitted(Path(given), rule, error="not an absolute path"))
        elif watched_only and watch_for(config, path) is None:
            out.append(Submitted(path, rule, error=OUTSIDE))
        elif (problem := not_a_file(path)) is not None:
            out.append(Submitted(path, rule, error=problem))
        elif not (matches := match_file(config, path, rule)):
            out.append(Submitted(path, rule, error="no rule matches"))
        else:
            try:
                sig = file_signature(path)
                digest = content_hash(path)
            except OSError as exc:
                out.append(Submitted(path, rule, error=f"cannot be read: {exc.strerror or exc}"))
                continue
            if sig is None:
                out.append(Submitted(path, rule, error="no such file"))
                continue
            for m in matches:
                # Asked only when a done job has these bytes (``Candidate.redo``).
                redo: bool | Callable[[], bool] = (True if force else functools.partial(_stale, m, sig[1])
                                                   if stale else functools.partial(sidecar_missing, m))
                candidates.append(Candidate(path, m.rule.name, digest, sig[0], sig[1], redo=redo, seen_at=now,
                                            recipe=recipe_of(config, m), priority=priority))
                out.append(Submitted(path, m.rule.name))
    if not candidates:
        return out
    new = {(str(q.path), q.rule) for q in queue.enqueue(candidates)}
    results: list[Submitted] = []
    for s in out:
        if s.error is None and s.rule is not None:
            job = queue.latest(s.path, s.rule)
            s = Submitted(s.path, s.rule, job.id if job else None, job.state if job else None,
                          queued=(str(s.path), s.rule) in new)
        results.append(s)
    queue.prioritise([s.job_id for s in results if s.state == "queued" and s.job_id is not None], priority)
    return results


def _stale(match: "Match", mtime_ns: int) -> bool:
    return not sidecar_fresh(match, mtime_ns)  # fresh: every planned sidecar exists, newer than the file


# ------------------------------------------------------------------ waiting


@dataclass(frozen=True)
class ApiJob:
    """What waiting and reporting read of a job, as the daemon's API shows it (the fields of ``Job`` they use)."""

    id: int
    path: Path
    rule: str
    state: str
    error: str | None
    sidecars: tuple[Path, ...]


#: A job as ``wait_for`` and ``_report`` see it: from the state file, or from the API.
JobLike = Job | ApiJob


class JobSource(Protocol):
    def job(self, job_id: int) -> JobLike | None: ...
    def latest(self, path: Path, rule: str) -> JobLike | None: ...


class DaemonGone(Exception):
    """The daemon's API stopped answering while a job was awaited."""


class ApiJobs:
    """Jobs as the daemon's API shows them (``GET /api/v1/jobs/ID``): a ``JobSource`` for ``wait_for``."""

    def __init__(self, client: "httpx.Client") -> None:
        self.client = client

    def job(self, job_id: int) -> ApiJob | None:
        import httpx

        try:
            response = self.client.get(f"/api/v1/jobs/{job_id}")
        except httpx.HTTPError as exc:
            raise DaemonGone(str(exc)) from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise DaemonGone(f"HTTP {response.status_code}")
        return _api_job(response.json())

    def latest(self, path: Path, rule: str) -> ApiJob | None:
        """The newest job of this file and rule (``GET /api/v1/jobs?path=&rule=``): one that replaced ours."""
        import httpx

        text = str(path)
        try:
            text.encode("utf-8")  # a name that is not UTF-8 cannot be asked for
        except UnicodeError:
            return None
        try:
            response = self.client.get("/api/v1/jobs", params={"path": text, "rule": rule, "limit": 1})
        except httpx.HTTPError as exc:
            raise DaemonGone(str(exc)) from exc
        if response.status_code != 200:
            return None  # an older daemon, without the filter: the job counts as dropped
        jobs = response.json().get("jobs") or []
        return _api_job(jobs[0]) if jobs else None


def _api_job(doc: dict[str, Any]) -> ApiJob:
    return ApiJob(int(doc["id"]), Path(doc["path"]), str(doc["rule"]), str(doc["state"]), doc.get("error"),
                  tuple(Path(s) for s in doc.get("sidecars") or ()))


def wait_for(source: JobSource, submitted: Sequence[Submitted], *, timeout: float | None = None,
             alive: Callable[[], bool] = lambda: True, poll: float = 0.2) -> dict[int, JobLike | None]:
    """Poll the submitted jobs until each is done or has failed an attempt, by job id.

    A job that failed once counts as failed here (the daemon may retry it;
    ``status`` tells).  A job replaced by a newer one of the same file is
    followed to that one where ``source`` can tell; a job the daemon dropped
    (the file went away) maps to None.  Stops early when ``alive()`` turns
    false (the daemon went away) or ``timeout`` passes; unfinished jobs are
    then left out.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = {s.job_id: (s.job_id, s.path, s.rule) for s in submitted if s.job_id is not None and s.rule}
    finished: dict[int, JobLike | None] = {}
    while pending:
        try:
            for asked, (current, path, rule) in list(pending.items()):
                job = source.job(current)
                if job is None:
                    newer = source.latest(path, rule)
                    if newer is None or newer.id <= current:
                        finished[asked] = None  # dropped
                        del pending[asked]
                        continue
                    pending[asked] = (newer.id, path, rule)
                    job = newer
                if job.state in ("done", "failed") or (job.state == "queued" and job.error):
                    finished[asked] = job
                    del pending[asked]
        except DaemonGone:
            break
        if not pending or not alive() or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(poll)
    return finished


# ------------------------------------------------------------------ process


def process(config: Config, paths: Sequence[Path], *, rule: str | None = None, force: bool = False,
            local: bool = False, timeout: float | None = None) -> int:
    """``vlwatch process``: these files now; through the running daemon when there is one (issues 11.1, 13.4).

    While a daemon works the state file, the files go to it (through its API
    when it answers, else onto its queue) and this waits for their sidecars:
    one model in memory, and no file done twice.  Otherwise (or with
    ``local``) the model is loaded here.
    """
    holder = None if local or not config.state.exists() else StateLock(config.state).holder()
    if holder is None:
        return process_local(config, paths, rule=rule)
    check_rule(config, rule)
    failed = 0
    files: list[Path] = []
    for path in paths:
        if (problem := not_a_file(path)) is not None:
            print(f"error: {printable(path)}: {problem}", file=sys.stderr)
            failed += 1
        else:
            files.append(normalised(path))
    place = {p: i for i, p in enumerate(files)}  # sidecars are printed in the order the files were given
    client = _client(config) if files else None
    lock = StateLock(config.state)
    with contextlib.ExitStack() as stack:
        waits: list[tuple[JobSource, list[Submitted]]] = []
        if client is not None:
            stack.callback(client.close)
            by_api = [p for p in files if _api_takes(config, p)]
            if by_api:
                waits.append((ApiJobs(client), _post(client, by_api, rule, force)))
            files = [p for p in files if p not in set(by_api)]
            if files and not _queue_writable(config):
                failed += _refuse(config, files)
                files = []
        if files:
            queue = stack.enter_context(Queue(config.state))
            waits.append((queue, submit(config, queue, files, rule, force=force, stale=True)))
        for source, submitted in waits:
            failed += _print_refused(submitted)
            if ids := [s.job_id for s in submitted if s.job_id is not None]:
                how = " through its API" if isinstance(source, ApiJobs) else ""
                # A normal hand-off, not a warning (issue 27): a note on stderr, where the results are not.
                print(f"vlwatch: handed {plural(len(ids), 'job')} to the running daemon (pid {holder}){how}; "
                      f"waiting for {'it' if len(ids) == 1 else 'them'}", file=sys.stderr, flush=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        outcomes: list[tuple[int, int, JobLike | None | str]] = []  # (place, job id, the job or why it is not done)
        for source, submitted in waits:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Over HTTP, one request per job and round: a long list is asked less often.
            poll = min(2.0, 0.2 + len(submitted) / 200) if isinstance(source, ApiJobs) else 0.2
            jobs = wait_for(source, submitted, timeout=left, alive=lambda: lock.holder() is not None, poll=poll)
            why = "the daemon stopped" if lock.holder() is None or timeout is None else f"not done within {timeout:g}s"
            outcomes += [(place.get(s.path, 0), s.job_id, jobs.get(s.job_id, why))
                         for s in submitted if s.job_id is not None]
    for _, job_id, job in sorted(outcomes, key=lambda o: o[0]):
        failed += _report(job_id, job)
    return ExitCode.FAILED if failed else ExitCode.OK


def _client(config: Config) -> "httpx.Client | None":
    """The daemon's API client (``vlwatch ask``'s), or None: then the files go through the state file."""
    from daemon.asking import daemon_client

    try:
        client = daemon_client(config)
    except VlwatchError as exc:  # it wants a token this user lacks: the state file still takes the files
        if not _queue_writable(config):
            raise
        log.warning("%s; handing the files over through its state file instead", exc)
        return None
    if client is None and config.api.listen is not None:
        log.info("the daemon's API does not answer at %s; handing the files over through its state file",
                 config.api.listen)
    return client


def _refuse(config: Config, files: Sequence[Path]) -> int:
    """Files the API does not take, and the state file may not be written here: say why, and what to do."""
    for path in files:
        why = OUTSIDE if watch_for(config, path) is None else "its name is not UTF-8"
        print(f"error: {printable(path)}: {why}: the daemon's API does not take it, and its state file "
              f"{printable(config.state)} is not writable here (`vlwatch process --local` processes it "
              "in this process)", file=sys.stderr)
    return len(files)


def _api_takes(config: Config, path: Path) -> bool:
    """Whether the API would take ``path``: inside a watched folder, and a name JSON can carry.

    A name that is not UTF-8 could travel escaped, but the API's job records
    show paths as text; such a file goes through the state file, where the
    name is kept byte for byte.
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return watch_for(config, path) is not None


def _queue_writable(config: Config) -> bool:
    return os.access(config.state, os.W_OK) and os.access(config.state.parent, os.W_OK)


def _post(client: "httpx.Client", paths: Sequence[Path], rule: str | None, force: bool) -> list[Submitted]:
    """``POST /api/v1/jobs`` with ``vlwatch process``'s semantics (``stale``); the answers as ``Submitted``."""
    import httpx

    from daemon.asking import _api_error

    out: list[Submitted] = []
    for start in range(0, len(paths), API_CHUNK):
        chunk = paths[start:start + API_CHUNK]
        body = json.dumps({"paths": [str(p) for p in chunk], "rule": rule, "force": force, "stale": True})
        try:
            response = client.post("/api/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            raise VlwatchError(f"the daemon's API stopped answering: {exc}", ExitCode.FAILED) from exc
        if response.status_code != 202:
            code = ExitCode.USAGE if response.status_code == 400 else ExitCode.FAILED
            raise VlwatchError(f"the daemon refused the files: {_api_error(response)}", code)
        for entry in response.json()["jobs"]:
            out.append(Submitted(Path(entry["path"]), entry.get("rule"), entry.get("job"), entry.get("state"),
                                 bool(entry.get("queued")), entry.get("error")))
    return out


def _print_refused(submitted: Sequence[Submitted]) -> int:
    """Print why each refused file was refused; return how many."""
    refused = [s for s in submitted if s.error]
    for s in refused:
        hint = (f"; skipped (see `vlwatch explain -- {shlex.quote(printable(s.path))}`)"
                if s.error == "no rule matches" else "")
        print(f"error: {printable(s.path)}: {s.error}{hint}", file=sys.stderr)
    return len(refused)


def _report(job_id: int, job: JobLike | None | str) -> int:
    """Print a job's sidecars (0), or why it has none (1)."""
    if isinstance(job, str):
        print(f"error: job #{job_id}: {job}; it stays queued (`vlwatch status`)", file=sys.stderr)
    elif job is None:
        print(f"error: job #{job_id}: dropped by the daemon (the file went away or changed; see its log)",
              file=sys.stderr)
    elif job.state == "done":
        for sidecar in job.sidecars:
            print_path(sidecar)
        return 0
    else:
        retry = " (the daemon will try it again)" if job.state == "queued" else ""
        print(f"error: {safe_text(str(job.path))}: {job.rule}: {job.error}{retry}", file=sys.stderr)
    return 1


def process_local(config: Config, paths: Sequence[Path], *, rule: str | None = None) -> int:
    """``vlwatch process --local`` (and without a daemon): the model loaded here, sidecars printed.

    The files run through the daemon's own job loop (``WorkerLoop.drain``,
    issue 22.1: one loop), so they get its continuous admission, its retries
    of a page and its hooks, on a queue of their own in a temporary folder:
    the state file is the daemon's, and these files are not its backlog.  One
    attempt each: a failure is reported now, not retried in an hour.
    """
    check_rule(config, rule)
    with tempfile.TemporaryDirectory(prefix="vlwatch-process-") as folder:
        here = replace(config, state=Path(folder) / "state.db", jobs=replace(config.jobs, attempts=1))
        with Queue(here.state) as queue:
            submitted = submit(here, queue, paths, rule, force=True)
            failed = _print_refused(submitted)
            queued = [s for s in submitted if s.job_id is not None]
            if queued:
                check_model(config)
                failed += _run_here(here, queue)
                for s in queued:
                    failed += _report_here(s.path, queue.job(s.job_id))
    return ExitCode.FAILED if failed else ExitCode.OK


def _run_here(config: Config, queue: Queue) -> int:
    """Drain ``queue`` through the daemon's loop in this process; 1 when it stopped short (an outage, a lost GPU)."""
    worker = Worker(config, create_backend(config.model, config.engine))
    processor = Processor(queue, on_changed=lambda p: log.warning("%s: changed while it was processed; not done",
                                                                  printable(p)))
    loop = WorkerLoop(queue, worker, processor)
    try:
        loop.drain()
    finally:
        worker.close()
    if loop.stopped_by is None:
        return 0
    print(f"vlwatch: {loop.stopped_by}", file=sys.stderr)
    return 1


def _report_here(path: Path, job: Job | None) -> int:
    """Print a job's sidecars (0), or why it has none (1)."""
    if job is not None and job.state == "done":
        for sidecar in job.sidecars:
            print_path(sidecar)
        return 0
    if job is None:  # dropped by the loop
        print(f"error: {printable(path)}: not processed: the file went away or changed meanwhile", file=sys.stderr)
    elif job.state == "failed":
        print(f"error: {safe_text(str(job.path))}: {job.rule}: {job.error}", file=sys.stderr)
    else:  # still queued: the loop stopped first (its reason is printed above)
        print(f"error: {safe_text(str(job.path))}: {job.rule}: not processed", file=sys.stderr)
    return 1


def not_a_file(path: Path) -> str | None:
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return "is a symbolic link to a file that does not exist"
    if path.exists():
        return "is not a regular file"
    return "no such file"


def print_path(path: Path) -> None:
    """One path per line, as the exact bytes of its name (a name need not be UTF-8)."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a test harness's text-only stdout
        print(printable(path))
        return
    buffer.write(os.fsencode(path) + b"\n")
    buffer.flush()
