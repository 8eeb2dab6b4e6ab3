"""`vlwatch scan` processes the queue through the daemon's own job loop (issue 22.1: one job loop).

Without a daemon the scan drains the queue itself (``WorkerLoop.drain``):
what the daemon would pause for (a backend down) ends the scan with exit 1,
the jobs left queued with no attempt spent; a file the model rejects is
retried as the daemon retries it.  The stub backend injects the faults.
"""

from __future__ import annotations

from pathlib import Path

from daemon.store.queue import Queue
from tests.conftest import run_vlwatch
from tests.test_daemon import png_bytes, put

STUB = {"VLWATCH_PLUGINS": "tests.stub_backend"}


def _setup(tmp_path: Path, files: int = 3) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(files):
        put(inbox / f"f{i}.png", png_bytes(80 + i))
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {backend: stub, name: stub-model}\n"
        "state: ./state/state.db\n"
        "watch: [{path: ./inbox, settle: 0s}]\n"
        "rules: [{name: desc, task: custom, prompt: 'Describe $filename', output: md}]\n"
        "jobs: {attempts: 3, backoff: 1h}\n")
    return config


def _jobs(tmp_path: Path) -> list:
    queue = Queue(tmp_path / "state" / "state.db")
    try:
        return sorted(queue.history(), key=lambda j: j.id)
    finally:
        queue.close()


def test_a_scan_drains_the_queue_and_says_what_became_of_each_file(tmp_path: Path) -> None:
    config = _setup(tmp_path)
    put(tmp_path / "inbox" / "bad.png", png_bytes(90))  # the stub model rejects it: retried later (backoff 1h)
    done = run_vlwatch("scan", "--config", config, env=STUB)
    assert done.returncode == 1, done.stderr
    assert "processed 4 files: 3 done, 1 failed (1 will be retried)" in done.stdout
    assert sorted(p.name for p in (tmp_path / "inbox").glob("*.md")) == [f"f{i}.png.desc.md" for i in range(3)]
    states = {Path(j.path).name: (j.state, j.attempts) for j in _jobs(tmp_path)}
    assert states["bad.png"] == ("queued", 1) and all(states[f"f{i}.png"][0] == "done" for i in range(3))


def test_process_here_with_the_backend_down_says_so_and_writes_nothing(tmp_path: Path) -> None:
    config = _setup(tmp_path)
    down = tmp_path / "backend-down"
    down.touch()
    image = tmp_path / "elsewhere.png"
    image.write_bytes(png_bytes(91))
    done = run_vlwatch("process", "--local", "--config", config, str(image), env={**STUB, "VLWATCH_STUB_DOWN": str(down)},
                       timeout=120)
    assert done.returncode == 1
    assert "vlwatch: backend unavailable: connection refused (stub server down)" in done.stderr
    assert f"error: {image}: desc: not processed" in done.stderr
    assert not list(tmp_path.glob("elsewhere.png.*")) and _jobs(tmp_path) == []  # the daemon's state untouched

def test_a_backend_down_ends_the_scan_with_the_jobs_left_queued_and_no_attempt_spent(tmp_path: Path) -> None:
    config = _setup(tmp_path)
    down = tmp_path / "backend-down"
    down.touch()
    done = run_vlwatch("scan", "--config", config, env={**STUB, "VLWATCH_STUB_DOWN": str(down)}, timeout=120)
    assert done.returncode == 1
    assert "backend unavailable: connection refused (stub server down); 3 jobs left queued" in done.stderr
    assert [(j.state, j.attempts) for j in _jobs(tmp_path)] == [("queued", 0)] * 3
    assert not list((tmp_path / "inbox").glob("*.md"))
    down.unlink()  # back up: the next scan does them
    again = run_vlwatch("scan", "--config", config, env=STUB)
    assert again.returncode == 0 and "3 done" in again.stdout


def test_a_drain_uses_every_slot_where_the_daemon_keeps_some_for_questions(tmp_path: Path, tiny_model: Path) -> None:
    # A scan or `process` without a daemon drains through the daemon's loop, and no question comes through
    # it: keeping the lowest slots for questions (the daemon's engine 0) left a quarter of them idle, and
    # warming the decode steps for a question's sake held up the scan's end.
    from daemon.backends import create_backend
    from daemon.backends.transformers.events import Prefill
    from daemon.config_reader import load_config
    from daemon.engine.loop import WorkerLoop
    from daemon.engine.outcomes import Processor
    from daemon.engine.worker import Worker
    from daemon.process import submit
    from tests.conftest import tiny_daemon_config

    (tmp_path / "inbox").mkdir()
    config = load_config(tiny_daemon_config(tmp_path, tiny_model, batch_size=8, max_new_tokens=2))
    files = [put(tmp_path / "inbox" / f"f{i}.png", png_bytes(i)) for i in range(6)]
    backend = create_backend(config.model, config.engine)
    backend.load()
    slots: list[int] = []
    backend.slot_engine.trace = lambda event: slots.extend(event.slots) if isinstance(event, Prefill) else None
    with Queue(config.state) as queue:
        submit(config, queue, files)
        loop = WorkerLoop(queue, Worker(config, backend), Processor(queue, on_changed=lambda p: None))
        loop.drain()
        assert sorted(j.state for j in queue.history()) == ["done"] * 6
    backend.unload()
    assert 0 in slots, slots  # the daemon's engine 0 would have kept slots 0-1 for questions
