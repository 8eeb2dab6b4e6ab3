"""The CLI and the page tell the truth (issue 27): counts in the right number, and the like."""

from __future__ import annotations

import json
import time
from pathlib import Path

from daemon.store.queue import Candidate, Queue
from tests.conftest import run_vlwatch, write_config


def _failed_job(state: Path, source: Path) -> int:
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"\x89PNG not really")
    st = source.stat()
    with Queue(state) as q:
        (queued,) = q.enqueue([Candidate(source, "describe", "h1", st.st_size, st.st_mtime_ns, seen_at=time.time() + 1)])
        (job,) = q.claim(1)
        q.fail(job.id, "the model refused", retry_at=None)
    return queued.id


def test_status_says_1_attempt(tmp_path: Path) -> None:
    state = tmp_path / "state" / "state.db"
    _failed_job(state, tmp_path / "inbox" / "a.png")
    config = write_config(tmp_path, f"""
        state: {state}
        include: [describe]
        watch:
          - path: {tmp_path / 'inbox'}
        """)
    r = run_vlwatch("status", "--config", config, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "after 1 attempt," in r.stdout and "1 attempts" not in r.stdout, r.stdout


def test_check_cites_the_line_of_model_name(tmp_path: Path) -> None:
    # issue 27: the warning cited the model mapping's first line (here `backend:`), not `name:`
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text("state: ./s.db\ninclude: [describe]\nwatch:\n  - path: ./inbox\n\n"
                      "model:\n  backend: transformers\n  max_pixels: 1003520\n  name: Qwen/Not-Here-7B\n")
    r = run_vlwatch("check", "--config", config, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{config}:9: model.name: model 'Qwen/Not-Here-7B' is not downloaded" in r.stdout, r.stdout


def test_status_after_a_kill_does_not_say_running_jobs(tmp_path: Path) -> None:
    # issue 27: after kill -9, status said "not running" and "1 running" at once
    state = tmp_path / "state" / "state.db"
    source = tmp_path / "inbox" / "b.png"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"\x89PNG not really")
    st = source.stat()
    with Queue(state) as q:  # claimed by a daemon that then died: the job stays "running" in the file
        q.enqueue([Candidate(source, "describe", "h2", st.st_size, st.st_mtime_ns, seen_at=time.time() + 1)])
        q.claim(1)
    config = write_config(tmp_path, f"""
        state: {state}
        include: [describe]
        watch:
          - path: {tmp_path / 'inbox'}
        """)
    r = run_vlwatch("status", "--config", config, timeout=120)
    assert "not running" in r.stdout and "0 running" in r.stdout and "1 interrupted" in r.stdout, r.stdout
    r = run_vlwatch("status", "--json", "--config", config, timeout=120)
    counts = json.loads(r.stdout)["counts"]
    assert counts["running"] == 0 and counts["interrupted"] == 1


def test_a_reload_keeps_the_models_since(tmp_path: Path) -> None:
    # issue 27: "loaded since" reset on every SIGHUP, though the same model stayed loaded
    import signal

    from tests.conftest import Daemon, png_bytes, put, wait_until
    from tests.test_api import api_config, free_port

    config = api_config(tmp_path, free_port())
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend").start()
    try:
        put(tmp_path / "inbox" / "a.png", png_bytes(1))  # a job loads the model

        def model() -> dict:
            r = run_vlwatch("status", "--json", "--config", config, timeout=120,
                            env={"VLWATCH_PLUGINS": "tests.stub_backend"})
            return json.loads(r.stdout)["model"] or {}
        wait_until(lambda: model().get("loaded"), "the model to load", log=d.log)
        since = model()["since"]
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in d.log(), "the reload", log=d.log)
        put(tmp_path / "inbox" / "b.png", png_bytes(2))  # a batch after it: the new worker runs
        wait_until(lambda: (tmp_path / "inbox" / "b.png.describe.md").exists(), "the second sidecar", log=d.log)
        assert model()["loaded"] and model()["since"] == since
    finally:
        d.stop()
        d.close()


def test_status_shows_the_device_in_use_not_the_configured_auto(tmp_path: Path, tiny_model: Path) -> None:
    # issue 27: status and the overview showed `auto` (the config) rather than where the model runs.
    from tests.conftest import Daemon, png_bytes, put, wait_until

    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path, f"""
        model:
          name: {tiny_model}
          device: auto
          max_new_tokens: 4
          max_pixels: 50000
        state: ./state/state.db
        include: [describe]
        watch:
          - path: ./inbox
            settle: 0.3s
        """)
    d = Daemon(tmp_path, config).start()
    try:
        put(tmp_path / "inbox" / "a.png", png_bytes(1))  # a job loads the model
        wait_until(lambda: (tmp_path / "inbox" / "a.png.describe.md").exists(), "the sidecar", log=d.log)
        wait_until(lambda: json.loads(run_vlwatch("status", "--json", "--config", config).stdout)["model"]
                   .get("device"), "the device in the status", log=d.log)
        info = json.loads(run_vlwatch("status", "--json", "--config", config).stdout)
        assert info["model"]["device"] == "cpu"  # this machine has no GPU: auto came to the CPU
        shown = run_vlwatch("status", "--config", config).stdout
        assert "loaded on cpu" in shown
        # issue 22.4: what the load-time check of the model's private touchpoints found
        assert "comparisons with the stock path agree" in info["model"]["touchpoints"]
        assert "checked  Qwen2.5-VL touchpoints: " in shown
    finally:
        d.stop()
        d.close()
