"""The queue commands: ``vlwatch scan``, ``status`` and ``retry``.

What the CLI (and, through the same functions, the HTTP API) calls; none of
them needs the daemon to be running, and ``scan`` works the queue itself when
no daemon holds the state file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence


from daemon.backends import create_backend
from daemon.config import Config
from daemon.engine import BatchResult, Processor, check_model
from daemon.errors import BackendUnavailableError, ExitCode, VlwatchError, plural
from daemon.images import printable
from daemon.queue import Job, Queue, StateLock, safe_text
from daemon.recipes import Outdated, outdated, recipe_of
from daemon.rules import watch_for
from daemon.scanning import (
    Progress,
    Work,
    enqueue_in_chunks,
    find_work,
    sidecars_written,
)
from daemon.watching import file_signature
from daemon.worker import Worker

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)



def scan(config: Config, dry_run: bool = False, *, redo: bool = False, rule: str | None = None) -> int:
    """``vlwatch scan``: queue files with missing or stale sidecars, and process them.

    With a daemon running on the same state file, the jobs are left to it;
    otherwise this process takes the state lock and works the queue itself.

    Args:
        dry_run: only list the files (and create nothing: no state file, issue 11.3).
        redo: also redo sidecars an older recipe made (``daemon.recipes``, issue 11.13).
        rule: with ``redo``, only this rule's.
    """
    if rule is not None and config.rule(rule) is None:
        names = ", ".join(r.name for r in config.rules)
        raise VlwatchError(f"no rule named {rule!r} (defined: {names})", ExitCode.USAGE)
    tty = sys.stderr.isatty()
    # A dry run of a config that never ran must not create its state file:
    # an empty in-memory queue answers "nothing done yet" just as well.
    state = config.state if config.state.exists() or not dry_run else Path(":memory:")
    with Queue(state) as queue:
        progress = Progress("scanning", tty=tty)
        works = list(find_work(config, queue, progress=progress))
        progress.close()
        old = outdated(config, queue, rule)
        if dry_run:
            for w in works:
                print(f"{w.reason}\t{w.match.rule.name}\t{safe_text(str(w.match.path))}")
            for o in old:
                print(f"outdated\t{o.job.rule}\t{safe_text(str(o.job.path))}")
            print(f"{plural(len(works), 'file')} need{'s' if len(works) == 1 else ''} processing "
                  f"({progress.count} scanned)", file=sys.stderr)
            if old:
                print(_outdated_note(len(old), redo), file=sys.stderr)
            return ExitCode.OK
        ready = _settled(config, works)
        if redo:
            ready += [w for o in old if (w := _redo_work(config, o)) is not None]
        elif old:
            print(_outdated_note(len(old), redo=False), file=sys.stderr)
        jobs = enqueue_in_chunks(queue, ready)
        log.info("scan: %s scanned, %s queued", plural(progress.count, "file"), plural(len(jobs), "job"))
        lock = StateLock(config.state)
        if not lock.acquire():
            print(f"queued {plural(len(jobs), 'job')}; the running daemon (pid {lock.holder()}) will process them")
            return ExitCode.OK
        try:
            check_model(config)
            return _drain(config, queue, tty)
        finally:
            lock.release()


def _outdated_note(n: int, redo: bool) -> str:
    made = f"{plural(n, 'sidecar')} {'was' if n == 1 else 'were'} made by an older recipe (model, prompt or sizing)"
    return f"{made}; `vlwatch scan --redo` redoes {'it' if n == 1 else 'them'}" if not redo else made


def _redo_work(config: Config, old: Outdated) -> Work | None:
    """The work that redoes an outdated sidecar; None if the file changed since (the scan redoes it anyway)."""
    sig = file_signature(old.job.path)
    if sig is None or sig != old.job.signature:
        return None
    return Work(old.match, sig[0], sig[1], "outdated", old.job.hash, time.time(), recipe_of(config, old.match))


def _settled(config: Config, works: list[Work], *, limit: float = 60.0) -> list[Work]:
    """``works``, once each file has held still for its watch's ``settle`` (issue 11.7).

    A scan right after a copy used to skip the files still being written and
    say "nothing to process"; it now waits for them (saying so), and only a
    file still changing after ``limit`` more seconds is left for the next scan.
    """
    ready, waiting = [], []
    now = time.time()
    for work in works:
        (waiting if now - work.mtime_ns / 1e9 < _settle_of(config, work.match.path) else ready).append(work)
    if not waiting:
        return ready
    print(f"waiting for {plural(len({x.match.path for x in waiting}), 'file')} still being written "
          f"(unchanged for `settle` counts as complete)", file=sys.stderr)
    deadline = time.monotonic() + limit + max(_settle_of(config, x.match.path) for x in waiting)
    while waiting and time.monotonic() < deadline:
        time.sleep(0.1)
        still = []
        now = time.time()
        for work in waiting:
            sig = file_signature(work.match.path)
            if sig is None:
                continue  # gone meanwhile
            if sig != (work.size, work.mtime_ns):
                work = replace(work, size=sig[0], mtime_ns=sig[1], hash=None)
            if now - work.mtime_ns / 1e9 >= _settle_of(config, work.match.path):
                ready.append(work)
            else:
                still.append(work)
        waiting = still
    for w in waiting:
        log.warning("%s: still being written after %gs; left for the next scan", w.match.path, limit)
    return ready


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
            except BackendUnavailableError as exc:  # the server, the output disk or the state database
                processor.release([j.id for j in jobs])  # recorded now, or kept until the state disk takes it
                what = "backend unavailable: " if exc.meta_key == "backend" else ""
                left = "" if processor.unrecorded() else f"; {plural(queue.due_count(), 'job')} left queued"
                print(f"vlwatch: {what}{exc}{left}", file=sys.stderr)
                return ExitCode.FAILED
            for k in ("done", "failed", "retrying", "dropped"):
                setattr(summary, k, getattr(summary, k) + getattr(r, k))
            progress.update(len(jobs))
    finally:
        progress.close()
        worker.close()
    print(f"processed {plural(summary.done + summary.failed + summary.retrying, 'file')}: {summary.done} done, "
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
                               "model": None, "backend": None, "storage": None, "failures": [], "outdated": 0}
    if not config.state.exists():
        return info
    with Queue(config.state) as queue:
        meta = queue.meta()
        info["counts"] = queue.counts()
        info["failures"] = [j.as_dict() for j in queue.failures(failures)]
        info["outdated"] = len(outdated(config, queue))
    model = meta.get("model")
    if model is not None and pid is None:
        model = {**model, "loaded": False, "since": None}  # nobody holds it any more
    info["model"] = model
    info["backend"] = meta.get("backend") if pid is not None else None
    # An output disk that refuses writes pauses the queue like a backend outage (issue 10.8).
    info["storage"] = meta.get("storage") if pid is not None else None
    return info


def format_status(info: dict) -> str:
    c = info["counts"]
    daemon = info["daemon"]
    lines = [
        f"state    {info['state']}",
        f"daemon   {'running (pid %s)' % daemon['pid'] if daemon['running'] else 'not running'}",
        f"queue    {c['queued']} queued, {c['running']} running, {c['done']} done, {c['failed']} failed",
    ]
    if info.get("outdated"):
        lines.append(f"outdated {_outdated_note(info['outdated'], redo=False)}")
    model = info.get("model")
    if model:
        state = "loaded" if model.get("loaded") else "not loaded"
        since = f" since {_when(model['since'])}" if model.get("since") else ""
        lines.append(f"model    {model.get('model')} ({model.get('backend')}): {state}{since}")
    backend = info.get("backend")
    if backend and not backend.get("available", True):
        lines.append(f"backend  unavailable since {_when(backend.get('since'))}: {backend.get('error')}; "
                     f"next try {_when(backend.get('retry_at'))}")
    storage = info.get("storage")
    if storage and not storage.get("available", True):
        lines.append(f"storage  {storage.get('error')} since {_when(storage.get('since'))}; queue paused, "
                     f"no attempts spent; next try {_when(storage.get('retry_at'))}")
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


# ---------------------------------------------------------------- explain


def explain(config: Config, path: Path) -> int:
    """``vlwatch explain``: which rules match ``path``, and why or why not (issue 11.9).

    Loads no model and writes nothing.  Exit 1 when the file does not exist,
    is never processed (our own output, a temporary or litter file) or no
    rule matches it.
    """
    from daemon.outputs import (
        TEMP_PREFIX,
        TEMP_SUFFIX,
        is_output_name,
        optional_sidecars,
        planned_sidecars,
    )
    from daemon.rules import (
        candidate_rules,
        match_file,
        normalised,
        relative_to_root,
        render_prompt,
    )
    from daemon.scanning import output_dirs_inside, rule_names
    from daemon.watching import ignored_dir, ignored_name

    path = normalised(path)
    shown = safe_text(str(path))
    if not path.exists():
        print(f"vlwatch: {shown}: no such file", file=sys.stderr)
        return ExitCode.FAILED
    watch = watch_for(config, path)
    root = normalised(watch.path) if watch else path.parent
    print(shown)
    if watch is None:
        print("  watched folder: none (the daemon never sees this file; `vlwatch process` can still take it, "
              "matching the globs against the file name)")
    else:
        print(f"  watched folder: {safe_text(str(root))}"
              + ("" if watch.rules is None else f" (only rules {', '.join(watch.rules)})"))
    # What the watcher and the scans drop before any rule sees the file.
    name = path.name
    if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
        print("  never processed: a temporary file vlwatch writes a sidecar into before renaming it")
        return ExitCode.FAILED
    if is_output_name(name, rule_names(config)):
        print("  never processed: a sidecar (or overlay) vlwatch wrote; vlwatch never feeds on its own output")
        return ExitCode.FAILED
    if ignored_name(name):
        print("  never processed: a hidden, temporary or system file (editor swap, partial download, "
              ".DS_Store, Thumbs.db ...)")
        return ExitCode.FAILED
    relative = relative_to_root(path, root)
    if watch is not None:
        folders = relative.split("/")[:-1]
        if bad := [f for f in folders if ignored_dir(f)]:
            print(f"  never processed: inside the ignored folder {bad[0]!r} (hidden, or system litter)")
            return ExitCode.FAILED
        for out in output_dirs_inside(watch, config):
            if path.is_relative_to(out):
                print(f"  never processed: inside the output folder {safe_text(str(out))}")
                return ExitCode.FAILED
    matches = match_file(config, path)
    if not matches:
        print(f"  no rule matches {relative!r}; it was held against:")
        tried = candidate_rules(config, watch)
        for r in tried:
            print(f"    rule {r.name} ({r.source}): match {', '.join(r.match)}")
        skipped = [r.name for r in config.rules if r not in tried]
        if skipped:
            print(f"    (not tried: {', '.join(skipped)}; this folder's `rules:` leaves them out)")
        if not tried:
            print("    (no rule: this folder's `rules:` names none that exists)")
        return ExitCode.FAILED
    for m in matches:
        r = m.rule
        print(f"  rule {r.name} ({r.source}): task {r.task} -> {r.output}")
        if r.formats is not None or r.pages is not None:
            pages = ",".join(f"{a}" if a == b else f"{a}-{b or ''}" for a, b in r.pages or ())
            print(f"    takes: formats {', '.join(r.formats or ('any',))}; pages {pages or 'all'}")
        for ref in r.reference:
            print(f"    reference: {safe_text(str(ref))}")
        print("    prompt:")
        for line in render_prompt(r, path).splitlines():
            print(f"      {line}")
        for sidecar in planned_sidecars(m):
            print(f"    writes: {safe_text(str(sidecar))}")
        for sidecar in optional_sidecars(m):
            print(f"    writes: {safe_text(str(sidecar))} (when the answer holds boxes)")
    return ExitCode.OK


# ---------------------------------------------------------------- process


# ----------------------------------------------------------------- search


def search(config: Config, query: str, *, as_json: bool = False, limit: int = 20, folder: Path | None = None,
           rule: str | None = None, since: str | None = None, until: str | None = None) -> int:
    """``vlwatch search``: full-text search over every sidecar; path, rule, sidecar and a snippet per hit.

    The same index and function as ``GET /api/v1/search`` (``search_hits``).
    """
    hits = search_hits(config, query, limit=limit, folder=folder, rule=rule, since=since, until=until)
    if as_json:
        print(json.dumps({"query": query, "hits": hits}, indent=2, ensure_ascii=False))
        return ExitCode.OK
    bold = sys.stdout.isatty()
    for h in hits:
        print(f"{h['path']}\t[{h['rule']}]\t{h['sidecar']}")
        print(f"    {_marked(h['snippet'], h['highlights'], bold)}")
    if not hits:
        print("no hits", file=sys.stderr)
    return ExitCode.OK


def search_hits(config: Config, query: str, *, limit: int = 20, folder: Path | None = None, rule: str | None = None,
                since: str | None = None, until: str | None = None) -> list[dict[str, object]]:
    """The hits of one search as JSON-ready dicts (what the CLI prints and the API returns).

    Raises:
        VlwatchError: a date is not ``YYYY-MM-DD`` or ``limit`` is out of range (exit 2).
    """
    from daemon.errors import VlwatchError
    from daemon.search import Filters, parse_date
    from daemon.search import search as run_search

    if not 1 <= limit <= 1000:
        raise VlwatchError(f"--limit must be between 1 and 1000, not {limit}", ExitCode.USAGE)
    dates: list[float | None] = []
    for text, end in ((since, False), (until, True)):
        try:
            dates.append(parse_date(text, end=end) if text else None)
        except ValueError:
            raise VlwatchError(f"dates are YYYY-MM-DD, not {text!r}", ExitCode.USAGE) from None
    filters = Filters(folder=folder.expanduser().absolute() if folder else None, rule=rule or None,
                      since=dates[0], until=dates[1])
    return [h.as_dict() for h in run_search(config.state, query, limit=limit, filters=filters)]


def _marked(snippet: str, spans: Sequence[Sequence[int]], bold: bool) -> str:
    if not bold:
        return snippet
    out, pos = [], 0
    for start, end in spans:
        out += [snippet[pos:start], "\033[1m", snippet[start:end], "\033[0m"]
        pos = end
    return "".join(out) + snippet[pos:]


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
    from daemon.outputs import planned_sidecars
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
            redo = force or not sidecar_fresh(m, sig[1]) or not all(p.exists() for p in planned_sidecars(m))
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


# --------------------------------------------------------- the daemon's API


def daemon_client(config: Config, timeout: float = 10.0) -> "httpx.Client | None":
    """An HTTP client for the running daemon's API (``api.listen``), or None when none answers there.

    The daemon is recognised by its state file: whatever answers at the
    address must report the same ``state`` as this config, so a command never
    sends images to some other program (or another user's daemon) that
    happens to listen on the port.  The token, when ``api.token_env`` names
    one, goes in the ``Authorization`` header.

    Raises:
        VlwatchError: the daemon answers but refuses the token (or wants one).
    """
    import httpx

    listen = config.api.listen
    if listen is None or StateLock(config.state).holder() is None:
        return None  # no daemon works this state file
    headers = {}
    if config.api.token_env and (token := os.environ.get(config.api.token_env, "").strip()):
        headers["Authorization"] = f"Bearer {token}"
    if (sock := config.api.unix_socket) is not None:
        if not sock.exists():
            return None
        transport = httpx.HTTPTransport(uds=str(sock))
        base = "http://localhost"
    else:
        transport = httpx.HTTPTransport()
        host_port = config.api.host_port()
        assert host_port is not None
        host, port = host_port
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host in ("::", "[::]"):
            host = "::1"
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    client = httpx.Client(base_url=base, headers=headers, transport=transport,
                          timeout=httpx.Timeout(timeout, connect=2.0))
    try:
        response = client.get("/api/v1/status")
    except httpx.HTTPError:
        client.close()
        return None
    if response.status_code == 401:
        client.close()
        hint = f"set ${config.api.token_env}" if config.api.token_env else "set api.token_env in the config"
        raise VlwatchError(f"the daemon at {listen} wants a bearer token: {hint}")
    try:
        same = response.status_code == 200 and response.json().get("state") == str(config.state)
    except ValueError:
        same = False
    if not same:
        client.close()
        log.info("something answers at %s, but not the vlwatch daemon of %s; not using it", listen, config.state)
        return None
    return client


def _api_error(response: "httpx.Response") -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


# ------------------------------------------------------------------- ask


def ask(config: Config, question: str, images: Sequence[Path], *, max_tokens: int | None = None,
        as_json: bool = False) -> int:
    """``vlwatch ask``: one question about one or more images, answered on stdout.

    Through the running daemon's API when one answers (its model, no second
    copy in memory); otherwise the model is loaded here.  The answer is
    printed as it is produced; ``as_json`` prints one JSON object at the end.
    """
    for path in images:
        if not path.is_file():
            raise VlwatchError(f"{safe_text(str(path))}: no such file", ExitCode.FAILED)
    client = daemon_client(config, timeout=600.0)
    if client is not None:
        try:
            return _ask_daemon(client, config, question, images, max_tokens, as_json)
        finally:
            client.close()
    pid = StateLock(config.state).holder()
    if pid is not None:
        log.warning("a daemon runs (pid %s) but its API does not answer at %s; loading the model here too",
                    pid, config.api.listen)
    return _ask_here(config, question, images, max_tokens, as_json)


def _ask_daemon(client: "httpx.Client", config: Config, question: str, images: Sequence[Path],
                max_tokens: int | None, as_json: bool) -> int:
    import base64

    from daemon.server.app import MAX_BODY

    content: list[dict[str, object]] = []
    total = 0
    for path in images:
        data = path.read_bytes()
        total += len(data) * 4 // 3
        if total > MAX_BODY - 65536:
            raise VlwatchError(f"{safe_text(str(path))}: the images are too large to send to the daemon "
                               f"(over {MAX_BODY // 2**20} MiB together)", ExitCode.FAILED)
        url = "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": question})
    body: dict[str, object] = {"model": config.model.name, "messages": [{"role": "user", "content": content}],
                               "stream": not as_json}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if as_json:
        response = client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise VlwatchError(f"the daemon refused: {_api_error(response)}", ExitCode.FAILED)
        doc = response.json()
        choice = doc["choices"][0]
        print(json.dumps({"answer": choice["message"]["content"], "model": doc.get("model"),
                          "finish_reason": choice.get("finish_reason"),
                          "new_tokens": (doc.get("usage") or {}).get("completion_tokens"),
                          "images": [str(p) for p in images], "via": "daemon"}, ensure_ascii=False, indent=2))
        return ExitCode.OK
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise VlwatchError(f"the daemon refused: {_api_error(response)}", ExitCode.FAILED)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                print(file=sys.stdout, flush=True)
                raise VlwatchError(f"the model failed: {chunk['error'].get('message')}", ExitCode.FAILED)
            for choice in chunk.get("choices", ()):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    print()
    return ExitCode.OK


def _ask_here(config: Config, question: str, images: Sequence[Path], max_tokens: int | None, as_json: bool) -> int:
    from daemon.backends import Message, Request
    from daemon.errors import InputError
    from daemon.images import load_pages

    pictures = []
    for path in images:
        try:
            pages = load_pages(path, min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels,
                               pages=((1, 8),))
        except InputError as exc:
            raise VlwatchError(str(exc), ExitCode.FAILED) from exc
        pictures.extend(p.image for p in pages)
    printed: list[str] = []

    def stream(piece: str) -> None:
        printed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    max_new = min(max_tokens or config.model.max_new_tokens, config.model.max_new_tokens)
    request = Request(images=tuple(pictures), prompt=question, max_new_tokens=max_new,
                      messages=(Message("user", (*pictures, question)),), stream=None if as_json else stream)
    check_model(config)
    backend = create_backend(config.model)
    try:
        [answer] = backend.generate([request])
    finally:
        unload = getattr(backend, "unload", None)
        if callable(unload):
            unload()
    if as_json:
        print(json.dumps({"answer": answer.text, "model": backend.model,
                          "finish_reason": "stop" if answer.finished else "length", "new_tokens": answer.new_tokens,
                          "images": [str(p) for p in images], "via": "local"}, ensure_ascii=False, indent=2))
        return ExitCode.OK
    rest = answer.text[len("".join(printed)):]  # a backend that does not stream sends it all here
    sys.stdout.write(rest + "\n")
    sys.stdout.flush()
    return ExitCode.OK


# ----------------------------------------------------- process (API client)


