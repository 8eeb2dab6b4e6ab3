"""Commands run after a job: ``on_done`` once its sidecars are written, ``on_failed`` once it failed for good.

A hook is an argv list, run without a shell (a file name can never become
shell syntax), with what it is about in its environment:

- ``VLWATCH_SOURCE``: the image (or PDF) the job was about;
- ``VLWATCH_SIDECARS``: the sidecars written, one path per line (empty on failure);
- ``VLWATCH_RULE``, ``VLWATCH_TASK``: the rule's name and task;
- ``VLWATCH_ERROR``: why it failed (empty when done).

A rule's own ``on_done``/``on_failed`` replace the top-level ``hooks:``
ones for that rule.  A rule's ``webhook:`` URL is POSTed a JSON summary of
the same two events (``daemon.webhooks``: retried with backoff, on its own
thread).  Hooks run on a small pool of background threads, never
on the engine's: a slow hook holds up no model call.  Each gets
``hooks.timeout`` seconds, after which its whole process group is killed;
a hook that cannot start, exits non-zero or times out is logged (with the
first lines of its output) and that is all: it never fails the job or stops
the daemon.  Stdin is ``/dev/null``.

Deliberately not done: retrying a failed hook (it may not be idempotent),
and running hooks for a job that will still be retried (``on_failed`` is
for a file that needs a person).  Hooks still queued when the process exits
are waited for up to ``EXIT_WAIT`` seconds (``atexit``), so a ``vlwatch
scan`` does not cut them off; one still running then is left to finish on
its own (it runs in its own session).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from daemon import webhooks
from daemon.config import Config, Rule
from daemon.errors import printable

log = logging.getLogger(__name__)

#: Hooks running at once; the rest wait their turn.
WORKERS = 2
#: Hooks waiting at most; beyond this new ones are dropped (and logged), so a
#: hook slower than the model cannot grow memory without bound.
BACKLOG = 10_000
#: Longest the process waits at exit for hooks still queued or running
#: (systemd's stop timeout is 45 s, and the batch in hand may take 20).
EXIT_WAIT = 15.0
#: Output of a failing hook quoted in the log.
OUTPUT_LINES = 5


@dataclass(frozen=True)
class Hook:
    argv: tuple[str, ...]
    env: dict[str, str]
    timeout: float
    what: str  # for the log: "on_done of /x.png [describe]"


def done(config: Config, rule_name: str, source: Path, sidecars: Sequence[Path]) -> None:
    """Run the ``on_done`` hook (if any) for a job whose sidecars were just written; POST its webhook."""
    rule = config.rule(rule_name)
    argv = config.hooks.on_done if rule is None or rule.on_done is None else rule.on_done
    if argv and rule is not None:
        _submit(_hook("on_done", argv, config, rule, source, sidecars, ""))
    if rule is not None and rule.webhook:
        _webhook("done", rule, source, sidecars, None)


def failed(config: Config, rule_name: str, source: Path, error: str) -> None:
    """Run the ``on_failed`` hook (if any) for a job that failed for good; POST its webhook."""
    rule = config.rule(rule_name)
    argv = config.hooks.on_failed if rule is None or rule.on_failed is None else rule.on_failed
    if argv and rule is not None:
        _submit(_hook("on_failed", argv, config, rule, source, (), error))
    if rule is not None and rule.webhook:
        _webhook("failed", rule, source, (), error)


def _webhook(event: str, rule: Rule, source: Path, sidecars: Sequence[Path], error: str | None) -> None:
    # Queued for the webhook thread (daemon.webhooks): never waits for the receiver.
    assert rule.webhook is not None
    webhooks.send(rule.webhook, webhooks.job_payload(event=event, source=source, rule=rule.name, task=rule.task,
                                                     sidecars=sidecars, error=error),
                  what=f"{event} of {printable(source)} [{rule.name}]")


def _hook(kind: str, argv: Sequence[str], config: Config, rule: Rule, source: Path,
          sidecars: Sequence[Path], error: str) -> Hook:
    # The daemon's secrets stay with the daemon: a hook gets neither the
    # API's token nor the model server's key.
    secrets = {config.api.token_env, config.model.api_key_env} - {None}
    env = {k: v for k, v in os.environ.items() if k not in secrets}
    env.update(VLWATCH_SOURCE=str(source), VLWATCH_SIDECARS="\n".join(str(s) for s in sidecars),
               VLWATCH_RULE=rule.name, VLWATCH_TASK=rule.task, VLWATCH_ERROR=error)
    return Hook(tuple(argv), env, config.hooks.timeout, f"{kind} of {printable(source)} [{rule.name}]")


# ------------------------------------------------------------------ pool

_queue: "queue.Queue[Hook]" = queue.Queue(BACKLOG)
_threads: list[threading.Thread] = []
_lock = threading.Lock()
_pending = 0  # queued or running
_idle = threading.Condition(_lock)


def _submit(hook: Hook) -> None:
    global _pending
    with _lock:
        try:
            _queue.put_nowait(hook)
        except queue.Full:
            log.error("hook %s dropped: %d hooks are already waiting", hook.what, BACKLOG)
            return
        _pending += 1
        if len(_threads) < WORKERS:
            if not _threads:
                atexit.register(wait, EXIT_WAIT)
            t = threading.Thread(target=_work, name=f"vlwatch-hook-{len(_threads)}", daemon=True)
            _threads.append(t)
            t.start()


def _work() -> None:
    global _pending
    while True:
        hook = _queue.get()
        try:
            run(hook)
        except Exception:  # a bug here must not end the pool
            log.exception("hook %s: unexpected error", hook.what)
        finally:
            with _lock:
                _pending -= 1
                _idle.notify_all()


def wait(timeout: float | None = None) -> bool:
    """Wait until every queued hook has run (at exit, and for tests); False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _lock:
        while _pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            _idle.wait(remaining)
    return True


def run(hook: Hook) -> int | None:
    """Run one hook to completion (or its timeout); return its exit code, None if it never ran or timed out."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(hook.argv, env=hook.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    except OSError as exc:
        log.error("hook %s: cannot run %s: %s", hook.what, printable(hook.argv[0]), exc.strerror or exc)
        return None
    try:
        output, _ = proc.communicate(timeout=hook.timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            output, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipe
            output = b""
        log.error("hook %s: %s still running after %gs; killed", hook.what, printable(hook.argv[0]), hook.timeout)
        return None
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = _tail(output)
        log.error("hook %s: %s exited with %d after %.1fs%s", hook.what, printable(hook.argv[0]),
                  proc.returncode, seconds, f": {tail}" if tail else "")
    else:
        log.info("hook %s: %s ok in %.1fs", hook.what, printable(hook.argv[0]), seconds)
    return proc.returncode


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The hook runs in its own session: kill whatever it started too (sh -c 'sleep ...').
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _tail(output: bytes | None) -> str:
    lines = (output or b"").decode("utf-8", "replace").strip().splitlines()[-OUTPUT_LINES:]
    return printable(" | ".join(lines))[:1000]
