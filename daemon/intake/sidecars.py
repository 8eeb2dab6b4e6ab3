"""Sidecar names, whether a name is ours, and whether a sidecar is up to date.

One module answers these three questions for everyone (watching, scanning,
outputs, ``explain``), so the daemon never disagrees with itself about which
files are its own output:

- **naming**: the sidecar of ``photo.png`` under rule ``ground`` is
  ``photo.png.ground.json`` (and ``photo.png.ground.overlay.png``), beside
  the image or mirrored under ``output_dir``;
- **ownership** (``own_name_reason``): a name is ours when it is
  ``<anything>.<rule>.<md|html|json>`` or ``<anything>.<rule>.overlay.png``
  for a rule that exists in the config, or one of our temporary files
  (``.vlwatch-*.tmp``).  Plain string operations, not a regular expression:
  a file name may hold any byte, newlines included (issue 10.2), and a name
  that merely looks like a sidecar of a rule that does not exist is an
  ordinary input (issue 10.5);
- **freshness**: every planned sidecar exists (and is newer than the file).

Deliberately not here: writing sidecars (``outputs``: atomic writes, folder
checks) and deciding from the queue whether a file needs work (``scanning``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AbstractSet

from daemon.intake.rules import Match

TEMP_PREFIX = ".vlwatch-"
TEMP_SUFFIX = ".tmp"
OVERLAY = "overlay.png"
#: What a sidecar name ends with after ``.<rule>``: the longest first.
SIDECAR_ENDINGS = ("." + OVERLAY, ".md", ".html", ".json")


def sidecar_path(match: Match, ext: str) -> Path:
    """Where the sidecar of ``match`` with extension ``ext`` (md, html, json, overlay.png) goes."""
    return Path(sidecar_text(match, ext))


def sidecar_text(match: Match, ext: str) -> str:
    """``sidecar_path`` as text: the freshness checks of a burst make no ``Path`` for it."""
    path = _lexical(match.path)
    if match.output_dir is None:
        return f"{path}.{match.rule.name}.{ext}"
    return str(_mirrored(match, path, f"{path.name}.{match.rule.name}.{ext}"))


def _mirrored(match: Match, path: Path, name: str) -> Path:
    assert match.output_dir is not None
    try:
        sub = path.parent.relative_to(_lexical(match.root))
    except ValueError:
        sub = Path()
    return _lexical(match.output_dir) / sub / name


def _lexical(path: Path) -> Path:
    text = str(path)
    if os.path.isabs(text) and os.path.normpath(text) == text:
        return path  # canonical already (every path from the config and the watcher is)
    return Path(os.path.normpath(os.path.abspath(text)))


def planned_sidecars(match: Match) -> list[Path]:
    """The sidecars every successful job of ``match`` writes (what freshness is judged by).

    A ``ground`` rule's overlay is not among them: it is drawn only when the
    answer held boxes (issue 11.10), and it is written before the JSON, so a
    JSON sidecar vouches for it.  ``optional_sidecars`` names it.
    """
    return [Path(t) for t in planned_texts(match)]


def planned_texts(match: Match) -> list[str]:
    """``planned_sidecars`` as text."""
    return [sidecar_text(match, match.rule.output)]


def optional_sidecars(match: Match) -> list[Path]:
    """Sidecars a job of ``match`` writes only sometimes: a ground rule's overlay, when there are boxes."""
    return [Path(sidecar_text(match, OVERLAY))] if match.rule.task == "ground" else []


def is_temp_name(name: str) -> bool:
    """One of our sidecar temporary files (renamed into place within milliseconds)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def temp_name(token: str) -> str:
    """A temporary file's name that says who writes it: ``.vlwatch-HOST-PID-TOKEN.tmp``.

    So a sweep can tell a file whose writer is gone (a ``kill -9``) from one
    being written now, at once, without waiting for it to grow old (issue 27).
    """
    return f"{TEMP_PREFIX}{_host()}-{os.getpid()}-{token}{TEMP_SUFFIX}"


def temp_writer_gone(name: str) -> bool:
    """Whether the temporary file ``name`` was written by a process of this host that no longer runs.

    False when it cannot tell: a name of the old form (no writer in it),
    another host's (a shared folder: its pids mean nothing here), a live pid.
    """
    parts = name[len(TEMP_PREFIX):-len(TEMP_SUFFIX)].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def _host() -> str:
    # Dashes would blur the name's fields; a host name is not secret but need not be long.
    return "".join(c for c in os.uname().nodename if c.isalnum())[:32] or "host"


def sidecar_rule(name: str, rule_names: AbstractSet[str]) -> str | None:
    """The rule whose sidecar (or overlay) ``name`` is, if any of ``rule_names``."""
    for ending in SIDECAR_ENDINGS:
        if not name.endswith(ending):
            continue
        stem = name[: -len(ending)]
        # The longest matching rule name: "a.b" before "b" when both exist.
        for rule in sorted(rule_names, key=len, reverse=True):
            if len(stem) > len(rule) + 1 and stem.endswith("." + rule):
                return rule
    return None


def own_name_reason(name: str, rule_names: AbstractSet[str]) -> str | None:
    """Why ``name`` is vlwatch's own file (a reason to show a user), or None if it is not."""
    if is_temp_name(name):
        return "vlwatch's own temporary file"
    rule = sidecar_rule(name, rule_names)
    if rule is None:
        return None
    what = "overlay" if name.endswith("." + OVERLAY) else "sidecar"
    return f"vlwatch's own {what} of rule {rule!r}"


def is_output_name(name: str, rule_names: AbstractSet[str]) -> bool:
    """Whether a file name is one of ours: a sidecar, an overlay or a temporary file."""
    return own_name_reason(name, rule_names) is not None


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def sidecar_missing(match: Match) -> bool:
    return not all(os.path.exists(t) for t in planned_texts(match))


def sidecar_fresh(match: Match, mtime_ns: int) -> bool:
    """Whether every sidecar of ``match`` exists and is newer than the file (mtime ``mtime_ns``)."""
    for sidecar in planned_texts(match):
        m = _mtime_ns(sidecar)
        if m is None or m < mtime_ns:
            return False
    return True
