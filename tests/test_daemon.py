"""The real daemon, ``python -m daemon run``, as a subprocess on the tiny checkpoint.

Files are dropped into temp folders the way people and programs drop them
(write, rename into place, sub-folders, slow chunked copies) and every wait
is a deadline loop on the state database or the log, never a fixed sleep.
"Exactly one complete sidecar" is checked against the content hash the queue
recorded for the job that wrote it.

The daemon talks to a notify socket of the test's own, as it would to
systemd: READY=1 says when files may be dropped, and STATUS=/STOPPING=1 are
checked on the way.  One daemon per watching mode serves all arrival tests
(starting one costs the model load); the restart tests start their own.
Only the fault test uses a stub backend, to make the model fail on demand.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from daemon.store.keys import content_hash
from daemon.store.queue import Queue
from tests.conftest import (  # noqa: F401
    DEADLINE,
    REPO,
    Daemon,
    daemon_env,
    png_bytes,
    put,
    run_vlwatch,
    wait_until,
)

# --------------------------------------------------------------------- helpers

PLUGINS = "VLWATCH_PLUGINS"


def config_text(model: Path | str, *, polling: bool = False, extra_rules: str = "", model_extra: str = "",
                jobs: str = "{batch_wait: 0.2s, backoff: 1s}", settle: str = "1s") -> str:
    return f"""\
model:
  name: {model}
  device: cpu
  max_new_tokens: 8
  max_pixels: 50000
{model_extra}state: ./state/state.db
include: [describe]
watch:
  - path: ./inbox
    settle: {settle}
    polling: {str(polling).lower()}
