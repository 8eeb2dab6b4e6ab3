"""Soak: many ``kill -9`` cycles of the real daemon while files keep arriving.

Usage:
    python benchmarks/soak.py [--cycles 12] [--files 16] [--model DIR] [--seed 1] [--keep DIR]

Each cycle starts ``python -m daemon run`` on the tiny random-weight
Qwen2.5-VL checkpoint (built from ``tests/tiny_model.py`` unless ``--model``
names one), drops a new set of files in every way files arrive (written at
once, renamed into place, written slowly in chunks by a thread that may still
be writing when the kill comes, in sub-folders, rewritten with new bytes,
and into a folder whose ground rule writes a JSON sidecar plus an overlay
picture), waits a random time, and kills the daemon with SIGKILL — in the
middle of loading the model, of a batch, of writing a sidecar, wherever it
falls.  After the last cycle a final daemon runs until every file is done,
and is stopped with SIGTERM.

Then every source file is checked and the counts printed:

- **lost**: a file without its sidecars (or whose sidecar is not from its final bytes);
- **duplicated**: a file processed more than once for the same bytes, or any
  extra file next to it (a sidecar of a sidecar, an overlay taken as input);
- **partial**: a sidecar that is empty where it cannot be, or does not parse
  (JSON, PNG) — atomic writes must make this impossible.

All three must be 0 (exit code 1 otherwise).  Also printed: jobs that ended
``failed`` and temporary files left by kills (hidden ``.vlwatch-*.tmp``,
removed by the daemon's scan once an hour old).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.store.keys import content_hash  # noqa: E402


def png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class Soak:
    def __init__(self, work: Path, model: Path, rng: random.Random) -> None:
        self.work, self.rng = work, rng
        self.inbox = work / "inbox"
        self.outside = work / "outside"
        for d in (self.inbox, self.outside, self.inbox / "boxes"):
            d.mkdir(parents=True, exist_ok=True)
        self.config = work / "config.yaml"
        self.config.write_text(textwrap.dedent(f"""\
            model: {{name: {model}, device: cpu, max_new_tokens: 24, max_pixels: 50000, batch_size: 4}}
            state: ./state.db
            include: [describe]
            watch: [{{path: ./inbox, settle: 1s}}]
            rules: [{{name: boxes, match: ["boxes/*.png"], task: ground}}]
            # Kills count as attempts (a file that crashes the daemon must not loop
            # forever); this soak kills on purpose, so it allows many.
            jobs: {{attempts: 50, backoff: 1s, batch_wait: 0.2s}}
        """))
        self.log = open(work / "daemon.log", "ab")
        # The daemon says READY=1 on this socket, as it would to systemd.
        self._sockdir = Path(tempfile.mkdtemp(prefix="vlw-soak-", dir="/tmp"))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self._sockdir / "notify"))
        self.files: list[Path] = []
        self.writers: list[threading.Thread] = []
        self.seed = 0
        self.kills = 0

    # -- files arriving
    def drop(self, n: int) -> None:
        for _ in range(n):
            self.seed += 1
            data = png_bytes(self.seed, (self.rng.randint(40, 200), self.rng.randint(40, 200)))
            way = self.rng.choice(["write", "rename", "slow", "sub", "boxes", "rewrite"])
            if way == "rewrite" and self.files:
                target = self.rng.choice(self.files)
                if target.exists() and not any(w.is_alive() for w in self.writers):
                    target.write_bytes(data)  # new bytes for a file seen before
                continue
            name = f"f{self.seed:05d}.png"
            if way == "write":
                path = self.inbox / name
                path.write_bytes(data)
            elif way == "rename":
                tmp = self.outside / name
                tmp.write_bytes(data)
                path = self.inbox / name
                os.rename(tmp, path)
            elif way == "sub":
                path = self.inbox / f"d{self.seed % 3}" / name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
            elif way == "boxes":
                path = self.inbox / "boxes" / name
                path.write_bytes(data)
            else:
                path = self.inbox / name
                writer = threading.Thread(target=self._write_slowly, args=(path, data), daemon=True)
                writer.start()
                self.writers.append(writer)
            self.files.append(path)

    def _write_slowly(self, path: Path, data: bytes) -> None:
        step = -(-len(data) // 5)
        with open(path, "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(0.3)

    # -- the daemon
    def start(self, ready: bool = False) -> subprocess.Popen[bytes]:
        """Start a daemon; with ``ready``, wait until it says READY=1."""
        self.notify.setblocking(False)
        while True:  # forget what the last one said
            try:
                self.notify.recv(4096)
            except BlockingIOError:
                break
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "NOTIFY_SOCKET": str(self._sockdir / "notify")}
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
                                cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.notify.settimeout(1.0)
        deadline = time.monotonic() + 120
        while ready and time.monotonic() < deadline and proc.poll() is None:
            try:
                if b"READY=1" in self.notify.recv(4096):
                    break
            except TimeoutError:
                continue
        return proc

    def cycle(self, files: int, min_run: float, max_run: float) -> None:
        proc = self.start()
        time.sleep(0.5)
        self.drop(files)
        time.sleep(self.rng.uniform(min_run, max_run))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.kills += 1

    def finish(self, timeout: float) -> int:
        for w in self.writers:
            w.join()
        proc = self.start(ready=True)
        deadline = time.monotonic() + timeout
        while not self.all_done():
            if time.monotonic() > deadline or proc.poll() is not None:
                print("soak: not everything got done in time", file=sys.stderr)
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        self.notify.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)
        return rc

    # -- checking
    def rule_of(self, path: Path) -> str:
        return "boxes" if path.parent.name == "boxes" else "describe"

    def expected(self, path: Path) -> list[str]:
        if self.rule_of(path) == "boxes":
            return [f"{path.name}.boxes.json"]
        return [f"{path.name}.describe.md"]

    def optional(self, path: Path) -> set[str]:
        # The overlay is drawn only when the answer holds boxes (issue 11.10).
        return {f"{path.name}.boxes.overlay.png"} if self.rule_of(path) == "boxes" else set()

    def jobs(self) -> list[tuple[str, str, str, str]]:
        db = sqlite3.connect(self.work / "state.db", timeout=30)
        try:
            return db.execute("SELECT path, rule, hash, state FROM jobs ORDER BY id").fetchall()
        finally:
            db.close()

    def all_done(self) -> bool:
        try:
            jobs = self.jobs()
        except sqlite3.Error:
            return False
        latest = {(p, r): (h, s) for p, r, h, s in jobs}
        for f in set(self.files):
            got = latest.get((str(f), self.rule_of(f)))
            if got is None or got[1] not in ("done", "failed") or got[0] != content_hash(f):
                return False
        return True

    def report(self) -> dict[str, int]:
        jobs = self.jobs()
        latest = {(p, r): (h, s) for p, r, h, s in jobs}
        done_count: dict[tuple[str, str, str], int] = {}
        for p, r, h, s in jobs:
            if s == "done":
                done_count[(p, r, h)] = done_count.get((p, r, h), 0) + 1
        lost = duplicated = partial = 0
        sources = set(self.files)
        for f in sorted(sources):
            rule, names = self.rule_of(f), self.expected(f)
            got = latest.get((str(f), rule))
            present = sorted(p.name for p in f.parent.iterdir() if p.name.startswith(f.name + "."))
            if got is None or got[1] != "done" or got[0] != content_hash(f) or not set(names) <= set(present):
                lost += 1
            if set(names) <= set(present) and not set(present) <= set(names) | self.optional(f):
                duplicated += 1  # extra files beside it
            duplicated += sum(1 for (p, r, _), n in done_count.items() if p == str(f) and r == rule and n > 1)
            for name in names:
                if (f.parent / name).exists() and not self.complete(f.parent / name):
                    partial += 1
        strays = [p for p in self.inbox.rglob("*") if p.is_file() and p not in sources
                  and not any(p.name.startswith(s.name + ".") for s in sources if s.parent == p.parent)
                  and not p.name.startswith(".vlwatch-")]
        duplicated += len(strays)
        return {
            "files": len(sources), "lost": lost, "duplicated": duplicated, "partial": partial,
            "failed": sum(1 for h, s in latest.values() if s == "failed"),
            "litter": len(list(self.inbox.rglob(".vlwatch-*.tmp"))),
        }

    @staticmethod
    def complete(sidecar: Path) -> bool:
        try:
            if sidecar.name.endswith(".json"):
                json.loads(sidecar.read_text(encoding="utf-8"))
            elif sidecar.name.endswith(".png"):
                from PIL import Image

                with Image.open(sidecar) as image:
                    image.load()
            else:
                sidecar.read_text(encoding="utf-8")
        except Exception:
            return False
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12, help="kill -9 cycles (default 12)")
    parser.add_argument("--files", type=int, default=16, help="files dropped per cycle (default 16)")
    parser.add_argument("--min-run", type=float, default=1.0, help="shortest run before the kill, seconds")
    parser.add_argument("--max-run", type=float, default=14.0, help="longest run before the kill, seconds")
    parser.add_argument("--model", type=Path, help="a Qwen2.5-VL checkpoint folder (default: build the tiny one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="vlwatch-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model
        if model is None:
            from tests.tiny_model import build_tiny_model

            model = build_tiny_model(work / "tiny-model")
        soak = Soak(work, model, random.Random(args.seed))
        started = time.monotonic()
        for i in range(args.cycles):
            soak.cycle(args.files, args.min_run, args.max_run)
            print(f"cycle {i + 1}/{args.cycles}: killed; {len(set(soak.files))} files so far", flush=True)
        rc = soak.finish(timeout=900)
        r = soak.report()
        print(f"soak: {args.cycles} kill -9 cycles, {r['files']} files, {time.monotonic() - started:.0f}s; "
              f"final SIGTERM exit code {rc}")
        print(f"lost {r['lost']}, duplicated {r['duplicated']}, partial {r['partial']}  "
              f"(failed {r['failed']}, temp files left by kills {r['litter']})")
        return 0 if r["lost"] == r["duplicated"] == r["partial"] == 0 and rc == 0 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
