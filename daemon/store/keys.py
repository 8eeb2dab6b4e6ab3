"""What a job is keyed on: a file's content hash, and its path as stored.

A job is keyed on path + rule + a blake2b hash of the file's bytes.  Paths
are stored as text, or as raw bytes when the name is not UTF-8 (``path_key``
and back: ``key_path``); ``safe_text`` shows such a name with escapes
wherever text must be valid UTF-8 (error columns, JSON).

Plain functions with no database of their own: the intake hashes with them
before it ever opens the queue.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: The hash of a candidate whose bytes may not be read (issue 10.3): it is
#: recorded as a failed job, not queued; new permissions give a real hash,
#: which no longer matches, so the file is queued again.
UNREADABLE = "unreadable:"


def unreadable_hash(size: int, mtime_ns: int) -> str:
    return f"{UNREADABLE}{size}:{mtime_ns}"


def path_key(path: Path | str) -> str | bytes:
    """How a path is stored: as text, or as its raw bytes when the name is not UTF-8.

    File names are bytes on Linux; Python carries undecodable ones as lone
    surrogates, which SQLite's text type refuses.  Such a name is stored as a
    BLOB (compared byte for byte, like the file system does), so one odd name
    cannot fail the transaction that queues a whole batch.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def key_path(value: str | bytes) -> Path:
    return Path(os.fsdecode(value) if isinstance(value, bytes) else value)


def safe_text(text: str) -> str:
    """``text`` with any undecodable bytes of a file name shown as escapes (for error columns)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def content_hash(path: Path) -> str:
    """The blake2b hex digest of a file's bytes (what a job is keyed on)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        # One read for the usual small image; a big scan streams in 1 MiB pieces.
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_hash(data: bytes) -> str:
    """``content_hash`` of bytes already read (the settler reads a small file once: issue 10.21)."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()
