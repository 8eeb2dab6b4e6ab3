"""Which files need work: the catch-up at start, the periodic rescan and ``vlwatch scan``.

A file under a watched folder needs work for a rule when that rule's
sidecar is missing, or older than the file's bytes.  Cheap first: the
newest job's size and mtime vouch for the bytes its sidecar was made from,
so an unchanged file costs a ``stat`` and one indexed query; only a file
whose size or mtime moved is hashed, and a touch that left the bytes alone
is remembered, not redone.  A sidecar with no job behind it (written by
``vlwatch process``, or before this state file existed) counts as up to date
when it is newer than the file.

The same filter as the watcher's applies (hidden, temporary, litter, our
own outputs), so the scan never finds what the watcher would ignore.  Also
here: whether a job that a crash left ``running`` did write its sidecars
(``sidecars_written``), which is the same question asked of one job.

Deliberately not here: readiness (a file still being written is the
settler's business: the daemon hands recent files to it) and processing.
"""

from __future__ import annotations

import functools
import logging
import os
import string
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from daemon.config import Config, Snapshot
from daemon.errors import printable
from daemon.intake.readiness import file_signature
from daemon.intake.recipes import recipe_of
from daemon.intake.rules import Match, match_file
from daemon.intake.sidecars import is_temp_name, planned_sidecars, temp_writer_gone
from daemon.intake.ignoring import is_ignored
from daemon.intake.watching import walk_files
from daemon.store.keys import UNREADABLE, content_hash, unreadable_hash
from daemon.store.queue import ACTIVE, MTIME_SLACK_NS, Candidate, Job, Queue, Queued

log = logging.getLogger(__name__)

#: Age after which a leftover sidecar temp file is removed by the daemon's scans.
STALE_TEMP = 3600.0


