"""What becomes of a job: permanent vs transient failures, superseded failures,
and outages of the disks (output folder, state database) that must not burn
attempts or leave jobs ``running``.

Real files in tmp_path, a real SQLite state file, the real ``Worker``,
``Processor`` and ``WorkerLoop``; only the model (a stub answering instantly)
and the disk faults (ENOSPC from the sidecar writer, "database or disk is
full" from a commit) are injected, since a full disk cannot be made here.
"""

from __future__ import annotations

import errno
import io
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.stub_backend  # noqa: F401  registers the "stub" backend
from daemon import outputs
from daemon.backends import create_backend
from daemon.config_reader import parse_config
from daemon.engine.loop import WorkerLoop
from daemon.engine.outcomes import Processor
from daemon.engine.worker import Worker
from daemon.store.keys import content_hash
from daemon.store.queue import Candidate, Queue
from tests.conftest import wait_until
from tests.stub_backend import StubBackend



def png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()



def make_config(tmp_path: Path, extra_rule: str = "", model: str = "{backend: stub, name: stub-model}"):
    text = (
        f"model: {model}\n"
        f"state: {tmp_path}/state/state.db\n"
        f"watch: [{{path: {tmp_path}/inbox}}]\n"
        "rules:\n"
        f"{extra_rule}"
        "  - {name: desc, task: custom, prompt: 'Describe $filename', output: md}\n"
        "jobs: {attempts: 3, backoff: 30s, batch_wait: 0s}\n")
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return parse_config(text, tmp_path / "config.yaml")


def enqueue(queue: Queue, path: Path, rule: str = "desc") -> int:
    st = path.stat()
    [q] = queue.enqueue([Candidate(path, rule, content_hash(path), st.st_size, st.st_mtime_ns)])
    return q.id


@pytest.fixture
def setup(tmp_path: Path):
    config = make_config(tmp_path, "  - {name: pngonly, match: ['only/*'], task: custom, prompt: x, output: md, formats: [png]}\n")
    with Queue(config.state) as queue:
        worker = Worker(config, StubBackend(config.model), threads=1)
        yield config, queue, worker
        worker.close()


@pytest.fixture(params=["batches", "live"])
def either_path(request: pytest.FixtureRequest, tmp_path: Path):
    """The stub backend (batches through ``Processor.process``) and the transformers backend
    on the tiny checkpoint (the engine's live admission, which records from its writer thread)."""
    model = "{backend: stub, name: stub-model}"
    if request.param == "live":
        model = f"{{backend: transformers, name: '{request.getfixturevalue('tiny_model')}', max_new_tokens: 4}}"
    config = make_config(tmp_path, model=model)
    with Queue(config.state) as queue:
        worker = Worker(config, create_backend(config.model), threads=1)
        yield config, queue, worker
        worker.close()


# ------------------------------------------------------------- issue 10.10


