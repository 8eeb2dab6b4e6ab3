"""The web page's ask/compare conversations, kept in the state database until cleared.

Three tables (migration ``m031_conversations``): ``conversations`` (a title
and its times), ``conversation_messages`` (each turn's OpenAI message
content as JSON: text, or text and ``image_url`` parts) and
``conversation_images`` (images uploaded from the browser, kept only for
their conversation).  Every function here takes the page's connection
(``page.PageConnection``) and returns plain values or frozen dataclasses.

Deliberately not here: checking what a client sent (roles, parts, image
types, sizes) and rendering answers; the routes in
``daemon.server.conversations`` do that before and after.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.store.page import PageConnection, json_or_none

#: A conversation's title until its first question names it (``append_turn``).
UNTITLED = "New conversation"


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    created: float
    updated: float


@dataclass(frozen=True)
class Message:
    id: int
    role: str  # user | assistant
    #: the OpenAI message content as it was kept (a string, or a list of parts);
    #: None if the stored JSON cannot be read
    content: Any
    created: float


@dataclass(frozen=True)
class Image:
    mime: str
    data: bytes


def _conversation(row: Any) -> Conversation:
    return Conversation(id=row["id"], title=row["title"], created=row["created"], updated=row["updated"])


def create(conn: PageConnection, title: str, now: float) -> int:
    """A new, empty conversation (titled ``UNTITLED`` if ``title`` is empty); its id."""
    cur = conn.write("INSERT INTO conversations (title, created, updated) VALUES (?, ?, ?)",
                     ((title or UNTITLED)[:120], now, now))
    return int(cur.lastrowid or 0)


def get(conn: PageConnection, cid: int) -> Conversation | None:
    rows = conn.rows("SELECT * FROM conversations WHERE id = ?", (cid,))
    return _conversation(rows[0]) if rows else None


def recent(conn: PageConnection, limit: int = 200) -> list[Conversation]:
    """The conversations most recently added to, newest first."""
    return [_conversation(r) for r in conn.rows("SELECT * FROM conversations ORDER BY updated DESC LIMIT ?", (limit,))]


def messages(conn: PageConnection, cid: int) -> list[Message]:
    """Every message of one conversation, oldest first."""
    return [Message(id=r["id"], role=r["role"], content=json_or_none(r["content"]), created=r["created"])
            for r in conn.rows("SELECT * FROM conversation_messages WHERE conversation_id = ? ORDER BY id", (cid,))]


def append_turn(conn: PageConnection, cid: int, turn: Sequence[tuple[str, Any]], title: str, now: float) -> list[int]:
    """Keep a finished turn's messages (role, content) in one transaction; their ids, in order.

    The conversation's ``updated`` moves to ``now``; an ``UNTITLED`` one takes
    ``title`` (the first question's words) unless that is empty.
    """
    ids = []
    with conn.transaction() as db:
        for role, content in turn:
            cur = db.execute("INSERT INTO conversation_messages (conversation_id, role, content, created)"
                             " VALUES (?, ?, ?, ?)", (cid, role, json.dumps(content), now))
            ids.append(int(cur.lastrowid or 0))
        db.execute("UPDATE conversations SET updated = ?,"
                   " title = CASE WHEN title = ? AND ? != '' THEN ? ELSE title END"
                   " WHERE id = ?", (now, UNTITLED, title, title, cid))
    return ids


def user_contents_before(conn: PageConnection, cid: int, before_id: int) -> list[Any]:
    """The content of each user message before message ``before_id``, newest first (None where unreadable)."""
    return [json_or_none(r["content"]) for r in conn.rows(
        "SELECT content FROM conversation_messages WHERE conversation_id = ? AND id < ? AND role = 'user'"
        " ORDER BY id DESC", (cid, before_id))]


def add_image(conn: PageConnection, cid: int, name: str, mime: str, data: bytes, now: float) -> int:
    """Keep an uploaded image for conversation ``cid``; its id."""
    cur = conn.write("INSERT INTO conversation_images (conversation_id, name, mime, data, created)"
                     " VALUES (?, ?, ?, ?, ?)", (cid, name, mime, data, now))
    return int(cur.lastrowid or 0)


def image(conn: PageConnection, cid: int, image_id: int) -> Image | None:
    """An image uploaded to conversation ``cid`` (None if it has no such image)."""
    rows = conn.rows("SELECT mime, data FROM conversation_images WHERE id = ? AND conversation_id = ?",
                     (image_id, cid))
    return Image(mime=rows[0]["mime"], data=rows[0]["data"]) if rows else None


def image_data(conn: PageConnection, cid: int, image_id: int) -> bytes | None:
    """Only the bytes of an uploaded image (what sizing its boxes needs)."""
    rows = conn.rows("SELECT data FROM conversation_images WHERE id = ? AND conversation_id = ?", (image_id, cid))
    return rows[0]["data"] if rows else None


def clear(conn: PageConnection) -> int:
    """Forget every conversation, its messages and its images, in one transaction; how many conversations."""
    with conn.transaction() as db:
        n = db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
        db.execute("DELETE FROM conversation_images")
        db.execute("DELETE FROM conversation_messages")
        db.execute("DELETE FROM conversations")
    return int(n)
