"""``vlwatch process`` through the running daemon's API, and jobs handed over going first (issue 13.4).

A real ``python -m daemon run`` on the stub backend (``tests/stub_backend.py``)
slowed to 0.25 s a request, with a backlog of 120 folder files: 30 s of
work.  Files handed over (``vlwatch process``, ``POST /api/v1/jobs``) must be
done in seconds, with the backlog still mostly queued, and by the daemon's
model (the stub logs the pid of every process that answered).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from daemon.store.migrations import migrate
from daemon.store.queue import Candidate, Queue
from tests.conftest import Daemon, png_bytes, put, run_vlwatch, wait_until
from tests.test_api import api_config, free_port
from tests.test_ask import stub_lines

BACKLOG = 120
DELAY = "0.25"  # seconds a request: the backlog needs 30 s


def backlog(inbox: Path) -> list[Path]:
    files = [put(inbox / f"backlog-{i:03d}.png", png_bytes(100 + i, (32, 32))) for i in range(BACKLOG)]
    old = time.time() - 60
    for p in files:
        os.utime(p, (old, old))  # settled already: the catch-up queues them at once, in name order
    return files


def busy_daemon(tmp_path: Path, *, api: bool) -> tuple[Daemon, Path, Path, dict[str, str]]:
    """A daemon working through the backlog one slow file at a time: (daemon, config, inbox, CLI env)."""
    port = free_port()
    inbox = tmp_path / "inbox"
    backlog(inbox)
    config = api_config(tmp_path, port, model_extra="  batch_size: 1", jobs="jobs: {batch_wait: 0s}")
    if not api:
        config.write_text(config.read_text().replace(f"listen: 127.0.0.1:{port}", "listen: null"))
    env = {"VLWATCH_PLUGINS": "tests.stub_backend", "VLWATCH_STUB_LOG": str(tmp_path / "stub.log")}
    d = Daemon(tmp_path, config, VLWATCH_STUB_DELAY=DELAY, **env).start()
    if api:
        wait_until(lambda: _up(port), "the API to answer", log=d.log)
    wait_until(lambda: d.queue.counts()["done"] >= 2, "the backlog to start", log=d.log)
    return d, config, inbox, env


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[Daemon, Path, Path, dict[str, str]]]:
    d, config, inbox, env = busy_daemon(tmp_path, api=True)
    try:
        yield d, config, inbox, env
    finally:
        d.stop()
        d.close()


def _up(port: int) -> bool:
    return _status(port) == 200


def _status(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/v1/status", timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_process_goes_through_the_api_ahead_of_the_backlog(busy: tuple[Daemon, Path, Path, dict[str, str]],
                                                           tmp_path: Path) -> None:  # issue 13.4
    d, config, inbox, env = busy
    last = inbox / f"backlog-{BACKLOG - 1:03d}.png"  # queued behind the whole backlog already
    assert d.latest(last) is not None and d.latest(last).state == "queued"
    fresh = put(inbox / "new" / "fresh.png", png_bytes(7, (40, 30)))
    elsewhere = put(tmp_path / "elsewhere" / "outside.png", png_bytes(8, (40, 30)))  # no watched folder holds it
    started = time.monotonic()
    done = run_vlwatch("-v", "process", "--config", config, last, fresh, elsewhere, env=env)
    took = time.monotonic() - started
    left = d.queue.counts()["queued"]
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{p}.describe.md" for p in (last, fresh, elsewhere)]
    assert all(Path(f"{p}.describe.md").is_file() for p in (last, fresh, elsewhere))
    # The backlog needs 120 x 0.25 s = 30 s; these wait for the file in hand at most.
    assert took < 15.0, (took, done.stderr)
    assert left >= 40, left
    # Two files through the API; the one outside every watched folder through the state file.
    pid = d.proc.pid
    assert f"handed 2 jobs to the running daemon (pid {pid}) through its API" in done.stderr, done.stderr
    assert re.search(rf"handed 1 job to the running daemon \(pid {pid}\); waiting", done.stderr), done.stderr
    assert "WARNING" not in done.stderr, done.stderr  # issue 27: a normal hand-off is no warning
    log = d.log()
    assert f"{last}: describe moved ahead through the API: job #{d.latest(last).id}" in log, log[-3000:]
    assert re.search(rf"{re.escape(str(fresh))}: describe (queued through the API as|moved ahead through the API:) "
                     r"job #\d+, ahead of the folder backlog", log), log[-3000:]
    # No second model: every request was answered by the daemon's process.
    assert {p for _, _, p in stub_lines(tmp_path / "stub.log")} == {pid}
    assert "loading" not in done.stderr.lower()


def test_process_with_the_api_off_hands_over_through_the_state_file(tmp_path: Path) -> None:  # issue 13.4
    d, config, inbox, env = busy_daemon(tmp_path, api=False)
    try:
        last = inbox / f"backlog-{BACKLOG - 1:03d}.png"
        started = time.monotonic()
        done = run_vlwatch("-v", "process", "--config", config, last, env=env)
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"{last}.describe.md"]
        assert re.search(rf"handed 1 job to the running daemon \(pid {d.proc.pid}\); waiting", done.stderr)
        assert "through its API" not in done.stderr and "through the API" not in d.log()
        # The state-file hand-off goes ahead of the backlog too.
        assert took < 15.0 and d.queue.counts()["queued"] >= 40, (took, d.queue.counts())
        assert {p for _, _, p in stub_lines(tmp_path / "stub.log")} == {d.proc.pid}
    finally:
        d.stop()
        d.close()


def test_outside_files_need_a_writable_state_file(busy: tuple[Daemon, Path, Path, dict[str, str]], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsysbinary: pytest.CaptureFixture[bytes]) -> None:  # issue 13.4
    # In-process, to stand in for a user who may not write the daemon's state
    # file (root may write any file, so chmod cannot show it here).
    import tests.stub_backend  # noqa: F401  (registers the stub, as VLWATCH_PLUGINS does in a subprocess)
    from daemon import process as proc
    from daemon.config_reader import load_config

    d, config, inbox, env = busy
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(proc, "_queue_writable", lambda config: False)
    inside = put(inbox / "mine" / "inside.png", png_bytes(9, (40, 30)))
    outside = put(tmp_path / "elsewhere" / "outside.png", png_bytes(10, (40, 30)))
    rc = proc.process(load_config(config), [inside, outside])
    out, err = capsysbinary.readouterr()
    assert rc == 1
    assert out.decode().splitlines() == [f"{inside}.describe.md"]
    assert f"{outside}: not inside a watched folder: the daemon's API does not take it" in err.decode()
    assert "--local" in err.decode() and not Path(f"{outside}.describe.md").exists()
    assert d.latest(outside) is None


def test_post_jobs_are_claimed_before_the_backlog(busy: tuple[Daemon, Path, Path, dict[str, str]]) -> None:
    # issue 13.4: POST /api/v1/jobs with a plain HTTP client (no vlwatch code on this side)
    d, config, inbox, _ = busy
    port = int(re.search(r"listen: 127\.0\.0\.1:(\d+)", config.read_text()).group(1))
    base = f"http://127.0.0.1:{port}"
    mine = put(inbox / "mine" / "asked.png", png_bytes(11, (40, 30)))
    r = httpx.post(base + "/api/v1/jobs", json={"paths": [str(mine)]})
    assert r.status_code == 202, r.text
    [entry] = r.json()["jobs"]
    assert entry["error"] is None and entry["job"] is not None
    wait_until(lambda: httpx.get(f"{base}/api/v1/jobs/{entry['job']}").json()["state"] == "done", "the job",
               timeout=15, log=d.log)
    assert d.queue.counts()["queued"] >= 40
    assert httpx.post(base + "/api/v1/jobs", json={"paths": [str(mine)], "stale": "yes"}).status_code == 400


# ---------------------------------------------------------------- the queue itself


def test_claim_takes_higher_priority_first_and_prioritise_moves_a_queued_job(tmp_path: Path) -> None:  # 13.4
    with Queue(tmp_path / "state.db") as q:
        q.enqueue(Candidate(Path(f"/in/{i}.png"), "r", f"h{i}", 1, 1) for i in range(5))
        q.enqueue([Candidate(Path("/in/asked.png"), "r", "ha", 1, 1, priority=10)])
        waiting = q.latest(Path("/in/4.png"), "r")
        q.prioritise([waiting.id], 10)
        assert {j.path.name for j in q.claim(3)} == {"asked.png", "4.png", "0.png"}
        q.prioritise([waiting.id], 0)  # never lowered, and only while queued
        assert {j.path.name for j in q.claim(5)} == {"1.png", "2.png", "3.png"}


def test_priority_migration_from_the_previous_schema(tmp_path: Path) -> None:  # issue 13.4
    import sqlite3

    from daemon.store import migrations as q

    db = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    before = q.MIGRATIONS[:q.MIGRATIONS.index(q.m040_priority)]
    for fn in before:
        fn(db)
        db.execute("INSERT INTO _migrations VALUES (?, 0)", (fn.__name__,))
    db.execute("INSERT INTO jobs (path, rule, hash, size, mtime_ns, state, queued_at) VALUES ('/a', 'r', 'h', 1, 1,"
               " 'queued', 0)")
    assert "m040_priority" in migrate(db)
    assert db.execute("SELECT priority FROM jobs").fetchone()[0] == 0
    db.close()


def test_help_and_readme_tell_the_same_hand_off() -> None:  # issue 13.4
    from tests.test_cli_docs import README

    done = run_vlwatch("process", "--help")
    assert "through its API for files inside a watched folder" in " ".join(done.stdout.split())
    text = " ".join(README.split())
    assert "goes through the daemon's API (`POST /api/v1/jobs`)" in text
    assert "a file elsewhere still goes through the state file when you may write it" in text
    api = " ".join((Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text().split())
    assert "goes onto the queue in the state file directly" in api and "suggests `--local`" in api


def test_process_with_a_token_and_without_one(tmp_path: Path) -> None:  # issue 13.4
    # With the daemon's token the files go through its API; without it, through
    # the state file this user may write (as before the API), with a warning.
    from tests.test_api import TOKEN

    port = free_port()
    config = api_config(tmp_path, port, api_extra="  token_env: VLWATCH_TEST_API_TOKEN")
    env = {"VLWATCH_PLUGINS": "tests.stub_backend"}
    d = Daemon(tmp_path, config, VLWATCH_TEST_API_TOKEN=TOKEN, **env).start()
    try:
        wait_until(lambda: _status(port) == 401, "the API to answer", log=d.log)
        one = put(tmp_path / "inbox" / "one.png", png_bytes(12, (40, 30)))
        two = put(tmp_path / "inbox" / "two.png", png_bytes(13, (40, 30)))
        done = run_vlwatch("process", "--config", config, one, env={**env, "VLWATCH_TEST_API_TOKEN": TOKEN})
        assert done.returncode == 0 and done.stdout.splitlines() == [f"{one}.describe.md"], done.stderr
        assert "through its API" in done.stderr, done.stderr
        done = run_vlwatch("process", "--config", config, two, env={**env, "VLWATCH_TEST_API_TOKEN": ""})
        assert done.returncode == 0 and done.stdout.splitlines() == [f"{two}.describe.md"], done.stderr
        assert "wants a bearer token" in done.stderr and "through its state file instead" in done.stderr
        assert "through its API" not in done.stderr
    finally:
        d.stop()
        d.close()
    assert TOKEN not in d.log()


def test_a_job_retried_by_id_goes_ahead_of_the_backlog(tmp_path: Path) -> None:  # issue 13.4
    from daemon import commands
    from daemon.config_reader import parse_config

    config = parse_config(f"state: {tmp_path / 'state.db'}\ninclude: [describe]\n", tmp_path / "config.yaml")
    with Queue(config.state) as q:
        q.enqueue(Candidate(Path(f"/in/{i}.png"), "describe", f"h{i}", 1, 1) for i in range(5))
        q.enqueue([Candidate(Path("/in/failed.png"), "describe", "hf", 1, 1)])  # the newest, folder priority
        *backlog, job = q.claim(6)
        q.fail(job.id, "boom", retry_at=None)
        q.release([j.id for j in backlog])
        assert commands.retry_job(config, job.id) is not None  # as the API and the web page's button do
        assert [j.id for j in q.claim(1)] == [job.id]


def test_process_follows_a_job_the_daemon_replaced_through_the_api(tmp_path: Path) -> None:
    # `vlwatch process` waits on job ids; the daemon replaces a job when the file got new bytes while it was in
    # hand (the old job is dropped when it would go back on the queue: Queue._drop_if_superseded). Through the
    # state file `process` followed it to the new job; through the API it reported the file as dropped, because
    # the API looked jobs up by id only. Now GET /api/v1/jobs takes path= and rule=, and process follows.
    from daemon.process import ApiJobs, Submitted, wait_for

    port = free_port()
    config = api_config(tmp_path, port)
    env = {"VLWATCH_PLUGINS": "tests.stub_backend", "VLWATCH_STUB_LOG": str(tmp_path / "stub.log")}
    d = Daemon(tmp_path, config, **env).start()
    try:
        wait_until(lambda: _up(port), "the API to answer", log=d.log)
        image = put(tmp_path / "inbox" / "page.png", png_bytes(1, (40, 30)))
        first = d.wait_done(image)
        put(image, png_bytes(2, (40, 30)))  # new bytes: a new job
        wait_until(lambda: (j := d.latest(image)) is not None and j.id > first.id and j.state == "done",
                   "the new bytes done", log=d.log)
        second = d.latest(image)
        with Queue(d.state) as queue, queue._tx() as db:  # the old job replaced, as when its retry came due
            db.execute("UPDATE jobs SET state = 'queued' WHERE id = ?", (first.id,))
            Queue._drop_if_superseded(db, [first.id])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            listed = client.get("/api/v1/jobs", params={"path": str(image), "rule": "describe"}).json()["jobs"]
            assert [j["id"] for j in listed] == [second.id]
            assert client.get("/api/v1/jobs", params={"path": "inbox/page.png"}).status_code == 400
            assert client.get(f"/api/v1/jobs/{first.id}").status_code == 404
            got = wait_for(ApiJobs(client), [Submitted(image, "describe", job_id=first.id)], timeout=10)
        assert got[first.id] is not None and got[first.id].id == second.id and got[first.id].state == "done"
    finally:
        d.stop()
        d.close()
