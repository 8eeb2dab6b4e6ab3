"""How much of a GPU step the daemon's feed costs: the real daemon, a simulated GPU (issue 22.6).

    python benchmarks/feed_overhead.py [--images 256] [--size 1036] [--step-ms 20] [--tokens 64]

``bench --end-to-end`` on an H100 made 83.7% of the engine-only figure.  In
the daemon the GPU thread calls the job feed (``engine.loop.JobFeed``)
between steps: ``next`` (claims jobs from SQLite, collects decoded pages),
``deliver`` (hands an answer to the writer thread).  Here the real daemon
runs with ``benchmarks.sim_gpu_backend``, whose GPU work is sleeps, on real
PNGs renamed into a watched folder; the report says how much wall time went
to those calls, against the sleeps a GPU would have spent working.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=1036)
    p.add_argument("--step-ms", type=float, default=20)
    p.add_argument("--prefill-ms", type=float, default=70)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--keep", action="store_true", help="keep the temp folder (daemon.log)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlwatch-feed-"))
    inbox, staging = work / "inbox", work / "staging"
    inbox.mkdir()
    staging.mkdir()
    (work / "config.yaml").write_text(
        "model: {backend: sim-gpu, name: sim}\n"
        f"state: {work / 'state.db'}\n"
        "include: []\n"
        f"watch: [{{path: {inbox}, recursive: false}}]\n"
        "rules: [{name: bench, match: ['*.png'], task: custom, prompt: Describe., output: md}]\n"
        "jobs: {attempts: 1, rescan: 0s}\n"
        "api: {listen: null}\n")
    rng = np.random.default_rng(0)
    for i in range(args.images):
        pixels = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        (staging / f"image-{i:05d}.png").write_bytes(buf.getvalue())
    report = work / "sim.jsonl"
    env = dict(os.environ, VLWATCH_PLUGINS="benchmarks.sim_gpu_backend", PYTHONPATH=str(ROOT),
               SIM_REPORT=str(report), SIM_STEP_MS=str(args.step_ms), SIM_PREFILL_MS=str(args.prefill_ms),
               SIM_TOKENS=str(args.tokens), SIM_SLOTS=str(args.slots), PYTHONUNBUFFERED="1")
    env.pop("VLWATCH_CONFIG", None)
    with open(work / "daemon.log", "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(work / "config.yaml")],
                                  cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)  # the daemon's start (no model to load)
        first = time.time()
        for f in sorted(staging.iterdir()):
            os.rename(f, inbox / f.name)
        want = [inbox / f"image-{i:05d}.png.bench.md" for i in range(args.images)]
        deadline = time.monotonic() + 600
        while not all(w.exists() for w in want):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon stopped or timed out; see {work / 'daemon.log'}")
            time.sleep(0.2)
        last = max(w.stat().st_mtime for w in want)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    runs = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    wall = last - first
    # A GPU fed at once: slots fill three images a round, then every step decodes all of them.
    # (three prompts a prefill round, one decode step after each round, then the rest of the last wave)
    waves = -(-args.images // args.slots)
    ideal_steps = -(-args.images // 3) + args.tokens * waves
    ideal = args.images * args.prefill_ms / 1000 + ideal_steps * args.step_ms / 1000
    spent = {k: sum(r["spent_s"][k] for r in runs) for k in ("next", "deliver", "more", "wait")}
    steps = sum(r["steps"] for r in runs)
    print(f"{args.images} images of {args.size} px, {args.slots} slots, {args.tokens} tokens, step "
          f"{args.step_ms} ms, prefill {args.prefill_ms} ms an image: first rename to last sidecar {wall:.2f} s "
          f"(a GPU fed at once: ~{ideal:.2f} s, {100 * ideal / wall:.1f}%); {len(runs)} serve call(s), "
          f"{steps} steps; on the GPU thread: " + ", ".join(f"{k} {v:.3f} s" for k, v in spent.items())
          + f"; slowest call {max((r['slowest'] for r in runs), key=lambda s: s['seconds'], default={})}"
          + (f"; first prompt admitted {runs[0]['first_item_at'] - first:.2f} s after the first rename, "
             f"serve began {runs[0]['serve_started_at'] - first:+.2f} s; steps where slots were free and "
             f"nothing was admitted: {sum(r['steps_without_admission'] for r in runs)}; last answer delivered -> last "
             f"sidecar written: {last - max(r['last_delivered_at'] or 0 for r in runs):.2f} s" if runs else ""))
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
