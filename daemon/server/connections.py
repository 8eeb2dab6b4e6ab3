"""Bounded connections for the API's uvicorn server (issue 27).

An attack held 19,985 sockets open, each having sent half a request
header: uvicorn has no header timeout and no cap on connections (its
``limit_concurrency`` answers 503 to *requests* over the cap, but keeps
every connection), so the API went unreachable, the process ran out of
file descriptors, and asyncio logged ``socket.accept() out of system
resource`` with a traceback 634,876 times in 30 s.  Here:

- ``BoundedH11Protocol`` (uvicorn's h11 protocol, which it lets a config
  name as ``http=``) closes a connection over ``MAX_CONNECTIONS`` at once,
  with a short 503, and closes one that has not sent a whole request header
  within ``HEADER_TIMEOUT`` seconds of opening or of its last answer (a
  slowloris or an idle keep-alive that sends one byte now and then; the
  keep-alive timeout alone is cancelled by any byte);
- ``raise_fd_limit`` lifts the soft descriptor limit to the hard one
  (systemd's default soft limit is 1024, its hard limit far higher), so the
  cap, not the kernel, is what refuses a flood;
- ``quiet_accept_errors`` is the event loop's exception handler: the
  accept() out-of-resource error becomes one warning line per
  ``LOG_EVERY`` seconds with a count, without a traceback; everything else
  goes to asyncio's default handler.

What is deliberately not here: a slow request *body* is not timed (a
large upload on a slow link is legitimate; the body size is capped by the
guard), and a per-client limit (every local client shares 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: Open connections served at once; more are closed as they arrive.
MAX_CONNECTIONS = 1000
#: Seconds a connection has to send a whole request header (after opening, or after its last answer).
HEADER_TIMEOUT = 10.0
#: The accept() out-of-resource warning is logged at most once per this many seconds.
LOG_EVERY = 10.0
_BUSY_BODY = b'{"error": {"message": "too many open connections", "type": "server_error", "code": "busy"}}'
#: What a connection over the cap is told before it is closed.
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a header timeout (see the module doc)."""

    max_connections = MAX_CONNECTIONS
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            _refused.note()
            transport.write(_BUSY)
            transport.close()
            return
        self._await_header()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_header()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _await_header(self) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_overdue, self.cycle)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_overdue(self, cycle: Any) -> None:
        self._header_timer = None
        # A new cycle began: a whole header arrived since the timer started; its answer restarts the timer.
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


class _Refusals:
    """Counts connections refused over the cap; one log line per ``LOG_EVERY`` seconds."""

    def __init__(self) -> None:
        self.count = 0
        self.logged = 0.0

    def note(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY:
            log.warning("api: %d connection(s) refused: too many open at once", self.count)
            self.count, self.logged = 0, now


_refused = _Refusals()


class _AcceptErrors:
    """The loop's exception handler: accept() out of resources, rate-limited (see the module doc)."""

    def __init__(self) -> None:
        self.count = 0
        self.logged = float("-inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        self.count += 1
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY:
            exc = context.get("exception")
            log.warning("api: cannot accept connections (%s), %d time(s) since the last report; "
                        "retrying", getattr(exc, "strerror", None) or exc, self.count)
            self.count, self.logged = 0, now


def quiet_accept_errors() -> _AcceptErrors:
    """A new exception handler for the API's event loop (``loop.set_exception_handler``)."""
    return _AcceptErrors()


def protocol_class(max_connections: int, header_timeout: float = HEADER_TIMEOUT) -> type[BoundedH11Protocol]:
    """``BoundedH11Protocol`` with these limits, for ``uvicorn.Config(http=...)``."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,),
                {"max_connections": max_connections, "header_timeout": header_timeout})


def connection_cap(fd_limit: int, in_use: int | None = None) -> int:
    """``MAX_CONNECTIONS``, or half the descriptors still free if that is less (the rest: files, SQLite).

    Args:
        fd_limit: the soft limit of open files.
        in_use: descriptors open now (counted in /proc/self/fd when None).
    """
    if in_use is None:
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 64
    return max(16, min(MAX_CONNECTIONS, (fd_limit - in_use) // 2))


def raise_fd_limit() -> int:
    """Lift the soft limit of open files to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft
