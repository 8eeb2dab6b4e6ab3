"""Watch folders: the observers that report new and changed files, and the tree walk.

What is not input is ``daemon.intake.ignoring``'s to say; when a file is
complete, ``daemon.intake.readiness``'s.

- **Observers** (``Watcher``): one inotify observer for all local folders,
  one polling observer per ``polling: true`` folder (NFS/SMB/FUSE, where
  inotify sees nothing: watchdog README, #409; OCRmyPDF #714, #1645).  A
  folder that is missing is watched through its nearest existing parent and
  watched itself the moment it appears; one that cannot be watched is
  retried by ``ensure``, which the periodic rescan calls.  An overflowed
  inotify queue is reported by watchdog's reader itself (``on_overflow``),
  and while the caller is far behind the reader pauses, so a burst waits in
  the kernel's queue rather than in memory (backpressure).  The reader also
  hands file events to the caller itself, in the kernel's order, skipping
  a file's create and write events when its close follows in the same read:
  watchdog's own path (two more threads, two objects per event) cost more
  per file in a burst than everything else (issue 10.21).

Deliberately not here: when a file is complete (``daemon.intake.readiness``),
which rule applies (the caller's ``accept`` decides), hashing and queueing
(``daemon.store``), and finding files that arrived while nobody watched (the
catch-up scan in ``service``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from daemon.config import WatchConfig
from daemon.intake.ignoring import ignored_dir
from daemon.intake.readiness import Kind

log = logging.getLogger(__name__)

#: Events that matter; everything else (opened, closed-without-write,
#: attribute-only on folders) is never even read from the kernel.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
    DirCreatedEvent, DirMovedEvent,
]
try:  # watchdog >= 6.1 reports attribute changes apart from writes
    from watchdog.events import FileAttribEvent

    # A chmod that makes an unreadable file readable must bring it back (issue 10.3).
    _EVENTS.append(FileAttribEvent)
except ImportError:  # older watchdog: attribute changes arrive as FileModifiedEvent
    FileAttribEvent = FileModifiedEvent  # type: ignore[misc, assignment]


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into ``offer``/``forget`` calls, nothing more.

    Paths are handed on as text: most events are for a file already tracked,
    and a ``Path`` made for each of them was most of a burst's CPU time
    (issue 10.21).  Whoever needs a ``Path`` makes one, once per file.

    Args:
        direct: the inotify reader hands this handler every file event itself
            (``on_inotify``), in the kernel's order, and forgets a folder
            moved away the moment it goes.  What still comes through
            watchdog's queue is what watchdog makes up: files found in a
            new folder, files of a folder moved within the tree.  Those only
            offer (a late forget could drop a newer file of the same name).
    """

    def __init__(self, offer: Callable[[str, Kind], None], forget: Callable[[str], None],
                 forget_under: Callable[[str], None], *, direct: bool = False) -> None:
        self._offer = offer
        self._forget = forget
        self._forget_under = forget_under
        self.direct = direct

    def dispatch(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if event.is_directory:
            if isinstance(event, DirMovedEvent) and src and not self.direct:
                self._forget_under(src)
            return  # new folders' files arrive as their own events (watchdog simulates them)
        if isinstance(event, FileClosedEvent):
            self._offer(src, "closed")
        elif isinstance(event, FileMovedEvent):
            if src and not self.direct:
                self._forget(src)
            dest = os.fsdecode(event.dest_path)
            if dest:
                self._offer(dest, "moved")
        elif isinstance(event, FileDeletedEvent):
            if not self.direct:
                self._forget(src)
        elif self.direct and isinstance(event, FileCreatedEvent):
            self._offer(src, "found")  # watchdog walked a new folder: the file's own events say more
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileAttribEvent)):
            self._offer(src, "changed")

    def on_inotify(self, mask: int, path: bytes) -> None:
        """One inotify event of a file (not a folder), on the reader's thread (``direct``)."""
        if mask & _IN_CLOSE_WRITE:
            self._offer(os.fsdecode(path), "closed")
        elif mask & _IN_MOVED_TO:
            self._offer(os.fsdecode(path), "moved")
        elif mask & _IN_GONE:
            self._forget(os.fsdecode(path))
        elif mask & _IN_CHANGED:
            self._offer(os.fsdecode(path), "changed")

    def on_folder_moved_away(self, path: bytes) -> None:
        """A folder was renamed (within the tree or out of it): what settled under its old name is gone."""
        self._forget_under(os.fsdecode(path))


