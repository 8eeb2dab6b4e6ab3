"""Shared fixtures: an isolated user environment and the tiny Qwen2.5-VL checkpoint.

Every test runs with HOME, XDG dirs and VLWATCH_CONFIG pointed at a temp
folder (the llm habit), so nothing reads or writes the real user's config,
state or Hugging Face cache, and HF_HUB_OFFLINE makes any accidental network
access fail loudly instead of hanging.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Triton (the few-row FP8 kernel, tests/test_fp8_gemv.py) runs kernels in its CPU interpreter only when
# this is set before triton is first imported: its own helpers are built as interpreted functions then.
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image

from daemon.store.keys import content_hash
from daemon.store.queue import Job, Queue

REPO = Path(__file__).resolve().parent.parent
#: Generous: the CI machine has two cores shared with other work.
DEADLINE = 90.0


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("VLWATCH_CONFIG", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen2.5-VL checkpoint, built once per test session."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


def write_config(folder: Path, body: str) -> Path:
    """Write a config file from an indented snippet and return its path."""
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


def run_vlwatch(*args: str | os.PathLike[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `vlwatch` command (as `python -m daemon`) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


def _ours(thread: threading.Thread) -> bool:
    """A thread this code base started and is responsible for stopping: named ``vlwatch-*``,
    or a watchdog observer/emitter (every one of ours is a daemon thread, so ``daemon``
    says nothing: issue 10.20)."""
    from watchdog.observers.api import BaseObserver, EventEmitter

    return thread.name.startswith("vlwatch-") or isinstance(thread, (BaseObserver, EventEmitter))


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves our threads running (watchdog's conftest habit)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and _ours(t)]
    deadline = time.monotonic() + 5
    for t in leaked:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked threads: {still}"


# ------------------------------------------------ the daemon as a subprocess


def png_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def wait_until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE,
               log: Callable[[], str] | None = None, interval: float = 0.1) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` naming ``what`` (and the log's tail)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = "\n--- daemon log (tail) ---\n" + log()[-4000:] if log else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)


PLUGINS = "VLWATCH_PLUGINS"


def daemon_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a daemon under test: its own HOME and XDG dirs, offline, this checkout's code."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLWATCH_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", PLUGINS)}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_STATE_HOME=str(home / ".state"),
               XDG_CACHE_HOME=str(home / ".cache"), HF_HOME=str(home / ".cache" / "hf"), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


class Daemon:
    """``vlwatch run`` in a subprocess, with a notify socket standing in for systemd."""

    def __init__(self, workdir: Path, config: Path | str, *, cwd: Path = REPO, state: Path | None = None,
                 prefix: tuple[str, ...] = (), verbose: int = 0, log_path: Path | None = None, **env: str) -> None:
        self.workdir, self.config, self.cwd, self.prefix = workdir, config, cwd, prefix
        self.flags = ["-v"] * verbose
        self.state = state or workdir / "state" / "state.db"
        self.env = daemon_env(workdir / "home", **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.notes: list[str] = []
        self._sockdir = Path(tempfile.mkdtemp(prefix="vlw-", dir="/tmp"))  # AF_UNIX paths are short
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._sockdir / "notify"))
        self._sock.settimeout(0.2)
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read_notes, name="notify-reader", daemon=True)
        self._reader.start()
        self._runs = 0
        self.log_path = log_path or workdir / "daemon.log"
        self._queue: Queue | None = None

    # -- life
    def start(self, watchdog: bool = True) -> Daemon:
        self._runs += 1
        env = {**self.env, "NOTIFY_SOCKET": str(self._sockdir / "notify")}
        if watchdog:
            env["WATCHDOG_USEC"] = "2000000"
        log = open(self.log_path, "ab")
        log.write(f"=== start {self._runs}\n".encode())
        log.flush()
        self.notes = []
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "daemon", *self.flags, "run", "--config",
                                      str(self.config)],
                                     cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self.notified("READY=1") or self.proc.poll() is not None, "READY=1", log=self.log)
        assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}\n{self.log()}"
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, float]:
        """Signal the daemon and wait for it; return (exit code, seconds it took)."""
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # the daemon dumps every thread's stack to its log
            time.sleep(1)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s\n{self.log()[-8000:]}") from None
        return rc, time.monotonic() - start

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()
        if self._queue is not None:
            self._queue.close()
        self._closing.set()
        self._reader.join(5)
        self._sock.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    # -- what it says
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_count(self, text: str) -> int:
        return self.log().count(text)

    def _read_notes(self) -> None:
        # Drain the socket as systemd does: a full socket would make sd_notify fail.
        while not self._closing.is_set():
            try:
                self.notes += self._sock.recv(4096).decode().splitlines()
            except (TimeoutError, OSError):
                continue

    def notified(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in list(self.notes))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    # -- the state database
    @property
    def queue(self) -> Queue:
        if self._queue is None:
            self._queue = Queue(self.state)
        return self._queue

    def latest(self, image: Path, rule: str = "describe") -> Job | None:
        return self.queue.latest(image.absolute(), rule)

    def wait_done(self, image: Path, rule: str = "describe", timeout: float = DEADLINE) -> Job:
        """Wait until the newest job of ``image`` is done, for the bytes the file has now."""

        def done() -> bool:
            job = self.latest(image, rule)
            return job is not None and job.state == "done" and job.hash == content_hash(image)

        wait_until(done, f"{image.name} [{rule}] to be done", timeout, log=self.log)
        job = self.latest(image, rule)
        assert job is not None
        return job

    def wait_state(self, image: Path, state: str, rule: str = "describe") -> Job:
        wait_until(lambda: (j := self.latest(image, rule)) is not None and j.state == state,
                   f"{image.name} to be {state}", log=self.log)
        job = self.latest(image, rule)
        assert job is not None
        return job


def tiny_daemon_config(folder: Path, model: Path, *, include: str = "describe", port: int | None = None,
                       settle: str | None = None, **model_keys: object) -> Path:
    """A daemon config for the tiny checkpoint on the CPU: ``folder``/inbox watched, the state beside it.

    ``model_keys`` go into ``model:`` (max_new_tokens, batch_size, ...); ``port`` adds the API.
    """
    keys = {"device": "cpu", "max_new_tokens": 8, "max_pixels": 50000, **model_keys}
    model_lines = "".join(f"\n          {k}: {v}" for k, v in keys.items())
    api = f"\n        api:\n          listen: 127.0.0.1:{port}" if port is not None else ""
    settle_line = f"\n            settle: {settle}" if settle else ""
    return write_config(folder, f"""
        model:
          name: {model}{model_lines}
        state: ./state/state.db
        include: [{include}]
        watch:
          - path: ./inbox{settle_line}{api}
        """)
