"""Full-text search over every sidecar the daemon has written (SQLite FTS5).

The index lives in the state database (tables ``search_docs`` and the FTS5
table ``search_fts``, migration ``m030_search_index`` in ``migrations``)
and is kept in step WITHOUT hooks in the writers: the jobs table already
says which sidecars exist, so the index *catches up* from it.

- ``catch_up`` reads finished jobs newer than the last one it saw (a cursor
  on ``(finished_at, id)``, which a retried or recovered job moves forward
  too), reads their text sidecars and (re)indexes them.  A job supersedes the
  entries of older jobs of the same (path, rule).  From an empty index this
  is the one-time build over sidecars that exist already.
- ``search`` never returns a stale hit: each hit's sidecar and source are
  stat'ed; an entry whose source or sidecar is gone is deleted, one whose
  sidecar changed on disk is re-read, and the query runs again.
- ``sweep`` checks every entry the same way (for a page that lists results
  without a query); the web page runs it now and then.

What is indexed: the sidecar's TEXT (Markdown as is; HTML as its visible
text; JSON as box labels plus the raw answer) and the source's file name.
Overlays are images and are skipped.

User queries are never passed to FTS5 as syntax: every word becomes a quoted
string (a trailing ``*`` keeps prefix search), so ``"NEAR(``, ``AND`` or an
unbalanced quote can only ever be searched for, never raise.

Deliberately not here: ranking beyond FTS5's bm25, stemming, and CJK word
splitting (``unicode61`` treats a run of CJK characters as one token).
"""

from __future__ import annotations

import html.parser
import json
import logging
import os
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import ContextManager, Iterable, Iterator, Sequence

from daemon.store.keys import key_path, path_key, safe_text
from daemon.store.migrations import fully_migrated, migrate
from daemon.store.state import immediate

log = logging.getLogger(__name__)

#: Sidecar text beyond this is not indexed (a runaway answer must not bloat the database).
MAX_TEXT = 1 << 20
#: Finished jobs are re-examined this far behind the cursor: two writers may
#: commit out of clock order, and the cheap re-check catches the late one.
LOOKBACK = 5.0
#: Snippet highlight markers: private-use characters no sidecar text contains
#: (they are stripped from indexed text), turned into offsets for callers.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKERS = re.compile(f"[{_OPEN}{_CLOSE}]")
INDEXED_EXTS = ("md", "html", "json")


# ------------------------------------------------------------------ values


@dataclass(frozen=True)
class Filters:
    """What narrows a search: a folder (and everything under it), a rule, finished between two dates."""

    folder: Path | None = None
    rule: str | None = None
    since: float | None = None  # epoch seconds, inclusive
    until: float | None = None  # epoch seconds, exclusive


