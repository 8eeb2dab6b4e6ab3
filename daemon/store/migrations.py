"""The state database's schema: ordered, named migrations, each applied once.

The schema evolves by ordered, named migrations recorded in ``_migrations``
(simonw/llm's ``migrations.py`` habit), so an old state file is upgraded in
place and a blank one is built by running them all.  Existing state files
record the names of the migrations they have: a migration, once released, is
never renamed, reordered or edited; a change is a new one after the last.

Whoever opens the state file first migrates it (``Queue``, ``SearchIndex``);
the tables belong to ``queue`` (jobs, meta, job_events), ``search``
(search_*) and ``conversations`` (conversation*) beside this module.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

from daemon.store.keys import path_key

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register a schema change; they run in definition order, each exactly once."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_jobs(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL,
            rule TEXT NOT NULL,
            hash TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            not_before REAL NOT NULL DEFAULT 0,
            queued_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            seconds REAL,
            error TEXT,
            sidecars TEXT
        )""")
    db.execute("CREATE INDEX jobs_path_rule ON jobs (path, rule, id)")
    db.execute("CREATE INDEX jobs_due ON jobs (state, not_before, id)")


@migration
def m002_meta(db: sqlite3.Connection) -> None:
    # Small shared facts for `vlwatch status` in another process: model state,
    # backend outage, the daemon's pid and start time.
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL)")


@migration
def m003_finished_index(db: sqlite3.Connection) -> None:
    # `status` lists the latest failures and `prune` deletes by age.
    db.execute("CREATE INDEX jobs_finished ON jobs (state, finished_at)")


@migration
def m004_absolute_paths(db: sqlite3.Connection) -> None:
    """Rewrite relative job paths (issue 10.1) as the canonical absolute ones the daemon now stores.

    Before 10.1 a relative ``--config`` made the watcher store ``in/x.png``
    (relative to the daemon's working directory), beside the catch-up's
    ``/abs/in/x.png``.  That directory was not recorded; the best guess is
    the working directory of the command opening the state now (users run
    the same command from the same place), unless the file exists only
    relative to the state file's folder.
    """
    state = next((Path(r[2]) for r in db.execute("PRAGMA database_list") if r[1] == "main" and r[2]), None)
    bases = [Path.cwd()] + ([state.parent] if state is not None else [])
    rows = db.execute("SELECT id, path FROM jobs WHERE CAST(path AS TEXT) NOT LIKE '/%'").fetchall()
    for job_id, value in rows:
        relative = os.fsdecode(value) if isinstance(value, bytes) else value
        if os.path.isabs(relative):
            continue
        candidates = [os.path.abspath(os.path.join(b, relative)) for b in bases]
        chosen = next((c for c in candidates if os.path.exists(c)), candidates[0])
        db.execute("UPDATE jobs SET path = ? WHERE id = ?", (path_key(chosen), job_id))



@migration
def m010_recipe(db: sqlite3.Connection) -> None:
    # What made each sidecar (model, rendered prompt, sizing: daemon.intake.recipes),
    # so sidecars of an older recipe can be found and redone (issue 11.13).
    # NULL for jobs from before: they count as current.
    db.execute("ALTER TABLE jobs ADD COLUMN recipe TEXT")


@migration
def m020_job_events(db: sqlite3.Connection) -> None:
    # The API's event stream (GET /api/v1/events) follows every job's state
    # changes, whichever process made them (the daemon, `scan`, `retry`):
    # triggers log each change with a sequence number a client can resume
    # from.  Trimmed to the last ~10,000 changes as it grows.
    db.execute("CREATE TABLE job_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL,"
               " state TEXT NOT NULL, at REAL NOT NULL)")
    now = "(julianday('now') - 2440587.5) * 86400.0"
    db.execute(f"CREATE TRIGGER job_events_insert AFTER INSERT ON jobs BEGIN"
               f" INSERT INTO job_events (job_id, state, at) VALUES (NEW.id, NEW.state, {now}); END")
    db.execute(f"CREATE TRIGGER job_events_update AFTER UPDATE OF state ON jobs WHEN NEW.state IS NOT OLD.state BEGIN"
               f" INSERT INTO job_events (job_id, state, at) VALUES (NEW.id, NEW.state, {now}); END")
    db.execute("CREATE TRIGGER job_events_trim AFTER INSERT ON job_events WHEN NEW.seq % 1000 = 0 BEGIN"
               " DELETE FROM job_events WHERE seq <= NEW.seq - 10000; END")


