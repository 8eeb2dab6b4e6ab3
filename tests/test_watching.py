"""Watching: the filter, readiness (the settler) and the real observers.

The settler and observers run on real files in tmp_path with short settle
times; nothing here loads a model.  Every wait has a deadline.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from daemon.config import WatchConfig
from daemon.intake.readiness import Arrival, Settler
from daemon.intake.ignoring import is_ignored
from daemon.intake.watching import Watcher, walk_files
from tests.conftest import wait_until

RULES = frozenset({"describe", "ground"})


def png_bytes(seed: int = 0, size: tuple[int, int] = (96, 64)) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    wait_until(predicate, what, timeout, interval=0.02)


# ---------------------------------------------------------------------- filter


@pytest.mark.parametrize("name", [
    ".hidden.png", "shot.png.part", "shot.png.crdownload", "shot.png.download", "shot.png.tmp", "shot.TMP",
    "~$report.png", ".~lock.scan.png#", "#scan.png#", ".#scan.png", "scan.png~", "scan.png.swp", "4913",
    ".DS_Store", "Thumbs.db", "desktop.ini",
    # our own outputs: sidecars, overlays, temporary files
    "shot.png.describe.md", "shot.png.ground.json", "shot.png.ground.overlay.png", ".vlwatch-0a1b2c3d4e5f.tmp",
])
def test_ignored_names(tmp_path: Path, name: str) -> None:
    assert is_ignored(tmp_path / name, tmp_path, RULES)


@pytest.mark.parametrize("name", ["shot.png", "Scan 0001.TIF", "photo.jpeg", "a.b.c.png", "notes.md", "2024.png",
                                  "shot.png.other.md"])
def test_input_names(tmp_path: Path, name: str) -> None:
    assert not is_ignored(tmp_path / name, tmp_path, RULES)


@pytest.mark.parametrize("folder", ["@eaDir", ".git", ".stfolder", "#recycle", ".hidden", "$RECYCLE.BIN"])
def test_ignored_folders(tmp_path: Path, folder: str) -> None:
    assert is_ignored(tmp_path / folder / "sub" / "shot.png", tmp_path, RULES)
    assert not is_ignored(tmp_path / "ok" / "shot.png", tmp_path, RULES)


def test_output_dir_inside_the_watch_is_ignored(tmp_path: Path) -> None:
    out = tmp_path / "sidecars"
    assert is_ignored(out / "a" / "shot.png", tmp_path, RULES, [out])
    assert not is_ignored(tmp_path / "a" / "shot.png", tmp_path, RULES, [out])


def test_walk_skips_ignored_folders_and_respects_recursive(tmp_path: Path) -> None:
    for rel in ["a.png", "sub/b.png", ".git/c.png", "@eaDir/d.png", "sub/deeper/e.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path, recursive=True)]
    assert found == ["a.png", "sub/b.png", "sub/deeper/e.png"]
    assert [p.name for p in walk_files(tmp_path, recursive=False)] == ["a.png"]


# ------------------------------------------------------------------- readiness


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[Arrival]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: list[Arrival]) -> None:
        with self.lock:
            self.batches.append(batch)

    @property
    def paths(self) -> list[Path]:
        with self.lock:
            return [a.path for b in self.batches for a in b]


@pytest.fixture
def settler():
    got = Collector()
    s = Settler(got)
    s.start()
    yield s, got
    s.stop()
    assert not s.alive


def test_a_closed_file_is_ready_at_once(settler, tmp_path: Path) -> None:
    s, got = settler
    f = tmp_path / "a.png"
    f.write_bytes(png_bytes())
    start = time.monotonic()
    s.note(f, "changed", settle=5.0)
    s.note(f, "closed")
    wait_for(lambda: got.paths == [f], 3, "the closed file")
    assert time.monotonic() - start < 2.0
    [arrival] = got.batches[0]
    assert arrival.size == f.stat().st_size and arrival.mtime_ns == f.stat().st_mtime_ns


def test_an_unclosed_file_waits_for_settle(settler, tmp_path: Path) -> None:
    s, got = settler
    f = tmp_path / "a.png"
    f.write_bytes(png_bytes())
    start = time.monotonic()
    s.note(f, "changed", settle=0.6)
    wait_for(lambda: got.paths == [f], 5, "the settled file")
    assert time.monotonic() - start >= 0.6


def test_a_file_still_growing_is_rechecked_not_dropped(tmp_path: Path) -> None:
    """A slow copy with no events between writes (as on a network mount) is
    re-checked until size and mtime hold still, then handed over once, whole.

    Whatever the machine's load (issue 27: this once raced a 0.15 s sleep
    against the 0.3 s settle): a pause longer than the settle only makes the
    settler find a truncated PNG, which it checks again, never hands over
    (``max_probes`` is out of reach here).  The pauses pace the copy; no
    assertion depends on their length.
    """
    got = Collector()
    s = Settler(got, max_probes=10_000)
    s.start()
    try:
        f = tmp_path / "slow.png"
        data = png_bytes(1, (400, 300))
        chunks = [data[i:i + len(data) // 6 + 1] for i in range(0, len(data), len(data) // 6 + 1)]
        with open(f, "wb") as out:
            out.write(chunks[0])
            out.flush()
            s.note(f, "changed", settle=0.3)
            for chunk in chunks[1:]:
                time.sleep(0.15)  # pacing a slow copy (see the docstring)
                out.write(chunk)
                out.flush()
                assert got.paths == []
        wait_for(lambda: got.paths == [f], 5, "the complete file")
        assert len(got.batches) == 1 and got.batches[0][0].size == len(data)
    finally:
        s.stop()


def test_a_file_is_not_dropped_while_the_process_is_out_of_descriptors(tmp_path: Path, caplog) -> None:
    """issue 27: a socket flood used every descriptor, and a file arriving then was
    logged "gone before it was complete" and never queued."""
    import errno
    import logging

    got = Collector()
    s = Settler(got)
    s.start()
    held: list[int] = []
    f = tmp_path / "during.png"
    f.write_bytes(png_bytes())
    try:
        with caplog.at_level(logging.WARNING, logger="daemon.intake.readiness"):
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
            s.note(f, "closed", settle=0.3)
            wait_for(lambda: "out of file descriptors" in caplog.text or not s.tracking(f), 5,
                     "the settler to look at the file")
            assert s.tracking(f), "dropped while the process was out of descriptors"
            for fd in held:
                os.close(fd)
            held = []
            wait_for(lambda: got.paths == [f], 5, "the file once descriptors are free")
    finally:
        for fd in held:
            os.close(fd)
        s.stop()


def test_a_truncated_image_is_checked_again_after_settling(settler, tmp_path: Path) -> None:
    """Closed is not always complete: a copier that closes between chunks
    (OCRmyPDF #552) leaves a truncated image, which must wait, not be queued."""
    s, got = settler
    f = tmp_path / "a.png"
    data = png_bytes(2, (200, 150))
    f.write_bytes(data[: len(data) // 2])
    s.note(f, "closed", settle=0.3)
    # A negative, decided by the settler's own progress rather than a sleep:
    # once it has probed the file and found it truncated, nothing was handed over.
    wait_for(lambda: (e := s._pending.get(str(f))) is not None and e.probes >= 1, 5, "the first probe")
    assert got.paths == [] and s.tracking(f)
    with open(f, "ab") as out:
        out.write(data[len(data) // 2:])
    s.note(f, "closed")
    wait_for(lambda: got.paths == [f], 5, "the completed file")


def test_a_file_that_never_decodes_is_handed_over_after_a_few_checks(tmp_path: Path) -> None:
    got = Collector()
    s = Settler(got, max_probes=2)
    s.start()
    try:
        f = tmp_path / "broken.png"
        f.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
        s.note(f, "closed", settle=0.2)
        wait_for(lambda: got.paths == [f], 5, "the broken file")  # the worker will say why it fails
    finally:
        s.stop()


def test_a_file_deleted_before_it_settles_is_dropped(settler, tmp_path: Path) -> None:
    s, got = settler
    f = tmp_path / "gone.png"
    f.write_bytes(png_bytes())
    s.note(f, "changed", settle=0.3)
    f.unlink()
    wait_for(lambda: s.pending() == 0, 5, "the deleted file to be dropped")
    assert got.paths == []


def test_forget_drops_a_file_moved_away(settler, tmp_path: Path) -> None:
    s, got = settler
    f = tmp_path / "moved.png"
    f.write_bytes(png_bytes())
    s.note(f, "changed", settle=0.3)
    s.forget(f)
    assert s.pending() == 0
    # A negative: once the settler has passed the time the file was due, nothing came.
    wait_for(lambda: not s._heap, 5, "the settler to pass the file's due time")
    assert got.paths == []


def test_note_without_settle_only_updates_tracked_files(settler, tmp_path: Path) -> None:
    s, _ = settler
    assert not s.note(tmp_path / "x.png", "changed")
    assert s.note(tmp_path / "x.png", "changed", settle=10)
    assert s.note(tmp_path / "x.png", "changed")


def _moved_in(s: Settler, folder: Path, count: int) -> list[Path]:
    """``count`` PNGs written in ``folder`` and noted as moved in whole (a scanner's or ``mv``'s burst)."""
    data = png_bytes()
    files = [folder / f"{i}.png" for i in range(count)]
    for f in files:
        f.write_bytes(data)
    for f in files:
        s.note(f, "moved", settle=1.0)
    return files


def test_many_ready_files_leave_in_few_batches(settler, tmp_path: Path) -> None:
    s, got = settler
    files = _moved_in(s, tmp_path, 300)
    wait_for(lambda: len(got.paths) == 300, 10, "300 files")
    assert len(got.batches) <= 10
    assert sorted(got.paths) == sorted(files)


def test_a_bursts_first_files_are_handed_over_while_the_rest_are_still_read(tmp_path: Path) -> None:
    # issue 22.6: 256 screenshots of 3 MB were all read and hashed before the first reached the queue (~1 s
    # of the engine's time at the start of a burst).  A slow digest stands in for hashing big files.
    hashed: list[int] = []
    at_handover: list[int] = []

    def digest(data: bytes) -> str:
        time.sleep(0.02)
        hashed.append(len(data))
        return str(len(hashed))

    def got(batch: list[Arrival]) -> None:
        at_handover.append(len(hashed))

    s = Settler(got, digest=digest, handover=0.05)
    _moved_in(s, tmp_path, 20)
    s.start()
    try:
        wait_for(lambda: len(hashed) == 20 and at_handover and at_handover[-1] == 20, 10, "20 files")
    finally:
        s.stop()
    assert at_handover[0] < 20 and len(at_handover) <= 10, at_handover  # the first went early, still in few batches


# ------------------------------------------------------------------- observers


class Events:
    def __init__(self) -> None:
        self.offers: list[tuple[Path, str]] = []
        self.forgotten: list[Path] = []
        self.lock = threading.Lock()

    def offer(self, path: str, kind: str) -> None:
        with self.lock:
            self.offers.append((Path(path), kind))

    def forget(self, path: str) -> None:
        with self.lock:
            self.forgotten.append(Path(path))

    def kinds(self, path: Path) -> set[str]:
        with self.lock:
            return {k for p, k in self.offers if p == path}


@pytest.fixture(params=["inotify", "polling"])
def watched(request: pytest.FixtureRequest, tmp_path: Path):
    root = tmp_path / "inbox"
    root.mkdir()
    events = Events()
    before = set(threading.enumerate())
    watcher = Watcher(events.offer, events.forget, lambda folder: None)
    watcher.start([WatchConfig(path=root, polling=request.param == "polling", settle=0.5)])
    yield root, events, request.param
    watcher.stop()
    # The observers are daemon threads, which the conftest check skips: stop must still end them.
    leaked = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not leaked, f"observer threads still running after stop: {leaked}"


def test_observer_sees_create_rename_subfolder_and_delete(watched, tmp_path: Path) -> None:
    root, events, mode = watched
    created = root / "new.png"
    created.write_bytes(png_bytes())
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(1))
    renamed = root / "renamed.png"
    os.rename(outside, renamed)
    (root / "a" / "b").mkdir(parents=True)
    deep = root / "a" / "b" / "deep.png"
    deep.write_bytes(png_bytes(2))
    wait_for(lambda: events.kinds(created) and events.kinds(renamed) and events.kinds(deep), 10, "all three files")
    if mode == "inotify":
        assert "closed" in events.kinds(created)  # readiness from IN_CLOSE_WRITE, no settle wait
        assert "moved" in events.kinds(renamed)  # renamed in whole: no settle wait either
    created.unlink()
    wait_for(lambda: created in events.forgotten, 10, "the deletion")


def test_temp_then_rename_inside_the_folder(watched) -> None:
    root, events, mode = watched
    part = root / "download.png.part"
    part.write_bytes(png_bytes())
    final = root / "download.png"
    os.rename(part, final)
    wait_for(lambda: events.kinds(final), 10, "the renamed file")
    if mode == "inotify":
        assert "moved" in events.kinds(final)
        wait_for(lambda: part in events.forgotten, 5, "the temp name to be forgotten")


def test_missing_folder_is_watched_once_it_appears(tmp_path: Path) -> None:
    root = tmp_path / "later"
    events = Events()
    watcher = Watcher(events.offer, events.forget, lambda folder: None)
    watcher.start([WatchConfig(path=root, settle=0.5)])
    try:
        assert watcher.roots == []
        root.mkdir()
        assert watcher.ensure() == [root]
        (root / "x.png").write_bytes(png_bytes())
        wait_for(lambda: events.kinds(root / "x.png"), 10, "an event in the new folder")
    finally:
        watcher.stop()


# ------------------------------------------------- the reader hands events on (issue 10.21)


class Trace:
    """Every offer and forget in one list, in the order they came, with the thread that made them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path, str, threading.Thread]] = []
        self.lock = threading.Lock()

    def offer(self, path: str, kind: str) -> None:
        with self.lock:
            self.calls.append(("offer", Path(path), kind, threading.current_thread()))

    def forget(self, path: str) -> None:
        with self.lock:
            self.calls.append(("forget", Path(path), "", threading.current_thread()))

    def forget_under(self, path: str) -> None:
        with self.lock:
            self.calls.append(("forget_under", Path(path), "", threading.current_thread()))

    def of(self, path: Path) -> list[tuple[str, str]]:
        with self.lock:
            return [(op, kind) for op, p, kind, _ in self.calls if p == path]

    def index(self, op: str, path: Path, kind: str = "") -> int:
        with self.lock:
            return max((i for i, (o, p, k, _) in enumerate(self.calls) if o == op and p == path and k == kind),
                       default=-1)


def test_file_events_come_from_the_inotify_reader_in_the_kernels_order(tmp_path: Path) -> None:
    # issue 10.21: file events skip watchdog's two extra threads; folder events still go its way.
    # Order must hold across both: a folder moved away and made again at once keeps its new files.
    root = tmp_path / "inbox"
    (root / "d").mkdir(parents=True)
    trace = Trace()
    watcher = Watcher(trace.offer, trace.forget, trace.forget_under)
    watcher.start([WatchConfig(path=root, settle=0.5)])
    try:
        native = watcher._native
        assert native is not None and native.direct  # type: ignore[attr-defined]
        a = root / "a.png"
        a.write_bytes(png_bytes())
        wait_for(lambda: ("offer", "closed") in trace.of(a), 10, "a.png closed")
        assert all(t is native._inotify_fd for op, p, k, t in trace.calls if p == a)  # type: ignore[attr-defined]
        a.unlink()
        a.write_bytes(png_bytes(1))  # gone and back at once: the last word is the new file's
        (root / "d" / "x.png").write_bytes(png_bytes(2))
        wait_for(lambda: ("offer", "closed") in trace.of(root / "d" / "x.png"), 10, "d/x.png")
        os.rename(root / "d", tmp_path / "away")  # out of the tree: watchdog holds such a move 0.5 s
        (root / "d").mkdir()
        y = root / "d" / "y.png"
        y.write_bytes(png_bytes(3))
        # "closed" from its own events, or "found" when it was written before the new folder's watch
        # was in place and watchdog's walk of that folder reports it
        wait_for(lambda: trace.of(y), 10, "d/y.png")
        time.sleep(1.0)  # a late forget of d/ from watchdog's queue would have come by now
        assert trace.of(a)[-1] == ("offer", "closed")
        assert 0 <= trace.index("forget_under", root / "d") < min(trace.index("offer", y, k) for k in ("closed", "found")
                                                                   if trace.index("offer", y, k) >= 0)
        (root / "f").mkdir()
        (root / "f" / "z.png").write_bytes(png_bytes(4))
        wait_for(lambda: trace.of(root / "f" / "z.png"), 10, "f/z.png")
        os.rename(root / "f", root / "e")  # within the tree: its files are offered under their new names
        wait_for(lambda: ("offer", "moved") in trace.of(root / "e" / "z.png"), 10, "z.png under its new folder")
    finally:
        watcher.stop()


def test_a_files_create_and_modify_are_dropped_when_its_close_follows_in_the_same_read() -> None:
    # issue 10.21: in a burst each file's three events cost one offer
    from watchdog.observers.inotify_c import InotifyConstants as C
    from watchdog.observers.inotify_c import InotifyEvent

    from daemon.intake.watching import _superseded_dropped

    def ev(mask: int, name: bytes, wd: int = 1) -> InotifyEvent:
        return InotifyEvent(wd, mask, 0, name)

    burst = [ev(C.IN_CREATE, b"a"), ev(C.IN_CREATE, b"b"), ev(C.IN_MODIFY, b"a"), ev(C.IN_CLOSE_WRITE, b"a"),
             ev(C.IN_MODIFY, b"b"), ev(C.IN_CREATE | C.IN_ISDIR, b"d"), ev(C.IN_MODIFY, b"d"),
             ev(C.IN_CREATE, b"c"), ev(C.IN_DELETE, b"c"), ev(C.IN_CREATE, b"c"), ev(C.IN_CLOSE_WRITE, b"c"),
             ev(C.IN_CREATE, b"a", wd=2)]
    kept = [(e.mask, e.name, e.wd) for e in _superseded_dropped(burst)]
    assert kept == [(C.IN_CLOSE_WRITE, b"a", 1), (C.IN_MODIFY, b"b", 1),
                    (C.IN_CREATE | C.IN_ISDIR, b"d", 1), (C.IN_MODIFY, b"d", 1), (C.IN_CREATE, b"c", 1),
                    (C.IN_DELETE, b"c", 1), (C.IN_CLOSE_WRITE, b"c", 1), (C.IN_CREATE, b"a", 2)]


def test_one_look_gives_size_completeness_and_the_hash_of_the_bytes_checked(tmp_path: Path) -> None:
    # issue 10.21: the settler reads a small ready file once; the queue uses that hash
    from daemon.intake.readiness import look_at
    from daemon.store.keys import bytes_hash, content_hash

    whole, cut = tmp_path / "whole.png", tmp_path / "cut.png"
    whole.write_bytes(png_bytes())
    cut.write_bytes(png_bytes()[:-12])
    seen = look_at(str(whole), bytes_hash)
    assert seen.complete and seen.digest == content_hash(whole)
    assert seen.signature == (whole.stat().st_size, whole.stat().st_mtime_ns)
    assert look_at(str(cut), bytes_hash) == type(seen)((cut.stat().st_size, cut.stat().st_mtime_ns), False, None)
    assert look_at(str(tmp_path / "gone.png")).signature is None
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert look_at(str(fifo)).signature is None  # not opened for reading, which would wait for a writer


def test_a_found_file_that_is_tracked_keeps_what_its_own_events_said(settler, tmp_path: Path) -> None:
    # issue 10.21: watchdog's walk of a new folder reports files whose own events came first
    s, got = settler
    f = tmp_path / "a.png"
    f.write_bytes(png_bytes())
    s.note(f, "closed", settle=5.0)
    s.note(f, "found")  # must not reset it to "still being written" (a 5 s wait)
    wait_for(lambda: got.paths == [f], 3, "the closed file")


def _inotify_fds() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}") and "inotify" in os.readlink(f"/proc/self/fd/{fd}"))


def test_stop_after_a_watched_folder_was_moved_out_recreated_and_renamed(tmp_path: Path) -> None:
    # A watched subfolder moved out, a new one made under the same name and then renamed: watchdog's bookkeeping
    # loses the folder's path, and its stop raised KeyError halfway. Watcher.stop() (a reload that changes
    # `watch:`, the daemon's shutdown) then failed, and the inotify descriptor and reader thread leaked.
    root, away = tmp_path / "inbox", tmp_path / "away"
    (root / "sub").mkdir(parents=True)
    away.mkdir()
    events = Events()
    fds, before = _inotify_fds(), set(threading.enumerate())
    watcher = Watcher(events.offer, events.forget, lambda folder: None)
    watcher.start([WatchConfig(path=root)])
    os.rename(root / "sub", away / "sub")
    (root / "sub").mkdir()
    probe = root / "sub" / "probe.png"
    probe.write_bytes(png_bytes(3))
    wait_for(lambda: events.kinds(probe), 10, "the new folder to be watched")
    os.rename(root / "sub", root / "renamed")
    moved = root / "renamed" / "probe.png"
    (root / "renamed" / "late.png").write_bytes(png_bytes(4))
    wait_for(lambda: events.kinds(root / "renamed" / "late.png"), 10, "the renamed folder's file")
    watcher.stop()
    assert moved.exists()
    assert _inotify_fds() == fds, "the inotify descriptor was left open"
    leaked = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not leaked, f"observer threads still running after stop: {leaked}"
