"""``vlwatch process``: these files now, through the running daemon when there is one.

While a daemon holds the state file, the files go onto its durable queue
(``submit``) and this waits for their jobs (``wait_for``): one model in
memory, and no file done twice (issue 11.1).  Without a daemon (or with
``--local``) the model is loaded here.  ``submit_paths`` is the same hand-off
for ``POST /api/v1/jobs``, which only takes files inside a watched folder.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from daemon.backends import create_backend
from daemon.config import Config
from daemon.engine import check_model
from daemon.errors import ExitCode, VlwatchError, plural
from daemon.images import printable
from daemon.queue import Job, Queue, StateLock, safe_text
from daemon.recipes import recipe_of
from daemon.rules import watch_for
from daemon.watching import file_signature
from daemon.worker import Worker

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    """One (file, rule) handed to the queue: the job that covers it, or why there is none."""

    path: Path
    rule: str | None
    job_id: int | None = None
    error: str | None = None


def submit(config: Config, queue: Queue, paths: Sequence[Path], rule: str | None = None,
           force: bool = False) -> list[Submitted]:
    """Queue these files now, for whoever works the queue (the running daemon).

    What ``vlwatch process`` does while a daemon runs (issue 11.1), and what
    ``POST /api/v1/jobs`` is meant to call.  Like a scan, a file whose
    sidecar is up to date for its bytes is not queued again (its finished job
    is returned) unless ``force``; a file already queued or running is
    covered by that job.

    Raises:
        VlwatchError: ``rule`` names no rule (exit 2).
    """
    from daemon.queue import Candidate, content_hash
    from daemon.rules import match_file
    from daemon.scanning import sidecar_fresh

    if rule is not None and config.rule(rule) is None:
        names = ", ".join(r.name for r in config.rules)
        raise VlwatchError(f"no rule named {rule!r} (defined: {names})", ExitCode.USAGE)
    out: list[Submitted] = []
    for path in paths:
        if (problem := not_a_file(path)) is not None:
            out.append(Submitted(path, rule, error=f"{safe_text(str(path))}: {problem}"))
            continue
        path = path.absolute()
        matches = match_file(config, path, rule)
        if not matches:
            out.append(Submitted(path, rule, error=f"{safe_text(str(path))}: no rule matches; skipped "
                                                   f"(see `vlwatch explain`)"))
            continue
        sig = file_signature(path)
        try:
            digest = content_hash(path)
        except OSError as exc:
            out.append(Submitted(path, rule, error=f"{safe_text(str(path))}: cannot be read: {exc.strerror or exc}"))
            continue
        if sig is None:
            out.append(Submitted(path, rule, error=f"{safe_text(str(path))}: no such file"))
            continue
        now = time.time()
        for m in matches:
            redo = force or not sidecar_fresh(m, sig[1])  # fresh means every planned sidecar exists, newer
            queue.enqueue([Candidate(path, m.rule.name, digest, sig[0], sig[1], redo=redo, seen_at=now,
                                     recipe=recipe_of(config, m))])
            job = queue.latest(path, m.rule.name)
            out.append(Submitted(path, m.rule.name, job.id if job is not None else None))
    return out


def wait_for(queue: Queue, submitted: Sequence[Submitted], *, timeout: float | None = None,
             alive: Callable[[], bool] = lambda: True, poll: float = 0.2) -> dict[int, Job | None]:
    """Poll the submitted jobs until each is done or has failed an attempt, by job id.

    A job that failed once counts as failed here (the daemon may retry it;
    ``status`` tells).  A job replaced by a newer one of the same file is
    followed to that one; a job the daemon dropped (the file went away)
    maps to None.  Stops early when ``alive()`` turns false (the daemon went
    away) or ``timeout`` passes; unfinished jobs are then left out.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = {s.job_id: (s.job_id, s.path, s.rule) for s in submitted if s.job_id is not None and s.rule}
    finished: dict[int, Job | None] = {}
    while pending:
        for asked, (current, path, rule) in list(pending.items()):
            job = queue.job(current)
            if job is None:
                newer = queue.latest(path, rule)
                if newer is None or newer.id <= current:
                    finished[asked] = None  # dropped
                    del pending[asked]
                    continue
                pending[asked] = (newer.id, path, rule)
                job = newer
            if job.state in ("done", "failed") or (job.state == "queued" and job.error):
                finished[asked] = job
                del pending[asked]
        if not pending or not alive() or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(poll)
    return finished


def process(config: Config, paths: Sequence[Path], *, rule: str | None = None, force: bool = False,
            local: bool = False, timeout: float | None = None) -> int:
    """``vlwatch process``: these files now; through the running daemon when there is one (issue 11.1).

    While a daemon holds the state file, the files go onto its queue and this
    waits for their sidecars: one model in memory, and no file done twice.
    Otherwise (or with ``local``) the model is loaded here.
    """
    holder = None if local or not config.state.exists() else StateLock(config.state).holder()
    if holder is None:
        return process_local(config, paths, rule=rule)
    with Queue(config.state) as queue:
        submitted = submit(config, queue, paths, rule, force)
        failed = 0
        for s in submitted:
            if s.error:
                print(f"error: {s.error}", file=sys.stderr)
                failed += 1
        ids = [s.job_id for s in submitted if s.job_id is not None]
        if ids:
            log.warning("handed %s to the running daemon (pid %d); waiting for %s",
                        plural(len(ids), "job"), holder, "it" if len(ids) == 1 else "them")
        lock = StateLock(config.state)
        jobs = wait_for(queue, submitted, timeout=timeout, alive=lambda: lock.holder() is not None)
        for job_id in ids:
            job = jobs.get(job_id)
            if job_id not in jobs:
                failed += 1
                why = "the daemon stopped" if lock.holder() is None else f"not done within {timeout:g}s"
                print(f"error: job #{job_id}: {why}; it stays queued (`vlwatch status`)", file=sys.stderr)
            elif job is None:
                failed += 1
                print(f"error: job #{job_id}: dropped by the daemon (the file went away or changed; see its log)",
                      file=sys.stderr)
            elif job.state == "done":
                for sidecar in job.sidecars:
                    print_path(sidecar)
            else:
                failed += 1
                retry = " (the daemon will try it again)" if job.state == "queued" else ""
                print(f"error: {safe_text(str(job.path))}: {job.rule}: {job.error}{retry}", file=sys.stderr)
    return ExitCode.FAILED if failed else ExitCode.OK


