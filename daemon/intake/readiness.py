"""Readiness: when a watched file is complete, and what it holds then (``Settler``, ``look_at``).

A create event fires at the first write (watchdog #586, #787), so a file
is only handed over once it is complete: closed after writing (inotify
``IN_CLOSE_WRITE``), moved in whole, or unchanged in size and mtime for
``settle`` seconds, restarting on any new event as paperless-ngx's consumer
does.  Then it is read once (``look_at``: size, completeness and, for the
queue, the hash of the very bytes checked) and, where its end is not
conclusive, decoded for real; one that still reads as truncated (a copy that closes and re-opens the file,
OCRmyPDF #552) is re-checked after settling again, not dropped, and only
handed over as it is after a few tries (the worker then records why it
fails).  Ready files leave in batches, so the queue commits once per batch.

Deliberately not here: which files are watched or ignored
(``daemon.intake.watching`` hands events over as ``offer(path, kind)``), which
rule applies, and hashing for the queue beyond the digest function the caller
passes.
"""

from __future__ import annotations

import errno
import heapq
import io
import logging
import mmap
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)  # one per file of a burst: no per-instance dict
class Arrival:
    """A complete file, with the size and mtime it had when found ready."""

    path: Path
    size: int
    mtime_ns: int
    #: what the caller attached when it first offered the path (the rules it matched)
    data: object = None
    #: the content hash of the bytes found complete, when the settler was given ``digest`` and read them whole
    digest: str | None = None


#: What happened to a file: ``changed`` (created or written), ``closed`` (closed
#: after writing), ``moved`` (renamed into place, so whole), or ``found`` (it
#: exists, but no event of its own said so: watchdog walked a new folder).
Kind = Literal["changed", "closed", "moved", "found"]


@dataclass(slots=True)  # one per file in flight (issue 10.21): small, no per-instance dict
class _Pending:
    settle: float
    signature: tuple[int, int] | None  # (size, mtime_ns) when last seen changing
    complete: bool = False  # closed after writing, or moved in whole, since the last change
    probes: int = 0  # times it was stable but did not decode
    due: float = 0.0  # when to look next
    heap_due: float | None = None  # the earliest entry this path has in the heap, if any
    data: object = None


def file_signature(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file, or None if it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns)


#: The common raster formats, probed by decoding.  Anything else (a PDF, a
#: HEIC without its plugin) is handed over once stable: the worker's decoder
#: knows more formats than Pillow, and Pillow's EPS reader would run Ghostscript.
_PROBED = frozenset({".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif",
                     ".tif", ".tiff"})


def probe_image(path: Path) -> bool:
    """Whether ``path`` looks complete (or is not an image Pillow knows).

    A cheap look at the end of the file first: a PNG ends with its IEND chunk,
    a JPEG with the EOI marker, a GIF with its trailer, and WebP and BMP
    headers state the file's size.  A PNG with no IEND or a JPEG with no EOI
    after its last scan is incomplete, full stop (issue 10.9): Pillow decodes
    a PNG cut just before IEND, which would be processed and then redone.
    Only when the end is not conclusive (TIFF, trailing data after the end
    marker) is the image decoded for real; JPEGs then in draft mode (1/8
    scale), which still reads every byte.  The worker decodes every file
    again anyway, so a common, complete file costs one read of its last
    bytes here, not a second decode.  A file we may not read is "complete":
    waiting cannot help, and the intake records why it fails.
    """
    if path.suffix.lower() not in _PROBED:
        return True
    verdict = _complete_by_structure(path)
    if verdict is not None:
        return verdict
    return _decodes(path)


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _complete_by_structure(path: Path) -> bool | None:
    """True/False when the file's structure says whether it is complete; None to decode it."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 12))
            tail = f.read(12)
            return _structure_verdict(head, tail, size, lambda needle: _find(f, size, needle))
    except PermissionError:
        return True
    except OSError as exc:
        if exc.errno in OUT_OF_RESOURCES:
            raise  # says nothing of the file: the caller looks again
        return False


def _structure_verdict(head: bytes, tail: bytes, size: int, rfind: Callable[[bytes], int]) -> bool | None:
    """``_complete_by_structure`` from a file's first 16 and last 12 bytes; ``rfind`` finds the last
    offset of a marker in the file (-1 if absent)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if tail == _PNG_END:
            return True
        return None if rfind(b"IEND") >= 0 else False
    if head.startswith(b"\xff\xd8"):
        if tail.endswith(b"\xff\xd9"):
            return True
        # Byte stuffing keeps FF D9 out of scan data: an EOI after the
        # last start-of-scan means data follows a complete image.
        return None if rfind(b"\xff\xd9") > rfind(b"\xff\xda") else False
    if head.startswith((b"GIF87a", b"GIF89a")):
        return True if tail.endswith(b";") else None
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True if int.from_bytes(head[4:8], "little") + 8 <= size else None
    if head.startswith(b"BM"):
        return True if int.from_bytes(head[2:6], "little") <= size else None
    return None  # TIFF and the rest: decode


