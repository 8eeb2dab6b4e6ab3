"""Hooks after a sidecar (issue 13.6): an argv, no shell, the job in environment variables.

A real daemon (stub backend) runs the hooks: ``on_done`` once per job that
wrote its sidecars (a ground job writes two: still one run, both listed),
``on_failed`` once per job that failed for good; a failing and a hanging
hook do not stop the daemon or hold up the files after them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from daemon import hooks
from daemon.config_reader import parse_config
from daemon.errors import ConfigError
from tests.conftest import run_vlwatch, write_config
from tests.test_daemon import Daemon, png_bytes, put, wait_until

#: A hook that appends its environment (the VLWATCH_ part) as one JSON line to the file in $1.
RECORD = ("import json, os, sys; open(sys.argv[1], 'a').write(json.dumps("
          "{k: v for k, v in os.environ.items() if k.startswith('VLWATCH_')}) + chr(10))")


def _recorder(log: Path) -> str:
    """A hook argv (YAML flow list) that appends its VLWATCH_ environment to ``log``."""
    return f'["{sys.executable}", -c, "{RECORD}", "{log}"]'


def records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_hooks_run_once_per_job_with_its_variables(tmp_path: Path) -> None:  # issue 13.6
    done_log, failed_log = tmp_path / "done.jsonl", tmp_path / "failed.jsonl"
    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path, f"""
        model: {{backend: stub, name: stub-model}}
        state: ./state/state.db
        include: [describe]
        watch:
          - path: ./inbox
            settle: 0.3s
        rules:
          - name: boxes
            match: ["boxes/*.png"]
            task: ground
            on_done: ["{sys.executable}", -c, "{RECORD}", "{done_log}"]
        hooks:
          on_done: ["{sys.executable}", -c, "{RECORD}", "{done_log}"]
          on_failed: ["{sys.executable}", -c, "{RECORD}", "{failed_log}"]
          timeout: 20s
        jobs: {{attempts: 1, batch_wait: 0.1s}}
        api: {{listen: null, token_env: VLWATCH_API_TOKEN}}
        """)
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend", VLWATCH_API_TOKEN="must-not-leak").start()
    try:
        shots = [put(tmp_path / "inbox" / f"shot {i}.png", png_bytes(i)) for i in range(3)]
        boxed = put(tmp_path / "inbox" / "boxes" / "b.png", png_bytes(9))
        bad = put(tmp_path / "inbox" / "bad one.png", png_bytes(10))
        for s in shots:
            d.wait_done(s)
        d.wait_done(boxed, "boxes")
        d.wait_state(bad, "failed")
        wait_until(lambda: len(records(done_log)) >= 4 and len(records(failed_log)) >= 1, "the hooks", log=d.log)
    finally:  # the daemon waits for queued hooks at exit: after this, every run is in the logs
        d.stop()
        d.close()
    done = records(done_log)
    assert sorted(r["VLWATCH_SOURCE"] for r in done) == sorted(str(p) for p in [*shots, boxed])  # once each
    by_source = {r["VLWATCH_SOURCE"]: r for r in done}
    shot = by_source[str(shots[0])]
    assert shot["VLWATCH_RULE"] == "describe" and shot["VLWATCH_TASK"] == "describe"
    assert shot["VLWATCH_SIDECARS"] == str(shots[0].parent / "shot 0.png.describe.md")
    assert shot["VLWATCH_ERROR"] == ""
    box = by_source[str(boxed)]
    assert box["VLWATCH_RULE"] == "boxes" and box["VLWATCH_TASK"] == "ground"
    # The stub's answer holds no boxes, so the job writes its JSON and no overlay (issue 11.10).
    assert box["VLWATCH_SIDECARS"].splitlines() == [str(boxed) + ".boxes.json"]
    [failed] = records(failed_log)
    assert failed["VLWATCH_SOURCE"] == str(bad) and "rejected" in failed["VLWATCH_ERROR"]
    assert failed["VLWATCH_SIDECARS"] == ""
    assert all("VLWATCH_API_TOKEN" not in r for r in done)  # the daemon's secrets stay with it


def test_a_failing_or_hanging_hook_does_not_stop_the_daemon(tmp_path: Path) -> None:  # issue 13.6
    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path, """
        model: {backend: stub, name: stub-model}
        state: ./state/state.db
        include: [describe]
        watch:
          - path: ./inbox
            settle: 0.3s
        rules:
          - name: hang
            match: ["hang/*.png"]
            task: describe
            on_done: [sh, -c, "sleep 300"]
          - name: fail
            match: ["fail/*.png"]
            task: describe
            on_done: [sh, -c, "echo something broke >&2; exit 3"]
          - name: absent
            match: ["absent/*.png"]
            task: describe
            on_done: [/no/such/program]
        hooks: {timeout: 1s}
        api: {listen: null}
        """)
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend").start()
    try:
        for folder, rule in (("hang", "hang"), ("fail", "fail"), ("absent", "absent")):
            d.wait_done(put(tmp_path / "inbox" / folder / "x.png", png_bytes(hash(folder) % 1000)), rule)
        later = [put(tmp_path / "inbox" / f"later{i}.png", png_bytes(50 + i)) for i in range(3)]
        for p in later:
            d.wait_done(p)
        wait_until(lambda: "killed" in d.log() and "exited with 3" in d.log() and "cannot run" in d.log(),
                   "the hook failures in the log", log=d.log)
        assert d.proc.poll() is None
        rc, _ = d.stop()
        assert rc == 0
    finally:
        d.close()
    log = d.log()
    assert "still running after 1s; killed" in log and "something broke" in log
    assert "/no/such/program: No such file or directory" in log


def test_hook_config_is_checked(tmp_path: Path) -> None:  # issue 13.6
    text = """
        rules:
          - name: r
            task: describe
            on_done: "notify-send done"
        hooks:
          on_failed: []
          timeout: soon
        """
    with pytest.raises(ConfigError) as caught:
        parse_config(__import__("textwrap").dedent(text), tmp_path / "c.yaml")
    found = {p.where: p.message for p in caught.value.problems}
    assert "list of words" in found["rules[0].on_done"] and "must name a command" in found["hooks.on_failed"]
    assert "duration" in found["hooks.timeout"]


def test_a_hanging_hook_is_killed_with_everything_it_started(tmp_path: Path) -> None:  # issue 13.6
    marker = tmp_path / "grandchild-lived"
    hook = hooks.Hook(("sh", "-c", f"(sleep 3; touch {marker}) & sleep 300"), {"PATH": "/usr/bin:/bin"}, 0.5, "test")
    started = time.monotonic()
    assert hooks.run(hook) is None
    assert time.monotonic() - started < 10
    time.sleep(3.5)  # the grandchild would have touched the marker by now, had it survived
    assert not marker.exists()


def test_explain_lists_hooks_config_ok(tmp_path: Path) -> None:  # issue 13.6: a valid hooks section passes check
    config = write_config(tmp_path, """
        include: [describe]
        rules:
          - name: mine
            task: describe
            on_done: [notify-send, vlwatch, "$VLWATCH_SOURCE is done"]
        hooks:
          on_failed: [notify-send, -u, critical, vlwatch failed]
          timeout: 30s
        api: {listen: null}
        """)
    done = run_vlwatch("check", "--config", config)
    assert done.returncode == 0, done.stdout


def test_process_without_a_daemon_runs_the_hooks_as_the_daemon_would(tmp_path: Path) -> None:  # issue 22.1
    # `vlwatch process` with no daemon now runs the files through the daemon's own job loop: its hooks run
    # (they did when a daemon took the files, and did not without one), and the state file is left alone.
    done_log, failed_log = tmp_path / "done.jsonl", tmp_path / "failed.jsonl"
    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path, "model: {backend: stub, name: stub-model}\nstate: ./state/state.db\n"
                          "include: [describe]\nwatch: [{path: ./inbox}]\njobs: {attempts: 3, backoff: 1h}\n"
                          f"hooks: {{on_done: {_recorder(done_log)}, on_failed: {_recorder(failed_log)}}}\n")
    shots = [put(tmp_path / "inbox" / f"shot {i}.png", png_bytes(i)) for i in range(2)]
    bad = put(tmp_path / "inbox" / "bad one.png", png_bytes(10))  # the stub model rejects it
    done = run_vlwatch("process", "--config", config, shots[0], bad, shots[1],
                       env={"VLWATCH_PLUGINS": "tests.stub_backend"})
    assert done.returncode == 1
    # The sidecars in the order the files were given; the failure now, not retried in an hour.
    assert done.stdout.splitlines() == [str(p) + ".describe.md" for p in shots]
    assert f"error: {bad}: describe: " in done.stderr and "rejected" in done.stderr
    assert sorted(r["VLWATCH_SOURCE"] for r in records(done_log)) == sorted(map(str, shots))
    assert [r["VLWATCH_SOURCE"] for r in records(failed_log)] == [str(bad)]
    assert not (tmp_path / "state").exists()