rules:
  - name: boxes
    match: ["boxes/*.png"]
    task: ground
{extra_rules}jobs: {jobs}
"""


def sidecar_names(image: Path) -> list[str]:
    return sorted(p.name for p in image.parent.iterdir() if p.name.startswith(image.name + "."))


def assert_one_complete_sidecar(d: Daemon, image: Path, rule: str = "describe", *, rewritten: bool = False) -> None:
    """Exactly the sidecars of one rule, complete, from the file's final bytes, made once.

    Unless ``rewritten`` (the test gave the file new bytes on purpose), no job
    may have run on any other bytes: that would be a partial file processed.
    """
    if rule == "boxes":
        doc = json.loads((image.parent / f"{image.name}.boxes.json").read_text())
        assert doc["source"] == image.name and isinstance(doc["boxes"], list)
        # issue 11.10: an overlay only when there are boxes to draw
        overlay = [f"{image.name}.boxes.overlay.png"] if doc["boxes"] else []
        assert sidecar_names(image) == [f"{image.name}.boxes.json", *overlay]
        if overlay:
            with Image.open(image.parent / overlay[0]) as drawn:
                drawn.load()
    else:
        assert sidecar_names(image) == [f"{image.name}.{rule}.md"]
        (image.parent / f"{image.name}.{rule}.md").read_text(encoding="utf-8")
    final = content_hash(image)
    done = [j for j in d.queue.history(image.absolute()) if j.rule == rule and j.state == "done"]
    assert done and done[-1].hash == final, "the sidecar was not made from the file's final bytes"
    assert [j.hash for j in done].count(final) == 1, f"{image.name} was processed twice"
    if not rewritten:
        assert all(j.hash == final for j in done), f"{image.name} was processed before it was complete"


# --------------------------------------------------------------- arrival tests


@dataclass
class Watched:
    root: Path
    inbox: Path
    config: Path
    daemon: Daemon
    mode: str
    model: Path


@pytest.fixture(scope="module", params=["inotify", "polling"])
def watched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """One running daemon per watching mode, shared by the arrival tests."""
    mode = request.param
    root = tmp_path_factory.mktemp(f"watch-{mode}")
    inbox = root / "inbox"
    inbox.mkdir()
    config = root / "config.yaml"
    config.write_text(config_text(tiny_model, polling=mode == "polling"))
    d = Daemon(root, config).start()
    yield Watched(root, inbox, config, d, mode, tiny_model)
    try:
        rc, took = d.stop()
        assert rc == 0, d.log()[-3000:]
        assert took < 15
        assert d.notified("STOPPING=1") and d.notified("STATUS=")
        assert d.notified("WATCHDOG=1")
    finally:
        d.close()


def test_created_file_gets_one_sidecar(watched: Watched) -> None:
    image = put(watched.inbox / "created.png", png_bytes(1))
    # A name that is not UTF-8 (Latin-1 bytes, as an old NAS or a Windows share writes them).
    latin1 = put(watched.inbox / os.fsdecode(b"caf\xe9 re\xe7u.png"), png_bytes(14))
    for path in (image, latin1):
        watched.daemon.wait_done(path)
        assert_one_complete_sidecar(watched.daemon, path)


def test_renamed_into_the_folder(watched: Watched) -> None:
    outside = put(watched.root / "outside" / "moved.png", png_bytes(2))
    moved = watched.inbox / "moved.png"
    os.rename(outside, moved)  # mv from elsewhere on the same disk
    part = put(watched.inbox / "download.png.crdownload", png_bytes(3))
    download = watched.inbox / "download.png"
    os.rename(part, download)  # a browser's temp-then-rename
    for image in (moved, download):
        watched.daemon.wait_done(image)
        assert_one_complete_sidecar(watched.daemon, image)
    assert watched.daemon.latest(part) is None


def test_sub_folders_and_a_folder_moved_in(watched: Watched) -> None:
    deep = put(watched.inbox / "a" / "b" / "deep.png", png_bytes(4))
    album = watched.root / "outside" / "album"
    put(album / "one.png", png_bytes(5))
    put(album / "two" / "two.png", png_bytes(6))
    os.rename(album, watched.inbox / "album")
    images = [deep, watched.inbox / "album" / "one.png", watched.inbox / "album" / "two" / "two.png"]
    for image in images:
        watched.daemon.wait_done(image)
        assert_one_complete_sidecar(watched.daemon, image)
    # A processed folder renamed: its files arrive with their sidecars, and are not redone.
    os.rename(watched.inbox / "a", watched.inbox / "renamed")
    sentinel = put(watched.inbox / "after-rename.png", png_bytes(13))
    watched.daemon.wait_done(sentinel)
    assert watched.daemon.latest(watched.inbox / "renamed" / "b" / "deep.png") is None
    assert sidecar_names(watched.inbox / "renamed" / "b" / "deep.png") == ["deep.png.describe.md"]


def _write_slowly(path: Path, data: bytes, chunks: int, pause: float, reopen: bool) -> None:
    size = -(-len(data) // chunks)
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    if reopen:  # a copier that opens, appends and closes per chunk: every chunk is a close-after-write
        for part in parts:
            with open(path, "ab") as f:
                f.write(part)
            time.sleep(pause)
    else:  # one handle, flushed per chunk, as a scanner or a network copy writes
        with open(path, "wb") as f:
            for part in parts:
                f.write(part)
                f.flush()
                os.fsync(f.fileno())
                time.sleep(pause)


def test_slow_chunked_writes_are_processed_once_complete(watched: Watched) -> None:
    """Each file takes ~3s to arrive, in pieces; only the complete bytes may be processed."""
    one_handle = watched.inbox / "scanner.png"
    reopened = watched.inbox / "copier.png"
    writers = [
        threading.Thread(target=_write_slowly, args=(one_handle, png_bytes(7, (320, 240)), 8, 0.4, False)),
        threading.Thread(target=_write_slowly, args=(reopened, png_bytes(8, (320, 240)), 8, 0.4, True)),
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    for image in (one_handle, reopened):
        watched.daemon.wait_done(image)
        assert_one_complete_sidecar(watched.daemon, image)


#: Never input: hidden, temporary, partial, litter, and things that look like our outputs.
JUNK = [
    ".hidden.png", "draft.png.part", "get.png.crdownload", "~$report.png", "shot.png.tmp", "edit.png.swp",
    ".DS_Store", "Thumbs.db", "@eaDir/thumb.png", ".git/objects.png", ".hidden-folder/inside.png",
    "fake.png.describe.md", "fake.png.boxes.json", "fake.png.boxes.overlay.png", ".vlwatch-0123456789ab.tmp",
]


def test_outputs_overlays_hidden_and_temp_files_never_become_jobs(watched: Watched) -> None:
    d, inbox = watched.daemon, watched.inbox
    for i, name in enumerate(JUNK):
        put(inbox / name, png_bytes(100 + i))
    # A ground rule writes a JSON sidecar AND an overlay PNG, in a folder whose
    # rule matches *.png: the overlay must not come back as input.
    box = put(inbox / "boxes" / "box.png", png_bytes(9))
    d.wait_done(box, "boxes")
    # Events are handled in order: once a file dropped after all of the above
    # is done, every earlier event (the overlay's included) has been judged.
    sentinel = put(inbox / "boxes" / "sentinel.png", png_bytes(10))
    d.wait_done(sentinel, "boxes")
    assert_one_complete_sidecar(d, box, "boxes")
    jobs = {j.path for j in d.queue.history()}
    assert not jobs & {(inbox / n).absolute() for n in JUNK}
    assert not [p for p in jobs if ".boxes." in p.name or ".describe." in p.name or p.name.startswith(".")]
    # No sidecar of a sidecar, anywhere.
    assert not [p for p in inbox.rglob("*") if p.name.count(".boxes.") + p.name.count(".describe.") > 1]
    # The catch-up scan applies the same filter: it finds nothing to do either.
    listed = run_vlwatch("scan", "--dry-run", "--config", watched.config, env=d.env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == ""


def test_sighup_applies_a_new_rule_and_rejects_a_broken_config(watched: Watched) -> None:
    d, inbox = watched.daemon, watched.inbox
    good = config_text(watched.model, polling=watched.mode == "polling",
                       extra_rules='  - name: late\n    match: ["late/*.png"]\n    task: describe\n')
    reloads = d.log_count("reloaded")
    watched.config.write_text(good)
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log_count("reloaded") > reloads, "the reload", log=d.log)
    late = put(inbox / "late" / "first.png", png_bytes(11))
    d.wait_done(late, "late")
    assert_one_complete_sidecar(d, late, "late")

    broken = good.replace("settle: 1s", "settle: soon")
    watched.config.write_text(broken)
    d.signal(signal.SIGHUP)
    # The problem lines are records of their own, after the "rejected" one: wait for them too.
    wait_until(lambda: "reload rejected" in d.log() and "settle: expected a duration" in d.log(), "the rejection",
               log=d.log)
    assert "config.yaml:" in d.log()
    after = put(inbox / "late" / "after.png", png_bytes(12))
    d.wait_done(after, "late")  # still running, with the last good config
    assert d.proc is not None and d.proc.poll() is None
    watched.config.write_text(good)


# --------------------------------------------------------------- restart tests


def _workspace(tmp_path: Path, model: Path, **kw: object) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(config_text(model, **kw))  # type: ignore[arg-type]
    return inbox, config


def test_catch_up_restart_and_sigterm(tmp_path: Path, tiny_model: Path) -> None:
    inbox, config = _workspace(tmp_path, tiny_model)
    before = [put(inbox / "keep.png", png_bytes(20)), put(inbox / "change.png", png_bytes(21)),
              put(inbox / "sub" / "old.png", png_bytes(22))]
    d = Daemon(tmp_path, config)
    try:
        d.start()
        for image in before:  # present before the start: caught up
            d.wait_done(image)
        kept = (inbox / "keep.png.describe.md").stat().st_mtime_ns

        # SIGTERM with work in flight: exit 0 promptly, nothing lost.
        burst = [put(inbox / f"burst{i}.png", png_bytes(30 + i)) for i in range(6)]
        wait_until(lambda: d.queue.counts()["running"] > 0 or d.latest(burst[-1]) is not None, "work in flight")
        rc, took = d.stop()
        assert rc == 0 and took < 25, d.log()[-3000:]
        assert "stopped" in d.log()

        # While it is down: new bytes in one file, a mere touch of another, a new file.
        put(inbox / "change.png", png_bytes(23))
        os.utime(inbox / "keep.png", ns=(time.time_ns(), time.time_ns()))
        new = put(inbox / "new.png", png_bytes(24))
        listed = run_vlwatch("scan", "--dry-run", "--config", config, env=d.env)
        assert listed.returncode == 0, listed.stderr
        assert "stale\tdescribe\t" + str((inbox / "change.png").absolute()) in listed.stdout
        assert "missing\tdescribe\t" + str(new.absolute()) in listed.stdout
        assert "keep.png" not in listed.stdout and "old.png" not in listed.stdout

        # Also: a folder that does not exist yet, and a rescan every second.
        config.write_text(config.read_text().replace(
            "    polling: false\n", "    polling: false\n  - path: ./later\n    settle: 1s\n").replace(
            "jobs: {batch_wait: 0.2s", "jobs: {rescan: 1s, batch_wait: 0.2s"))
        d.start()
        for image in [*before, *burst, new]:
            d.wait_done(image)
            assert_one_complete_sidecar(d, image, rewritten=image.name == "change.png")
        # Files inotify never saw (the folder appeared after the start) are found by the rescan.
        missed = put(tmp_path / "later" / "missed.png", png_bytes(25))
        d.wait_done(missed)
        assert_one_complete_sidecar(d, missed)
        assert "later: watching" in d.log()
        changed = [j for j in d.queue.history((inbox / "change.png").absolute()) if j.state == "done"]
        assert len(changed) == 2  # redone for its new bytes
        assert (inbox / "keep.png.describe.md").stat().st_mtime_ns == kept  # the touch changed nothing
        rc, _ = d.stop()
        assert rc == 0
    finally:
        d.close()


def test_kill_9_mid_batch_then_restart(tmp_path: Path, tiny_model: Path) -> None:
    # Long answers and two slots make the work slow enough to kill inside it: the tiny model
    # runs every answer to max_new_tokens, ~0.5 s a pair at 256 tokens (0.1 s at 48 was too
    # quick to catch with jobs finishing one by one).
    inbox, config = _workspace(tmp_path, tiny_model, model_extra="  batch_size: 2\n",
                               jobs="{batch_wait: 0.5s, backoff: 1s}")
    config.write_text(config.read_text().replace("max_new_tokens: 8", "max_new_tokens: 256"))
    d = Daemon(tmp_path, config)
    try:
        d.start()
        images = [put(inbox / f"plain{i}.png", png_bytes(40 + i)) for i in range(4)]
        images += [put(inbox / "boxes" / f"box{i}.png", png_bytes(50 + i)) for i in range(4)]
        # Once the model is loaded (a file is done), kill inside the next batch's generation.
        # Work must be left after the kill (a poll that saw the last job running could kill after it ended).
        wait_until(lambda: (c := d.queue.counts())["done"] > 0 and c["running"] > 0
                   and c["queued"] + c["running"] >= 3, "a batch in progress, with more to come", log=d.log)
        d.kill9()
        finished = sum(1 for j in d.queue.history() if j.state == "done")
        assert finished < len(images), "everything finished before the kill; the test proves nothing"

        d.start()
        for image in images:
            rule = "boxes" if image.parent.name == "boxes" else "describe"
            d.wait_done(image, rule)
            assert_one_complete_sidecar(d, image, rule)
        rc, _ = d.stop()
        assert rc == 0
    finally:
        d.close()


def test_recovery_trusts_only_sidecars_written_after_the_job_started(tmp_path: Path) -> None:
    """After a crash, a running job counts as done only if all its sidecars
    are newer than its start and the source still has the job's bytes."""
    from daemon.config_reader import parse_config
    from daemon.intake.scanning import sidecars_written

    inbox = tmp_path / "inbox"
    image = put(inbox / "boxes" / "a.png", png_bytes(80))
    config = parse_config(config_text("/nonexistent-model"), tmp_path / "config.yaml")
    with Queue(tmp_path / "state.db") as q:
        from daemon.store.queue import Candidate

        st = image.stat()
        q.enqueue([Candidate(image.absolute(), "boxes", content_hash(image), st.st_size, st.st_mtime_ns)])
        [job] = q.claim(1)
    assert not sidecars_written(job, config)  # nothing written yet
    overlay = put(inbox / "boxes" / "a.png.boxes.overlay.png", b"png")
    assert not sidecars_written(job, config)  # the overlay comes first; the JSON is missing: crashed between
    json_sidecar = put(inbox / "boxes" / "a.png.boxes.json", b"{}")
    assert sidecars_written(job, config)
    old = job.started_at - 5  # type: ignore[operator]
    os.utime(json_sidecar, (old, old))  # left over from an earlier run
    assert not sidecars_written(job, config)
    os.utime(json_sidecar)
    image.write_bytes(png_bytes(81))  # new bytes since
    assert not sidecars_written(job, config)
    assert overlay.exists()


