"""A sidecar temp file left by a killed writer is cleaned at the next start (issue 27).

It stayed behind after a ``kill -9`` and a full restart, because only temp
files older than an hour were swept.  Its name now says which process of
which host wrote it, so the catch-up at start removes one whose writer is
gone, and keeps one a live process may still be writing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon.intake.sidecars import temp_name, temp_writer_gone
from tests.conftest import REPO, Daemon, wait_until
from tests.test_api import api_config, free_port


def _dead_writers_temp() -> str:
    """A temp name made by a process that has exited since."""
    r = subprocess.run([sys.executable, "-c", "from daemon.intake.sidecars import temp_name; print(temp_name('0a1b2c'))"],
                       capture_output=True, text=True, cwd=REPO, check=True)
    return r.stdout.strip()


def test_names_tell_a_dead_writer() -> None:
    assert not temp_writer_gone(temp_name("x1"))  # this process
    assert temp_writer_gone(_dead_writers_temp())
    assert not temp_writer_gone(".vlwatch-0a1b2c3d4e5f.tmp")  # the old form: age decides
    assert not temp_writer_gone(".vlwatch-otherhost-1-0a1b2c.tmp")  # a shared folder's other host


def test_the_start_sweeps_a_dead_writers_temp_file(tmp_path: Path) -> None:
    config = api_config(tmp_path, free_port())
    inbox = tmp_path / "inbox"
    dead = inbox / _dead_writers_temp()
    live = inbox / temp_name("livewr")
    old_form = inbox / ".vlwatch-0a1b2c3d4e5f.tmp"
    for f in (dead, live, old_form):
        f.write_bytes(b"half a sidecar")
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend").start()
    try:
        wait_until(lambda: not dead.exists(), "the dead writer's temp file to go", log=d.log)
        wait_until(lambda: "catch-up:" in d.log(), "the catch-up to end", log=d.log)
        assert live.exists() and old_form.exists()  # may still be written: left alone
    finally:
        d.stop()
        d.close()