class Recipes:
    """``recipe_of`` for many files under one config: computed once per rule whose prompt
    names nothing of the file (the usual case), as the recipe then is the same for all.

    A burst of 100,000 files rendered, serialised and hashed the same prompt
    100,000 times (issue 10.21).  Only ``$rule`` and ``$objects`` count as
    naming nothing of the file; any other ``$name`` is rendered per file.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._of_rule: dict[str, str] = {}

    def __call__(self, match: Match) -> str:
        rule = match.rule
        if not _file_free(rule.prompt):
            return recipe_of(self.config, match)
        recipe = self._of_rule.get(rule.name)
        if recipe is None:
            recipe = self._of_rule[rule.name] = recipe_of(self.config, match)
        return recipe


@functools.lru_cache(maxsize=256)
def _file_free(prompt: str) -> bool:
    """Whether a prompt template uses only rule-level names (``daemon.intake.rules.render_prompt``)."""
    return set(string.Template(prompt).get_identifiers()) <= {"rule", "objects"}


def rule_names(config: Config) -> frozenset[str]:
    """The rule names whose sidecars are ours: this config's rules (issue 10.5: a name that only
    looks like the sidecar of a rule that does not exist is an ordinary input)."""
    return frozenset(r.name for r in config.rules)


class Progress:
    """A progress bar on a terminal; a log line every few seconds otherwise."""

    def __init__(self, what: str, total: int | None = None, *, tty: bool | None = None, every: float = 5.0) -> None:
        self.what, self.total, self.count = what, total, 0
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._every, self._last = every, time.monotonic()
        self._bar = None
        if self._tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=" files", leave=False, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            of = f"/{self.total}" if self.total is not None else ""
            log.info("%s: %d%s files", self.what, self.count, of)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass(frozen=True)
class Work:
    """A file, under one rule, whose sidecar is missing or older than its bytes."""

    match: Match
    size: int
    mtime_ns: int
    reason: str  # "missing" | "stale" | "outdated" (an older recipe made it: daemon.intake.recipes)
    hash: str | None = None
    seen_at: float = 0.0
    recipe: str | None = None


def needs_work(queue: Queue, match: Match, size: int, mtime_ns: int) -> tuple[str | None, str | None]:
    """Whether ``match`` needs processing: (reason or None, content hash if computed).

    Cheap first: the newest job's size and mtime vouch for its bytes; only a
    file whose size or mtime moved is hashed (a touch is not a change).
    """
    job = queue.latest(match.path, match.rule.name)
    if job is not None and job.state in ACTIVE:
        return None, None
    if job is not None and job.state == "failed" and job.signature == (size, mtime_ns):
        if not (job.hash.startswith(UNREADABLE) and os.access(match.path, os.R_OK)):
            return None, None  # failed for good on these bytes: `vlwatch retry` redoes it
        # else: unreadable then, readable now (a chmod leaves size and mtime alone)
    mtimes = []
    for sidecar in planned_sidecars(match):
        sig = file_signature(sidecar)
        if sig is None:
            return "missing", None
        mtimes.append(sig[1])
    if job is None:  # written by `vlwatch process`, moved in with its image, or older than this state file
        return (None if min(mtimes) >= mtime_ns else "stale"), None
    if job.state == "done" and job.signature == (size, mtime_ns):
        return None, None
    try:
        digest = content_hash(match.path)
    except PermissionError:
        return "unreadable", unreadable_hash(size, mtime_ns)
    except OSError:
        return None, None
    if digest == job.hash:
        queue.touch(job.id, size, mtime_ns)
        return None, digest
    return "stale", digest


def find_work(config: Config, queue: Queue, *, progress: Progress | None = None,
              stop: threading.Event | None = None, on_ignored: Callable[[Path], None] | None = None) -> Iterator[Work]:
    """Files under the watched folders whose sidecars are missing or stale (``vlwatch scan``).

    Args:
        on_ignored: told about each file the filter skips (the daemon sweeps
            its own stale temporary files there).
    """
    snapshot = Snapshot.of(config)
    recipes = Recipes(config)
    for watch in config.watch:
        root = watch.path
        if not root.is_dir():
            log.warning("%s: watched folder does not exist; skipped", root)
            continue
        skip = snapshot.skip_dirs[watch]
        for path in walk_files(root, recursive=watch.recursive, skip_dirs=skip):
            if stop is not None and stop.is_set():
                return
            if progress is not None:
                progress.update()
            if is_ignored(path, root, snapshot.rule_names, skip):
                if on_ignored is not None:
                    on_ignored(path)
                continue  # litter, or our own output
            found = snapshot.find(path)
            # By value, not identity: the owner lookup is cached per (equal) watch
            # list, so a config loaded again may answer with its twin from before.
            if found is None or found[0] != watch:
                continue  # a nested watch's file: that watch's turn
            yield from _file_work(config, queue, path, recipes)


def _file_work(config: Config, queue: Queue, path: Path, recipes: Recipes | None = None) -> Iterator[Work]:
    matches = match_file(config, path)
    if not matches:
        return
    sig = file_signature(path)
    if sig is None:
        return
    for match in matches:
        seen_at = time.time()
        reason, digest = needs_work(queue, match, *sig)
        recipe = recipes(match) if recipes is not None else recipe_of(config, match)
        if reason is None and config.jobs.redo_outdated:
            reason, digest = _outdated(queue, match, recipe, sig), digest
        if reason is not None:
            yield Work(match, sig[0], sig[1], reason, digest, seen_at, recipe)


def _outdated(queue: Queue, match: Match, recipe: str, sig: tuple[int, int]) -> str | None:
    """"outdated" when the up-to-date sidecar of ``match`` was made by another recipe (issue 11.13).

    Asked only when the config says ``jobs.redo_outdated: true``.
    """
    job = queue.latest(match.path, match.rule.name)
    if job is None or job.state != "done" or job.recipe is None or job.recipe == recipe:
        return None
    return "outdated" if job.signature == sig else None


def candidate(work: Work) -> Candidate | None:
    """The queue entry for ``work``, hashing the file if that was not needed yet."""
    try:
        digest = work.hash or content_hash(work.match.path)
    except PermissionError:  # recorded as a failed job (issue 10.3), not skipped in silence
        digest = unreadable_hash(work.size, work.mtime_ns)
    except OSError:
        return None
    return Candidate(work.match.path, work.match.rule.name, digest, work.size, work.mtime_ns,
                     redo=work.reason in ("missing", "outdated"), seen_at=work.seen_at, recipe=work.recipe)


def enqueue_in_chunks(queue: Queue, works: Iterable[Work], chunk: int = 500) -> list[Queued]:
    queued: list[Queued] = []
    batch: list[Candidate] = []
    for work in works:
        if (c := candidate(work)) is not None:
            batch.append(c)
        if len(batch) >= chunk:
            queued += queue.enqueue(batch)
            batch = []
    if batch:
        queued += queue.enqueue(batch)
    return queued


def remove_stale_temp(path: Path) -> None:
    """Delete a sidecar temp file (``.vlwatch-*.tmp``) a killed process left behind.

    At once when its name says its writer, a process of this host, is gone
    (issue 27: one stayed after a ``kill -9`` and a restart); otherwise only
    after ``STALE_TEMP`` seconds: a live writer renames its temp file within
    milliseconds, so an old one has no owner any more.
    """
    if not is_temp_name(path.name):
        return
    sig = file_signature(path)
    if sig is not None and (temp_writer_gone(path.name) or time.time() - sig[1] / 1e9 > STALE_TEMP):
        path.unlink(missing_ok=True)
        log.info("%s: removed a temporary file its writer left behind", printable(path))


def sidecars_written(job: Job, config: Config) -> bool:
    """Whether a job left ``running`` by a crash did write all its sidecars, from these bytes."""
    if job.started_at is None:
        return False
    matches = match_file(config, job.path, job.rule)
    if not matches:
        return False
    started_ns = int(job.started_at * 1e9) - MTIME_SLACK_NS
    for sidecar in planned_sidecars(matches[0]):
        sig = file_signature(sidecar)
        if sig is None or sig[1] < started_ns:
            return False
    try:
        return content_hash(job.path) == job.hash
    except OSError:
        return False