def process_local(config: Config, paths: Sequence[Path], *, rule: str | None = None) -> int:
    """``vlwatch process --local``: load the model here, write the sidecars, print their paths."""
    from daemon.rules import match_file

    if rule is not None and config.rule(rule) is None:
        names = ", ".join(r.name for r in config.rules)
        raise VlwatchError(f"no rule named {rule!r} (defined: {names})", ExitCode.USAGE)
    failed = 0
    matches = []
    for path in paths:
        if (problem := not_a_file(path)) is not None:
            print(f"error: {printable(path)}: {problem}", file=sys.stderr)
            failed += 1
            continue
        found = match_file(config, path, rule)
        if not found:
            hint = shlex.quote(printable(path))
            print(f"error: {printable(path)}: no rule matches; skipped (see `vlwatch explain -- {hint}`)",
                  file=sys.stderr)
            failed += 1
        matches.extend(found)
    if matches:
        check_model(config)
        worker = Worker(config, create_backend(config.model))
        try:
            outcomes = worker.process(matches)
        finally:
            worker.close()
        for outcome in outcomes:
            if outcome.ok:
                for sidecar in outcome.sidecars:
                    print_path(sidecar)
            else:
                failed += 1
                print(f"error: {outcome.error}", file=sys.stderr)
    return ExitCode.FAILED if failed else ExitCode.OK


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


@dataclass(frozen=True)
class Accepted:
    """What became of one path handed to ``submit_paths``."""

    path: str
    rule: str | None = None
    job: int | None = None  # the job that covers it now (new or already queued/running/done)
    state: str | None = None  # that job's state
    queued: bool = False  # a new job was queued for it by this call
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "rule": self.rule, "job": self.job, "state": self.state, "queued": self.queued,
                "error": self.error}


def submit_paths(config: Config, paths: Sequence[str | Path], rule: str | None = None,
                 force: bool = False) -> list[Accepted]:
    """Queue these files now, for the running daemon (``POST /api/v1/jobs``, ``vlwatch process``).

    Only files inside a watched folder are taken: a file elsewhere would have
    the daemon (often another user, with other rights) read it and write a
    sidecar beside it.  Queueing is the queue's idempotent ``enqueue``: a
    file already queued or running is reported with that job.

    Args:
        config: the config in force.
        paths: absolute paths of the files.
        rule: run this rule instead of matching (it must exist).
        force: queue again even when an up-to-date sidecar exists (``process``
            semantics); otherwise only a missing or stale sidecar queues it.

    Raises:
        VlwatchError: ``rule`` names no rule.
    """
    from daemon.queue import Candidate, content_hash
    from daemon.rules import match_file, normalised
    from daemon.scanning import sidecar_missing

    if rule is not None and config.rule(rule) is None:
        raise VlwatchError(f"no rule named {rule!r} (defined: {', '.join(r.name for r in config.rules)})",
                           ExitCode.USAGE)
    out: list[Accepted | tuple[Path, str]] = []  # in the order given; (path, rule) until queued
    candidates: list[Candidate] = []
    now = time.time()
    for given in paths:
        path = normalised(Path(given))
        shown = safe_text(str(path))
        if not Path(given).is_absolute():
            out.append(Accepted(safe_text(str(given)), error="not an absolute path"))
            continue
        if watch_for(config, path) is None:
            out.append(Accepted(shown, error="not inside a watched folder"))
            continue
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError
            digest = content_hash(path)
        except FileNotFoundError:
            out.append(Accepted(shown, error="no such file"))
            continue
        except OSError:
            out.append(Accepted(shown, error="not a readable regular file"))
            continue
        matches = match_file(config, path, rule)
        if not matches:
            out.append(Accepted(shown, error="no rule matches"))
            continue
        for m in matches:
            redo: bool | Callable[[], bool] = True if force else functools.partial(sidecar_missing, m)
            candidates.append(Candidate(path, m.rule.name, digest, st.st_size, st.st_mtime_ns, redo=redo, seen_at=now,
                                        recipe=recipe_of(config, m)))
            out.append((path, m.rule.name))
    if not candidates:
        return [s for s in out if isinstance(s, Accepted)]
    results: list[Accepted] = []
    with Queue(config.state) as queue:
        new = {(str(q.path), q.rule) for q in queue.enqueue(candidates)}
        for item in out:
            if isinstance(item, Accepted):
                results.append(item)
                continue
            path, name = item
            job = queue.latest(path, name)
            results.append(Accepted(safe_text(str(path)), name, job.id if job else None, job.state if job else None,
                                     queued=(str(path), name) in new))
    return results