# inotify(7) event bits, as the kernel defines them (watchdog's InotifyConstants, where present).
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_GONE = _IN_MOVED_FROM | _IN_DELETE
_IN_CHANGED = _IN_CREATE | _IN_MODIFY | _IN_ATTRIB


class _ParentHandler(FileSystemEventHandler):
    """Watches the nearest existing parent of a missing folder for that folder to appear."""

    def __init__(self, appeared: Callable[[], None]) -> None:
        self._appeared = appeared

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_directory and isinstance(event, (DirCreatedEvent, DirMovedEvent)):
            self._appeared()


#: Most events read from the kernel but not yet handled, and most files being
#: settled, before the inotify reader stops reading (issue 10.21): past these,
#: a burst waits in the kernel's queue (``fs.inotify.max_queued_events``), not
#: in our memory; if that overflows, the rescan finds the files.
MAX_EVENT_BACKLOG = 20_000
MAX_SETTLING = 20_000


#: The inotify bits a file event of ours may carry (the rest is watchdog's business).
_IN_FILE_EVENTS = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_GONE | _IN_CHANGED


def _superseded_dropped(events: list) -> list:  # type: ignore[type-arg]
    """The events of one read from inotify, less each file's create or modify event whose
    next event in the same read is another modify or its close-after-write.

    Handled one by one, those would only be overtaken by that next event (a
    file written and closed is ready, whatever came before); in a burst of
    small files the kernel hands them over together, and skipping them
    skips two thirds of the work per file (issue 10.21).  Everything else
    stays, in order: deletes, moves, attribute changes, folders.
    """
    if len(events) < 2:
        return events
    kept = []
    later: dict[tuple[int, bytes], int] = {}  # (watch, name) -> the mask of its next event kept
    for event in reversed(events):
        key, mask = (event.wd, event.name), event.mask
        after = later.get(key)
        if (after is not None and mask & _SUPERSEDED and after & _SUPERSEDING
                and not (mask | after) & _IN_ISDIR):
            continue
        later[key] = mask
        kept.append(event)
    kept.reverse()
    return kept


_IN_ISDIR = 0x40000000
_IN_Q_OVERFLOW = 0x4000
_SUPERSEDED = _IN_CREATE | _IN_MODIFY
_SUPERSEDING = _IN_MODIFY | _IN_CLOSE_WRITE


def _direct_possible(fd_class: type, group_class: type) -> bool:
    """Whether this watchdog's reader and watch groups are the ones ``_FD`` knows how to read."""
    return (all(hasattr(fd_class, a) for a in ("handle_event", "_read_event_buffer", "should_keep_running"))
            and all(hasattr(group_class, a) for a in ("_build_event_source_path", "is_active", "on_event")))


