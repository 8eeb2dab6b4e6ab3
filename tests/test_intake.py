"""Intake: what becomes a job, under which path, and what is never lost (issue 10 items 1-6, 9, 17, 18; 11.3).

Unit tests for the one filter (``ignore_reason``), the completeness probe,
the config's canonical paths and the snapshot; the rest against the real
daemon (``python -m daemon run``) with the stub backend, since what is
tested is intake, not the model.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from PIL import Image

from daemon.config import Snapshot

from daemon.config_reader import load_config
from daemon.intake.readiness import probe_image
from daemon.intake.ignoring import ignore_reason, is_ignored
from daemon.intake.watching import Watcher
from daemon.store.queue import PERMISSION_DENIED, Queue
from tests.conftest import Daemon, png_bytes, put, run_vlwatch, wait_until

RULES = frozenset({"ground", "desc"})


# ------------------------------------------------------------- the filter


@pytest.mark.parametrize("name", [
    "#1 receipt.png", "holiday.describe.overlay.png", "a.png.other.md", "#", "#x", "a\nb.png", "12.png",
    "notes.md",
])
def test_ordinary_names_are_input(tmp_path: Path, name: str) -> None:
    # issue 10.5: '#1 receipt.png' and look-alikes of rules that do not exist are ordinary files
    assert ignore_reason(tmp_path / name, tmp_path, RULES) is None


@pytest.mark.parametrize(("name", "reason"), [
    ("a\nb.png.ground.json", "sidecar of rule 'ground'"),  # issue 10.2: newlines in names
    ("a\nb.png.ground.overlay.png", "overlay of rule 'ground'"),
    ("a\nb.png.ground.json.desc.md", "sidecar of rule 'desc'"),
    ("x\n.png.desc.md", "sidecar of rule 'desc'"),
    (".vlwatch-0a1b2c.tmp", "temporary file"),
    ("~$report.png", "Office lock"),
    ("#scan.png#", "Emacs autosave"),
    (".#scan.png", "Emacs lock"),
    ("4913", "vim"),
    ("4913\n", None),
    ("shot.png.part", "partial download"),
    (".DS_Store", "litter"),
])
def test_ignore_reason_says_why(tmp_path: Path, name: str, reason: str | None) -> None:
    got = ignore_reason(tmp_path / name, tmp_path, RULES)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got
        assert is_ignored(tmp_path / name, tmp_path, RULES)


def test_folders_and_output_dirs_are_named(tmp_path: Path) -> None:
    assert "ignored folder" in (ignore_reason(tmp_path / "@eaDir" / "a.png", tmp_path, RULES) or "")
    out = tmp_path / "out"
    assert "output folder" in (ignore_reason(out / "a.png", tmp_path, RULES, [out]) or "")


# ------------------------------------------------------- completeness probe


def _image(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(out, fmt)
    return out.getvalue()


def test_png_without_iend_and_jpeg_without_eoi_are_incomplete(tmp_path: Path) -> None:
    # issue 10.9: Pillow decodes a PNG cut just before IEND; the probe must not call it complete
    png, jpg = _image("PNG"), _image("JPEG")
    cases = {"cut.png": (png[:-12], False), "whole.png": (png, True), "trailing.png": (png + b"junk", True),
             "cut.jpg": (jpg[:-2], False), "whole.jpg": (jpg, True), "trailing.jpg": (jpg + b"more", True)}
    for name, (data, complete) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert probe_image(tmp_path / name) is complete, name


# ------------------------------------------------------------ config paths


def test_relative_config_gives_canonical_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.1: every path from the config is absolute and normalised, whatever the cwd
    (tmp_path / "in").mkdir()
    (tmp_path / "config.yaml").write_text(
        "model: {backend: stub, name: m}\nstate: ./st/../state.db\n"
        "watch: [{path: ./in/., output_dir: ./in}]\nrules: [{name: desc, task: custom, prompt: x, output: md}]\n")
    monkeypatch.setenv("VLWATCH_PLUGINS", "tests.stub_backend")
    monkeypatch.chdir(tmp_path)
    config = load_config("config.yaml")
    assert config.source == tmp_path / "config.yaml"
    assert config.state == tmp_path / "state.db"
    assert config.watch[0].path == tmp_path / "in"
    # issue 10.4: output_dir equal to the watched folder means "beside the images"
    assert config.watch[0].output_dir is None
    assert not config.warnings


def test_migration_makes_relative_rows_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.1: a state file written by the old daemon under a relative config is mended
    state = tmp_path / "state.db"
    with Queue(state):
        pass
    db = sqlite3.connect(state)
    db.execute("DELETE FROM _migrations WHERE name = 'm004_absolute_paths'")
    db.execute("INSERT INTO jobs (path, rule, hash, size, mtime_ns, state, queued_at) VALUES"
               " ('in/x.png', 'desc', 'h', 1, 1, 'done', 0), (?, 'desc', 'h', 1, 1, 'done', 0)",
               (str(tmp_path / "in" / "y.png"),))
    db.commit()
    db.close()
    monkeypatch.chdir(tmp_path)
    with Queue(state) as q:
        paths = sorted(str(j.path) for j in q.history())
    assert paths == [str(tmp_path / "in" / "x.png"), str(tmp_path / "in" / "y.png")]


# --------------------------------------------------------------- snapshot


def test_an_event_is_judged_by_one_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.17: a reload in the middle of judging an event cannot mix old and new config
    from daemon.intake import arrivals

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    monkeypatch.setenv("VLWATCH_PLUGINS", "tests.stub_backend")

    def config(folder: str, rule: str):
        (tmp_path / f"{folder}.yaml").write_text(
            f"model: {{backend: stub, name: m}}\nstate: ./state.db\nwatch: [{{path: ./{folder}, settle: 0.1s}}]\n"
            f"rules: [{{name: {rule}, task: custom, prompt: x, output: md}}]\n")
        return load_config(tmp_path / f"{folder}.yaml")

    old, new = config("a", "old"), config("b", "new")
    running = [Snapshot.of(old)]  # the daemon's snapshot, which a reload swaps whole
    intake = arrivals.Arrivals(lambda: running[0], wake=lambda: None)
    real = arrivals.is_ignored

    def swap_midway(*args, **kw):  # the reload lands while the observer thread is judging
        running[0] = Snapshot.of(new)
        return real(*args, **kw)

    monkeypatch.setattr(arrivals, "is_ignored", swap_midway)
    accepted = intake.accept(running[0], tmp_path / "a" / "x.png")
    assert accepted is not None and [m.rule.name for m in accepted[1]] == ["old"]


# ------------------------------------------------------------- overflow


def test_overflow_is_noticed_without_any_log_handler(tmp_path: Path) -> None:
    # issue 10.18: the overflow reaches us from watchdog's reader, not from its WARNING line
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

    seen = threading.Event()
    watcher = Watcher(lambda p, k: None, lambda p: None, lambda p: None, on_overflow=seen.set)
    logging.getLogger("watchdog").disabled = True
    try:
        from daemon.config import WatchConfig

        watcher.start([WatchConfig(path=tmp_path)])
        fd = watcher._native._inotify_fd  # type: ignore[union-attr]
        fd.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))
        assert seen.is_set()
    finally:
        logging.getLogger("watchdog").disabled = False
        watcher.stop()


def test_a_scan_asked_for_during_a_scan_runs_again_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.18: an overflow during a rescan is not folded into it: another rescan follows
    from daemon import service

    (tmp_path / "a").mkdir()
    (tmp_path / "c.yaml").write_text("model: {backend: stub, name: m}\nstate: ./state.db\nwatch: [{path: ./a}]\n"
                                     "rules: [{name: r, task: custom, prompt: x, output: md}]\n")
    monkeypatch.setenv("VLWATCH_PLUGINS", "tests.stub_backend")
    daemon = service.Daemon(load_config(tmp_path / "c.yaml"))
    walks: list[str] = []

    def walk(why: str) -> None:
        walks.append(why)
        if len(walks) < 3:
            daemon.catch_up("rescan")  # an overflow arrives while this walk runs

    monkeypatch.setattr(daemon, "_catch_up", walk)
    daemon.catch_up("catch-up")
    assert walks == ["catch-up", "rescan", "rescan"]


# ------------------------------------------------------ the real daemon


def _config(tmp_path: Path, *, watch: str = "[{path: ./in, settle: 0.3s}]", rescan: str = "0s") -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {backend: stub, name: stub-model}\nstate: ./state/state.db\n"
        f"watch: {watch}\n"
        "rules:\n"
        "  - {name: ground, match: ['*'], task: custom, prompt: 'Look at $filename', output: json}\n"
        f"jobs: {{batch_wait: 0.1s, backoff: 0.2s, rescan: {rescan}}}\n")
    return config


def _rows(d: Daemon) -> list[tuple[str, str]]:
    return [(str(j.path), j.state) for j in d.queue.history()]


def test_relative_config_newline_names_hash_names_and_output_dir(tmp_path: Path) -> None:
    # issues 10.1, 10.2, 10.4, 10.5 through the daemon, started as the README starts it: a relative --config
    (tmp_path / "in").mkdir()
    _config(tmp_path, watch="[{path: ./in, settle: 0.3s, output_dir: ./in}]", rescan="1s")
    d = Daemon(tmp_path, "config.yaml", cwd=tmp_path, VLWATCH_PLUGINS="tests.stub_backend")
    try:
        d.start()
        names = ["noise.png", "a\nb.png", "#1 receipt.png", "holiday.describe.overlay.png"]
        for i, name in enumerate(names):
            put(tmp_path / "in" / name, png_bytes(i) if name != "noise.png" else os.urandom(300))
        wait_until(lambda: len(_rows(d)) >= 4 and all(s in ("done", "failed") for _, s in _rows(d)),
                   "a finished job per file", log=d.log)
        for name in names[1:]:
            assert (tmp_path / "in" / f"{name}.ground.json").exists(), name
        # Two more rescans: neither the relative path (10.1) nor a sidecar (10.2) becomes a job.
        runs = d.log_count("rescan:")
        wait_until(lambda: d.log_count("rescan:") >= runs + 2, "two rescans", log=d.log)
        rows = _rows(d)
        assert sorted(p for p, _ in rows) == sorted(str(tmp_path / "in" / n) for n in names), rows
        assert " in/noise.png" not in d.log()
        # explain gives the daemon's answer (10.5)
        out = run_vlwatch("explain", "--config", tmp_path / "config.yaml", tmp_path / "in" / "#1 receipt.png",
                          env={"VLWATCH_PLUGINS": "tests.stub_backend"})
        assert out.returncode == 0 and "rule ground" in out.stdout, out.stdout + out.stderr
        out = run_vlwatch("explain", "--config", tmp_path / "config.yaml", tmp_path / "in" / "a\nb.png.ground.json",
                          env={"VLWATCH_PLUGINS": "tests.stub_backend"})
        assert out.returncode == 1 and "sidecar of rule 'ground'" in out.stdout, out.stdout + out.stderr
        assert d.stop()[0] == 0
    finally:
        d.close()


def test_an_unreadable_file_is_a_failed_job_and_retried_once_readable(tmp_path: Path) -> None:
    # issue 10.3: run without the root's right to read anything (as a normal user runs it)
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    (tmp_path / "in").mkdir()
    _config(tmp_path)
    d = Daemon(tmp_path, tmp_path / "config.yaml", prefix=prefix, VLWATCH_PLUGINS="tests.stub_backend")
    try:
        d.start()
        image = put(tmp_path / "in" / "locked.png", png_bytes(1))
        tmp = tmp_path / "in" / "locked.png"
        tmp.chmod(0)
        job = d.wait_state(image, "failed", "ground")
        assert job.error == PERMISSION_DENIED
        status = run_vlwatch("status", "--config", tmp_path / "config.yaml", env={"VLWATCH_PLUGINS": "tests.stub_backend"})
        assert "permission denied" in status.stdout, status.stdout
        image.chmod(0o644)  # the file changes (its permissions): tried again
        d.wait_done(image, "ground")
        assert d.stop()[0] == 0
    finally:
        d.close()


def test_files_arriving_during_rapid_reloads_all_get_jobs(tmp_path: Path) -> None:
    # issue 10.6: a reload that changes watch: opens no window in which arrivals are missed
    for name in ("in", "other"):
        (tmp_path / name).mkdir()
    config = _config(tmp_path)
    text = config.read_text()
    variants = [text, text.replace("watch: [{path: ./in, settle: 0.3s}]",
                                   "watch: [{path: ./in, settle: 0.3s}, {path: ./other}]")]
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend")
    try:
        d.start()
        files = []
        for i in range(30):
            config.write_text(variants[i % 2])
            d.signal(signal.SIGHUP)  # signals coalesce: one at a time, files arriving meanwhile
            k = 0
            # Files keep arriving while the reload runs (tens of ms here); a
            # slow machine's longer reload gets at most 200, then is waited for.
            while d.log_count("reloaded:") <= i and k < 200:
                files.append(put(tmp_path / "in" / f"f{i:02d}-{k}.png", png_bytes(i * 100 + k)))
                k += 1
            wait_until(lambda: d.log_count("reloaded:") > i, f"reload {i + 1}", 30, log=d.log, interval=0.01)
        missing = lambda: [f.name for f in files if d.latest(f, "ground") is None]  # noqa: E731
        try:
            wait_until(lambda: not missing(), "a job for every file", 60)
        except AssertionError:
            raise AssertionError(f"no job for {missing()} of {len(files)} files\n{d.log()[-6000:]}") from None
        assert d.stop()[0] == 0
    finally:
        d.close()


def test_a_missing_watch_folder_is_watched_the_moment_it_appears(tmp_path: Path) -> None:
    # issue 11.3 (watcher part): no wait for the 10-minute rescan
    _config(tmp_path, watch="[{path: ./later/in, settle: 0.3s}]")
    d = Daemon(tmp_path, tmp_path / "config.yaml", VLWATCH_PLUGINS="tests.stub_backend")
    try:
        d.start()
        early = put(tmp_path / "later" / "in" / "early.png", png_bytes(1))  # mkdir -p and a file at once
        wait_until(lambda: "the watched folder exists now; watching it" in d.log(), "the folder watched", log=d.log)
        late = put(tmp_path / "later" / "in" / "late.png", png_bytes(2))
        d.wait_done(early, "ground")
        d.wait_done(late, "ground")
        assert d.stop()[0] == 0
    finally:
        d.close()


# ------------------------------------------------------------ backpressure


def test_the_inotify_reader_waits_while_the_settler_is_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.21: a burst waits in the kernel's queue, not in our memory, while we are behind
    from daemon.config import WatchConfig

    behind = threading.Event()
    behind.set()
    asked = threading.Event()

    def backlog() -> int:
        asked.set()
        return 10 ** 9 if behind.is_set() else 0

    offers: list[str] = []
    watcher = Watcher(lambda p, k: offers.append(p), lambda p: None, lambda p: None, backlog=backlog)
    watcher.start([WatchConfig(path=tmp_path)])
    try:
        for i in range(20):
            (tmp_path / f"{i}.png").write_bytes(b"x")
        wait_until(asked.is_set, "the reader to ask how far behind we are", 10)
        assert offers == []  # asked before handing on: nothing was read past the limit
        behind.clear()
        wait_until(lambda: len(set(offers)) == 20, "every file once we caught up", 10)
    finally:
        watcher.stop()


def test_the_settlers_ready_count_follows_its_files(tmp_path: Path) -> None:
    from daemon.intake.readiness import Settler

    settler = Settler(lambda batch: None)  # not started: nothing leaves
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for f in (a, b):
        f.write_bytes(b"x")
    settler.note(a, "changed", 1.0)
    settler.note(b, "closed", 1.0)
    assert settler.ready_backlog() == 1
    settler.note(a, "closed")
    settler.note(b, "changed")
    settler.note(b, "moved")
    assert settler.ready_backlog() == 2
    settler.forget(a)
    settler.forget_under(tmp_path)
    assert settler.ready_backlog() == 0 and settler.pending() == 0


def test_the_scan_finds_files_under_a_config_loaded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.6: after a reload back to an equal config, the catch-up found nothing (an identity
    # check against the owner lookup, which is cached per equal watch list)
    from daemon.intake.scanning import find_work

    (tmp_path / "in").mkdir()
    put(tmp_path / "in" / "a.png", png_bytes(1))
    config = _config(tmp_path)
    monkeypatch.setenv("VLWATCH_PLUGINS", "tests.stub_backend")
    with Queue(tmp_path / "state.db") as queue:
        first = [w.match.path.name for w in find_work(load_config(config), queue)]
        again = [w.match.path.name for w in find_work(load_config(config), queue)]
    assert first == again == ["a.png"]


# ------------------------------------------------------------ a burst's cost (issue 10.21)


@pytest.mark.parametrize("n", [30, 200])
def test_a_ready_batch_queues_each_file_once_and_skips_those_that_came_with_their_sidecars(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    # issue 10.21: the batch is hashed from the settler's one read and looked up in the queue together;
    # still one job per file, none twice, none for a file whose fresh sidecar came with it.  A large
    # batch looks for its sidecars on several threads (a missing name in a folder being filled waits
    # for the folder's lock: 140-170 us a lookup, one at a time)
    import threading

    from daemon.intake import arrivals
    from daemon.intake.readiness import Arrival
    from daemon.store.keys import content_hash

    (tmp_path / "in").mkdir()
    monkeypatch.setenv("VLWATCH_PLUGINS", "tests.stub_backend")
    snapshot = Snapshot.of(load_config(_config(tmp_path)))
    woken: list[int] = []
    intake = arrivals.Arrivals(lambda: snapshot, wake=lambda: woken.append(1))  # no engine: only intake
    queue = Queue(tmp_path / "state" / "state.db")
    intake.start(queue)
    looked_from: set[str] = set()
    fresh = arrivals.sidecar_fresh
    monkeypatch.setattr(arrivals, "sidecar_fresh",
                        lambda m, t: looked_from.add(threading.current_thread().name) or fresh(m, t))
    try:
        files = [put(tmp_path / "in" / f"f{i}.png", png_bytes(i)) for i in range(n)]
        for f in files[:5]:  # a processed folder moved in: the sidecars are there and newer
            put(Path(f"{f}.ground.json"), b"{}")

        def arrival(f: Path, digest: str | None) -> Arrival:
            st = f.stat()
            admitted = intake.admit(snapshot, f)
            assert admitted is not None
            return Arrival(f, st.st_size, st.st_mtime_ns, intake.travels(snapshot, admitted[1], admitted[0]), digest)

        # half carry the settler's hash, half are hashed here; one file twice in the batch
        batch = [arrival(f, content_hash(f) if i % 2 else None) for i, f in enumerate(files)] + [arrival(files[7], None)]
        intake.deliver(batch)
        intake.deliver(batch)  # the same files again: nothing new
        jobs = queue.history()
        assert sorted(j.path.name for j in jobs) == sorted(f.name for f in files[5:])
        assert all(j.hash == content_hash(j.path) for j in jobs) and woken
        if n >= arrivals.PARALLEL_LOOKUPS:
            assert looked_from and all(t.startswith("vlwatch-lookup") for t in looked_from)
        else:
            assert looked_from == {threading.current_thread().name}
    finally:
        intake.stop()
        queue.close()


def test_recipes_hash_every_part_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.21: the recipe is rendered with the names its prompt uses and framed once per rule;
    # it must stay the hash of all its parts, or every sidecar would look outdated
    import hashlib
    import json
    import string

    from daemon.intake.recipes import VERSION, recipe_of
    from daemon.intake.rules import match_file, neutralise
    from daemon.intake.scanning import Recipes

    def reference(config, match) -> str:  # type: ignore[no-untyped-def]
        rule, model, path = match.rule, config.model, match.path
        values = {"filename": path.name, "stem": path.stem, "suffix": path.suffix.lstrip("."),
                  "folder": path.parent.name, "path": str(path), "rule": rule.name, "objects": rule.objects}
        prompt = string.Template(rule.prompt).safe_substitute({k: neutralise(v) for k, v in values.items()}).strip()
        parts = {"model": model.name, "task": rule.task, "output": rule.output, "prompt": prompt,
                 "min_pixels": rule.min_pixels or model.min_pixels, "max_pixels": rule.max_pixels or model.max_pixels,
                 "max_new_tokens": rule.max_new_tokens or model.max_new_tokens, "pages": rule.pages,
                 "csp": rule.csp if rule.task == "code" else None}
        text = json.dumps(parts, sort_keys=True, default=str).encode("utf-8", "surrogatepass")
        return f"{VERSION}:{hashlib.blake2b(text, digest_size=8).hexdigest()}"

    (tmp_path / "in").mkdir()
    (tmp_path / "c.yaml").write_text(
        "model: {backend: stub, name: m}\nstate: ./s.db\nwatch: [{path: ./in}]\ninclude: [describe]\nrules:\n"
        "  - {name: every, match: ['*'], task: custom, output: md,\n"
        "     prompt: 'all: $filename ${stem} $suffix $folder $path $rule $objects $$5 \"quoted\" \\u00fc'}\n"
        "  - {name: plain, match: ['*'], task: custom, output: json, prompt: 'Describe $rule.'}\n")
    monkeypatch.setenv("VLWATCH_PLUGINS", "tests.stub_backend")
    config = load_config(tmp_path / "c.yaml")
    recipes = Recipes(config)
    names = ["a.png", "we<|im_end|>ird\udcff.png", "b\u00e9 \"q\".jpg", "a.b.c.tiff"]
    matches = [m for name in names for rule in ("every", "plain", "describe")
               for m in match_file(config, tmp_path / "in" / name, rule)]
    assert {m.rule.name for m in matches} == {"every", "plain", "describe"}
    for m in matches:
        assert recipe_of(config, m) == recipes(m) == reference(config, m), (m.path.name, m.rule.name)


def test_a_burst_is_logged_in_one_line_per_batch(caplog: pytest.LogCaptureFixture) -> None:
    # issue 10.21: a line per file for a few files; one line for a large batch, each file at DEBUG
    from daemon.intake.arrivals import LOG_EACH, log_queued
    from daemon.store.queue import Queued

    few = [Queued(i, Path(f"/in/f{i}.png"), "describe", "h") for i in range(3)]
    many = [Queued(i, Path(f"/in/g{i}.png"), "describe", "h") for i in range(LOG_EACH + 40)]
    with caplog.at_level(logging.INFO, logger="daemon.intake.arrivals"):
        log_queued(few)
        log_queued(many)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"/in/f{i}.png: queued for describe" for i in range(3)]
    assert lines[3:] == [f"queued {LOG_EACH + 40} jobs for describe in /in (g0.png ... g{LOG_EACH + 39}.png; "
                         "each at DEBUG)"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="daemon.intake.arrivals"):
        log_queued(many)
    assert len(caplog.records) == len(many) + 1
