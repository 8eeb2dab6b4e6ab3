"""From a watcher's event to a queued job: which new files may become jobs, their settling, their queueing.

The daemon's watcher offers every path it sees (``offer``); a path that a
watched folder's rules match is handed to the settler (``readiness.
Settler``), which waits until the file is completely written; ready files
come back in batches (``deliver``), are hashed once, matched again under the
config running then, and queued, a job per matching rule, in one commit.  A
file that came with its sidecars already there and newer (a processed folder
moved in) is not queued.  ``load`` tells the engines whether a burst is
still arriving, so they wait for it rather than start on its first files.

Everything here runs for each file of a burst (100,000 at once, issue
10.21): paths stay text until a file is ready, and what travels with a file
through the settler is one tuple shared by every file of the same rules and
folder (``travels``).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from daemon.config import Rule, Snapshot, WatchConfig
from daemon.intake.readiness import Arrival, Kind, Settler
from daemon.intake.rules import Match, normalised, watched_rules
from daemon.intake.scanning import Recipes
from daemon.intake.sidecars import sidecar_fresh, sidecar_missing
from daemon.intake.ignoring import is_ignored
from daemon.store.keys import bytes_hash, content_hash, unreadable_hash
from daemon.store.queue import Candidate, Queue, Queued

log = logging.getLogger(__name__)

#: A batch of more jobs than this is logged as one line at INFO, its files each at
#: DEBUG: a burst of 100,000 files is not 100,000 lines in the journal, nor
#: their cost in the burst (issue 10.21).
LOG_EACH = 10


def log_queued(jobs: Sequence[Queued], why: Callable[[Queued], str] | None = None) -> None:
    """A line per job queued, or for a batch of more than ``LOG_EACH`` one summary line (each job at DEBUG)."""
    few = len(jobs) <= LOG_EACH
    each = log.info if few else log.debug
    if few or log.isEnabledFor(logging.DEBUG):
        for job in jobs:
            if why is None:
                each("%s: queued for %s", job.path, job.rule)
            else:
                each("%s: queued for %s (%s)", job.path, job.rule, why(job))
    if not few:
        folders = {os.path.dirname(job.path) for job in jobs}
        where = next(iter(folders)) if len(folders) == 1 else f"{len(folders)} folders"
        log.info("queued %d jobs for %s in %s (%s ... %s; each at DEBUG)", len(jobs),
                 ", ".join(sorted({job.rule for job in jobs})), where, jobs[0].path.name, jobs[-1].path.name)


#: A ready batch of at least this many files has its sidecars looked for on
#: ``LOOKUP_THREADS`` threads (``Arrivals._sidecars_fresh``).  While a slow writer
#: fills a folder, ready batches are small and their lookups are made one at a
#: time: the settler then has time to spare (it kept pace in every slow run), and
#: handing small batches to the threads too cost more CPU (10.2-11.0 s against
#: 9.2-10.2 s for 100,000 files at 16).
PARALLEL_LOOKUPS = 64
LOOKUP_THREADS = 4


def _fresh_each(files: list[tuple[Match, int]]) -> list[bool]:
    return [sidecar_fresh(m, mtime_ns) for m, mtime_ns in files]


class Arrivals:
    """The daemon's intake between its watcher and its queue (one per daemon; its settler runs a thread)."""

    def __init__(self, snapshot: Callable[[], Snapshot], wake: Callable[[], None]) -> None:
        """``snapshot``: the running config (swapped whole by a reload); ``wake``: tells the engines that jobs
        were queued."""
        self._snapshot = snapshot
        self._wake = wake
        self.queue: Queue | None = None  # the daemon's, once it has opened it (``start``)
        self.settler = Settler(self.deliver, digest=bytes_hash)  # hashed from the bytes it checked
        self._arrived: collections.deque[tuple[float, int]] = collections.deque()
        self._shared_data: dict[tuple[object, ...], tuple[object, ...]] = {}  # see travels
        self._lookups: ThreadPoolExecutor | None = None  # see _sidecars_fresh
        self._lookups_lock = threading.Lock()

    def start(self, queue: Queue) -> None:
        self.queue = queue
        self.settler.start()

    def stop(self) -> None:
        self.settler.stop()
        if self._lookups is not None:  # the settler's helpers: idle once it has stopped
            self._lookups.shutdown(wait=True)

    def offer(self, path: str, kind: Kind) -> None:
        """The watcher saw ``path`` (created, modified, moved in): settle it if a rule may take it."""
        if self.settler.note(path, kind):
            return  # already tracked: only its timing changes
        snapshot = self._snapshot()
        admitted = self.admit(snapshot, path)
        if admitted is not None:
            watch, rules = admitted
            self.settler.note(path, kind, watch.settle, data=self.travels(snapshot, rules, watch))

    def travels(self, snapshot: Snapshot, rules: Sequence[Rule], watch: WatchConfig) -> tuple[object, ...]:
        """What travels with an accepted file: the snapshot, its rules and where it is watched.

        Not Match objects: one tuple shared by every file of the same rules
        and folder, so memory per file in flight stays small and the ready
        file needs no second look-up of its folder (issue 10.21).
        """
        root, output_dir = watch.path, watch.output_dir
        # By identity (a snapshot does not hash); the entry holds them, so no id is reused meanwhile.
        key = (id(snapshot), *(id(rule) for rule in rules), root, output_dir)
        shared = self._shared_data.get(key)
        if shared is None:
            if len(self._shared_data) > 1024:  # many reloads or rule sets: start again
                self._shared_data.clear()
            shared = self._shared_data.setdefault(key, (snapshot, tuple(rules), root, output_dir))
        return shared

    @staticmethod
    def admit(snapshot: Snapshot, path: str | Path) -> tuple[WatchConfig, list[Rule]] | None:
        """(its watch, the rules that match) for a new path that may become a job, else None.

        Text in, no ``Path`` or ``Match`` made: this runs for every new file
        of a burst (issue 10.21).  The same answers as ``match_file``.
        """
        text = os.fspath(path)
        if not os.path.isabs(text) or os.path.normpath(text) != text:
            text = os.path.normpath(os.path.abspath(text))  # rules.normalised, as text
        found = snapshot.find(text)
        if found is None:
            return None
        watch, root, skip = found
        if is_ignored(text, root, snapshot.rule_names, skip):
            log.debug("%s: ignored", text)
            return None
        rules = watched_rules(snapshot.config, text, watch)
        if not rules:
            log.debug("%s: no rule matches", text)
            return None
        return watch, rules

    @staticmethod
    def accept(snapshot: Snapshot, path: Path) -> tuple[float, list[Match]] | None:
        """(settle time, matching rules) for a new path that may become a job, else None."""
        admitted = Arrivals.admit(snapshot, path)
        if admitted is None:
            return None
        watch, rules = admitted
        path = normalised(path)
        return watch.settle, [Match(path, rule, watch.path, watch.output_dir) for rule in rules]

    def deliver(self, arrivals: list[Arrival]) -> None:
        """Ready files from the settler: hash once, queue a job per matching rule, one commit."""
        assert self.queue is not None
        snapshot = self._snapshot()
        recipes = Recipes(snapshot.config)
        found: list[tuple[Arrival, Match, str, float]] = []
        for arrival in arrivals:
            matches = self.matches_now(snapshot, arrival)
            if not matches:
                continue
            try:
                digest = arrival.digest or content_hash(arrival.path)
            except PermissionError:
                # Recorded as a failed job saying so (issue 10.3), retried once readable.
                digest = unreadable_hash(arrival.size, arrival.mtime_ns)
            except OSError:
                continue  # gone already
            seen_at = time.time()
            found.extend((arrival, m, digest, seen_at) for m in matches)
        fresh = self._sidecars_fresh([(m, arrival.mtime_ns) for arrival, m, _, _ in found])
        batch: list[Candidate] = []
        for (arrival, m, digest, seen_at), sidecar_newer in zip(found, fresh):
            if sidecar_newer and self._came_with_its_sidecar(m, arrival):
                continue
            batch.append(Candidate(arrival.path, m.rule.name, digest, arrival.size, arrival.mtime_ns,
                                   redo=functools.partial(sidecar_missing, m), seen_at=seen_at,
                                   recipe=recipes(m)))
        jobs = self.queue.enqueue(batch)
        self._arrived.append((time.monotonic(), len(arrivals)))
        log_queued(jobs)
        if jobs:
            self._wake()

    def _sidecars_fresh(self, files: list[tuple[Match, int]]) -> list[bool]:
        """``sidecar_fresh`` of each (match, mtime_ns), several at a time for a large batch.

        A new file's sidecar is usually missing, and looking up a name that
        is missing in a folder that a writer is filling waits for the
        folder's lock behind each of the writer's file creations: 140-170 µs
        a lookup on ext4 here, against 2-5 µs in a quiet folder, which made
        it the settler's largest cost in a burst (issue 10.21).  Lookups made
        on a few threads at once share those waits (about 10 µs each).
        """
        if len(files) < PARALLEL_LOOKUPS:
            return [sidecar_fresh(m, mtime_ns) for m, mtime_ns in files]
        with self._lookups_lock:
            if self._lookups is None:
                self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="vlwatch-lookup")
            pool = self._lookups
        size = -(-len(files) // LOOKUP_THREADS)
        parts = pool.map(_fresh_each, [files[i:i + size] for i in range(0, len(files), size)])
        return [fresh for part in parts for fresh in part]

    def _came_with_its_sidecar(self, match: Match, arrival: Arrival) -> bool:
        """A file new to the queue whose sidecars are already there and newer (``_sidecars_fresh``
        said so): a processed folder renamed or moved in.  The same rule as the scan's for
        sidecars with no job."""
        assert self.queue is not None
        if self.queue.latest(match.path, match.rule.name) is not None:
            return False  # known: the queue decides by content hash
        log.info("%s: %s sidecar already present and newer; not queued", arrival.path, match.rule.name)
        return True

    def load(self) -> int:
        """Files waiting to settle plus the rate of files queued lately (per second): a burst if large.

        The rate counts only while files are still waiting: it says more are
        coming, and once every file of a burst is queued the engines have
        nothing to wait for (a 256-file burst held them 0.5 s longer, idle).
        """
        horizon = time.monotonic() - 0.5
        while self._arrived and self._arrived[0][0] < horizon:
            self._arrived.popleft()
        pending = self.settler.pending()
        return pending + 2 * sum(n for _, n in self._arrived) if pending else 0

    @staticmethod
    def matches_now(snapshot: Snapshot, arrival: Arrival) -> list[Match]:
        """The rules that apply to a ready file under the running snapshot.

        Matched with the snapshot it was accepted under when nothing was
        reloaded since (the filter passed then); judged again in full otherwise.
        """
        if isinstance(arrival.data, tuple) and arrival.data[0] is snapshot:
            _, rules, root, output_dir = arrival.data
            return [Match(arrival.path, rule, root, output_dir) for rule in rules]
        accepted = Arrivals.accept(snapshot, arrival.path)
        return accepted[1] if accepted is not None else []

    def requeue_changed(self, path: Path) -> None:
        """A job's file changed since it was queued (the processor saw it when recording): settle it again."""
        snapshot = self._snapshot()
        admitted = self.admit(snapshot, path)
        if admitted is not None:
            watch, rules = admitted
            self.settler.note(path, "changed", watch.settle, data=self.travels(snapshot, rules, watch))
