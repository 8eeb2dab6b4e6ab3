"""SIGTERM during a catch-up scan: the scan ends before the queue closes (issue 10.19).

The real daemon (stub backend, so no model loads) starts on a folder of a few
thousand files, so its catch-up scan is still walking when SIGTERM arrives:
it must stop cleanly, exit 0, and log no traceback.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_sigterm_during_the_catch_up_scan_logs_no_traceback(tmp_path: Path) -> None:
    # issue 10.19
    inbox = tmp_path / "inbox"
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    # Big enough that hashing a chunk of them outlasts the rest of the stop:
    # the scan is still at work when the queue would close.
    padding = os.urandom(300_000)
    for d in range(6):
        folder = inbox / f"d{d:02}"
        folder.mkdir(parents=True)
        for i in range(100):
            (folder / f"{i:03}.png").write_bytes(out.getvalue() + padding + bytes([d, i]))  # distinct bytes
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {backend: stub, name: stub-model}\n"
        "state: ./state/state.db\n"
        "watch: [{path: ./inbox, settle: 0.1s}]\n"
        "rules: [{name: desc, task: custom, prompt: 'Describe $filename', output: md}]\n"
        "jobs: {batch_wait: 0.1s}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "VLWATCH_CONFIG")}
    env.update(VLWATCH_PLUGINS="tests.stub_backend", PYTHONUNBUFFERED="1", HOME=str(tmp_path / "home"),
               PYTHONPATH=str(REPO))
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                                cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while b"watching" not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "failed" not in text, text[-3000:]
    assert "stopped" in text
    # The scan ended (and said so) before the daemon stopped.
    assert "catch-up:" in text and text.index("catch-up:") < text.index("INFO daemon.service: stopped"), text[-3000:]