def _find(f: BinaryIO, size: int, needle: bytes) -> int:
    """The last offset of ``needle`` in the open file ``f`` (-1 if absent), without reading it into memory."""
    if size == 0:
        return -1
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.rfind(needle)


def _decodes(source: Path | BinaryIO) -> bool:
    from PIL import Image

    try:
        with Image.open(source) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError:
        return True  # complete, just refused: the worker says so
    except OSError as exc:
        if exc.errno in OUT_OF_RESOURCES:
            raise
        return False  # truncated ("image file is truncated" has no errno)
    except Exception:  # truncated, or not even a header yet
        return False
    return True


#: A file up to this size is read whole, once, when it looks ready: the
#: completeness check and the content hash then share that one read
#: (``look_at``).  A bigger one is checked at its end and hashed as it streams.
READ_WHOLE = 8 << 20


@dataclass(frozen=True, slots=True)
class Look:
    """What one look at a file that seems ready found (``look_at``)."""

    #: (size, mtime_ns); None when it is gone or not a regular file
    signature: tuple[int, int] | None
    #: whether its bytes are whole (``probe_image``)
    complete: bool = False
    #: the digest of exactly the bytes judged whole, when one was asked for and the file was read whole
    digest: str | None = None
    #: the process could not open it for want of descriptors or memory: look again, it says nothing of the file
    busy: bool = False


#: errno values that say the process, not the file, is at a limit (issue 27: a flood of sockets
#: used every descriptor, and a file arriving then was dropped as "gone").
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds before a file that could not be opened for want of descriptors is looked at again.
BUSY_RETRY = 1.0


def look_at(path: str, digest: Callable[[bytes], str] | None = None) -> Look:
    """Size, mtime, completeness and (optionally) the content digest of ``path``, from one read.

    In a burst of small files this is most of the daemon's work per file
    (issue 10.21): one ``open``, ``fstat`` and ``read`` here replace a
    ``stat``, an ``open`` to look at the file's end and another to hash it.
    The bytes hashed are the bytes judged complete; if the file changed
    while it was read, it is not complete (yet): the caller looks again.

    Args:
        path: the file.
        digest: makes the content hash from the bytes (``daemon.store.keys.bytes_hash``).
    """
    try:
        # O_NONBLOCK: a FIFO named x.png must not hang the settler (fstat then says what it is).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:  # waiting cannot help; the intake records why it fails (issue 10.3)
        return Look(file_signature(path), True)
    except OSError as exc:
        if exc.errno in OUT_OF_RESOURCES:
            return Look(file_signature(path), busy=True)
        return Look(None)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Look(None)
        sig = (st.st_size, st.st_mtime_ns)
        if st.st_size > READ_WHOLE:
            try:
                return Look(sig, probe_image(Path(path)))
            except OSError as exc:  # only OUT_OF_RESOURCES leaves probe_image
                return Look(sig, busy=exc.errno in OUT_OF_RESOURCES)
        try:
            data = _read(fd, st.st_size + 1)
            after = os.fstat(fd)
        except OSError:
            return Look(sig, False)
    finally:
        os.close(fd)
    if len(data) != sig[0] or (after.st_size, after.st_mtime_ns) != sig:
        return Look((after.st_size, after.st_mtime_ns), False)  # written to while we read
    complete = _whole(_suffix(path).lower(), data)
    return Look(sig, complete, digest(data) if complete and digest is not None else None)


