"""``vlwatch ask`` (issue 13.4): through a running daemon's API, or with the model loaded in-process.

With a daemon the command must not load a model of its own: the stub
backend logs the pid of every process that answered, and all of them must
be the daemon's.  Without one, the stub (and the tiny real checkpoint)
answer in the ``ask`` process itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.conftest import run_vlwatch, write_config
from tests.test_api import api_config, free_port, shown
from tests.test_daemon import Daemon, png_bytes, put, wait_until


def stub_lines(log: Path) -> list[tuple[str, int, int]]:
    if not log.exists():
        return []
    return [(k, int(n), int(pid)) for k, n, pid in (line.split() for line in log.read_text().splitlines())]


def test_ask_through_the_running_daemon_loads_no_model(tmp_path: Path) -> None:  # issue 13.4
    port = free_port()
    config = api_config(tmp_path, port)
    log = tmp_path / "stub.log"
    env = {"VLWATCH_PLUGINS": "tests.stub_backend", "VLWATCH_STUB_LOG": str(log)}
    a = put(tmp_path / "elsewhere" / "a.png", png_bytes(1, (64, 48)))  # anywhere: ask sends the bytes
    b = put(tmp_path / "elsewhere" / "b.png", png_bytes(2, (300, 200)))
    d = Daemon(tmp_path, config, **env).start()
    try:
        wait_until(lambda: _up(port), "the API", log=d.log)
        done = run_vlwatch("ask", "which one is larger?", a, b, "--config", config, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"chat: 1 turns, 2 images ({shown((64, 48))}, {shown((300, 200))}); " \
                              "last: which one is larger?\n"
        done = run_vlwatch("ask", "and now?", a, "--json", "--max-tokens", "5", "--config", config, env=env)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["via"] == "daemon" and doc["answer"].endswith("last: and now?") and doc["model"] == "stub-model"
        pid = d.proc.pid
    finally:
        d.stop()
        d.close()
    chats = [line for line in stub_lines(log) if line[0] == "chat"]
    assert [(n, p) for _, n, p in chats] == [(2, pid), (1, pid)]  # both answered by the daemon, no second model


def test_ask_without_a_daemon_loads_the_model_itself(tmp_path: Path) -> None:  # issue 13.4
    config = api_config(tmp_path, free_port())
    log = tmp_path / "stub.log"
    a = put(tmp_path / "a.png", png_bytes(3, (64, 48)))
    b = put(tmp_path / "b.png", png_bytes(4, (90, 90)))
    env = {"VLWATCH_PLUGINS": "tests.stub_backend", "VLWATCH_STUB_LOG": str(log)}
    done = run_vlwatch("ask", "compare", a, b, "--config", config, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"chat: 1 turns, 2 images ({shown((64, 48))}, {shown((90, 90))}); last: compare\n"
    assert [k for k, _, _ in stub_lines(log)] == ["chat"]
    done = run_vlwatch("ask", "compare", a, tmp_path / "missing.png", "--config", config, env=env)
    assert done.returncode == 1 and "missing.png: no such file" in done.stderr


def test_ask_on_the_tiny_checkpoint_without_a_daemon(tmp_path: Path, tiny_model: Path) -> None:  # issue 13.4
    config = write_config(tmp_path, f"""
        model:
          name: {tiny_model}
          device: cpu
          max_new_tokens: 6
          max_pixels: 50000
        state: ./state/state.db
        include: [describe]
        api:
          listen: null
        """)
    a = put(tmp_path / "a.png", png_bytes(5, (64, 48)))
    b = put(tmp_path / "b.png", png_bytes(6, (80, 120)))
    done = run_vlwatch("ask", "what changed?", a, b, "--json", "--config", config)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["via"] == "local" and isinstance(doc["answer"], str) and 0 < doc["new_tokens"] <= 6


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_ask_never_prints_model_text_raw(tmp_path: Path) -> None:
    # issue 27: model text is hostile; the stub echoes the question, so an escape sequence in it
    # comes back as model text, through the daemon and without one
    hostile = "clear \x1b[2J title \x1b]0;pwned\x07 csi \x9b1m"
    port = free_port()
    config = api_config(tmp_path, port)
    env = {"VLWATCH_PLUGINS": "tests.stub_backend"}
    a = put(tmp_path / "a.png", png_bytes(5, (64, 48)))
    done = run_vlwatch("ask", hostile, a, "--config", config, env=env)  # no daemon: loaded here
    assert done.returncode == 0, done.stderr
    assert not any(c in done.stdout for c in "\x1b\x07\x9b") and "\\x1b[2J" in done.stdout, repr(done.stdout)
    d = Daemon(tmp_path, config, **env).start()
    try:
        wait_until(lambda: _up(port), "the API", log=d.log)
        for args in ((), ("--json",)):
            done = run_vlwatch("ask", hostile, a, *args, "--config", config, env=env)
            assert done.returncode == 0, done.stderr
            assert not any(c in done.stdout for c in "\x1b\x07\x9b"), repr(done.stdout)
        assert json.loads(done.stdout)["answer"].endswith("last: " + hostile)  # the JSON keeps it, escaped
    finally:
        d.stop()
        d.close()
