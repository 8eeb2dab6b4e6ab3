"""The queue commands: ``vlwatch scan``, ``status`` and ``retry``.

What the CLI (and, through the same functions, the HTTP API) calls; none of
them needs the daemon to be running, and ``scan`` works the queue itself when
no daemon holds the state file.
"""

from __future__ import annotations

import functools
import json
import logging
import stat
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from daemon.backends import create_backend
from daemon.config import Config
from daemon.engine import BatchResult, Processor, check_model
from daemon.errors import BackendUnavailableError, ExitCode, VlwatchError
from daemon.queue import Job, Queue, StateLock, safe_text
from daemon.rules import watch_for
from daemon.scanning import (
    Progress,
    Work,
    enqueue_in_chunks,
    find_work,
    sidecars_written,
)
from daemon.worker import Worker

log = logging.getLogger(__name__)



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


def retry_job(config: Config, job_id: int) -> "Job | None":
    """Put one failed job back on the queue (``POST /api/v1/jobs/ID/retry``); None if it is not a failed job."""
    with Queue(config.state) as queue:
        jobs = queue.retry([job_id])
    return jobs[0] if jobs else None


def jobs_info(config: Config, state: str | None = None, limit: int = 50) -> list[dict[str, object]]:
    """The newest jobs, newest first (``GET /api/v1/jobs``)."""
    if not config.state.exists():
        return []
    with Queue(config.state) as queue:
        return [j.as_dict() for j in queue.recent(state, limit)]


def job_info(config: Config, job_id: int) -> dict[str, object] | None:
    if not config.state.exists():
        return None
    with Queue(config.state) as queue:
        job = queue.job(job_id)
    return job.as_dict() if job is not None else None


# ------------------------------------------------------------ submit (API)


@dataclass(frozen=True)
class Submitted:
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
                 force: bool = False) -> list[Submitted]:
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
    out: list[Submitted] = []
    wanted: list[tuple[Path, str]] = []
    candidates: list[Candidate] = []
    now = time.time()
    for given in paths:
        path = normalised(Path(given))
        shown = safe_text(str(path))
        if not Path(given).is_absolute():
            out.append(Submitted(safe_text(str(given)), error="not an absolute path"))
            continue
        if watch_for(config, path) is None:
            out.append(Submitted(shown, error="not inside a watched folder"))
            continue
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError
            digest = content_hash(path)
        except FileNotFoundError:
            out.append(Submitted(shown, error="no such file"))
            continue
        except OSError:
            out.append(Submitted(shown, error="not a readable regular file"))
            continue
        matches = match_file(config, path, rule)
        if not matches:
            out.append(Submitted(shown, error="no rule matches"))
            continue
        for m in matches:
            redo: bool | Callable[[], bool] = True if force else functools.partial(sidecar_missing, m)
            candidates.append(Candidate(path, m.rule.name, digest, st.st_size, st.st_mtime_ns, redo=redo, seen_at=now))
            wanted.append((path, m.rule.name))
    if candidates:
        with Queue(config.state) as queue:
            new = {(str(q.path), q.rule): q.id for q in queue.enqueue(candidates)}
            for path, name in wanted:
                job = queue.latest(path, name)
                out.append(Submitted(safe_text(str(path)), name, job.id if job else None, job.state if job else None,
                                     queued=(str(path), name) in new))
    return out