def _suffix(path: str) -> str:
    """``Path(path).suffix``, without making a ``Path`` (once per file of a burst)."""
    name = path.rpartition(os.sep)[2]
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _read(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``fd``, fewer only at its end."""
    parts = []
    while limit > 0 and (part := os.read(fd, limit)):
        parts.append(part)
        limit -= len(part)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def _whole(suffix: str, data: bytes) -> bool:
    """``probe_image`` on a file's bytes in memory."""
    if suffix not in _PROBED:
        return True
    verdict = _structure_verdict(data[:16], data[-12:], len(data), data.rfind)
    if verdict is not None:
        return verdict
    return _decodes(io.BytesIO(data))


class _Busy:
    """One warning per ``every`` seconds while files cannot be opened for want of descriptors."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.logged, self.count = every, float("-inf"), 0

    def note(self, key: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged >= self.every:
            # %r, not images.printable: nothing may be imported here (an import opens files).
            log.warning("%r: cannot be opened now (the process is out of file descriptors); %d file(s) "
                        "wait and are looked at again every %gs", key, self.count, BUSY_RETRY)
            self.logged, self.count = now, 0


_out_of_descriptors = _Busy()


class Settler:
    """Tracks files until they are complete, then hands them over in batches.

    ``note`` is called from observer threads and only updates a table; the
    checking (stat, read, decode) runs on the settler's own thread.

    Args:
        deliver: called on the settler thread with each batch of ready files.
        digest: makes the content hash of a file's bytes; given, a file that
            is read whole to check it arrives with the hash of what was checked
            (``Arrival.digest``), so the queue need not read it again.
        max_probes: hand a file over after this many failed decodes anyway.
        batch: most files checked per round.
        handover: longest a checked file waits for the rest of its round to be
            checked (each is read and hashed whole): a burst's first files reach
            the queue, and the engine, while the rest are still being read.
    """

    def __init__(self, deliver: Callable[[list[Arrival]], None], *, digest: Callable[[bytes], str] | None = None,
                 max_probes: int = 3, batch: int = 2000, gather: float = 0.02, handover: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._deliver = deliver
        self._digest = digest
        self._max_probes = max_probes
        self._batch = batch
        self._gather = gather  # once a file is due, wait this long for others: one commit for a burst
        # ... and a commit at least this often while a round is checked: 256 screenshots of 3 MB took ~1 s to
        # read and hash before the first reached the engine (issue 22.6); ten commits a second cost nothing
        self._handover = handover
        self._clock = clock
        self._wakes_at: float | None = None  # when the settler thread will look next, if it is waiting
        # Keyed by the path's text, not a Path: a burst of 100,000 files holds
        # 100,000 of these, and a str is a fifth of a Path's memory (issue 10.21).
        self._pending: dict[str, _Pending] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._complete = 0  # tracked files known whole (closed or moved in): waiting only for us
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- from any thread
    def note(self, path: str | Path, kind: Kind, settle: float | None = None, data: object = None) -> bool:
        """Record an event for ``path``.

        Args:
            kind: ``changed`` (created or written), ``closed`` (closed after
                writing), ``moved`` (renamed into place, so already whole) or
                ``found`` (seen in a folder walk: like ``changed`` for a new
                path, and no news for a tracked one, whose own events came
                later than the walk and say more).
            settle: the quiet time for a path not yet tracked; None means
                "only if already tracked".
            data: kept with a newly tracked path and handed back in its ``Arrival``.
        Returns:
            whether the path is (now) tracked.
        """
        key = os.fspath(path)
        if settle is None and key not in self._pending:  # a dict lookup is atomic: no lock, no stat
            return False
        now = self._clock()
        changed = kind == "changed" or kind == "found"
        sig = file_signature(key) if changed else None
        with self._cond:
            entry = self._pending.get(key)
            if entry is None:
                if settle is None:
                    return False
                entry = self._pending[key] = _Pending(settle=settle, signature=sig, data=data)
            elif kind == "found":
                return True
            if changed:
                self._set_complete(entry, False)
                entry.signature = sig
                self._schedule(key, entry, now + entry.settle)
            else:
                self._set_complete(entry, True)
                self._schedule(key, entry, now)
            return True

    def _set_complete(self, entry: _Pending, complete: bool) -> None:
        """(lock held) Keep ``_complete`` in step with the entries' flags."""
        if entry.complete != complete:
            self._complete += 1 if complete else -1
            entry.complete = complete

    def _drop(self, key: str) -> _Pending | None:
        """(lock held) Stop tracking ``key``."""
        entry = self._pending.pop(key, None)
        if entry is not None and entry.complete:
            self._complete -= 1
        return entry

    def tracking(self, path: str | Path) -> bool:
        with self._cond:
            return os.fspath(path) in self._pending

    def forget(self, path: str | Path) -> None:
        """The file was deleted or moved away before it was ready: drop it."""
        with self._cond:
            if self._drop(os.fspath(path)) is not None:
                log.debug("%s: gone before it was complete", path)

    def forget_under(self, folder: str | Path) -> None:
        prefix = os.fspath(folder).rstrip(os.sep) + os.sep
        with self._cond:
            for key in [k for k in self._pending if k.startswith(prefix)]:
                self._drop(key)

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def ready_backlog(self) -> int:
        """Files known whole that wait only for the settler's check: how far behind it is.

        Read without the lock (an int read is atomic), so the inotify reader may
        ask per event.  Files waiting out their settle time do not count: their
        close event may be the very one a paused reader would hold back.
        """
        return self._complete

    def _schedule(self, key: str, entry: _Pending, due: float) -> None:
        entry.due = due
        if entry.heap_due is not None and entry.heap_due <= due:
            # An earlier heap entry comes up first and is pushed again for the
            # new time then: each event of a file no longer costs a heap entry.
            return
        entry.heap_due = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key))
        # Wake the settler only if it would otherwise look too late: a burst of
        # events must not cost a thread switch each.
        if self._wakes_at is not None and due < self._wakes_at:
            self._wakes_at = due
            self._cond.notify()

    # -- the settler thread
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vlwatch-settle", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            due = self._wait_for_due()
            if due is None:
                return
            ready: list[Arrival] = []
            since = self._clock()
            for key in due:
                arrival = self._check(key)
                if arrival is not None:
                    ready.append(arrival)
                if ready and self._clock() - since >= self._handover:
                    self._hand_over(ready)
                    ready, since = [], self._clock()
            self._hand_over(ready)

    def _hand_over(self, ready: list[Arrival]) -> None:
        if not ready:
            return
        try:
            self._deliver(ready)
        except Exception:  # a queue error must not stop the watching
            log.exception("could not hand over %d ready files; the rescan will find them", len(ready))

    def _wait_for_due(self) -> list[str] | None:
        with self._cond:
            due: list[str] = []
            gathered = False
            while True:
                if self._stop:
                    return None
                now = self._clock()
                while self._heap and self._heap[0][0] <= now and len(due) < self._batch:
                    when, _, key = heapq.heappop(self._heap)
                    entry = self._pending.get(key)
                    if entry is None or entry.heap_due != when:
                        continue  # gone, or a later heap entry of a rescheduled file
                    entry.heap_due = None
                    if entry.due > when:
                        self._schedule(key, entry, entry.due)  # an event since moved its time on
                    else:
                        due.append(key)
                if due and (gathered or len(due) >= self._batch):
                    self._wakes_at = None
                    return due
                if due:
                    # Gathering: events keep adding due files; none needs a wake-up.
                    gathered, timeout, self._wakes_at = True, self._gather, None
                else:
                    timeout = (self._heap[0][0] - now) if self._heap else None
                    self._wakes_at = now + timeout if timeout is not None else float("inf")
                self._cond.wait(timeout)

    def _check(self, key: str) -> Arrival | None:
        with self._cond:
            entry = self._pending.get(key)
            if entry is None:
                return None
            complete, before, settle = entry.complete, entry.signature, entry.settle
        if not complete:  # ready by settling: first, has it held still?
            sig = file_signature(key)
            if sig is None:
                self.forget(key)
                return None
            if sig != before:
                with self._cond:  # still changing (or changed behind the events' back): wait again
                    if self._pending.get(key) is entry:
                        entry.signature = sig
                        self._schedule(key, entry, self._clock() + settle)
                return None
        seen = look_at(key, self._digest)
        now, sig = self._clock(), seen.signature
        if seen.busy:
            _out_of_descriptors.note(key)
            with self._cond:  # not the file's fault: no probe counted, look again soon
                if self._pending.get(key) is entry:
                    self._schedule(key, entry, now + BUSY_RETRY)
            return None
        if sig is None:
            self.forget(key)
            return None
        path = Path(key)
        if sig[0] > 0 and seen.complete:
            return self._take(key, path, entry, sig, seen.digest)
        with self._cond:
            if self._pending.get(key) is not entry:
                return None
            entry.probes += 1
            if entry.probes >= self._max_probes:
                log.warning("%s: still does not decode after %d checks; queueing it as it is", path, entry.probes)
            else:
                log.info("%s: incomplete (empty or truncated); checking again in %gs", path, settle)
                self._set_complete(entry, False)
                entry.signature = sig
                self._schedule(key, entry, now + settle)
                return None
        return self._take(key, path, entry, sig)

    def _take(self, key: str, path: Path, entry: _Pending, sig: tuple[int, int],
              digest: str | None = None) -> Arrival | None:
        with self._cond:
            if self._pending.get(key) is not entry or entry.due > self._clock():
                return None  # a new event arrived while we checked: it reschedules
            self._drop(key)
        return Arrival(path, sig[0], sig[1], entry.data, digest)
