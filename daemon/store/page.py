"""The web page's one connection to the state database.

The page's routes run in the thread pool; they share one connection, used
under a re-entrant lock (``lock``), per state file.  Reads never take a
write lock (``isolation_level=None``: no implicit transaction), so the page
never slows the daemon; the few writes (the page's conversations) are each
one ``BEGIN IMMEDIATE`` transaction.

Only the store's modules (``history``, ``conversations``) run SQL on it:
routes call their functions and get plain values back.

Deliberately not here: migrating (the page's ``SearchIndex`` does that when
it opens the same file) and the job queue's writes (``queue.Queue``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, ContextManager

from daemon.store.state import immediate


class PageConnection:
    """One connection to ``state`` for the page's reads and its conversations' writes.

    Args:
        state: the state database (``config.state``).
    """

    def __init__(self, state: Path) -> None:
        #: held around every use of the connection; re-entrant, so a
        #: transaction may call the store's reads
        self.lock = threading.RLock()
        self._db = sqlite3.connect(state, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=30000")

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def rows(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        """Every row of one query, read under the lock."""
        with self.lock:
            return self._db.execute(sql, args).fetchall()

    def write(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        """One statement in a transaction of its own; its cursor (``lastrowid``) after the commit."""
        with self.transaction() as db:
            return db.execute(sql, args)

    def transaction(self) -> ContextManager[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the lock; ``ROLLBACK`` on any exception."""
        return immediate(self._db, self.lock)


def json_or_none(text: str) -> Any:
    """A stored JSON value, or None if it cannot be read (the page shows what it can, never fails on it)."""
    try:
        return json.loads(text)
    except ValueError:
        return None
