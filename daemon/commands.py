"""The queue commands: ``vlwatch scan``, ``status``, ``retry``, ``explain`` and ``search``.

What the CLI (and, through the same functions, the HTTP API) calls; none of
them needs the daemon to be running, and ``scan`` works the queue itself when
no daemon holds the state file.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Sequence

from daemon.backends import create_backend
from daemon.config import COMPILE_PARTS, ENGINE_KEYS, Config, EngineOptions
from daemon.controls import for_terminal, json_text
from daemon.engine.loop import WorkerLoop, check_model
from daemon.engine.outcomes import BatchResult, Processor
from daemon.engine.worker import Worker
from daemon.errors import ExitCode, VlwatchError, plural
from daemon.intake.readiness import file_signature
from daemon.intake.recipes import Outdated, outdated, recipe_of
from daemon.intake.rules import watch_for
from daemon.intake.scanning import (
    Progress,
    Work,
    enqueue_in_chunks,
    find_work,
    sidecars_written,
)
from daemon.store.keys import safe_text
from daemon.store.queue import HANDED_OVER, Job, Queue
from daemon.store.state import StateLock

log = logging.getLogger(__name__)



def scan(config: Config, dry_run: bool = False, *, redo: bool = False, rule: str | None = None) -> int:
    """``vlwatch scan``: queue files with missing or stale sidecars, and process them.

    With a daemon running on the same state file, the jobs are left to it;
    otherwise this process takes the state lock and works the queue itself.

    Args:
        dry_run: only list the files (and create nothing: no state file, issue 11.3).
        redo: also redo sidecars an older recipe made (``daemon.intake.recipes``, issue 11.13).
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
    """Process every due job now, through the daemon's own loop, with progress; exit 1 if any failed."""
    queue.recover(config.jobs.attempts, written=lambda j: sidecars_written(j, config))
    total = queue.due_count()
    if total == 0:
        print("nothing to process")
        return ExitCode.OK
    summary = BatchResult()
    progress = Progress("processing", total, tty=tty)

    def counted(result: BatchResult) -> None:
        for k in ("done", "failed", "retrying", "dropped"):
            setattr(summary, k, getattr(summary, k) + getattr(result, k))
        progress.update(result.done + result.failed + result.retrying + result.dropped)

    worker = Worker(config, create_backend(config.model, config.engine))
    processor = Processor(queue, on_changed=lambda p: log.warning("%s: changed while queued; run scan again", p),
                          on_result=counted)
    loop = WorkerLoop(queue, worker, processor)
    try:
        loop.drain()
    finally:
        progress.close()
        worker.close()
    if (why := loop.stopped_by) is not None:  # an outage, or a lost GPU (the jobs went back, attempt spent)
        # Outcomes the state database refused are still in memory: no count of the queue to trust.
        left = "" if loop.outage is not None and processor.unrecorded() else \
            f"; {plural(queue.due_count(), 'job')} left queued"
        print(f"vlwatch: {why}{left}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"processed {plural(summary.done + summary.failed + summary.retrying, 'file')}: {summary.done} done, "
          f"{summary.failed + summary.retrying} failed ({summary.retrying} will be retried)"
          + (f", {summary.dropped} dropped" if summary.dropped else ""))
    return ExitCode.FAILED if summary.failed or summary.retrying else ExitCode.OK


# ----------------------------------------------------------------- status


def status(config: Config, as_json: bool = False) -> int:
    """``vlwatch status``: queue counts, the daemon, the model, the last failures."""
    info = status_info(config)
    if as_json:
        print(json_text(info, indent=2))
    else:
        print(for_terminal(format_status(info)))
    return ExitCode.OK


