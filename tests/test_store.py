"""The store's functions on their own, on a real SQLite file in tmp_path.

What the route tests (``test_web_app``, ``test_web``) do not pin directly:
a turn kept in one transaction (all or nothing), titles, ordering, an
image asked for under the wrong conversation; the page's history reads on
odd rows (a re-queued file, a name that is not UTF-8, unreadable meta);
and ``migrate`` / ``fully_migrated`` on a bare connection (``test_queue``
migrates through ``Queue``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from daemon.store import conversations as stored
from daemon.store import history
from daemon.store.migrations import MIGRATIONS, fully_migrated, migrate
from daemon.store.page import PageConnection
from daemon.store.queue import Candidate, Queue


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def conn(state: Path):
    db = sqlite3.connect(state, isolation_level=None)
    migrate(db)
    db.close()
    page = PageConnection(state)
    yield page
    page.close()


def finished(queue: Queue, path: Path, digest: str, *, fail: str | None = None) -> int:
    """One job of ``path`` under rule ``r``, claimed and then done (or failed with ``fail``)."""
    queue.enqueue([Candidate(path, "r", digest, 1, 1)])
    (job,) = queue.claim(1)
    if fail is None:
        queue.finish([(job.id, [Path(f"{path}.r.md")], 0.5)])
    else:
        queue.fail(job.id, fail, retry_at=None)
    return job.id


# ------------------------------------------------------------------ migrations


def test_migrate_builds_a_blank_file_in_order_once(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "blank.db", isolation_level=None)
    assert not fully_migrated(db)
    assert migrate(db) == [fn.__name__ for fn in MIGRATIONS]
    assert [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY rowid")] == [fn.__name__ for fn in MIGRATIONS]
    assert fully_migrated(db)
    assert migrate(db) == []
    db.close()


def test_fully_migrated_sees_a_missing_migration(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    migrate(db)
    db.execute("DELETE FROM _migrations WHERE name = ?", (MIGRATIONS[-1].__name__,))
    assert not fully_migrated(db)
    db.close()


# ------------------------------------------------------------------ conversations


def test_a_conversation_round_trip(conn: PageConnection) -> None:
    cid = stored.create(conn, "", 100.0)
    assert stored.get(conn, cid) == stored.Conversation(cid, stored.UNTITLED, 100.0, 100.0)
    parts = [{"type": "text", "text": "what  is\nthis?"}, {"type": "image_url", "image_url": {"url": "file:///w/a.png"}}]
    ids = stored.append_turn(conn, cid, [("user", parts), ("assistant", "a cat")], "what is this?", 200.0)
    assert len(ids) == 2 and ids[0] < ids[1]
    assert stored.get(conn, cid) == stored.Conversation(cid, "what is this?", 100.0, 200.0)
    assert stored.messages(conn, cid) == [stored.Message(ids[0], "user", parts, 200.0),
                                          stored.Message(ids[1], "assistant", "a cat", 200.0)]
    # A later turn keeps the title the first question gave.
    more = stored.append_turn(conn, cid, [("user", "and now?")], "and now?", 300.0)
    assert stored.get(conn, cid).title == "what is this?"
    assert stored.user_contents_before(conn, cid, more[0] + 1) == ["and now?", parts]
    assert stored.user_contents_before(conn, cid, ids[1]) == [parts]


def test_a_given_title_is_kept_and_cut(conn: PageConnection) -> None:
    cid = stored.create(conn, "x" * 200, 1.0)
    stored.append_turn(conn, cid, [("user", "hello")], "hello", 2.0)
    assert stored.get(conn, cid).title == "x" * 120


def test_recent_lists_the_latest_updated_first(conn: PageConnection) -> None:
    first, second = stored.create(conn, "a", 1.0), stored.create(conn, "b", 2.0)
    stored.append_turn(conn, first, [("user", "q")], "q", 3.0)
    assert [c.id for c in stored.recent(conn)] == [first, second]
    assert [c.id for c in stored.recent(conn, 1)] == [first]
    assert stored.get(conn, 999) is None


def test_a_turn_is_kept_whole_or_not_at_all(conn: PageConnection) -> None:
    cid = stored.create(conn, "", 1.0)
    with pytest.raises(TypeError):  # the second message cannot be stored: the first must not stay either
        stored.append_turn(conn, cid, [("user", "q"), ("assistant", object())], "q", 2.0)
    assert stored.messages(conn, cid) == []
    assert stored.get(conn, cid) == stored.Conversation(cid, stored.UNTITLED, 1.0, 1.0)
    stored.append_turn(conn, cid, [("user", "q")], "q", 3.0)  # the connection is usable afterwards
    assert [m.content for m in stored.messages(conn, cid)] == ["q"]


def test_images_belong_to_their_conversation_and_clear_forgets_all(conn: PageConnection) -> None:
    one, two = stored.create(conn, "", 1.0), stored.create(conn, "", 1.0)
    image_id = stored.add_image(conn, one, "a.png", "image/png", b"\x89PNG...", 2.0)
    assert stored.image(conn, one, image_id) == stored.Image("image/png", b"\x89PNG...")
    assert stored.image_data(conn, one, image_id) == b"\x89PNG..."
    assert stored.image(conn, two, image_id) is None and stored.image_data(conn, two, image_id) is None
    stored.append_turn(conn, one, [("user", "q")], "q", 3.0)
    assert stored.clear(conn) == 2
    assert stored.recent(conn) == [] and stored.messages(conn, one) == [] and stored.image(conn, one, image_id) is None
    assert stored.clear(conn) == 0


def test_unreadable_stored_content_reads_as_none(conn: PageConnection) -> None:
    cid = stored.create(conn, "", 1.0)
    conn.write("INSERT INTO conversation_messages (conversation_id, role, content, created) VALUES (?, 'user', '{', 2)",
               (cid,))
    assert [m.content for m in stored.messages(conn, cid)] == [None]
    assert stored.user_contents_before(conn, cid, 10**9) == [None]


# ------------------------------------------------------------------ history


def test_a_result_stays_until_a_newer_one_is_done(state: Path, conn: PageConnection) -> None:
    with Queue(state) as queue:
        old = finished(queue, Path("/w/a.png"), "h1")
        queue.enqueue([Candidate(Path("/w/a.png"), "r", "h2", 1, 2)])  # new bytes, not processed yet
        done, nxt = history.results(conn, None, 10)
        assert [d.id for d in done] == [old] and nxt is None
        assert done[0].sidecars == (Path("/w/a.png.r.md"),) and done[0].seconds == 0.5
        (job,) = queue.claim(1)
        queue.finish([(job.id, [], 0.1)])
    assert [d.id for d in history.results(conn, None, 10)[0]] == [job.id]


def test_results_pages_follow_their_key(state: Path, conn: PageConnection) -> None:
    with Queue(state) as queue:
        ids = [finished(queue, Path(f"/w/{i}.png"), f"h{i}") for i in range(5)]
    first, key = history.results(conn, None, 2)
    assert [d.id for d in first] == ids[:-3:-1] and key == (first[-1].finished_at, first[-1].id)
    rest, end = history.results(conn, key, 10)
    assert [d.id for d in rest] == ids[-3::-1] and end is None
    assert history.results(conn, None, 10, rule="other") == ([], None)


def test_the_overview_reads(state: Path, conn: PageConnection) -> None:
    odd = Path(os.fsdecode(b"/w/\xff.png"))  # stored as raw bytes
    with Queue(state) as queue:
        a = finished(queue, Path("/w/a.png"), "ha")
        b = finished(queue, odd, "hb")
        bad = finished(queue, Path("/w/bad.png"), "hx", fail="broken")
        queue.enqueue([Candidate(Path("/w/c.png"), "r", "hc", 1, 1)])
        queue.set_meta("daemon", {"pid": 7})
    assert history.counts_by_state(conn) == {"queued": 1, "running": 0, "done": 2, "failed": 1}
    assert [(d.id, d.path, d.seconds) for d in history.latest_done(conn, 8)] == [(b, odd, None), (a, Path("/w/a.png"), None)]
    assert history.done_paths(conn, 50) == [Path("/w/a.png")]  # the name that is not UTF-8 is not offered
    (f,) = history.failures(conn, 5)
    assert (f.id, f.path, f.rule, f.attempts, f.error) == (bad, Path("/w/bad.png"), "r", 1, "broken") and f.finished_at
    assert history.failed_count(conn) == 1
    assert history.done_since(conn, 0) == 2 and history.done_since(conn, 2**40) == 0
    conn.write("INSERT INTO meta (key, value, updated) VALUES ('model', '{', 0)")
    assert history.meta(conn) == {"daemon": {"pid": 7}, "model": None}


def test_the_page_counts_failures_as_status_does(state: Path, conn: PageConnection) -> None:
    # A slow writer's truncated version failed, then the complete file got a job of its own (issue 10.9):
    # the overview, the failures page and `vlwatch status` all show the file's state now, not the old failure.
    with Queue(state) as queue:
        finished(queue, Path("/w/scan.pdf"), "truncated", fail="not a PDF")
        finished(queue, Path("/w/other.png"), "ho", fail="broken")
        queue.enqueue([Candidate(Path("/w/scan.pdf"), "r", "complete", 2, 2)])
        status = queue.counts()
    assert history.counts_by_state(conn) == status == {"queued": 1, "running": 0, "done": 0, "failed": 1}
    assert [f.path for f in history.failures(conn, 5)] == [Path("/w/other.png")]
    assert history.failed_count(conn) == 1
