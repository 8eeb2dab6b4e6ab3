"""One engine process per device (issue 12.5), in a real ``vlwatch run`` on the tiny checkpoint.

``model.devices: [cpu, cpu]``: engine 0 in the daemon, engine 1 in a child
process.  Which engine takes which job is a race; the tests make it
deterministic with real signals (SIGSTOP on the daemon holds engine 0 and
the intake while the child works on).  Nothing is faked: the child is a real
spawned process, killed with a real SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from daemon.store.queue import Queue
from tests.conftest import Daemon, png_bytes, put, run_vlwatch, wait_until
from tests.test_daemon import config_text


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _claims(state: Path) -> list[tuple[int, str, str, int, str | None]]:
    """(id, state, claimed_by, attempts, error) of every job, read straight from the state file."""
    with sqlite3.connect(state) as db:
        return list(db.execute("SELECT id, state, claimed_by, attempts, error FROM jobs ORDER BY id"))


def _engine(d: Daemon, index: int) -> dict:
    return d.queue.meta().get(f"engine.{index}", {})


def _two_engine_daemon(tmp_path: Path, tiny_model: Path, engine: str = "", **env: str) -> tuple[Daemon, Path]:
    """A daemon (not started) with ``devices: [cpu, cpu]`` (and ``engine``'s YAML options), and its inbox."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "config.yaml"
    # 256-token answers through 2 slots: slow enough on the tiny model to kill the child inside its work.
    config.write_text(config_text(tiny_model, model_extra="  batch_size: 2\n  devices: [cpu, cpu]\n",
                                  jobs="{batch_wait: 0.2s, backoff: 1s, attempts: 3}", settle="0.3s")
                      .replace("max_new_tokens: 8", "max_new_tokens: 256")
                      + (f"engine: {engine}\n" if engine else ""))
    return Daemon(tmp_path, config, verbose=1, **env), inbox


@pytest.fixture
def two_engines(tmp_path: Path, tiny_model: Path):
    d, inbox = _two_engine_daemon(tmp_path, tiny_model)
    yield d, inbox
    d.close()  # a child engine dies with its daemon (test_a_child_engine_dies_with_its_daemon)


def _loaded(d: Daemon) -> int:
    """Wait for engine 1's process to have loaded its model (it does as it starts); its pid."""
    wait_until(lambda: _engine(d, 1).get("running") and _engine(d, 1).get("loaded"), "engine 1 to load its model",
               log=d.log)
    return _engine(d, 1)["pid"]


def test_two_engines_share_the_backlog_a_killed_child_is_replaced_and_stop_leaves_nothing(two_engines) -> None:
    # issue 12.5: a backlog done by both engines; kill -9 of the child mid-run puts its jobs back
    # (the attempt counted), they get done, the daemon runs on with a new child; SIGTERM stops all.
    d, inbox = two_engines
    d.start()
    daemon_pid = d.proc.pid
    first_child = _loaded(d)
    assert first_child != daemon_pid and _alive(first_child)

    # Engine 1 ready: each engine claims a few slots' worth at a time, so both take part.
    images = [put(inbox / f"{i:02d}.png", png_bytes(100 + i)) for i in range(24)]
    one = f"engine 1 pid {first_child}"
    wait_until(lambda: {"running", "done"} <= {c[1] for c in _claims(d.state) if c[2] == one},
               "engine 1 to have done jobs and to hold more", log=d.log)
    os.kill(first_child, signal.SIGKILL)

    for image in images:
        d.wait_done(image)
    assert d.proc.poll() is None, d.log()  # the daemon ran on
    wait_until(lambda: "was killed by signal 9" in d.log(), "the daemon to notice", log=d.log)
    said = re.search(rf"engine 1 on cpu \(pid {first_child}\) was killed by signal 9; (\d+) of its jobs back on the queue",
                     d.log())
    assert said is not None, d.log()[-3000:]
    claims = {c[0]: c for c in _claims(d.state)}
    assert len(claims) == 24 and all(c[1] == "done" for c in claims.values())  # each file done once
    # The crash spent an attempt: the jobs it held were done on their second (and only those).
    again = [c for c in claims.values() if c[3] == 2]
    assert len(again) == int(said.group(1)) > 0, (said.group(0), again)
    assert all(c[2] != one for c in again)  # redone by another engine, or engine 1's new process
    zero = f"engine 0 pid {daemon_pid}"
    assert {zero, one} <= {c[2] for c in claims.values()}  # both engines did part of the backlog
    wait_until(lambda: _engine(d, 1).get("pid") != first_child, "engine 1 to run again in a new process", log=d.log)

    # SIGTERM with work in hand: what is running goes back (no attempt spent), nothing outlives the daemon.
    second_child = _loaded(d)
    assert second_child != first_child and _alive(second_child)
    [put(inbox / f"late{i:02d}.png", png_bytes(200 + i)) for i in range(16)]
    wait_until(lambda: any(c[1] == "running" and c[0] not in claims for c in _claims(d.state)),
               "the late files in hand", log=d.log)
    rc, _ = d.stop()
    assert rc == 0, d.log()[-3000:]
    assert not _alive(second_child), "engine 1's process outlived the daemon"
    late = [c for c in _claims(d.state) if c[0] not in claims]
    assert len(late) == 16 and all(c[1] in ("queued", "done") for c in late), late
    assert all(c[3] == 0 for c in late if c[1] == "queued"), late  # put back, no attempt spent
    assert "engine 1 stopped" in d.log()


def test_a_reload_reaches_the_child_and_a_child_dies_with_its_daemon(two_engines) -> None:
    # issue 12.5: SIGHUP hands the new config to engine 1's process (a rule added is one it runs);
    # kill -9 of the daemon ends its engine processes too (PR_SET_PDEATHSIG), and the next start
    # recovers what they held, as after any crash.
    d, inbox = two_engines
    d.start()
    wait_until(lambda: _engine(d, 1).get("running"), "engine 1's process to start", log=d.log)
    child = _engine(d, 1)["pid"]
    d.config.write_text(d.config.read_text().replace(
        "jobs:", '  - name: late\n    match: ["late/*.png"]\n    task: describe\n    output: json\njobs:'))
    d.signal(signal.SIGHUP)
    wait_until(lambda: "[engine 1]: engine 1: config reloaded" in d.log(), "engine 1 to take the new config",
               log=d.log)
    assert _loaded(d) == child
    images = [put(inbox / "late" / f"{i:02d}.png", png_bytes(500 + i)) for i in range(16)]
    for image in images:
        d.wait_done(image, "late")  # none dropped as "rule no longer configured" by engine 1
    theirs = f"engine 1 pid {child}"
    late = [j for j in d.queue.history() if j.rule == "late"]
    with sqlite3.connect(d.state) as db:
        by_child = {r[0] for r in db.execute("SELECT id FROM jobs WHERE claimed_by = ?", (theirs,))}
    assert by_child & {j.id for j in late}, "engine 1 ran none of the new rule's jobs; the test proves nothing"

    # SIGTERM to engine 1 alone (not its daemon): it stops cleanly and is started again.
    os.kill(child, signal.SIGTERM)
    wait_until(lambda: _engine(d, 1).get("pid", child) != child, "engine 1 started again", log=d.log)
    assert "[engine 1]: engine 1 stopped" in d.log() and f"(pid {child}) exited with code 0" in d.log()
    assert d.proc.poll() is None
    child = _loaded(d)

    d.kill9()
    wait_until(lambda: not _alive(child), "engine 1's process to end with its daemon", timeout=30)
    d.start()
    wait_until(lambda: _engine(d, 1).get("pid", child) != child, "a new engine 1", log=d.log)
    _loaded(d)
    status = d.queue.meta()
    assert {k for k in status if k.startswith("engine.")} == {"engine.0", "engine.1"}
    shown = run_vlwatch("status", "--config", d.config, env=d.env)
    assert shown.returncode == 0, shown.stderr
    assert f"engine 0 on cpu (pid {d.proc.pid}): not loaded, 0 files done" in shown.stdout, shown.stdout
    assert f"engine 1 on cpu (pid {_engine(d, 1)['pid']}): loaded, 0 files done" in shown.stdout, shown.stdout
    rc, _ = d.stop()
    assert rc == 0


def test_a_hung_child_is_killed_and_replaced_and_its_jobs_are_done(tmp_path: Path, tiny_model: Path) -> None:
    # issue 12.3 (a failure fails alone), for the engine processes of 12.5: a child that hangs rather than dies
    # (here stopped with SIGSTOP while holding jobs: no heartbeat) is killed after LOST_AFTER, its jobs go back
    # with the attempt spent, a new child starts, and every file is done once. Before, it held its jobs forever.
    d, inbox = _two_engine_daemon(tmp_path, tiny_model, engine="{engine_lost_after: 4s}")
    try:
        d.start()
        child = _loaded(d)
        images = [put(inbox / f"{i:02d}.png", png_bytes(300 + i)) for i in range(12)]
        theirs = f"engine 1 pid {child}"
        wait_until(lambda: any(c[1] == "running" and c[2] == theirs for c in _claims(d.state)),
                   "engine 1 to hold jobs", log=d.log)
        os.kill(child, signal.SIGSTOP)
        held = {c[0] for c in _claims(d.state) if c[1] == "running" and c[2] == theirs}
        wait_until(lambda: "stopped answering (no heartbeat for" in d.log(), "the daemon to notice the hang",
                   log=d.log)
        wait_until(lambda: not _alive(child), "the hung child to be killed", log=d.log)
        for image in images:
            d.wait_done(image)
        claims = {c[0]: c for c in _claims(d.state)}
        assert all(c[1] == "done" for c in claims.values()) and len(claims) == 12
        assert held and all(claims[i][3] == 2 for i in held), (held, claims)  # the hang spent an attempt
        wait_until(lambda: _engine(d, 1).get("pid") not in (None, child), "a new engine 1", log=d.log)
        assert d.proc.poll() is None
    finally:
        try:
            os.kill(child, signal.SIGCONT)
        except (ProcessLookupError, UnboundLocalError):
            pass
        d.close()


def test_release_claimed_by_counts_a_crash_and_refunds_a_stop(tmp_path: Path) -> None:
    # issue 12.5: only the dead engine's jobs go back; a crash spends the attempt (a poison file
    # fails once out of attempts), a stop does not.
    from daemon.store.queue import Candidate

    with Queue(tmp_path / "state.db") as q:
        q.enqueue([Candidate(Path(f"/x/{i}.png"), "r", f"h{i}", 1, 1) for i in range(4)])
        q.owner = "engine 1 pid 10"
        a, b = q.claim(2)
        q.owner = "engine 0 pid 9"
        c, d = q.claim(2)
        q.fail(b.id, "boom", retry_at=0)  # b: back on the queue after one attempt...
        q.owner = "engine 1 pid 10"
        assert [j.id for j in q.claim(1)] == [b.id]  # ...and claimed again: its second attempt
        counts = q.release_claimed_by("engine 1 pid 10", max_attempts=2, error="engine 1 was killed")
        assert counts == {"queued": 1, "failed": 1}
        jobs = {j.id: j for j in q.history()}
        assert (jobs[a.id].state, jobs[a.id].attempts, jobs[a.id].error) == ("queued", 1, "engine 1 was killed")
        assert (jobs[b.id].state, jobs[b.id].attempts) == ("failed", 2)
        assert jobs[c.id].state == jobs[d.id].state == "running"  # engine 0's are its own business
        assert q.release_claimed_by("engine 0 pid 9", max_attempts=None) == {"queued": 2, "failed": 0}
        jobs = {j.id: j for j in q.history()}
        assert jobs[c.id].state == "queued" and jobs[c.id].attempts == 0 and jobs[c.id].error is None


def test_status_says_when_an_engine_is_down() -> None:
    # issue 12.5: a child between a death and its restart.
    from daemon.commands import _engine_line

    line = _engine_line({"engine": 1, "device": "cuda:1", "running": False, "restarts": 2, "restart_at": 1.8e9,
                         "error": "engine 1 on cuda:1 was killed by signal 9 while this file was in hand"})
    assert line.startswith("engine 1 on cuda:1: not running (engine 1 on cuda:1 was killed by signal 9")
    assert "; starting again at " in line and "(restart 2)" in line


def test_a_child_sees_only_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12.5: cuda:N in a child is the Nth GPU the daemon sees, and the only one the child sees.
    from daemon.engine.child import pin_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pin_device("cpu") == "cpu" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert pin_device("cuda:1") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")  # the daemon itself was given two cards
    assert pin_device("cuda:1") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "6"


def test_a_child_that_loses_its_gpu_is_restarted_and_a_poison_file_fails(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    # issue 12.5 (with 12.3): a sticky CUDA error in engine 1's process puts its job back with the
    # attempt spent and ends that process (exit 3); it is started again, and the file that crashes
    # it every time fails after jobs.attempts instead of looping.  The daemon's side runs here.
    from daemon.config_reader import parse_config
    from daemon.engine.child import DEVICE_LOST_EXIT
    from daemon.engine.processes import ChildEngines
    from daemon.store.keys import content_hash
    from daemon.store.queue import Candidate

    monkeypatch.setenv("VLWATCH_PLUGINS", "tests.device_lost_backend")  # the child imports it as the daemon would
    import tests.device_lost_backend  # noqa: F401

    config = parse_config("model: {backend: devicelost, name: any}\nstate: ./state.db\nwatch: [{path: ./inbox}]\n"
                          "rules: [{name: describe, match: ['*.png'], task: describe, output: md}]\n"
                          "jobs: {attempts: 2}\n", tmp_path / "config.yaml")
    image = put(tmp_path / "inbox" / "poison.png", png_bytes(7))
    st = image.stat()
    queue = Queue(config.state)
    queue.enqueue([Candidate(image.absolute(), "describe", content_hash(image), st.st_size, st.st_mtime_ns)])
    children = ChildEngines(queue, config, [(1, "cpu")], lambda path: None, engines=2, stop_grace=10.0)
    caplog.set_level("INFO", logger="daemon.engine.processes")
    children.start()
    try:
        wait_until(lambda: queue.history()[0].state == "failed", "the poison file to fail")
        wait_until(lambda: caplog.text.count("lost its GPU") == 2, "two deaths noticed")
        job = queue.history()[0]
        assert job.attempts == 2 and "GPU failed" in (job.error or ""), job
        assert f"exit code {DEVICE_LOST_EXIT}" not in caplog.text  # said in words, not as a number
        wait_until(lambda: children.pids(), "engine 1 started a third time")
    finally:
        children.stop(0.0)
        children.join(30)
        queue.close()
    assert not children.is_alive() and not children.pids()


def test_a_burst_of_arrivals_reaches_the_child_engines_as_it_starts_and_ends() -> None:
    # Engine 0 lets a burst of arrivals reach the durable queue before it takes more work (issue 10.21); the
    # child engines were told nothing about it and went on claiming. Now the supervisor passes the burst on, one
    # message when it starts and one when it ends, and the child's loop yields the same way.
    import types

    from daemon.engine.loop import BURST
    from daemon.engine.child import _follow_burst
    from daemon.engine.processes import ChildEngines

    waiting = [0]
    engines = ChildEngines(None, None, [(1, "cpu"), (2, "cpu")], lambda path: None, engines=3, stop_grace=1.0,
                           backlog=lambda: waiting[0])
    sent: list[tuple[int, tuple]] = []
    for child in engines.children:
        child.send = lambda message, i=child.index: sent.append((i, message)) or True
    for n in (0, 10, BURST, BURST + 500, BURST + 1, 3, 0):
        waiting[0] = n
        engines._tell_burst()
    assert sent == [(1, ("burst", True)), (2, ("burst", True)), (1, ("burst", False)), (2, ("burst", False))]

    loop = types.SimpleNamespace(_backlog=lambda: 0)
    _follow_burst(loop, True)
    assert loop._backlog() >= BURST  # what WorkerLoop._yield_to_intake compares
    _follow_burst(loop, False)
    assert loop._backlog() < BURST
