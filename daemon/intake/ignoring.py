"""What is never input: hidden, temporary and half-written files, NAS and OS litter, and our own outputs.

The one filter (``ignore_reason``, and ``is_ignored`` as a yes/no) for the
daemon's watcher events, the scans and ``vlwatch explain``, which prints its
reason: hidden files and folders, temporary and partial downloads
(``.part``, ``.crdownload``, ``.tmp``, ``~$*``...), editor swap and autosave
files, NAS/OS litter (``.DS_Store``, ``@eaDir``, ``Thumbs.db``...) and, above
all, vlwatch's own sidecars, overlays and temporary files
(``daemon.intake.sidecars`` decides those).  It runs before any rule sees a
path, so the daemon never feeds on its own output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AbstractSet, Sequence

from daemon.intake.sidecars import own_name_reason

#: Folders never entered: version control, OS and NAS metadata, trash,
#: Syncthing's own folders (paperless-ngx and watchfiles ignore the same).
IGNORED_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", "node_modules", "@eaDir", "#recycle", "#snapshot", ".snapshot",
    ".stfolder", ".stversions", ".Trash", ".Trashes", ".Spotlight-V100", ".fseventsd", "$RECYCLE.BIN",
    "System Volume Information", "lost+found",
})
#: Exact names that are never input.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "ehthumbs.db", "desktop.ini", ".directory", "Icon\r"})
#: Suffixes of files still being downloaded, copied or edited, with what they are.
IGNORED_SUFFIXES: dict[str, str] = {
    ".part": "partial download", ".partial": "partial download", ".crdownload": "partial download (Chrome)",
    ".download": "partial download (Safari)", ".opdownload": "partial download (Opera)",
    ".filepart": "partial upload (WinSCP)", ".!qb": "partial download (qBittorrent)",
    ".tmp": "temporary file", ".temp": "temporary file",
    ".swp": "editor swap file (vim)", ".swo": "editor swap file (vim)", ".swx": "editor swap file (vim)",
    ".kate-swp": "editor swap file (Kate)", ".bak": "backup file", "~": "backup file",
}
#: Prefixes of lock and temporary files, with what they are.
IGNORED_PREFIXES: dict[str, str] = {
    "~$": "temporary file (Office lock)", ".~lock.": "temporary file (LibreOffice lock)",
    ".#": "temporary file (Emacs lock)", ".syncthing.": "temporary file (Syncthing)",
    ".goutputstream-": "temporary file (GNOME)",
}


_ANY_PREFIX = (*IGNORED_PREFIXES, "#", ".")
_ANY_SUFFIX = tuple(IGNORED_SUFFIXES)


def litter_reason(name: str) -> str | None:
    """Why a file name alone marks it as litter, hidden or temporary; None for an ordinary name.

    Precise on purpose (issue 10.5): ``#1 receipt.png`` is an ordinary file;
    only Emacs's autosave form ``#name#`` is not.  Plain string operations,
    so a name with a newline in it is judged like any other.
    """
    lower = name.lower()
    if not (name.startswith(_ANY_PREFIX) or lower.endswith(_ANY_SUFFIX) or name in IGNORED_NAMES
            or (4 <= len(name) <= 5 and name.isdigit())):
        return None  # the common case, in one pass: this runs for every new file of a burst
    for prefix, what in IGNORED_PREFIXES.items():
        if name.startswith(prefix):
            return what
    if name in IGNORED_NAMES:
        return f"system litter ({name!r})"
    for suffix, what in IGNORED_SUFFIXES.items():
        if lower.endswith(suffix):
            return what
    if len(name) > 2 and name.startswith("#") and name.endswith("#"):
        return "temporary file (Emacs autosave)"
    if name.startswith("."):
        return "hidden file"
    if 4 <= len(name) <= 5 and name.isascii() and name.isdigit():
        return "temporary file (vim's write probe)"
    return None


def ignored_name(name: str) -> bool:
    """Whether a file name alone marks it as litter, hidden or temporary."""
    return litter_reason(name) is not None


def ignored_dir(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIRS


def ignore_reason(path: Path | str, root: Path, rule_names: AbstractSet[str],
                  skip_dirs: Sequence[Path] = ()) -> str | None:
    """Why ``path`` under watch ``root`` must never become a job, or None if it may.

    The one answer for the daemon, ``scan`` and ``vlwatch explain`` (issues
    10.2 and 10.5): our own outputs and temporary files
    (``daemon.intake.sidecars``), litter, and anything inside an ignored folder
    or an output folder.

    Args:
        path: the file (absolute), as a ``Path`` or as text.
        root: the watched folder it was seen under.
        rule_names: the rules of the running config (their sidecars are ours).
        skip_dirs: output folders inside the watched tree; nothing under them is input.
    """
    # String work, not pathlib: this runs for every event of a burst.
    text = os.fspath(path)
    name = path.name if isinstance(path, Path) else os.path.basename(text)
    reason = own_name_reason(name, rule_names) or litter_reason(name)
    if reason is not None:
        return reason
    base = str(root).rstrip(os.sep) + os.sep
    folders = text[len(base):].split(os.sep)[:-1] if text.startswith(base) else []
    for folder in folders:
        if ignored_dir(folder):
            return f"inside an ignored folder ({folder!r})"
    for d in skip_dirs:
        if text.startswith(str(d).rstrip(os.sep) + os.sep):
            return f"inside the output folder {d}"
    return None


def is_ignored(path: Path | str, root: Path, rule_names: AbstractSet[str], skip_dirs: Sequence[Path] = ()) -> bool:
    """Whether ``path`` under watch ``root`` must never become a job (``ignore_reason`` as a yes/no)."""
    return ignore_reason(path, root, rule_names, skip_dirs) is not None