@dataclass(frozen=True)
class Hit:
    path: Path
    rule: str
    sidecar: Path
    job_id: int
    finished_at: float
    snippet: str
    #: (start, end) character ranges of ``snippet`` that matched
    highlights: tuple[tuple[int, int], ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {"path": safe_text(str(self.path)), "rule": self.rule, "sidecar": safe_text(str(self.sidecar)),
                "job_id": self.job_id, "finished_at": self.finished_at, "snippet": self.snippet,
                "highlights": [list(h) for h in self.highlights]}


# ------------------------------------------------------------------ queries


# Control characters part words too: SQLite ends a query string at a NUL (issue 27: "a\x00b" made
# FTS5 fail with "unterminated string" and the search answered nothing, silently).
_WORD = re.compile(r'[^\s"\x00-\x1f\x7f]+')


def fts_query(text: str) -> str | None:
    """The user's words as a safe FTS5 query: each word quoted, all of them required.

    A word ending in ``*`` is a prefix search.  Returns None when nothing is
    left to search for.

    >>> fts_query('quota exceeded')
    '"quota" "exceeded"'
    >>> fts_query('NEAR("a" b*')
    '"NEAR(" "a" "b"*'
    """
    terms = []
    for word in _WORD.findall(_MARKERS.sub(" ", text)):
        prefix = word.endswith("*")
        word = word.rstrip("*")
        if not word or not _has_token(word):
            continue
        terms.append(f'"{word}"' + ("*" if prefix else ""))
    return " ".join(terms) if terms else None


def _has_token(word: str) -> bool:
    # A "word" of punctuation only has no token for unicode61: FTS5 would
    # match it against nothing, or fail on an empty phrase with a prefix.
    return any(ch.isalnum() for ch in word)


def parse_date(text: str, *, end: bool = False) -> float:
    """``YYYY-MM-DD`` (local time) as epoch seconds; ``end`` gives the start of the next day.

    Raises:
        ValueError: not a date of that form.
    """
    day = datetime.strptime(text.strip(), "%Y-%m-%d")
    ts = day.timestamp()
    return ts + 86400 if end else ts


# ------------------------------------------------------------------ text


class _VisibleText(html.parser.HTMLParser):
    """The text a browser would show: no script, style, head or comments."""

    _HIDDEN = {"script", "style", "head", "template", "noscript", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in ("br", "p", "div", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append(" ")
        for name, value in attrs:  # what an image or a button says also counts as visible
            if name in ("alt", "title", "placeholder") and value:
                self.parts.append(f" {value} ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_text(document: str) -> str:
    parser = _VisibleText()
    try:
        parser.feed(document)
        parser.close()
    except Exception:  # html.parser is lenient, but a hostile page gets no second chance
        return re.sub(r"<[^>]*>", " ", document)
    return re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts)).strip()


def json_text(document: str) -> str:
    """Box labels and the raw answer(s) of a ``.json`` sidecar (any layout it may have)."""
    try:
        doc = json.loads(document)
    except ValueError:
        return document
    if not isinstance(doc, dict):
        return document
    parts: list[str] = []
    for page in [doc, *[p for p in doc.get("pages") or () if isinstance(p, dict)]]:
        for box in page.get("boxes") or ():
            if isinstance(box, dict) and isinstance(box.get("label"), str):
                parts.append(box["label"])
        for key in ("raw_answer", "answer"):
            if isinstance(page.get(key), str):
                parts.append(page[key])
    return "\n".join(parts)


def sidecar_text(path: Path) -> str | None:
    """The searchable text of a sidecar, or None if it is not a text sidecar or cannot be read."""
    ext = path.name.rsplit(".", 1)[-1].lower()
    if ext not in INDEXED_EXTS:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT * 4)
    except OSError:
        return None
    text = raw.decode("utf-8", "replace")
    if ext == "html":
        text = html_text(text)
    elif ext == "json":
        text = json_text(text)
    return _MARKERS.sub(" ", text)[:MAX_TEXT]


# ------------------------------------------------------------------ index


class SearchIndex:
    """The FTS5 index in the state database.  Thread-safe: one connection, used under a lock.

    Args:
        state: the state database (``config.state``); migrated if needed.
    """

    def __init__(self, state: Path) -> None:
        self.path = Path(state)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        #: held by whoever is catching up, so a search does not redo a background build's work
        self.catching = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        if not fully_migrated(self._db):
            migrate(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> ContextManager[sqlite3.Connection]:
        return immediate(self._db, self._lock)

    # ------------------------------------------------------------ catch-up

    def catch_up(self, limit: int | None = None) -> int:
        """Index sidecars of jobs finished since the last call; return how many jobs were looked at.

        Args:
            limit: at most this many jobs now (the rest next time); None = all.
        """
        total = 0
        while True:
            with self._lock:
                cursor = self._cursor()
                batch = min(500, limit - total) if limit is not None else 500
                if batch <= 0:
                    return total
                rows = self._db.execute(
                    "SELECT j.id, j.path, j.rule, j.finished_at, j.sidecars FROM jobs j"
                    " WHERE j.state = 'done' AND j.finished_at > ?"
                    " AND NOT EXISTS (SELECT 1 FROM search_docs d WHERE d.job_id = j.id AND d.job_finished = j.finished_at)"
                    " AND NOT EXISTS (SELECT 1 FROM search_skipped s WHERE s.job_id = j.id AND s.job_finished = j.finished_at)"
                    # A job whose file and rule have a newer finished job is history, not a result.
                    " AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.path = j.path AND k.rule = j.rule AND k.id > j.id"
                    " AND k.state = 'done')"
                    " ORDER BY j.finished_at, j.id LIMIT ?",
                    (cursor - LOOKBACK, batch)).fetchall()
            if not rows:
                return total
            docs = [(row, list(self._read(row))) for row in rows]  # file reads outside the lock
            with self._tx() as db:
                for row, texts in docs:
                    self._index_job(db, row, texts)
                newest = max(r["finished_at"] for r in rows)
                db.execute("UPDATE search_cursor SET finished_at = MAX(finished_at, ?) WHERE id = 1", (newest,))
            total += len(rows)

    def _cursor(self) -> float:
        row = self._db.execute("SELECT finished_at FROM search_cursor WHERE id = 1").fetchone()
        return float(row[0]) if row else 0.0

    @staticmethod
    def _read(row: sqlite3.Row) -> Iterator[tuple[Path, str, int, int]]:
        for name in json.loads(row["sidecars"] or "[]"):
            sidecar = Path(name)
            try:
                st = os.stat(sidecar)
            except OSError:
                continue
            text = sidecar_text(sidecar)
            if text is not None:
                yield sidecar, text, st.st_mtime_ns, st.st_size

    @staticmethod
    def _index_job(db: sqlite3.Connection, row: sqlite3.Row, texts: list[tuple[Path, str, int, int]]) -> None:
        path = row["path"]
        # A newer job of the same file and rule replaces what the older ones wrote.
        old = [r[0] for r in db.execute(
            "SELECT id FROM search_docs WHERE path = ? AND rule = ? AND job_id <= ?", (path, row["rule"], row["id"]))]
        _delete(db, old)
        if not texts:
            db.execute("INSERT OR REPLACE INTO search_skipped (job_id, job_finished) VALUES (?, ?)",
                       (row["id"], row["finished_at"]))
            return
        name = safe_text(key_path(path).name)
        for sidecar, text, mtime_ns, size in texts:
            _delete(db, [r[0] for r in db.execute("SELECT id FROM search_docs WHERE sidecar = ?", (path_key(sidecar),))])
            cur = db.execute(
                "INSERT INTO search_docs (path, rule, sidecar, job_id, job_finished, folder, sidecar_mtime_ns, sidecar_size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (path, row["rule"], path_key(sidecar), row["id"], row["finished_at"],
                 path_key(key_path(path).parent), mtime_ns, size))
            db.execute("INSERT INTO search_fts (rowid, name, body) VALUES (?, ?, ?)", (cur.lastrowid, name, text))

    # -------------------------------------------------------------- search

    def search(self, query: str, *, limit: int = 20, filters: Filters = Filters(), catch_up: bool = True) -> list[Hit]:
        """The best ``limit`` hits for ``query`` (words, all required), freshest state of disk.

        Hostile input is fine: an empty or punctuation-only query returns no hits.
        """
        if catch_up:
            with self.catching:
                self.catch_up()
        match = fts_query(query)
        if match is None or limit <= 0:
            return []
        for _ in range(5):
            rows = self._query(match, limit, filters)
            stale = [r for r in rows if self._stale(r)]
            if not stale:
                return [_hit(r) for r in rows]
            self._refresh(stale)
        return [_hit(r) for r in self._query(match, limit, filters) if not self._stale(r)]

    def _query(self, match: str, limit: int, filters: Filters) -> list[sqlite3.Row]:
        where, args = ["search_fts MATCH ?"], [match]
        if filters.folder is not None:
            folder = str(filters.folder).rstrip("/")
            # Everything under the folder: a range on the path, so the index on path serves it.
            where.append("(d.folder = ? OR (d.folder >= ? AND d.folder < ?))")
            args += [folder, folder + "/", folder + "0"]  # "0" is the character after "/"
        if filters.rule:
            where.append("d.rule = ?")
            args.append(filters.rule)
        if filters.since is not None:
            where.append("d.job_finished >= ?")
            args.append(filters.since)
        if filters.until is not None:
            where.append("d.job_finished < ?")
            args.append(filters.until)
        sql = (f"SELECT d.*, snippet(search_fts, 1, '{_OPEN}', '{_CLOSE}', '…', 16) AS snip,"
               f" highlight(search_fts, 0, '{_OPEN}', '{_CLOSE}') AS name_hl"
               f" FROM search_fts JOIN search_docs d ON d.id = search_fts.rowid"
               f" WHERE {' AND '.join(where)} ORDER BY search_fts.rank LIMIT ?")
        with self._lock:
            try:
                return self._db.execute(sql, [*args, limit]).fetchall()
            except sqlite3.OperationalError as exc:
                # fts_query quotes everything, so this is not expected; a search must never crash a page.
                log.warning("search %r failed: %s", match, exc)
                return []

    @staticmethod
    def _stale(row: sqlite3.Row) -> bool:
        try:
            st = os.stat(key_path(row["sidecar"]))
        except OSError:
            return True
        if (st.st_mtime_ns, st.st_size) != (row["sidecar_mtime_ns"], row["sidecar_size"]):
            return True
        return not os.path.exists(key_path(row["path"]))

    def _refresh(self, rows: Sequence[sqlite3.Row]) -> None:
        """Delete entries whose source or sidecar is gone; re-read sidecars that changed on disk."""
        updates: list[tuple[int, str | None, int, int]] = []
        for r in rows:
            sidecar = key_path(r["sidecar"])
            if not os.path.exists(key_path(r["path"])):
                updates.append((r["id"], None, 0, 0))
                continue
            try:
                st = os.stat(sidecar)
            except OSError:
                updates.append((r["id"], None, 0, 0))
                continue
            updates.append((r["id"], sidecar_text(sidecar), st.st_mtime_ns, st.st_size))
        with self._tx() as db:
            for doc_id, text, mtime_ns, size in updates:
                if text is None:
                    _delete(db, [doc_id])
                    continue
                name = db.execute("SELECT name FROM search_fts WHERE rowid = ?", (doc_id,)).fetchone()
                db.execute("DELETE FROM search_fts WHERE rowid = ?", (doc_id,))
                db.execute("INSERT INTO search_fts (rowid, name, body) VALUES (?, ?, ?)",
                           (doc_id, name[0] if name else "", text))
                db.execute("UPDATE search_docs SET sidecar_mtime_ns = ?, sidecar_size = ? WHERE id = ?",
                           (mtime_ns, size, doc_id))

    def sweep(self, batch: int = 2000) -> int:
        """Check every entry against the disk (as ``search`` does for its hits); return how many were fixed."""
        fixed, last = 0, 0
        while True:
            with self._lock:
                rows = self._db.execute("SELECT * FROM search_docs WHERE id > ? ORDER BY id LIMIT ?",
                                        (last, batch)).fetchall()
            if not rows:
                return fixed
            last = rows[-1]["id"]
            stale = [r for r in rows if self._stale(r)]
            if stale:
                self._refresh(stale)
                fixed += len(stale)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM search_docs").fetchone()[0])


def _delete(db: sqlite3.Connection, ids: Iterable[int]) -> None:
    ids = list(ids)
    db.executemany("DELETE FROM search_fts WHERE rowid = ?", [(i,) for i in ids])
    db.executemany("DELETE FROM search_docs WHERE id = ?", [(i,) for i in ids])


def _hit(row: sqlite3.Row) -> Hit:
    snip = row["snip"] or ""
    if _OPEN not in snip and _OPEN in (row["name_hl"] or ""):
        snip = row["name_hl"]  # only the file name matched: show it
    text, spans = _spans(snip)
    return Hit(path=key_path(row["path"]), rule=row["rule"], sidecar=key_path(row["sidecar"]), job_id=row["job_id"],
               finished_at=row["job_finished"], snippet=text, highlights=spans)


def _spans(marked: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Marked snippet text -> plain text and the ranges that were marked."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, start = 0, None
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece == _OPEN:
            start = pos
        elif piece == _CLOSE:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = None
        else:
            piece = re.sub(r"\s+", " ", piece)
            out.append(piece)
            pos += len(piece)
    return "".join(out), tuple(spans)


# --------------------------------------------------------------- the command


def search(state: Path, query: str, *, limit: int = 20, filters: Filters = Filters()) -> list[Hit]:
    """One search, from a fresh connection (what ``vlwatch search`` and the API call)."""
    with SearchIndex(state) as index:
        return index.search(query, limit=limit, filters=filters)