def _native_observer(on_overflow: Callable[[], None], backlog: Callable[[], int]) -> BaseObserver:
    try:
        from watchdog.observers.inotify import (
            InotifyFullEmitter,
            InotifyObserver,
            InotifyWatchGroup,
        )
        from watchdog.observers.inotify_c import (
            DEFAULT_EVENT_BUFFER_SIZE,
            InotifyEvent,
            InotifyFD,
        )
    except ImportError:  # not Linux: the platform's observer, readiness by settling
        from watchdog.observers import Observer

        return Observer()

    if not hasattr(InotifyFD, "handle_event"):  # another watchdog: its log line is the signal
        return InotifyObserver(generate_full_events=True)

    header = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name

    def _parsed(buffer: bytes) -> list[InotifyEvent]:
        """InotifyFD.read_events's parsing, in one loop (it runs for every event of a burst)."""
        events, i, end, unpack = [], 0, len(buffer), header.unpack_from
        while i + 16 <= end:
            wd, mask, cookie, length = unpack(buffer, i)
            if wd != -1 or mask & _IN_Q_OVERFLOW:  # the only global event watchdog keeps
                events.append(InotifyEvent(wd, mask, cookie, buffer[i + 16:i + 16 + length].rstrip(b"\0")))
            i += 16 + length
        return events

    class _FD(InotifyFD):  # type: ignore[misc, valid-type]
        """watchdog's inotify reader, telling us about IN_Q_OVERFLOW itself (issue 10.18),
        and handing our watches' file events on itself (issue 10.21).

        watchdog reconciles its watches after an overflow but reports the lost
        events only in a WARNING log line, which a log level can silence.

        Every event watchdog reads travels through two more threads (its move
        grouper's delayed queue, the emitter, the observer's queue) as two or
        three objects before a handler sees it: in a burst of small files that
        was more CPU than everything else the daemon does per file.  So the
        file events of our own watches are handed to the handler here, on the
        reader's thread, in the kernel's order; folder events still go
        watchdog's way, which keeps its watches right (new folders watched,
        watches moved with their folder) and walks new folders for files.
        """

        observer: BaseObserver | None = None

        def __init__(self) -> None:
            super().__init__()
            #: id(watch group) -> (the group, its handler): watches whose file events this thread hands on
            self.direct: dict[int, tuple[object, _Handler]] = {}

        def run(self) -> None:  # InotifyFD.run, with a burst's events thinned first
            while self.should_keep_running():
                if self.direct:
                    events = _superseded_dropped(_parsed(self._read_event_buffer(DEFAULT_EVENT_BUFFER_SIZE)))
                else:
                    events = self.read_events()
                for event in events:
                    self.handle_event(event)

        def handle_event(self, event):  # type: ignore[no-untyped-def]
            if event.is_queue_overflow:
                on_overflow()
            else:
                self._wait_for_room()
                if self.direct and self._handle_directly(event):
                    return
            super().handle_event(event)

        def _handle_directly(self, event) -> bool:  # type: ignore[no-untyped-def]
            """Hand a file event of our watches on; False to leave (the rest of) it to watchdog."""
            mask = event.mask
            if not mask & _IN_FILE_EVENTS:
                return False
            with self._lock:
                watch = self._watch_for_wd.get(event.wd)
                groups = list(watch.callbacks.values()) if watch is not None else []
            mine = [(g, entry[1]) for g in groups
                    if (entry := self.direct.get(id(g))) is not None and entry[0] is g]
            if not mine:
                return False
            if event.is_directory:
                if mask & _IN_MOVED_FROM:  # now, in order: a later folder of that name is another one
                    for group, handler in mine:
                        if (path := group._build_event_source_path(event)) is not None:
                            handler.on_folder_moved_away(path)
                return False
            for group, handler in mine:
                if group.is_active and (path := group._build_event_source_path(event)) is not None:
                    handler.on_inotify(mask, path)
            for group in groups:  # another observer's watch of the same folder (a missing folder's parent)
                if not any(group is g for g, _ in mine):
                    group.on_event(event)
            return True

        def _wait_for_room(self) -> None:
            """Backpressure: while those downstream are behind, leave events in the kernel."""
            observer = self.observer
            if observer is None:
                return
            queue = observer.event_queue
            while ((queue.qsize() > MAX_EVENT_BACKLOG or backlog() > MAX_SETTLING)
                   and self.should_keep_running()):
                time.sleep(0.005)

    class _Emitter(InotifyFullEmitter):  # type: ignore[misc, valid-type]
        def on_thread_stop(self) -> None:
            # A watched folder moved out, another made under its name and that
            # one renamed: watchdog's path-to-watch map loses the name, and
            # deactivate() raises KeyError halfway (watchdog 6-7).  Its watches
            # end with the observer's inotify descriptor, closed next; what
            # deactivate() skipped is only its move-pairing queue.  Uncaught,
            # the observer's stop ended there and the descriptor and its reader
            # thread leaked (a reload that changed `watch:` failed).
            group = self._inotify
            try:
                super().on_thread_stop()
            except KeyError as exc:
                log.debug("watchdog lost track of a renamed folder (%s); its watches end with the observer", exc)
                grouper = getattr(group, "_move_event_grouper", None)
                if grouper is not None:
                    grouper.close()

    class _Observer(InotifyObserver):  # type: ignore[misc, valid-type]
        # InotifyObserver.__init__ with our reader.  Full events: a file renamed
        # in from outside the tree arrives as a move with no source, so it is
        # known to be whole (no settle wait).
        def __init__(self) -> None:
            fd = self._inotify_fd = _FD()
            fd.start()
            BaseObserver.__init__(self, _Emitter, inotify_fd=fd)
            fd.observer = self
            #: whether file events can be handed on by the reader (``feed_directly``)
            self.direct = (_direct_possible(InotifyFD, InotifyWatchGroup) and hasattr(fd, "_watch_for_wd")
                           and hasattr(fd, "_lock") and hasattr(self, "_emitter_for_watch"))

        def feed_directly(self, watch: ObservedWatch, handler: _Handler) -> bool:
            """Have the reader hand ``watch``'s file events to ``handler`` itself."""
            group = getattr(self._emitter_for_watch.get(watch), "_inotify", None)
            if group is None:  # the emitter starts with the observer: it has
                return False
            self._inotify_fd.direct[id(group)] = (group, handler)
            return True

    return _Observer()


