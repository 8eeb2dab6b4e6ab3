"""What the web page reads of the jobs' history and the daemon's shared facts (``meta``).

The overview's counts, rate and latest results, the results pages, the
failures page and the ask page's recent files: each one query on the page's
connection (``page.PageConnection``), returned as plain values or frozen
dataclasses with paths already decoded (``keys.key_path``).

Failures are counted and listed as ``Queue.counts`` and ``Queue.failures``
(and so ``vlwatch status``) count them: only those no newer job of the same
(path, rule) superseded (``queue.CURRENT``, issue 10.9), which are also the
only ones the page's retry button can retry.  A *result*, though, is a done
job that no newer **done** job has replaced: a file re-queued after its
result still shows that result until the new one is in.

Deliberately not here: writing jobs (``queue.Queue``: the page's retry
button goes through it) and rendering (``daemon.server.web``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.store.keys import key_path
from daemon.store.page import PageConnection, json_or_none
from daemon.store.queue import CURRENT, STATES

#: SQL: the done job (alias ``j``) is its (path, rule)'s newest done job, i.e. what its sidecar shows.
_CURRENT_DONE = ("NOT EXISTS (SELECT 1 FROM jobs k WHERE k.path = j.path AND k.rule = j.rule AND k.id > j.id"
                 " AND k.state = 'done')")


@dataclass(frozen=True)
class Done:
    """A finished job as the page shows it."""

    id: int
    path: Path
    rule: str
    finished_at: float
    #: read by ``results`` only (``latest_done`` leaves them at their defaults)
    seconds: float | None = None
    sidecars: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Failed:
    id: int
    path: Path
    rule: str
    attempts: int
    finished_at: float | None
    error: str | None


def _failed(row: Any) -> Failed:
    return Failed(id=row["id"], path=key_path(row["path"]), rule=row["rule"], attempts=row["attempts"],
                  finished_at=row["finished_at"], error=row["error"])


def counts_by_state(conn: PageConnection) -> dict[str, int]:
    """Jobs per state, every state present (0 if none); failures only while current, as ``Queue.counts``."""
    counts = dict.fromkeys(STATES, 0)
    for r in conn.rows(f"SELECT state, COUNT(*) AS n FROM jobs WHERE state != 'failed' OR {CURRENT} GROUP BY state"):
        counts[r["state"]] = r["n"]
    return counts


def meta(conn: PageConnection) -> dict[str, Any]:
    """The daemon's shared facts (model, backend, daemon), each value parsed (None if unreadable)."""
    return {r["key"]: json_or_none(r["value"]) for r in conn.rows("SELECT key, value FROM meta")}


def done_since(conn: PageConnection, since: float) -> int:
    """How many jobs are done that finished at ``since`` or later."""
    return conn.rows("SELECT COUNT(*) AS n FROM jobs WHERE state = 'done' AND finished_at >= ?", (since,))[0]["n"]


def failures(conn: PageConnection, limit: int) -> list[Failed]:
    """The newest current failures, newest first (as ``Queue.failures``)."""
    return [_failed(r) for r in conn.rows(
        f"SELECT id, path, rule, attempts, finished_at, error FROM jobs WHERE state = 'failed' AND {CURRENT}"
        " ORDER BY finished_at DESC, id DESC LIMIT ?", (limit,))]


def failed_count(conn: PageConnection) -> int:
    return conn.rows(f"SELECT COUNT(*) AS n FROM jobs WHERE state = 'failed' AND {CURRENT}")[0]["n"]


def latest_done(conn: PageConnection, limit: int) -> list[Done]:
    """The newest done jobs, newest first (without their seconds and sidecars)."""
    return [Done(id=r["id"], path=key_path(r["path"]), rule=r["rule"], finished_at=r["finished_at"])
            for r in conn.rows("SELECT id, path, rule, finished_at FROM jobs WHERE state = 'done'"
                               " ORDER BY finished_at DESC, id DESC LIMIT ?", (limit,))]


def done_paths(conn: PageConnection, limit: int) -> list[Path]:
    """Files with a done job, most recently finished first, each once.

    Of the newest ``limit``, a name stored as raw bytes (not UTF-8) is left
    out: the page names the files it offers in ``file://`` URLs, as text.
    """
    return [key_path(r["path"]) for r in conn.rows("SELECT DISTINCT path FROM jobs WHERE state = 'done'"
                                                   " ORDER BY finished_at DESC LIMIT ?", (limit,))
            if not isinstance(r["path"], bytes)]


def results(conn: PageConnection, before: tuple[float, int] | None, limit: int,
            rule: str | None = None) -> tuple[list[Done], tuple[float, int] | None]:
    """Current results newest first, after the keyset ``before``; and the key of the next page (None if last).

    Keyset-paginated on ``(finished_at, id)``, so page 5,000 costs what page 1 does.
    """
    where, args = ["j.state = 'done'", _CURRENT_DONE], []
    if before is not None:
        where.append("(j.finished_at < ? OR (j.finished_at = ? AND j.id < ?))")
        args += [before[0], before[0], before[1]]
    if rule:
        where.append("j.rule = ?")
        args.append(rule)
    rows = conn.rows(f"SELECT j.id, j.path, j.rule, j.finished_at, j.seconds, j.sidecars FROM jobs j"
                     f" WHERE {' AND '.join(where)} ORDER BY j.finished_at DESC, j.id DESC LIMIT ?", [*args, limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    done = [Done(id=r["id"], path=key_path(r["path"]), rule=r["rule"], finished_at=r["finished_at"],
                 seconds=r["seconds"], sidecars=tuple(Path(s) for s in json.loads(r["sidecars"] or "[]")))
            for r in rows]
    nxt = (rows[-1]["finished_at"], rows[-1]["id"]) if more and rows else None
    return done, nxt
