"""Startup problems with the state database are one clear line and exit 2 (issue 10.16).

The real ``vlwatch`` command in a subprocess: a state folder nothing can be
written to, and a state file whose header is not SQLite's.  Exit 2 is a
setup problem (``RestartPreventExitStatus=2``: systemd does not restart in
a loop); no traceback reaches the user.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_vlwatch, write_config


def _config(tmp_path: Path, state: Path) -> Path:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return write_config(tmp_path, f"""
        model: {{backend: openai, name: m, base_url: "http://127.0.0.1:9/v1"}}
        state: {state}
        watch: [{{path: ./inbox}}]
        rules: [{{name: d, task: custom, prompt: x, output: md}}]
    """)


def _read_only_state(tmp_path: Path) -> Path:
    """A state path whose folder refuses new files, for this user."""
    if os.geteuid() == 0:
        # root ignores permission bits; sysfs refuses new files even to root.
        return Path("/sys/state.db")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "state.db"


# `scan --dry-run` creates no state file (issue 11.3: read-only commands create nothing), so a plain
# `scan`, which must, stands for it here.
@pytest.mark.parametrize("command", [("run",), ("status",), ("scan",), ("retry", "--all")])
def test_a_read_only_state_folder_is_one_line_and_exit_2(tmp_path: Path, command: tuple[str, ...]) -> None:
    # issue 10.16
    state = _read_only_state(tmp_path)
    config = _config(tmp_path, state)
    if command[0] in ("status", "retry") and not state.exists():
        pytest.skip(f"`{command[0]}` only reads a state file that exists")  # nothing to open, nothing to say
    result = run_vlwatch(*command, "--config", config, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vlwatch:")]
    assert len(lines) == 1 and str(state.parent) in lines[0] and "writable" in lines[0], result.stderr


@pytest.mark.parametrize("command", [("run",), ("status",), ("retry", "--all")])
def test_a_corrupt_state_file_is_one_line_and_exit_2(tmp_path: Path, command: tuple[str, ...]) -> None:
    # issue 10.16
    state = tmp_path / "state" / "state.db"
    state.parent.mkdir()
    state.write_bytes(b"this is not an SQLite header, just some bytes\n" * 200)
    config = _config(tmp_path, state)
    result = run_vlwatch(*command, "--config", config, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vlwatch:")]
    assert len(lines) == 1 and str(state) in lines[0] and "corrupt" in lines[0], result.stderr
