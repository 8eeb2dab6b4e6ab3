"""The queue commands: ``vlwatch scan``, ``status`` and ``retry``.

What the CLI (and, through the same functions, the HTTP API) calls; none of
them needs the daemon to be running, and ``scan`` works the queue itself when
no daemon holds the state file.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

from daemon.backends import create_backend
from daemon.config import Config
from daemon.engine import BatchResult, Processor, check_model
from daemon.errors import BackendUnavailableError, ExitCode
from daemon.queue import Queue, StateLock, safe_text
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
    # One entry per engine when model.devices runs several (issue 12.5).
    engines = sorted((k for k in meta if k.startswith("engine.") and k[7:].isdigit()), key=lambda k: int(k[7:]))
    info["engines"] = [{"engine": int(k[7:]), **meta[k]} for k in engines] if pid is not None else []
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
    for engine in info.get("engines") or []:
        state = "loaded" if engine.get("loaded") else "not loaded"
        lines.append(f"engine {engine['engine']} on {engine.get('device')}: {state}, {engine.get('done', 0)} files done")
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