# Search index (daemon/store/search.py): one row per text sidecar, and its FTS5 text.
@migration
def m030_search_index(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE search_docs (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL,
            rule TEXT NOT NULL,
            sidecar TEXT NOT NULL,
            job_id INTEGER NOT NULL,
            job_finished REAL NOT NULL,
            folder TEXT NOT NULL,
            sidecar_mtime_ns INTEGER NOT NULL,
            sidecar_size INTEGER NOT NULL
        )""")
    db.execute("CREATE INDEX search_docs_path_rule ON search_docs (path, rule)")
    db.execute("CREATE UNIQUE INDEX search_docs_sidecar ON search_docs (sidecar)")
    db.execute("CREATE INDEX search_docs_job ON search_docs (job_id, job_finished)")
    db.execute("CREATE INDEX search_docs_folder ON search_docs (folder)")
    # Jobs looked at that left no text sidecar, so the catch-up does not read them again.
    db.execute("CREATE TABLE search_skipped (job_id INTEGER PRIMARY KEY, job_finished REAL NOT NULL)")
    db.execute("CREATE TABLE search_cursor (id INTEGER PRIMARY KEY CHECK (id = 1), finished_at REAL NOT NULL)")
    db.execute("INSERT INTO search_cursor (id, finished_at) VALUES (1, 0)")
    db.execute("CREATE VIRTUAL TABLE search_fts USING fts5 (name, body, tokenize = 'unicode61 remove_diacritics 2')")


# The web page's ask/compare conversations (daemon/store/conversations.py), kept until cleared.
@migration
def m031_conversations(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""")
    # content: the OpenAI message content (text and image_url parts), as JSON.
    db.execute("""
        CREATE TABLE conversation_messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            created REAL NOT NULL
        )""")
    db.execute("CREATE INDEX conversation_messages_conv ON conversation_messages (conversation_id, id)")
    # Images uploaded from the browser, kept only for their conversation.
    db.execute("""
        CREATE TABLE conversation_images (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            mime TEXT NOT NULL,
            data BLOB NOT NULL,
            created REAL NOT NULL
        )""")
    db.execute("CREATE INDEX conversation_images_conv ON conversation_images (conversation_id)")

@migration
def m040_priority(db: sqlite3.Connection) -> None:
    # Files a person hands over (`vlwatch process`, POST /api/v1/jobs) are
    # claimed before the folder backlog (issue 13.4): higher first, then
    # oldest.  The index serves claim's ORDER BY without sorting the backlog.
    db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX jobs_claim ON jobs (state, priority DESC, id)")


@migration
def m041_claimed_by(db: sqlite3.Connection) -> None:
    # Which engine process claimed a running job (issue 12.5): when one of the
    # daemon's engine processes dies, its jobs (and only its) go back on the queue.
    db.execute("ALTER TABLE jobs ADD COLUMN claimed_by TEXT")


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply the migrations this database lacks; return their names."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    applied: list[str] = []
    for fn in MIGRATIONS:
        # One transaction per migration, re-checked under the write lock: two
        # processes opening a new state file at once must not both apply it.
        db.execute("BEGIN IMMEDIATE")
        try:
            done = db.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,)).fetchone()
            if not done:
                fn(db)
                db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (fn.__name__, time.time()))
                applied.append(fn.__name__)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return applied


def fully_migrated(db: sqlite3.Connection) -> bool:
    """Whether every migration is applied (one read; ``migrate`` takes a write lock per migration)."""
    try:
        done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
    except sqlite3.OperationalError:  # a blank database
        return False
    return all(fn.__name__ in done for fn in MIGRATIONS)
