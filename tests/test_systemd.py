"""The shipped systemd units: valid, and the system unit sandboxed to 2.0 or better.

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
    assert float(m.group(1)) <= 2.0  # issue 10.15
    unit = (UNITS / "vlwatch.service").read_text()
    for needed in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                   "StateDirectory=vlwatch", "CacheDirectory=vlwatch", "DevicePolicy=closed",
                   "DeviceAllow=char-nvidia rw", "DeviceAllow=char-nvidia-uvm rw"):
        assert needed in unit
    assert "PrivateDevices=yes" not in unit  # it would hide /dev/nvidia*


PROC_DEVICES = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h100-proc-devices.txt"


def test_every_nvidia_node_of_the_gpu_host_is_allowed() -> None:
    # issue 10.15: under DevicePolicy=closed, DeviceAllow=char-NAME is matched
    # (as a glob) against the group names of /proc/devices; a name no driver
    # registers allows nothing.  Every NVIDIA device node seen on the lent
    # H100 host (driver 580) must have its major allowed.
    import fnmatch

    text = PROC_DEVICES.read_text()
    chars = text.split("Character devices:")[1].split("Block devices:")[0]
    groups: dict[int, list[str]] = {}
    for line in chars.splitlines():
        if line.strip():
            major, name = line.split(None, 1)
            groups.setdefault(int(major), []).append(name.strip())
    nodes = {int(m.group(1)) for m in re.finditer(r"^c\S+ .*? (\d+), +\d+ .*(?:nvidia\S*)$", text, re.M)}
    assert nodes == {195, 238, 241}, nodes  # nvidia0 + nvidiactl, nvidia-uvm, nvidia-caps
    unit = (UNITS / "vlwatch.service").read_text()
    allowed = re.findall(r"^DeviceAllow=char-(\S+) rw", unit, re.M)
    for major in nodes:
        assert any(fnmatch.fnmatch(name, pattern) for name in groups[major] for pattern in allowed), (major, groups[major])
    # Each group that exists on that host and is allowed is one we mean to allow.
    granted = {n for names in groups.values() for n in names if any(fnmatch.fnmatch(n, p) for p in allowed)}
    assert granted == {"nvidia", "nvidiactl", "nvidia-uvm", "nvidia-caps"}, granted