def poll_interval(settle: float) -> float:
    """How often a polling observer walks its folder: twice per settle, 0.25 to 2 s."""
    return max(0.25, min(2.0, settle / 2))


class Watcher:
    """Observers over the configured folders, feeding ``offer``.

    A watched folder that does not exist yet is watched through its nearest
    existing parent, and watched itself the moment it appears (issue 11.3),
    not at the next rescan.

    Args:
        offer: called for each file event, ``offer(path, kind)``, on observer
            threads; ``path`` is the absolute path as text.
        forget: called for a file deleted or moved away (its path as text).
        forget_under: called for a folder moved away (its path as text).
        on_watched: told the folders watched late (they appeared after start), so
            the caller can catch up on files already in them.
        on_overflow: called when inotify dropped events (a rescan is due).
        backlog: how many files the caller is still settling; past
            ``MAX_SETTLING`` the inotify reader pauses (backpressure).
    """

    def __init__(self, offer: Callable[[str, Kind], None], forget: Callable[[str], None],
                 forget_under: Callable[[str], None], *,
                 on_watched: Callable[[list[Path]], None] | None = None,
                 on_overflow: Callable[[], None] | None = None,
                 backlog: Callable[[], int] | None = None) -> None:
        self._handler = _Handler(offer, forget, forget_under)
        self._direct_handler = _Handler(offer, forget, forget_under, direct=True)  # fed by the inotify reader
        self._parent_handler = _ParentHandler(self._appeared)
        self._on_watched = on_watched
        self._on_overflow = on_overflow or _OverflowAlarm.raised.set
        self._backlog = backlog or (lambda: 0)
        self._native: BaseObserver | None = None
        self._polling: dict[Path, BaseObserver] = {}
        self._watching: dict[Path, WatchConfig] = {}
        self._missing: dict[Path, WatchConfig] = {}
        self._parents: dict[Path, ObservedWatch] = {}  # parent folder -> its watch, for missing folders
        self._lock = threading.Lock()
        self._started = False
        _OverflowAlarm.install()

    @property
    def roots(self) -> list[Path]:
        with self._lock:
            return list(self._watching)

    def start(self, watches: Iterable[WatchConfig]) -> None:
        """Schedule every folder; those that cannot be watched yet are retried by ``ensure``."""
        with self._lock:
            self._native = _native_observer(self._on_overflow, self._backlog)
            self._native.start()
            self._started = True
            for watch in watches:
                self._missing[watch.path] = watch
        self.ensure(initial=True)

    def ensure(self, initial: bool = False) -> list[Path]:
        """Try again to watch folders that were missing or failed; return those now watched."""
        added = []
        with self._lock:
            if not self._started:
                return []
            # Again while a folder appeared meanwhile: `mkdir -p a/b/c` may make
            # b/c before the parent watch moves down to b.
            for _ in range(64):
                for root, watch in list(self._missing.items()):
                    if self._schedule(watch, quiet=not initial or _ > 0):
                        del self._missing[root]
                        self._watching[root] = watch
                        added.append(root)
                        if not initial:
                            log.info("%s: the watched folder exists now; watching it", root)
                self._watch_parents()
                if not any(root.is_dir() for root in self._missing):
                    break
        return added

    def _appeared(self) -> None:
        """A folder appeared under the parent of a missing one: look (off the observer's thread,
        which holds the observer's lock while it dispatches)."""
        def look() -> None:
            added = self.ensure()
            if added and self._on_watched is not None:
                self._on_watched(added)

        threading.Thread(target=look, name="vlwatch-appeared", daemon=True).start()

    def _watch_parents(self) -> None:
        """Keep an inotify watch on the nearest existing parent of each missing folder (lock held)."""
        wanted: set[Path] = set()
        for root in self._missing:
            parent = _nearest_existing(root)
            if parent is not None:
                wanted.add(parent)
        if self._native is None:
            return
        for parent in set(self._parents) - wanted:
            with contextlib.suppress(KeyError, OSError):
                self._native.unschedule(self._parents.pop(parent))
        for parent in wanted - set(self._parents):
            try:
                self._parents[parent] = self._native.schedule(
                    self._parent_handler, str(parent), recursive=False, event_filter=[DirCreatedEvent, DirMovedEvent])
            except OSError as exc:
                log.debug("%s: cannot watch for missing folders (%s); the rescan looks for them", parent, exc)

    def _schedule(self, watch: WatchConfig, quiet: bool = False) -> bool:
        path = watch.path
        if not path.is_dir():
            if not quiet:
                log.warning("%s: watched folder does not exist; watching %s for it to appear", path,
                            _nearest_existing(path) or "nothing")
            return False
        if not watch.polling and self._native is not None:
            try:
                self._schedule_native(path, watch.recursive)
                log.info("%s: watching (inotify%s, settle %gs)", path, ", recursive" if watch.recursive else "", watch.settle)
                return True
            except OSError as exc:
                # ENOSPC: fs.inotify.max_user_watches is used up; polling still works.
                log.warning("%s: cannot watch with inotify (%s); polling instead", path, exc)
        observer = PollingObserver(timeout=poll_interval(watch.settle))
        try:
            observer.schedule(self._handler, str(path), recursive=watch.recursive, event_filter=_EVENTS)
            observer.start()
        except OSError as exc:
            log.warning("%s: cannot watch (%s); will try again at the next rescan", path, exc)
            return False
        self._polling[path] = observer
        log.info("%s: watching (polling every %gs, settle %gs)", path, poll_interval(watch.settle), watch.settle)
        return True

    def _schedule_native(self, path: Path, recursive: bool) -> None:
        """Watch ``path`` with inotify; its file events straight from the reader where watchdog allows."""
        assert self._native is not None
        if not getattr(self._native, "direct", False):
            self._native.schedule(self._handler, str(path), recursive=recursive, event_filter=_EVENTS)
            return
        observed = self._native.schedule(self._direct_handler, str(path), recursive=recursive, event_filter=_EVENTS)
        if not self._native.feed_directly(observed, self._direct_handler):  # type: ignore[attr-defined]
            # Still correct through watchdog's queue, only slower: that handler only offers.
            log.debug("%s: file events go through watchdog's queue", path)

    def alive(self) -> bool:
        with self._lock:
            observers = [o for o in [self._native, *self._polling.values()] if o is not None]
        return all(o.is_alive() for o in observers)

    def stop(self) -> None:
        with self._lock:
            observers = [o for o in [self._native, *self._polling.values()] if o is not None]
            self._native, self._polling = None, {}
            self._watching, self._missing, self._parents = {}, {}, {}
            self._started = False
        for o in observers:
            o.stop()
        for o in observers:
            o.join(timeout=10)


def _nearest_existing(path: Path) -> Path | None:
    """The deepest existing folder above ``path``."""
    for parent in path.parents:
        if parent.is_dir():
            return parent
    return None


class _OverflowAlarm(logging.Handler):
    """Notices watchdog's "Inotify queue overflowed" warning: events were lost.

    watchdog reconciles its watches but reports the lost events only in its
    log, so this handler turns that line into a flag the service polls to
    run a rescan.
    """

    raised = threading.Event()
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            logging.getLogger("watchdog.observers.inotify_c").addHandler(cls(level=logging.WARNING))
            cls._installed = True

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            _OverflowAlarm.raised.set()


def overflowed() -> bool:
    """Whether inotify dropped events since the last call (then a rescan is due)."""
    if _OverflowAlarm.raised.is_set():
        _OverflowAlarm.raised.clear()
        return True
    return False


def walk_files(root: Path, *, recursive: bool, skip_dirs: Sequence[Path] = ()) -> Iterable[Path]:
    """Every file under ``root`` that is not in an ignored folder, in a stable order."""
    skip = {str(d) for d in skip_dirs}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if recursive and not ignored_dir(d) and os.path.join(folder, d) not in skip)
        for name in sorted(files):
            yield Path(folder, name)
