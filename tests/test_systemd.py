"""The shipped systemd units: valid, and the system unit sandboxed to 2.5 or better.

Skipped where ``systemd-analyze`` is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str, user: bool = False, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if user and tmp is not None:
        # A user-mode check wants a runtime dir even offline.
        runtime = tmp / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    cmd = [str(ANALYZE), *(["--user"] if user else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_system_unit_verifies() -> None:
    done = analyze("verify", str(UNITS / "vlwatch.service"))
    assert done.returncode == 0, done.stderr
    assert "vlwatch.service" not in done.stderr  # no warnings about our unit either


def test_user_unit_verifies(tmp_path: Path) -> None:
    done = analyze("verify", str(UNITS / "vlwatch-user.service"), user=True, tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "vlwatch-user.service" not in done.stderr


def test_system_unit_is_sandboxed_but_keeps_the_gpu() -> None:
    done = analyze("security", "--offline=true", str(UNITS / "vlwatch.service"))
    m = re.search(r"Overall exposure level for vlwatch\.service: (\d+\.\d+)", done.stdout + done.stderr)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.5
    unit = (UNITS / "vlwatch.service").read_text()
    for needed in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                   "StateDirectory=vlwatch", "CacheDirectory=vlwatch", "DevicePolicy=closed",
                   "DeviceAllow=char-nvidia-frontend rw", "DeviceAllow=char-nvidia-uvm rw"):
        assert needed in unit
    assert "PrivateDevices=yes" not in unit  # it would hide /dev/nvidia*