def test_scan_processes_the_backlog_without_a_daemon(tmp_path: Path, tiny_model: Path) -> None:
    inbox, config = _workspace(tmp_path, tiny_model)
    images = [put(inbox / "a.png", png_bytes(60)), put(inbox / "deep" / "b.png", png_bytes(61))]
    env = daemon_env(tmp_path / "home")
    old = time.time() - 60  # settled long ago
    for image in images:
        os.utime(image, (old, old))
    listed = run_vlwatch("scan", "--dry-run", "--config", config, env=env)
    assert listed.returncode == 0 and listed.stdout.count("missing\t") == 2, listed.stdout + listed.stderr
    done = run_vlwatch("scan", "--config", config, env=env)
    assert done.returncode == 0, done.stderr
    assert "2 done" in done.stdout
    for image in images:
        assert sidecar_names(image) == [f"{image.name}.describe.md"]
    again = run_vlwatch("scan", "--dry-run", "--config", config, env=env)
    assert again.stdout == ""


# ---------------------------------------------------------------- failures


def test_failures_backoff_retry_outage_and_vanished_files(tmp_path: Path) -> None:
    """Fault injection through a stub backend (the only test that uses one)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    down = tmp_path / "backend-down"
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {backend: stub, name: stub-model, idle_unload: 1s}\n"
        "state: ./state/state.db\n"
        "watch: [{path: ./inbox, settle: 0.5s}]\n"
        "rules: [{name: desc, task: custom, prompt: 'Describe $filename', output: md}]\n"
        "jobs: {attempts: 2, backoff: 0.2s, batch_wait: 0.1s}\n")
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend", VLWATCH_STUB_DOWN=str(down))
    try:
        d.start()
        ok = put(inbox / "ok.png", png_bytes(70))
        bad = put(inbox / "bad.png", png_bytes(71))
        d.wait_done(ok, "desc")
        # The scheduler frees the model after idle_unload without work.
        wait_until(lambda: "unloaded after" in d.log(), "the idle unload", log=d.log)
        failed = d.wait_state(bad, "failed", "desc")
        assert failed.attempts == 2 and "rejected" in (failed.error or "")
        assert sidecar_names(bad) == [] and bad.read_bytes() == png_bytes(71)  # left untouched

        status = run_vlwatch("status", "--json", "--config", config, env=d.env)
        info = json.loads(status.stdout)
        assert info["daemon"]["running"] and info["counts"]["failed"] == 1
        assert info["failures"][0]["path"] == str(bad.absolute()) and "rejected" in info["failures"][0]["error"]
        text = run_vlwatch("status", "--config", config, env=d.env).stdout
        assert "1 failed" in text and "bad.png" in text

        retried = run_vlwatch("retry", "--all", "--config", config, env=d.env)
        assert retried.returncode == 0 and f"#{failed.id}" in retried.stdout
        wait_until(lambda: d.log_count("failed after 2 attempts") == 2, "the retried job to fail again", log=d.log)

        # The backend goes away: the queue pauses and no attempts are spent.
        down.touch()
        during = put(inbox / "during.png", png_bytes(72))
        wait_until(lambda: "backend unavailable" in d.log(), "the outage to be noticed", log=d.log)
        info = json.loads(run_vlwatch("status", "--json", "--config", config, env=d.env).stdout)
        assert info["backend"] and info["backend"]["available"] is False
        # A file deleted before its turn is dropped cleanly.
        vanish = put(inbox / "vanish.png", png_bytes(73))
        d.wait_state(vanish, "queued", "desc")
        vanish.unlink()
        down.unlink()
        job = d.wait_done(during, "desc")
        assert job.attempts == 1
        wait_until(lambda: d.latest(vanish, "desc") is None, "the vanished file's job to be dropped", log=d.log)
        assert "vanish.png: desc dropped" in d.log()
        assert retried.returncode == 0 and run_vlwatch("retry", "999", "--config", config, env=d.env).returncode == 1
        rc, _ = d.stop()
        assert rc == 0
    finally:
        d.close()


def test_a_second_daemon_on_the_same_state_refuses(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text("model: {backend: stub, name: stub-model}\nstate: ./state/state.db\nwatch: [{path: ./inbox}]\n"
                      "rules: [{name: desc, task: custom, prompt: 'x', output: md}]\n")
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend")
    try:
        d.start(watchdog=False)
        second = run_vlwatch("run", "--config", config, env=d.env, timeout=60)
        assert second.returncode == 1 and "already working on" in second.stderr
        rc, _ = d.stop(signal.SIGINT)
        assert rc == 0
    finally:
        d.close()
