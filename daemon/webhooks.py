"""Webhooks: a JSON POST to a URL after a job, retried with backoff, on one background thread.

Two kinds of sender use it:

- a folder rule's ``webhook:`` (``daemon.hooks`` calls ``job_done`` /
  ``job_failed`` beside the rule's commands): the file, the rule, the
  sidecars written and the status;
- an async conversion's ``callbacks`` (``daemon.server.tasks``): the task's
  id and final status, in docling-serve's shape.

Deliveries never block their sender: ``send`` puts the delivery on a bounded
heap and returns; one thread (``vlwatch-webhook``) posts whatever is due,
so a slow or dead receiver holds up no model call and, since a failed
delivery waits for its retry on the heap rather than in a sleep, no other
delivery either.  A delivery is tried ``ATTEMPTS`` times, ``BACKOFF``
seconds apart and doubling; a 2xx answer ends it, a 4xx other than 408/429
too (the receiver refused it: asking again would not help).

A URL may carry a secret in its query (``?token=...``) or user info: the
log names a receiver by ``redacted(url)`` only (scheme, host, port and
path), never the whole URL.  Nothing else about the receiver is logged.

Deliveries still waiting when the process exits are given up to
``EXIT_WAIT`` seconds (``atexit``); a receiver that is down past that loses
them, and the log says how many.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import json
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

#: Tries per delivery (the first and the retries).
ATTEMPTS = 5
#: Seconds before the first retry; each next one waits twice as long (1, 2, 4, 8 s).
BACKOFF = 1.0
#: Seconds one POST may take (connect, send, answer).
TIMEOUT = 10.0
#: Deliveries waiting at most; beyond this new ones are dropped (and logged),
#: so a dead receiver cannot grow memory without bound.
BACKLOG = 10_000
#: Longest the process waits at exit for deliveries still due.
EXIT_WAIT = 10.0


def redacted(url: str) -> str:
    """``url`` fit for a log line: scheme, host, port and path; no user info, query or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<a malformed URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def url_problem(url: object) -> str | None:
    """Why ``url`` cannot be a webhook, or None: it must be an absolute http(s) URL with a host."""
    if not isinstance(url, str) or not url.strip():
        return "expected an http:// or https:// URL"
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL with a host, like https://example.org/hook"
    if any(c in url for c in "\r\n\t "):
        return "a URL must not contain spaces or line breaks"
    return None


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    headers: dict[str, str] = field(compare=False)
    what: str = field(compare=False)  # for the log: "done of /x.png [ocr]"
    attempt: int = field(default=0, compare=False)


class Sender:
    """The heap of due deliveries and the thread that posts them (one per process: ``SENDER``)."""

    def __init__(self) -> None:
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = 0  # deliveries being posted right now

    def send(self, url: str, payload: Mapping[str, Any], *, what: str,
             headers: Mapping[str, str] | None = None) -> bool:
        """Queue a POST of ``payload`` as JSON to ``url``; False (logged) when the backlog is full."""
        # ASCII JSON: a path that is not valid UTF-8 (surrogate escapes) still encodes.
        body = json.dumps(payload, default=str).encode()
        all_headers = {"Content-Type": "application/json", "User-Agent": "vlwatch-webhook"}
        all_headers.update(headers or {})
        with self._cond:
            if len(self._heap) >= BACKLOG:
                log.error("webhook %s to %s dropped: %d deliveries are already waiting", what, redacted(url), BACKLOG)
                return False
            heapq.heappush(self._heap, _Delivery(time.monotonic(), next(self._seq), url, body, all_headers, what))
            if self._thread is None:
                atexit.register(self.wait, EXIT_WAIT)
                self._thread = threading.Thread(target=self._work, name="vlwatch-webhook", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is left to deliver (at exit, and for tests); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._heap or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    log.warning("webhooks: %d deliveries not made before exit", len(self._heap) + self._busy)
                    return False
                self._cond.wait(remaining)
        return True

    def _work(self) -> None:
        import httpx

        with httpx.Client(timeout=TIMEOUT, follow_redirects=False, trust_env=False) as client:
            while True:
                delivery = self._next()
                try:
                    retry = self._post(client, delivery)
                except Exception:  # a bug here must not end the thread
                    log.exception("webhook %s: unexpected error", delivery.what)
                    retry = False
                with self._cond:
                    self._busy -= 1
                    if retry:
                        delivery.attempt += 1
                        delivery.due = time.monotonic() + BACKOFF * 2 ** (delivery.attempt - 1)
                        heapq.heappush(self._heap, delivery)
                    self._cond.notify_all()

    def _next(self) -> _Delivery:
        with self._cond:
            while True:
                if self._heap:
                    wait = self._heap[0].due - time.monotonic()
                    if wait <= 0:
                        self._busy += 1
                        return heapq.heappop(self._heap)
                    self._cond.wait(wait)
                else:
                    self._cond.wait()

    @staticmethod
    def _post(client: Any, d: _Delivery) -> bool:
        """POST once; True when it should be tried again."""
        import httpx

        shown = redacted(d.url)
        last = d.attempt + 1 >= ATTEMPTS
        try:
            response = client.post(d.url, content=d.body, headers=d.headers)
        except httpx.HTTPError as exc:
            # The exception's text may quote the URL: name only its type.
            why = type(exc).__name__
        else:
            if 200 <= response.status_code < 300:
                log.info("webhook %s: delivered to %s", d.what, shown)
                return False
            why = f"HTTP {response.status_code}"
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                log.error("webhook %s: %s refused it (%s); not retried", d.what, shown, why)
                return False
        if last:
            log.error("webhook %s: %s failed %d times (last: %s); given up", d.what, shown, ATTEMPTS, why)
            return False
        log.warning("webhook %s: %s failed (%s); retrying in %gs", d.what, shown, why,
                    BACKOFF * 2 ** d.attempt)
        return True


SENDER = Sender()


def send(url: str, payload: Mapping[str, Any], *, what: str, headers: Mapping[str, str] | None = None) -> bool:
    """Queue one delivery on the process's sender (see ``Sender.send``)."""
    return SENDER.send(url, payload, what=what, headers=headers)


def wait(timeout: float | None = None) -> bool:
    return SENDER.wait(timeout)


def job_payload(*, event: str, source: Path, rule: str, task: str, sidecars: Sequence[Path],
                error: str | None) -> dict[str, Any]:
    """What a folder rule's webhook receives after a job (``event``: ``done`` or ``failed``)."""
    return {
        "event": f"job.{event}",
        "status": event,
        "path": str(source),
        "rule": rule,
        "task": task,
        "sidecars": [str(s) for s in sidecars],
        "error": error,
        "at": time.time(),
    }