def test_permanent_input_errors_fail_at_once_transient_ones_retry(setup, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.10: bytes that can never succeed are not retried with backoff.
    _config, queue, worker = setup
    inbox = tmp_path / "inbox"
    (inbox / "only").mkdir()
    files = {
        "text.png": b"hello, this is not an image at all\n" * 10,
        "empty.png": b"",
        "strip.png": png(1, (2000, 5)),  # 400:1, over the model's 200:1
        "bomb.png": png(2),
        "only/photo.png": _jpeg(),  # a JPEG where the rule takes PNG only
    }
    ids = {}
    for name, data in files.items():
        (inbox / name).write_bytes(data)
        ids[name] = enqueue(queue, inbox / name, "pngonly" if name.startswith("only/") else "desc")
    truncated = inbox / "truncated.png"
    whole = png(3, (200, 200))
    truncated.write_bytes(whole[: len(whole) // 2])  # may still be growing: transient
    tid = enqueue(queue, truncated)

    processor = Processor(queue, on_changed=lambda p: None)
    jobs = queue.claim(10)
    assert len(jobs) == 6
    bomb = [j for j in jobs if j.id == ids["bomb.png"]]
    result = processor.process(worker, [j for j in jobs if j not in bomb])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x48 = 3072 > 2 x 1000: a "bomb"
    result_bomb = processor.process(worker, bomb)

    assert result.failed == 4 and result_bomb.failed == 1
    for name, job_id in ids.items():
        job = queue.job(job_id)
        assert job is not None and job.state == "failed" and job.attempts == 1, (name, job)
    assert "is a text file" in (queue.job(ids["text.png"]).error or "")
    assert "empty" in (queue.job(ids["empty.png"]).error or "")
    assert "aspect ratio" in (queue.job(ids["strip.png"]).error or "")
    assert "too large" in (queue.job(ids["bomb.png"]).error or "")
    assert "does not take" in (queue.job(ids["only/photo.png"]).error or "")
    # A truncated file may be a copy in progress: retried, with backoff.
    assert result.retrying == 1
    job = queue.job(tid)
    assert job is not None and job.state == "queued" and job.not_before > time.time()


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(out, format="JPEG")
    return out.getvalue()


# -------------------------------------------------------------- issue 10.9


def test_a_newer_job_supersedes_the_files_older_failures(setup, tmp_path: Path) -> None:
    # issue 10.9: a slow writer's early (truncated) version failed; the
    # complete file then succeeded: status shows the file's current state.
    _config, queue, worker = setup
    image = tmp_path / "inbox" / "slow.png"
    whole = png(5, (120, 90))
    image.write_bytes(whole[:200])
    old = enqueue(queue, image)
    [job] = queue.claim(1)
    queue.fail(job.id, "truncated", retry_at=None)
    assert queue.counts()["failed"] == 1 and [j.id for j in queue.failures()] == [old]

    image.write_bytes(whole)
    new = enqueue(queue, image)
    assert new != old
    # Queued now: that is the file's state, not "failed".
    assert queue.counts()["failed"] == 0 and queue.failures() == []
    assert queue.retry(None) == [] and queue.retry([old]) == []  # old bytes are not retried
    processor = Processor(queue, on_changed=lambda p: None)
    assert processor.process(worker, queue.claim(1)).done == 1
    assert queue.counts() == {"queued": 0, "running": 0, "done": 1, "failed": 0}
    assert [j.state for j in queue.history(image)] == ["failed", "done"]  # history is kept

    # A failure of the newest bytes is still a failure.
    other = tmp_path / "inbox" / "other.png"
    other.write_bytes(b"not an image")
    bad = enqueue(queue, other)
    processor.process(worker, queue.claim(1))
    assert [j.id for j in queue.failures()] == [bad] and queue.counts()["failed"] == 1


# -------------------------------------------------------------- issue 10.7


class FullStateDisk:
    """A queue whose commits of results fail ``times`` times with SQLite's disk-full error."""

    def __init__(self, queue: Queue, times: int) -> None:
        self._queue, self.left = queue, times

    def __getattr__(self, name: str):
        return getattr(self._queue, name)

    def _maybe_full(self) -> None:
        if self.left > 0:
            self.left -= 1
            raise sqlite3.OperationalError("database or disk is full")

    def finish(self, *a, **kw):
        self._maybe_full()
        return self._queue.finish(*a, **kw)

    def release(self, *a, **kw):
        self._maybe_full()
        return self._queue.release(*a, **kw)

    def fail(self, *a, **kw):
        self._maybe_full()
        return self._queue.fail(*a, **kw)


def test_a_failed_commit_leaves_no_job_running(either_path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # issue 10.7: the sidecars are written, then the state disk is full at the
    # commit: the result is kept and recorded once writes work, no restart.
    _config, queue, worker = either_path
    image = tmp_path / "inbox" / "a.png"
    image.write_bytes(png(7))
    job_id = enqueue(queue, image)
    full = FullStateDisk(queue, times=3)
    processor = Processor(full, on_changed=lambda p: None)  # type: ignore[arg-type]
    loop = WorkerLoop(full, worker, processor)  # type: ignore[arg-type]
    loop.start()
    try:
        wait_until(lambda: getattr(queue.job(job_id), "state", None) == "done",
                   "the job's result to be recorded once the state disk takes writes")
    finally:
        loop.stop()
        loop.join(10)
    job = queue.job(job_id)
    assert job is not None and job.attempts == 1 and job.sidecars == (image.with_name("a.png.desc.md"),)
    assert full.left == 0 and queue.running() == []
    assert "cannot record job results" in caplog.text and "takes writes again" in caplog.text


# -------------------------------------------------------------- issue 10.8


def test_a_full_output_disk_pauses_without_spending_attempts(either_path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.8: ENOSPC while writing sidecars is an outage: pause, say so in
    # status, resume by itself once writes work; no file fails for it.
    _config, queue, worker = either_path
    real_write = outputs.atomic_write
    disk = {"full": True, "refused": 0}

    def writer(path: Path, data: bytes, **kw: object) -> None:
        if disk["full"]:
            disk["refused"] += 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(outputs, "atomic_write", writer)
    images = []
    for i in range(4):
        images.append(tmp_path / "inbox" / f"f{i}.png")
        images[-1].write_bytes(png(10 + i))
        enqueue(queue, images[-1])
    processor = Processor(queue, on_changed=lambda p: None)
    loop = WorkerLoop(queue, worker, processor)
    loop.start()
    try:
        wait_until(lambda: "storage" in queue.meta(), "the outage to show in the state's meta")
        storage = queue.meta()["storage"]
        assert storage["available"] is False and str(tmp_path / "inbox") in str(storage["error"])
        assert "output disk full" in str(storage["error"])
        counts = queue.counts()
        assert counts["failed"] == 0 and counts["done"] == 0
        assert all(j.attempts == 0 for j in queue.history() if j.state == "queued")

        from daemon.commands import format_status
        text = format_status({"state": "x", "daemon": {"running": True, "pid": 1}, "counts": counts,
                              "failures": [], "storage": storage})
        assert "output disk full" in text and "no attempts spent" in text

        disk["full"] = False  # space returns
        wait_until(lambda: queue.counts()["done"] == 4, "every file to be done once the disk has space")
    finally:
        loop.stop()
        loop.join(10)
    assert disk["refused"] >= 1
    assert "storage" not in queue.meta()
    assert all(j.attempts == 1 for j in queue.history())
    assert all(p.with_name(p.name + ".desc.md").exists() for p in images)
