"""The durable job queue and its history, in one SQLite file (``state:``).

Called ``queue``, not ``jobs``: the table is ``jobs``, but what this module
does is queue them (enqueue, claim, finish, retry) and what callers hold is a
``Queue``; the history is the queue's finished rows.  The page's own reads of
that history are in ``history``; the keys a job is stored under (content
hash, path as text or bytes) in ``keys``; the state file's folder and lock in
``state``; the schema in ``migrations``.

A *job* is one (source file, rule) pair at one content: the file's path, the
rule's name and a blake2b hash of the bytes, with its state (``queued``,
``running``, ``done``, ``failed``), attempts, the earliest time it may run
again (``not_before``, which is how retries back off), timings, the last
error and the sidecars it wrote.  Finished jobs stay as history until
``prune``; the newest row of a (path, rule) says what its sidecar was made from.

What makes the queue safe to lose power or ``kill -9`` over:

- WAL journal, one transaction per batch of changes.  ``synchronous=NORMAL``
  survives any crash of the process; a power cut may roll back the last few
  commits, which the daemon's start-up recovery and catch-up scan redo
  (re-queueing at worst a file whose sidecar is already complete).
- ``enqueue`` is idempotent, keyed on path + rule + content hash: a file
  already queued, running or done with the same bytes is not queued again, so
  the watcher, the catch-up scan and the periodic rescan may all report the
  same file (paperless re-queued a file on a stray NAS touch, #13511).  A
  file whose bytes changed while still queued updates that job instead of
  adding a second one.
- ``recover`` (run by whoever holds the state lock, at start) puts jobs left
  ``running`` by a crash back on the queue, unless their sidecars were fully
  written after the job started (then the crash hit between the write and
  the commit, and the job is simply done).  A crash counts as an attempt, so
  a file that kills the process every time ends up ``failed``, not in a loop.

A failure of one (path, rule) is *current* only while no newer job of that
(path, rule) exists (``CURRENT``): a slow writer's early, truncated version
failed, the complete file then got its own job, and ``status``, the
``failed`` count and ``retry --all`` show the file's current state, not the
superseded failure (issue 10.9).  The row stays as history until ``prune``.

A state file that cannot be opened is a ``StateError`` (``state.state_problem``);
opening one applies the migrations it lacks (``migrations.migrate``).

Deliberately not here: deciding *whether* a file needs work (``service``),
readiness (``watching``) and running jobs (``worker``).  Reusing the answer
of another file with identical bytes is not done: the sidecars name their
source, and identical screenshots are rare enough not to be worth the
coupling.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, NamedTuple, Sequence

from daemon.errors import StateError
from daemon.store.keys import UNREADABLE, key_path, path_key, safe_text
from daemon.store.migrations import migrate
from daemon.store.state import immediate, make_state_folder, state_problem

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed")
ACTIVE = ("queued", "running")

#: SQL: the job (table alias ``jobs``) is the newest of its (path, rule), i.e.
#: what that file's sidecar is at now.  A failure of older bytes that a newer
#: job has superseded is history, not a current failure (issue 10.9).
CURRENT = ("NOT EXISTS (SELECT 1 FROM jobs newer WHERE newer.path = jobs.path AND newer.rule = jobs.rule"
           " AND newer.id > jobs.id)")

#: How far a sidecar's mtime may trail the job's start and still count as
#: written by that job: file timestamps come from the kernel's coarse clock,
#: which lags ``time.time()`` by up to a tick.
MTIME_SLACK_NS = 20_000_000
#: What a failed job says when the daemon may not read its file (as ``vlwatch process`` says).
PERMISSION_DENIED = "permission denied: the daemon's user may not read this file"

#: The priority of a file a person handed over (``vlwatch process``, ``POST
#: /api/v1/jobs``, a retried job): claimed before the folder backlog (0).
HANDED_OVER = 10


# ------------------------------------------------------------------ values


@dataclass(frozen=True)
class Candidate:
    """A file, under one rule, that should have an up-to-date sidecar."""

    path: Path
    rule: str
    hash: str
    size: int
    mtime_ns: int
    #: the sidecar is missing: redo even if a job with these bytes is done,
    #: unless that job finished after ``seen_at`` (it wrote the sidecar since).
    #: A callable is asked only when it matters (a done job with these bytes).
    redo: bool | Callable[[], bool] = False
    seen_at: float = 0.0
    #: what would make its sidecar (``daemon.intake.recipes``); recorded with the job
    recipe: str | None = None
    #: higher is claimed first: a file a person handed over (``vlwatch
    #: process``, ``POST /api/v1/jobs``) goes ahead of the folder backlog (0)
    priority: int = 0

    def wants_redo(self) -> bool:
        return self.redo() if callable(self.redo) else self.redo


class Queued(NamedTuple):
    """A job ``enqueue`` created, or updated to newer bytes."""

    id: int
    path: Path
    rule: str
    hash: str


@dataclass(frozen=True)
class Job:
    id: int
    path: Path
    rule: str
    hash: str
    size: int
    mtime_ns: int
    state: str
    attempts: int
    not_before: float
    queued_at: float
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    error: str | None
    sidecars: tuple[Path, ...]
    recipe: str | None = None  # daemon.intake.recipes: what made (or will make) its sidecars

    @property
    def signature(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)

    def as_dict(self) -> dict[str, object]:
        """The job as JSON-ready values; a file name that is not UTF-8 is shown with escapes (JSON is UTF-8)."""
        return {
            "id": self.id, "path": safe_text(str(self.path)), "rule": self.rule, "hash": self.hash,
            "state": self.state, "attempts": self.attempts, "queued_at": self.queued_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "seconds": self.seconds,
            "error": self.error, "sidecars": [safe_text(str(s)) for s in self.sidecars],
        }
# ------------------------------------------------------------------- queue


class Queue:
    """The state database.  Thread-safe: one connection, used under a lock.

    Args:
        path: the SQLite file (``config.state``); its folder is created.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        make_state_folder(self.path)
        self._lock = threading.RLock()
        #: recorded with each job ``claim`` takes (``claimed_by``): which process, which engine
        self.owner = f"pid {os.getpid()}"
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE),
        # so a read never holds a lock that blocks the daemon's writes.
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise StateError(state_problem(self.path, exc)) from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            applied = migrate(self._db)
        except sqlite3.Error as exc:  # a corrupt header, a read-only file or folder (issue 10.16)
            self._db.close()
            raise StateError(state_problem(self.path, exc)) from None
        if applied:
            log.debug("%s: applied migrations %s", self.path, ", ".join(applied))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> ContextManager[sqlite3.Connection]:
        return immediate(self._db, self._lock)

    @staticmethod
    def _drop_if_superseded(db: sqlite3.Connection, job_ids: Iterable[int]) -> None:
        """Delete jobs that a newer job of the same (path, rule) has replaced.

        Called before a job goes back on the queue: if the file got new bytes
        meanwhile, those have their own job and the old one has nothing to do.
        """
        db.executemany(
            "DELETE FROM jobs WHERE id = ? AND EXISTS"
            " (SELECT 1 FROM jobs k WHERE k.path = jobs.path AND k.rule = jobs.rule AND k.id > jobs.id)",
            [(i,) for i in job_ids])

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ----------------------------------------------------------- enqueue

    def enqueue(self, candidates: Iterable[Candidate]) -> list[Queued]:
        """Queue each candidate unless its bytes are already queued, running or done.

        All in one transaction, so 10,000 files cost one commit, and the
        newest job of every candidate is looked up together (a few queries
        per batch, not one per file: issue 10.21).  Returns the jobs queued
        (new, or a queued job updated to newer bytes).
        """
        now = time.time()
        queued: list[Queued] = []
        batch = [(c, path_key(c.path)) for c in candidates]
        with self._tx() as db:
            newest = self._newest_jobs(db, batch)
            seen: set[tuple[str | bytes, str]] = set()
            for c, path in batch:
                key = (path, c.rule)
                # A (path, rule) met again in this batch: its row may have changed meanwhile.
                row = newest.get(key) if key not in seen else self._newest_job(db, path, c.rule)
                seen.add(key)
                try:
                    job_id = self._enqueue_one(db, c, now, path, row)
                except sqlite3.Error as exc:  # one bad entry must not lose the rest of the batch
                    log.error("%s: %s: cannot be queued: %s", c.path, c.rule, exc)
                    continue
                if job_id is not None:
                    queued.append(Queued(job_id, c.path, c.rule, c.hash))
        return queued

    #: Paths per lookup query (SQLite allows 32,766 parameters; smaller keeps each query quick).
    LOOKUP_CHUNK = 500

    def _newest_jobs(self, db: sqlite3.Connection,
                     batch: Sequence[tuple[Candidate, str | bytes]]) -> dict[tuple[str | bytes, str], sqlite3.Row]:
        """The newest job of each (path, rule) in ``batch`` that has one, in one query per chunk of paths."""
        paths = list(dict.fromkeys(path for _, path in batch))
        newest: dict[tuple[str | bytes, str], sqlite3.Row] = {}
        for i in range(0, len(paths), self.LOOKUP_CHUNK):
            chunk = paths[i:i + self.LOOKUP_CHUNK]
            rows = db.execute(
                f"SELECT id, path, rule, hash, state, finished_at FROM jobs WHERE path IN ({','.join('?' * len(chunk))})"
                " ORDER BY id", chunk)
            for row in rows:  # ascending ids: the newest of each (path, rule) is written last
                newest[(row["path"], row["rule"])] = row
        return newest

    @staticmethod
    def _newest_job(db: sqlite3.Connection, path: str | bytes, rule: str) -> sqlite3.Row | None:
        return db.execute(
            "SELECT id, path, rule, hash, state, finished_at FROM jobs WHERE path = ? AND rule = ?"
            " ORDER BY id DESC LIMIT 1", (path, rule)).fetchone()

    def _enqueue_one(self, db: sqlite3.Connection, c: Candidate, now: float, path: str | bytes,
                     row: sqlite3.Row | None) -> int | None:
        """Queue ``c`` (stored as ``path``) given the newest job of its (path, rule), ``row``."""
        if c.hash.startswith(UNREADABLE):
            self._record_unreadable(db, path, c, row, now)
            return None
        if row is None:
            return self._insert(db, path, c, now)
        if row["hash"] == c.hash:
            redo = row["state"] == "done" and (row["finished_at"] or 0) < c.seen_at and c.wants_redo()
            if not redo:
                # Same bytes: remember the new size/mtime (a touch) so the next
                # scan recognises the file without hashing it again.
                db.execute("UPDATE jobs SET size = ?, mtime_ns = ? WHERE id = ?", (c.size, c.mtime_ns, row["id"]))
                return None
        elif db.execute(
                "SELECT 1 FROM jobs WHERE path = ? AND rule = ? AND state = 'running' AND hash = ?",
                (path, c.rule, c.hash)).fetchone():
            # Back to the bytes that are being processed right now (A -> B -> A):
            # the running job covers them, so the queued one for B is moot.
            if row["state"] == "queued":
                db.execute("DELETE FROM jobs WHERE id = ?", (row["id"],))
            return None
        elif row["state"] == "queued":
            # New bytes before the old ones were processed: one job, newest content.
            db.execute(
                "UPDATE jobs SET hash = ?, size = ?, mtime_ns = ?, attempts = 0, not_before = 0, error = NULL,"
                " queued_at = ?, recipe = ? WHERE id = ?",
                (c.hash, c.size, c.mtime_ns, now, c.recipe, row["id"]),
            )
            return int(row["id"])
        return self._insert(db, path, c, now)

    @staticmethod
    def _record_unreadable(db: sqlite3.Connection, path: str | bytes, c: Candidate, row: sqlite3.Row | None,
                           now: float) -> None:
        """A file the daemon may not read: a failed job saying so, once per (size, mtime) (issue 10.3)."""
        if row is not None and (row["state"] in ACTIVE or (row["state"] == "failed" and row["hash"] == c.hash)):
            return  # a job in hand finds out itself; or this very failure is on record already
        db.execute(
            "INSERT INTO jobs (path, rule, hash, size, mtime_ns, state, queued_at, finished_at, error)"
            " VALUES (?, ?, ?, ?, ?, 'failed', ?, ?, ?)",
            (path, c.rule, c.hash, c.size, c.mtime_ns, now, now, PERMISSION_DENIED))
        log.warning("%s: %s: %s; recorded as failed (it is tried again once its permissions change)",
                    safe_text(str(c.path)), c.rule, PERMISSION_DENIED)

    @staticmethod
    def _insert(db: sqlite3.Connection, path: str | bytes, c: Candidate, now: float) -> int:
        cur = db.execute(
            "INSERT INTO jobs (path, rule, hash, size, mtime_ns, state, queued_at, recipe, priority)"
            " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
            (path, c.rule, c.hash, c.size, c.mtime_ns, now, c.recipe, c.priority),
        )
        return int(cur.lastrowid or 0)

    # ------------------------------------------------------------- claim

    def claim(self, limit: int, now: float | None = None) -> list[Job]:
        """Take up to ``limit`` due jobs, highest priority first, then oldest, and mark them running.

        The attempt is counted here, not on failure, so a file that crashes
        the daemon still uses up its attempts.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            # INDEXED BY: walked in claim order, the first ``limit`` due rows end it
            # (the planner would sort the whole backlog: 0.01 ms against 12 ms at 100,000).
            ids = [r[0] for r in db.execute(
                "SELECT id FROM jobs INDEXED BY jobs_claim WHERE state = 'queued' AND not_before <= ?"
                " ORDER BY priority DESC, id LIMIT ?", (now, limit))]
            db.executemany(
                "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, claimed_by = ?"
                " WHERE id = ?", [(now, self.owner, i) for i in ids])
        return self._jobs_by_id(ids)

    def due_count(self, now: float | None = None, *, limit: int | None = None) -> int:
        """How many queued jobs may run now; counting stops at ``limit`` if given.

        The worker asks "none?" and "a batch yet?" each time a batch is
        queued: counting 100,000 queued jobs each time, under the lock that
        the intake needs to queue more, slowed a burst (issue 10.21).
        """
        now = time.time() if now is None else now
        if limit is None:
            return int(self._query("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND not_before <= ?", (now,))[0][0])
        return int(self._query("SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state = 'queued' AND not_before <= ?"
                               " LIMIT ?)", (now, limit))[0][0])

    def next_due(self) -> float | None:
        """When the earliest queued job may run (wall clock), or None if none is queued."""
        row = self._query("SELECT MIN(not_before) FROM jobs WHERE state = 'queued'")[0]
        return None if row[0] is None else float(row[0])

    # ------------------------------------------------------------ results

    def finish(self, results: Iterable[tuple[int, Sequence[Path], float]
                                      | tuple[int, Sequence[Path], float, str | None]]) -> None:
        """Mark jobs done: (job id, sidecars written, seconds spent[, note]) each.

        A note (a document's pages left without an answer: issue 24) is kept
        in the job's ``error``, so ``status`` and the jobs API show it.
        """
        now = time.time()
        rows = []
        for job_id, sidecars, seconds, *note in results:
            text = safe_text(note[0]) if note and note[0] else None
            rows.append((now, seconds, text, json.dumps([str(s) for s in sidecars]), job_id))
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state = 'done', finished_at = ?, seconds = ?, error = ?, sidecars = ?"
                " WHERE id = ?", rows)

    def fail(self, job_id: int, error: str, *, retry_at: float | None, seconds: float | None = None) -> None:
        """Record a failure: back on the queue from ``retry_at``, or ``failed`` for good if None."""
        now = time.time()
        error = safe_text(error)
        with self._tx() as db:
            if retry_at is None:
                db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, seconds = ?, error = ? WHERE id = ?",
                           (now, seconds, error, job_id))
            else:
                self._drop_if_superseded(db, [job_id])
                db.execute("UPDATE jobs SET state = 'queued', not_before = ?, seconds = ?, error = ? WHERE id = ?",
                           (retry_at, seconds, error, job_id))

    def release(self, job_ids: Iterable[int], *, not_before: float = 0.0) -> None:
        """Put running jobs back on the queue without spending their attempt.

        For work that never really ran: the backend was unreachable, or the
        daemon was asked to stop before it got to them.
        """
        job_ids = list(job_ids)
        with self._tx() as db:
            self._drop_if_superseded(db, job_ids)
            db.executemany(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), not_before = ?"
                " WHERE id = ? AND state = 'running'",
                [(not_before, i) for i in job_ids])

    def release_claimed_by(self, owner: str, *, max_attempts: int | None, error: str | None = None) -> dict[str, int]:
        """Put back the running jobs ``owner`` claimed: an engine process that died or hung (issue 12.5).

        With ``max_attempts`` (it crashed) the attempt stays spent, as for a
        daemon crash, and a job out of attempts fails: a file that kills its
        engine each time cannot loop forever.  Without (it was stopped), the
        attempt is given back, as ``release`` does, and ``error`` is not recorded.
        """
        counts = {"queued": 0, "failed": 0}
        now = time.time()
        error = safe_text(error) if error is not None and max_attempts is not None else None
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running' AND claimed_by = ?",
                              (owner,)).fetchall()
            spent = [r["id"] for r in rows if max_attempts is not None and r["attempts"] >= max_attempts]
            again = [r["id"] for r in rows if r["id"] not in spent]
            db.executemany("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ?",
                           [(now, error, i) for i in spent])
            self._drop_if_superseded(db, again)
            refund = 0 if max_attempts is not None else 1
            db.executemany("UPDATE jobs SET state = 'queued', not_before = 0, error = COALESCE(?, error),"
                           " attempts = MAX(attempts - ?, 0) WHERE id = ? AND state = 'running'",
                           [(error, refund, i) for i in again])
        counts["queued"], counts["failed"] = len(again), len(spent)
        return counts

    def touch(self, job_id: int, size: int, mtime_ns: int) -> None:
        """Record a job's file's new size and mtime after a touch that left its bytes alone."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, job_id))

    def drop(self, job_id: int) -> None:
        """Forget a job that has nothing left to do (source gone, or superseded)."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def retry(self, ids: Sequence[int] | None) -> list[Job]:
        """Put failed jobs (all of them, or these ids) back on the queue with fresh attempts."""
        with self._tx() as db:
            # Only current failures: one a newer job superseded was of bytes the file no longer has.
            if ids is None:
                found = [r[0] for r in db.execute(f"SELECT id FROM jobs WHERE state = 'failed' AND {CURRENT}")]
            else:
                marks = ",".join("?" * len(ids))
                found = [r[0] for r in db.execute(
                    f"SELECT id FROM jobs WHERE state = 'failed' AND {CURRENT} AND id IN ({marks})", list(ids))]
            db.executemany(
                "UPDATE jobs SET state = 'queued', attempts = 0, not_before = 0, finished_at = NULL WHERE id = ?",
                [(i,) for i in found])
        return self._jobs_by_id(found)

    def prioritise(self, job_ids: Sequence[int], priority: int) -> None:
        """Raise these jobs' priority while they wait (never lower it).

        A file a person hands over may already sit in the folder backlog;
        ``enqueue`` then keeps that job, which must move ahead too.
        """
        if not job_ids:
            return
        with self._tx() as db:
            db.executemany("UPDATE jobs SET priority = ? WHERE id = ? AND state = 'queued' AND priority < ?",
                           [(priority, i, priority) for i in job_ids])

    # ----------------------------------------------------------- recovery

    def recover(self, max_attempts: int, *, written: Callable[[Job], bool]) -> dict[str, int]:
        """After a crash: settle every job left ``running``.

        Args:
            max_attempts: a job that has used this many attempts is failed
                (it was running each time the daemon died).
            written: whether a job's sidecars are complete and its source
                unchanged; such a job only missed its ``done`` commit.
        """
        counts = {"done": 0, "queued": 0, "failed": 0}
        stuck = self._jobs("SELECT * FROM jobs WHERE state = 'running' ORDER BY id")
        for job in stuck:
            if written(job):
                self.finish([(job.id, job.sidecars, 0.0)])
                counts["done"] += 1
                log.info("%s: %s: recovered as done (sidecars were written before the stop)", job.path, job.rule)
            elif job.attempts >= max_attempts:
                self.fail(job.id, f"the daemon stopped while processing this file {job.attempts} times", retry_at=None)
                counts["failed"] += 1
                log.error("%s: %s: failed: the daemon stopped while processing it %d times", job.path, job.rule, job.attempts)
            else:
                with self._tx() as db:
                    self._drop_if_superseded(db, [job.id])
                    db.execute("UPDATE jobs SET state = 'queued', not_before = 0 WHERE id = ?", (job.id,))
                counts["queued"] += 1
                log.info("%s: %s: queued again (interrupted)", job.path, job.rule)
        return counts

    def prune(self, older_than: float) -> int:
        """Delete finished history older than ``older_than`` seconds.

        The newest ``done`` job of each (path, rule) is kept while its source
        exists: it records which bytes the sidecar was made from.
        """
        cutoff = time.time() - older_than
        with self._tx() as db:
            rows = db.execute(
                "SELECT j.id, j.path, j.state, (SELECT MAX(id) FROM jobs k WHERE k.path = j.path AND k.rule = j.rule) AS newest"
                " FROM jobs j WHERE j.state IN ('done', 'failed') AND j.finished_at < ?", (cutoff,)).fetchall()
            doomed = [r["id"] for r in rows
                      if not (r["id"] == r["newest"] and r["state"] == "done" and os.path.exists(r["path"]))]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in doomed])
        return len(doomed)

    # ------------------------------------------------------------ reading

    def latest(self, path: Path, rule: str) -> Job | None:
        """The newest job of this (path, rule), which says what its sidecar holds."""
        jobs = self._jobs("SELECT * FROM jobs WHERE path = ? AND rule = ? ORDER BY id DESC LIMIT 1", (path_key(path), rule))
        return jobs[0] if jobs else None

    def history(self, path: Path | None = None) -> list[Job]:
        if path is None:
            return self._jobs("SELECT * FROM jobs ORDER BY id")
        return self._jobs("SELECT * FROM jobs WHERE path = ? ORDER BY id", (path_key(path),))

    def job(self, job_id: int) -> Job | None:
        jobs = self._jobs_by_id([job_id])
        return jobs[0] if jobs else None

    def running(self) -> list[Job]:
        return self._jobs("SELECT * FROM jobs WHERE state = 'running' ORDER BY id")

    def latest_done_with_recipe(self, rule: str | None = None) -> list[Job]:
        """The newest job of each (path, rule), where it is done and recorded its recipe (daemon.intake.recipes)."""
        sql = ("SELECT * FROM jobs j WHERE state = 'done' AND recipe IS NOT NULL"
               + (" AND rule = ?" if rule is not None else "")
               + " AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.path = j.path AND k.rule = j.rule AND k.id > j.id)"
               " ORDER BY id")
        return self._jobs(sql, (rule,) if rule is not None else ())

    def counts(self) -> dict[str, int]:
        """Jobs per state; ``failed`` counts current failures only (see ``CURRENT``)."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self._query(f"SELECT state, COUNT(*) FROM jobs WHERE state != 'failed' OR {CURRENT}"
                                    " GROUP BY state"):
            out[state] = int(n)
        return out

    def failures(self, limit: int = 10) -> list[Job]:
        """The newest current failures: a file whose newer bytes have a job shows that job's state instead."""
        return self._jobs(f"SELECT * FROM jobs WHERE state = 'failed' AND {CURRENT}"
                          " ORDER BY finished_at DESC, id DESC LIMIT ?", (limit,))

    def recent(self, state: str | None = None, limit: int = 50, *, path: Path | None = None,
               rule: str | None = None) -> list[Job]:
        """The newest jobs (of one state, file or rule, or all), newest first (``GET /api/v1/jobs``)."""
        where = [(c, v) for c, v in (("state = ?", state), ("path = ?", path and path_key(path)), ("rule = ?", rule))
                 if v is not None]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(c for c, _ in where) if where else "")
        return self._jobs(sql + " ORDER BY id DESC LIMIT ?", (*[v for _, v in where], limit))

    def last_event(self) -> int:
        """The sequence number of the latest job state change (0 if none)."""
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM job_events")[0][0])

    def events_since(self, seq: int, limit: int = 500) -> list[tuple[int, str, float, Job | int]]:
        """Job state changes after ``seq``: (seq, new state, when, the job now — or its id if gone)."""
        rows = self._query(
            "SELECT e.seq AS e_seq, e.state AS e_state, e.at AS e_at, e.job_id AS e_job, j.* FROM job_events e"
            " LEFT JOIN jobs j ON j.id = e.job_id WHERE e.seq > ? ORDER BY e.seq LIMIT ?", (seq, limit))
        return [(r["e_seq"], r["e_state"], r["e_at"], _job(r) if r["id"] is not None else r["e_job"]) for r in rows]

    def _jobs_by_id(self, ids: Sequence[int]) -> list[Job]:
        out: list[Job] = []
        for start in range(0, len(ids), 500):  # SQLite caps the number of parameters
            part = ids[start:start + 500]
            out += self._jobs(f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(part))}) ORDER BY id", part)
        return out

    def _jobs(self, sql: str, args: Sequence[object] = ()) -> list[Job]:
        return [_job(r) for r in self._query(sql, args)]

    # --------------------------------------------------------------- meta

    def set_meta(self, key: str, value: dict[str, object] | None) -> None:
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT INTO meta (key, value, updated) VALUES (?, ?, ?)"
                           " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                           (key, json.dumps(value), time.time()))

    def meta(self) -> dict[str, dict[str, object]]:
        return {r["key"]: json.loads(r["value"]) for r in self._query("SELECT key, value FROM meta")}


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], path=key_path(row["path"]), rule=row["rule"], hash=row["hash"], size=row["size"],
        mtime_ns=row["mtime_ns"], state=row["state"], attempts=row["attempts"], not_before=row["not_before"],
        queued_at=row["queued_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        seconds=row["seconds"], error=row["error"],
        sidecars=tuple(Path(s) for s in json.loads(row["sidecars"])) if row["sidecars"] else (),
        recipe=row["recipe"] if "recipe" in row.keys() else None,
    )
