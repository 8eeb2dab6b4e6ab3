"""`vlwatch run` through the openai backend while its server goes away and comes back.

The daemon runs as a real subprocess, watching a folder, with the fault
server (tests/fault_server.py) as its model server.  The server is stopped
under a burst of files and started again on the same port: every file must
end with exactly one sidecar, no job may be marked failed (an unreachable
server is not the files' fault), and `vlwatch status` must show the outage
while it lasts.  The key of ``api_key_env`` must be in the requests' headers
and in no log line, state file or sidecar.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Daemon, run_vlwatch, wait_until, write_config
from tests.fault_server import FaultServer, Reply

KEY = "sk-vlwatch-daemon-2c41e8f0a9b7"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    wait_until(check, what, timeout)


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer() as server:
        server.default = Reply.ok("a described image", delay=0.05)
        yield server


def status(config: Path) -> dict:
    done = run_vlwatch("status", "--json", "--config", config, timeout=60, env={"VLWATCH_TEST_KEY": KEY})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def drop_image(folder: Path, name: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path = folder / name
    tmp = folder / f".{name}.part"
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp, format="PNG")
    tmp.rename(path)  # appears complete, as a scanner's finished file does
    return path


def test_daemon_survives_a_server_outage_under_a_burst(fault: FaultServer, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    state = tmp_path / "state" / "state.db"
    config = write_config(tmp_path, f"""
        model:
          backend: openai
          name: test-model
          base_url: {fault.url}
          api_key_env: VLWATCH_TEST_KEY
          max_concurrency: 4
          timeout: 10s
          max_new_tokens: 16
        state: {state}
        include: [describe]
        watch:
          - path: ./inbox
            settle: 0.3s
        jobs: {{attempts: 2, backoff: 1s, batch_wait: 0.1s}}
    """)
    daemon = Daemon(tmp_path, config, state=state, verbose=2, VLWATCH_TEST_KEY=KEY)
    try:
        daemon.start()
        first = drop_image(inbox, "first.png", 0)
        sidecar = lambda p: p.with_name(p.name + ".describe.md")  # noqa: E731
        wait_for("the first sidecar", lambda: sidecar(first).exists())

        fault.stop()
        burst = [drop_image(inbox, f"scan-{i:02d}.png", i + 1) for i in range(8)]

        def outage_shown() -> bool:
            backend = status(config).get("backend")
            return bool(backend) and backend.get("available") is False
        wait_for("`vlwatch status` to show the outage", outage_shown)
        shown = status(config)
        assert "connection refused" in shown["backend"]["error"]
        assert shown["counts"]["failed"] == 0
        assert not any(sidecar(p).exists() for p in burst)
        time.sleep(2)  # a while longer down: still nothing may fail
        assert status(config)["counts"]["failed"] == 0

        fault.start()  # the same port
        wait_for("every sidecar after the server came back",
                 lambda: all(sidecar(p).exists() for p in burst), timeout=120)
        wait_for("the outage to clear in status", lambda: not (status(config).get("backend") or {}))
        final = status(config)
        assert final["counts"]["failed"] == 0 and final["failures"] == []
        assert final["counts"]["done"] == 9 and final["counts"]["queued"] == 0
        code = daemon.stop()[0]
    finally:
        daemon.close()
    output = daemon.log()
    assert code == 0, output

    for image in [first, *burst]:
        outputs = sorted(p.name for p in inbox.iterdir() if p.name.startswith(image.name + "."))
        assert outputs == [image.name + ".describe.md"], outputs  # exactly one sidecar each
        assert sidecar(image).read_text().splitlines()[0] == "a described image"  # then the provenance line (issue 11.10)
    assert not list(inbox.glob(".vlwatch-*"))

    # The key went to the server and nowhere else: not the log (at DEBUG), the state, the sidecars.
    assert fault.received and all(r.authorization == f"Bearer {KEY}" for r in fault.received)
    assert KEY not in output
    for path in [*inbox.iterdir(), *state.parent.iterdir()]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
