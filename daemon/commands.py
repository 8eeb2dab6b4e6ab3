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
import stat
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

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

if TYPE_CHECKING:
    import httpx

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
    out: list[Submitted | tuple[Path, str]] = []  # in the order given; (path, rule) until queued
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
            out.append((path, m.rule.name))
    if not candidates:
        return [s for s in out if isinstance(s, Submitted)]
    results: list[Submitted] = []
    with Queue(config.state) as queue:
        new = {(str(q.path), q.rule) for q in queue.enqueue(candidates)}
        for item in out:
            if isinstance(item, Submitted):
                results.append(item)
                continue
            path, name = item
            job = queue.latest(path, name)
            results.append(Submitted(safe_text(str(path)), name, job.id if job else None, job.state if job else None,
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


def process_through_daemon(config: Config, files: Sequence[Path], rule: str | None = None,
                           poll: float = 0.2) -> int | None:
    """``vlwatch process`` while a daemon runs: its model does the work (``POST /api/v1/jobs``).

    Returns the exit code, or None when no daemon answers or a file lies
    outside the watched folders (the daemon takes only those): the caller
    then processes the files itself.  Waits for each job to be done or
    failed and prints the sidecars, as a local ``process`` does.
    """
    from daemon.rules import normalised

    absolute = [normalised(p) for p in files]
    if any(watch_for(config, p) is None for p in absolute):
        return None
    client = daemon_client(config)
    if client is None:
        return None
    try:
        return _process_through(client, absolute, rule, poll)
    finally:
        client.close()


def _process_through(client: "httpx.Client", absolute: Sequence[Path], rule: str | None, poll: float) -> int:
    # force: `process` means "run it now", even over an up-to-date sidecar.
    response = client.post("/api/v1/jobs", json={"paths": [str(p) for p in absolute], "rule": rule,
                                                 "force": True})
    if response.status_code != 202:
        raise VlwatchError(f"the daemon refused: {_api_error(response)}", ExitCode.USAGE)
    failed = 0
    waiting: dict[int, str] = {}
    for item in response.json()["jobs"]:
        if item["error"]:
            print(f"error: {item['path']}: {item['error']}", file=sys.stderr)
            failed += 1
        elif item["job"] is not None:
            waiting[int(item["job"])] = item["path"]
    print(f"queued {len(waiting)} jobs with the running daemon", file=sys.stderr)
    while waiting:
        for job_id in list(waiting):
            r = client.get(f"/api/v1/jobs/{job_id}")
            if r.status_code == 404:
                print(f"error: {waiting.pop(job_id)}: the job was dropped (the file changed or went away)",
                      file=sys.stderr)
                failed += 1
                continue
            job = r.json()
            if job["state"] == "done":
                waiting.pop(job_id)
                for sidecar in job["sidecars"]:
                    print(sidecar, flush=True)
            elif job["state"] == "failed":
                waiting.pop(job_id)
                print(f"error: {job['error']}", file=sys.stderr)
                failed += 1
        if waiting:
            time.sleep(poll)
    return ExitCode.FAILED if failed else ExitCode.OK


