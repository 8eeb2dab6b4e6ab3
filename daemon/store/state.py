"""The state file itself: its folder, the lock one process at a time holds on it, and why it cannot be opened.

A state folder nothing can be written to, or a file that is not an SQLite
database, is a ``StateError``: one line naming the file, exit 2.

``immediate`` is the one shape of a write on it: every writer (the queue,
the search index, the page's conversations) takes the write lock at
``BEGIN`` and rolls back on any failure.

Deliberately not here: the tables (``queue``, ``search``, ``conversations``)
and the schema (``migrations``).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from daemon.errors import StateError
from daemon.store.keys import safe_text


def make_state_folder(state: Path) -> None:
    """Create the state file's folder, or say in one line why it cannot be."""
    try:
        state.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{safe_text(str(state.parent))}: cannot create the state folder: "
                         f"{exc.strerror or exc}; set `state:` in the config to a writable path") from None


def state_problem(path: Path, exc: sqlite3.Error) -> str:
    """One line for a state database that cannot be opened, naming the file and the way out."""
    text = safe_text(str(path))
    reason = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in reason or "malformed" in reason):
        return (f"{text}: the state database is corrupt ({reason}); move it away (the daemon then starts "
                "afresh and its catch-up scan queues what has no sidecar) or restore it from a backup")
    why = _unwritable(path.parent)
    if why is None and path.exists() and not os.access(path, os.W_OK):
        why = "the file is read-only"
    if why is not None:
        return (f"{text}: the state database cannot be written ({why}; {reason}); fix the permissions "
                "or set `state:` in the config to a writable path")
    return f"{text}: cannot open the state database: {reason}"


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder``, or None if something can (tried, not guessed from modes)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return f"its folder {safe_text(str(folder))} is not writable: {exc.strerror or exc}"


class StateLock:
    """One process at a time works a state file: the daemon, or a `scan` without one.

    An ``flock`` on ``<state>.lock``, released by the kernel when the holder
    dies (so a ``kill -9`` never leaves a stale lock).  The holder's pid is
    written into the file for ``vlwatch status``.
    """

    def __init__(self, state: Path) -> None:
        self.path = Path(f"{state}.lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        make_state_folder(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(f"{safe_text(str(self.path))}: cannot create the state lock: {exc.strerror or exc}; "
                             "fix the folder's permissions or set `state:` in the config to a writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the process holding the lock, or None if nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


@contextmanager
def immediate(db: sqlite3.Connection, lock: threading.Lock | threading.RLock) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` on ``db`` under ``lock``; ``ROLLBACK`` on any exception.

    IMMEDIATE takes SQLite's write lock at the start, so a second writer
    waits at ``BEGIN`` (``busy_timeout``) instead of failing halfway through;
    ``lock`` keeps this process's threads off the one connection meanwhile.
    A failed ``COMMIT`` (a full disk) is rolled back too, so the connection
    is never left inside a transaction.
    """
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
