"""Log lines cannot be forged by file names or model text (issue 10.12).

The real daemon (``python -m daemon run`` in a subprocess, stub backend so no
model loads) processes files whose names hold a newline followed by a fake
log record, and ANSI escapes; its stderr must hold no such standalone line
and no raw escape character.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from daemon.store.queue import Queue

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 90.0


def _png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return out.getvalue()


def test_hostile_names_cannot_forge_log_lines_or_reach_the_terminal_raw(tmp_path: Path) -> None:
    # issue 10.12
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {backend: stub, name: stub-model}\n"
        "state: ./state/state.db\n"
        "watch: [{path: ./inbox, settle: 0.3s}]\n"
        "rules: [{name: desc, task: custom, prompt: 'Describe $filename', output: md}]\n"
        "jobs: {attempts: 1, backoff: 0.2s, batch_wait: 0.1s}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "VLWATCH_CONFIG")}
    env.update(VLWATCH_PLUGINS="tests.stub_backend", VLWATCH_LOG_LEVEL="DEBUG", PYTHONUNBUFFERED="1",
               HOME=str(tmp_path / "home"))
    log_path = tmp_path / "stderr.log"
    names = [
        "a\nERROR daemon.service: FORGED LINE.png",           # processed: done
        "b\r\nCRITICAL daemon.engine.loop: FORGED TOO.png",         # \r too
        "\x1b[31mred\x1b[0m\x1b]0;title\x07.png",               # ANSI colour and a terminal title
        "bad\nERROR daemon.service: FORGED FAILURE.png",       # the stub rejects "bad": a failure line
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                                cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log)
    try:
        _wait(lambda: (tmp_path / "state" / "state.db").exists() and b"watching" in log_path.read_bytes(),
              "the daemon to start", proc, log_path)
        for i, name in enumerate(names):
            (inbox / name).write_bytes(_png(["red", "green", "blue", "white"][i]))

        def settled() -> bool:
            with Queue(tmp_path / "state" / "state.db") as q:
                c = q.counts()
            return c["done"] == 3 and c["failed"] == 1

        _wait(settled, "three files done and one failed", proc, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log_path.read_bytes().decode("utf-8", "replace")
    assert "FORGED LINE" in text and "FORGED FAILURE" in text  # the names are logged, escaped
    for line in text.splitlines():
        assert not re.match(r"(<\d>)?(ERROR|CRITICAL|WARNING|INFO|DEBUG) daemon\.\w+: FORGED", line), line
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "a\\nERROR daemon.service: FORGED LINE.png" in text


def _wait(predicate, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: gave up (exit {proc.poll()})\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)
