"""How vlwatch logs: one safe line per record, stamped for a terminal, prioritised for journald.

Used by the command line and by the engine processes the daemon starts, so
that every process writes the same format.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    from daemon import env

    if named := env.get(env.LOG_LEVEL):
        level = getattr(logging, named.upper(), level)
    # journald stamps each line itself; a terminal, or a log file, wants the time (issue 11.8).
    stamp = "" if _stderr_is_journal() else "%(asctime)s "
    # Under systemd, a "<N>" prefix gives each line its syslog priority, so
    # `journalctl -p warning` works (sd-daemon(3), SyslogLevelPrefix=).
    prefix = "<%(priority)d>" if _stderr_is_journal() else ""
    logging.basicConfig(level=level, format=f"{prefix}{stamp}%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(SafeFormatter(handler.formatter))  # issue 10.12: no forged lines, no raw ANSI
        if prefix:
            handler.addFilter(_syslog_priority)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "PIL", "apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class SafeFormatter(logging.Formatter):
    """Every log line is one line, whatever a file name or the model said (issue 10.12).

    Paths, file names and model text reach log records as arguments; a name
    holding a newline would print a second, forged line (``ERROR
    daemon.service: ...``) and an ANSI escape would reach the terminal raw.
    Escaping here, once, covers every call site: the message (after %-style
    arguments are filled in) has its control characters escaped as Python
    would write them (``\\n``, ``\\x1b``), and the lines of a traceback are
    escaped likewise and indented with ``  | ``, so none of them can pass
    for a record of its own.

    Args:
        inner: the formatter that lays out the line (level, name, time...).
    """

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = escape_control(record.getMessage()), None
        text = self.inner.format(safe)
        head, newline, tail = text.partition("\n")
        if not newline:
            return head
        return head + "".join(f"\n  | {escape_control(line)}" for line in tail.split("\n"))


def escape_control(text: str) -> str:
    """``text`` with every non-printable character (newline, ESC, lone surrogates...) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _stderr_is_journal() -> bool:
    """Whether stderr is connected to journald ($JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _syslog_priority(record: logging.LogRecord) -> bool:
    record.priority = _PRIORITY.get(record.levelno, 6)
    return True