def status_info(config: Config, failures: int = 10) -> dict[str, object]:
    pid = StateLock(config.state).holder()
    info: dict[str, object] = {"state": str(config.state), "daemon": {"running": pid is not None, "pid": pid},
                               "counts": {"queued": 0, "running": 0, "done": 0, "failed": 0},
                               "model": None, "backend": None, "storage": None, "failures": [], "outdated": 0,
                               "engine_options": config.engine.shown()}
    if not config.state.exists():
        return info
    with Queue(config.state) as queue:
        meta = queue.meta()
        info["counts"] = queue.counts()
        info["failures"] = [j.as_dict() for j in queue.failures(failures)]
        info["outdated"] = len(outdated(config, queue))
    if pid is None and info["counts"].get("running"):  # type: ignore[union-attr]
        # Nobody runs them: a daemon was killed while it did (kill -9, a power cut). Not "running"
        # beside "not running" (issue 27): interrupted, and the next start redoes them.
        counts = dict(info["counts"])  # type: ignore[arg-type]
        counts["interrupted"], counts["running"] = counts["running"], 0
        info["counts"] = counts
    model = meta.get("model")
    if model is not None and pid is None:
        model = {**model, "loaded": False, "since": None}  # nobody holds it any more
    info["model"] = model
    # The engine options in effect: the running daemon's (recorded when its model
    # loaded), else what this config would start with (issue 22.3).
    running = (model or {}).get("engine_options") if pid is not None else None
    info["engine_options"] = running or config.engine.shown()
    info["backend"] = meta.get("backend") if pid is not None else None
    # An output disk that refuses writes pauses the queue like a backend outage (issue 10.8).
    info["storage"] = meta.get("storage") if pid is not None else None
    # One entry per engine when model.devices runs several (issue 12.5).
    engines = sorted((k for k in meta if k.startswith("engine.") and k[7:].isdigit()), key=lambda k: int(k[7:]))
    info["engines"] = [{"engine": int(k[7:]), **meta[k]} for k in engines] if pid is not None else []
    return info


def _engine_line(engine: dict) -> str:
    """One engine of several (issue 12.5): where, which process, loaded, files done; or why it is down."""
    where = f"engine {engine['engine']} on {engine.get('device')}"
    if engine.get("running") is False:
        line = f"{where}: not running"
        if engine.get("error"):
            line += f" ({engine['error']})"
        if engine.get("restart_at"):
            line += f"; starting again at {_when(engine['restart_at'])} (restart {engine.get('restarts', 1)})"
        return line
    pid = f" (pid {engine['pid']})" if engine.get("pid") else ""
    state = "loaded" if engine.get("loaded") else "not loaded"
    return f"{where}{pid}: {state}, {engine.get('done', 0)} files done"


def format_status(info: dict) -> str:
    c = info["counts"]
    daemon = info["daemon"]
    lines = [
        f"state    {info['state']}",
        f"daemon   {'running (pid %s)' % daemon['pid'] if daemon['running'] else 'not running'}",
        f"queue    {c['queued']} queued, {c['running']} running, {c['done']} done, {c['failed']} failed",
    ]
    if c.get("interrupted"):
        lines.append(f"         {c['interrupted']} interrupted: the daemon stopped while running them; "
                     "its next start redoes them")
    if info.get("outdated"):
        lines.append(f"outdated {_outdated_note(info['outdated'], redo=False)}")
    model = info.get("model")
    if model:
        state = "loaded" if model.get("loaded") else "not loaded"
        if model.get("loaded") and model.get("device"):
            state += f" on {model['device']}"
        since = f" since {_when(model['since'])}" if model.get("since") else ""
        lines.append(f"model    {model.get('model')} ({model.get('backend')}): {state}{since}")
        if model.get("loaded") and model.get("plan"):
            lines.append(f"memory   {model['plan']}")
        if model.get("loaded") and model.get("in_effect"):
            lines.append(f"         {model['in_effect']}")  # the choices in effect that can change answers
        if model.get("loaded") and model.get("touchpoints"):
            lines.append(f"checked  Qwen2.5-VL touchpoints: {model['touchpoints']}")
    if info.get("engine_options"):
        lines.append(f"engine   {EngineOptions(**_options(info['engine_options'])).line()}")
    for engine in info.get("engines") or []:
        lines.append(_engine_line(engine))
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
            lines.append(f"  #{f['id']}  {safe_text(f['path'])} [{f['rule']}] after {plural(f['attempts'], 'attempt')}, "
                         f"{_when(f['finished_at'])}: {f['error']}")
        lines.append("(`vlwatch retry --all` or `vlwatch retry JOB_ID...` puts them back on the queue)")
    return "\n".join(lines)


def _options(shown: dict) -> dict[str, object]:
    """``EngineOptions.shown()`` (JSON from the state database) back into the dataclass's fields."""
    out = {k: v for k, v in shown.items() if k in ENGINE_KEYS}
    compile_ = out.get("compile", True)
    out["compile"] = COMPILE_PARTS if compile_ is True else tuple(compile_ or ())
    return out


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
        if ids is not None:  # jobs named one by one: a person waits for them (issue 13.4); --all is a backlog
            queue.prioritise([j.id for j in jobs], HANDED_OVER)
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
    from daemon.config import Snapshot
    from daemon.intake.rules import candidate_rules, match_file, normalised, relative_to_root, render_prompt
    from daemon.intake.sidecars import optional_sidecars, planned_sidecars
    from daemon.intake.ignoring import ignore_reason

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
    # The daemon's own filter, so explain and the daemon give one answer (issue 10.5).
    snapshot = Snapshot.of(config)
    _, owner_root, skip = snapshot.find(path) or (None, root, ())
    if (reason := ignore_reason(path, owner_root, snapshot.rule_names, skip)) is not None:
        print(f"  never processed: {reason}")
        return ExitCode.FAILED
    relative = relative_to_root(path, root)
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
        if r.answers is not None:
            from daemon.policies import OLMOCR_TEMPERATURES

            ladder = ", ".join(f"{t:g}" for t in r.temperatures or OLMOCR_TEMPERATURES)
            size = f"; pages at longest side {r.longest_side}px" if r.longest_side else ""
            print(f"    answers: {r.answers} (the prompt before the page; each page tried at temperatures "
                  f"{ladder} until valid{size})")
        print("    prompt:")
        for line in render_prompt(r, path).splitlines():
            print(f"      {line}")
        for sidecar in planned_sidecars(m):
            print(f"    writes: {safe_text(str(sidecar))}")
        for sidecar in optional_sidecars(m):
            print(f"    writes: {safe_text(str(sidecar))} (when the answer holds boxes)")
    return ExitCode.OK


# ----------------------------------------------------------------- search


def search(config: Config, query: str, *, as_json: bool = False, limit: int = 20, folder: Path | None = None,
           rule: str | None = None, since: str | None = None, until: str | None = None) -> int:
    """``vlwatch search``: full-text search over every sidecar; path, rule, sidecar and a snippet per hit.

    The same index and function as ``GET /api/v1/search`` (``search_hits``).
    """
    hits = search_hits(config, query, limit=limit, folder=folder, rule=rule, since=since, until=until)
    if as_json:
        print(json_text({"query": query, "hits": hits}, indent=2))
        return ExitCode.OK
    bold = sys.stdout.isatty()
    for h in hits:  # snippets are model text, paths are anyone's: no control character reaches the terminal
        print(for_terminal(f"{h['path']}\t[{h['rule']}]\t{h['sidecar']}"))
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
    from daemon.store.search import Filters, parse_date
    from daemon.store.search import search as run_search

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
        return for_terminal(snippet)
    out, pos = [], 0
    for start, end in spans:  # escaped piece by piece: the spans index the raw snippet
        out += [for_terminal(snippet[pos:start]), "\033[1m", for_terminal(snippet[start:end]), "\033[0m"]
        pos = end
    return "".join(out) + for_terminal(snippet[pos:])


def retry_job(config: Config, job_id: int) -> "Job | None":
    """Put one failed job back on the queue (``POST /api/v1/jobs/ID/retry``); None if it is not a failed job."""
    with Queue(config.state) as queue:
        jobs = queue.retry([job_id])
        queue.prioritise([j.id for j in jobs], HANDED_OVER)  # a person clicked it: ahead of the backlog
    return jobs[0] if jobs else None


def jobs_info(config: Config, state: str | None = None, limit: int = 50, *, path: Path | None = None,
              rule: str | None = None) -> list[dict[str, object]]:
    """The newest jobs (of a state, a file, a rule), newest first (``GET /api/v1/jobs``)."""
    if not config.state.exists():
        return []
    with Queue(config.state) as queue:
        return [j.as_dict() for j in queue.recent(state, limit, path=path, rule=rule)]


def job_info(config: Config, job_id: int) -> dict[str, object] | None:
    if not config.state.exists():
        return None
    with Queue(config.state) as queue:
        job = queue.job(job_id)
    return job.as_dict() if job is not None else None
