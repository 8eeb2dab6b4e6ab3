"""The store's functions on their own, on a real SQLite file in tmp_path.

What the route tests (``test_web_app``, ``test_web``) do not pin directly:
a turn kept in one transaction (all or nothing), titles, ordering, an
image asked for under the wrong conversation, and ``migrate`` /
``fully_migrated`` on a bare connection (``test_queue`` migrates through
``Queue``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from daemon.store import conversations as stored
from daemon.store.migrations import MIGRATIONS, fully_migrated, migrate
from daemon.store.page import PageConnection


@pytest.fixture
def conn(tmp_path: Path):
    state = tmp_path / "state.db"
    db = sqlite3.connect(state, isolation_level=None)
    migrate(db)
    db.close()
    page = PageConnection(state)
    yield page
    page.close()


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
