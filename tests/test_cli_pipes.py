"""Every command that prints exits quietly when its reader goes away (issue 27: `vlwatch search … | head`
ended with a BrokenPipe traceback).

The real command, its stdout a pipe whose reading end is closed before it
starts: its first write fails with EPIPE, as under ``| head`` once head has
had enough.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.store.queue import Queue
from tests.conftest import REPO, write_config
from tests.test_search import finish_job


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pipes")
    state = tmp / "state" / "state.db"
    with Queue(state) as q:
        for i in range(50):
            finish_job(q, tmp / "inbox" / f"f{i}.png", "ocr", {"md": "quota exceeded " * 40})
    config = write_config(tmp, f"""
        state: {state}
        include: [ocr, describe]
        watch:
          - path: {tmp / 'inbox'}
        """)
    return config, tmp / "inbox" / "f1.png"


def _closed_reader(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "daemon", *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, cwd=REPO, timeout=120)
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [
    ("--help",), ("search", "quota"), ("search", "quota", "--json"), ("status",), ("status", "--json"),
    ("explain", "FILE"), ("check",), ("--print-completion", "bash"), ("scan", "--dry-run"),
])
def test_a_reader_that_goes_away_ends_the_command_quietly(setup, args) -> None:
    config, file = setup
    args = tuple(str(file) if a == "FILE" else a for a in args)
    if args[0] not in ("--help", "--print-completion"):
        args = (*args, "--config", str(config))
    r = _closed_reader(*args)
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err, \
        (r.returncode, err[-2000:])
