"""Time to first token of an API chat request: idle engine vs one saturated by a folder backlog.

Issue 13's goal: an interactive request (``POST /v1/chat/completions``,
streamed) waits at most 0.5 s longer for its first token while the engine
works through a folder backlog than on an idle engine.

What it does, against a real ``python -m daemon run`` subprocess:

1. writes a config in a scratch folder (an empty watched inbox, the API on a
   free loopback port) and starts the daemon; by default its backend is the
   real transformers one on random weights (``daemon/bench/dummy_backend.py``,
   ``--load-format dummy`` style: no download, the real architecture);
2. warms up (model load, first-call compilation), then sends ``--requests``
   streamed chat requests one after another on the idle engine and records,
   for each, the seconds until the first content chunk (TTFT) and until the
   end;
3. drops ``--backlog`` noise images into the inbox (each renamed into place,
   as a scanner does), waits until the engine is busy with them, and sends
   the same requests again, spaced by ``--gap`` seconds, while the backlog
   drains; the queue must still hold work when the last one is answered
   (else the run says so: raise ``--backlog``);
4. prints both distributions and the difference of the medians, and writes
   them as JSON (``--out``).

TTFT counts from sending the request, so it includes decoding the request's
image and the wait for a free slot in the engine.  A backend that does not
stream sends its whole answer as one chunk: TTFT then equals the full time.

Run on the GPU host (the lead's device run), e.g.::

    python benchmarks/api_ttft.py --backlog 400 --requests 20 --out /tmp/out

and on any machine, as a smoke test of the script itself, with the stub::

    python benchmarks/api_ttft.py --plugin tests.stub_backend --backend stub \\
        --env VLWATCH_STUB_DELAY=0.2 --backlog 60 --requests 5
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is measured and how.")
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="model.name (dummy: only its config is used)")
    p.add_argument("--backend", default="transformers-dummy",
                   help="model.backend: transformers-dummy (random weights, default), transformers (real weights), ...")
    p.add_argument("--plugin", default="daemon.bench.dummy_backend", help="$VLWATCH_PLUGINS for the daemon")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the daemon")
    p.add_argument("--backlog", type=int, default=300, help="folder images dropped in for the saturated phase")
    p.add_argument("--image-size", default="1036x1036", help="WxH of every image (backlog and requests)")
    p.add_argument("--job-tokens", type=int, default=256, help="max_new_tokens of a folder job")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of an API request")
    p.add_argument("--requests", type=int, default=10, help="API requests per phase")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between requests in the saturated phase")
    p.add_argument("--ask-after", type=float, default=0.0,
                   help="seconds to wait once the backlog started before asking: long enough (~12 s for 256 "
                        "slots on an H100) and every ask finds the slots full and takes one back from the backlog")
    p.add_argument("--batch-size", default="auto", help="model.batch_size")
    p.add_argument("--max-pixels", type=int, default=1003520, help="model.max_pixels")
    p.add_argument("--max-gpu-memory", default=None, help="model.max_gpu_memory, e.g. 60GiB")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of backlog PNGs made once and reused by later runs (default: in the workdir)")
    p.add_argument("--out", type=Path, default=None, help="folder for api_ttft.json and the daemon log")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the daemon and the model")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_png(seed: int, width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _write_noise(path: Path, seed: int, width: int, height: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(noise_png(seed, width, height))
    tmp.rename(path)


def make_backlog(folder: Path, count: int, width: int, height: int) -> None:
    """``count`` noise PNGs in ``folder`` (kept: a second run reuses them), made on every core."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"b{i:05d}.png").exists()]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_noise, [folder / f"b{i:05d}.png" for i in missing], missing,
                      [width] * len(missing), [height] * len(missing)))


def write_config(work: Path, args: argparse.Namespace, port: int) -> Path:
    gpu = f"  max_gpu_memory: {args.max_gpu_memory}\n" if args.max_gpu_memory else ""
    text = f"""\
model:
  backend: {args.backend}
  name: {args.model}
  max_pixels: {args.max_pixels}
  max_new_tokens: {max(args.job_tokens, args.max_tokens)}
  batch_size: {args.batch_size}
  idle_unload: 0
{gpu}state: {work / 'state.db'}
watch:
  - path: {work / 'inbox'}
    settle: 0.2s
rules:
  - name: bench
    task: describe
    max_new_tokens: {args.job_tokens}
jobs: {{batch_wait: 0.05s, rescan: 0}}
api:
  listen: 127.0.0.1:{port}
"""
    path = work / "config.yaml"
    path.write_text(text)
    return path


def stream_once(client: Any, image_url: str, max_tokens: int) -> tuple[float, float, int, float, float]:
    """(seconds to the first content chunk, seconds to the end, chunks, longest gap between two content
    chunks, when it was sent: Unix time, to set beside the daemon's log) of one streamed request."""
    body = {"model": "bench", "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "Describe this image."}]}]}
    sent = time.time()
    started = time.perf_counter()
    first = None
    chunks = 0
    last = gap = 0.0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", ())):
                chunks += 1
                now = time.perf_counter() - started
                if first is None:
                    first = now
                else:
                    gap = max(gap, now - last)
                last = now
    total = time.perf_counter() - started
    return (first if first is not None else total), total, chunks, gap, sent


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p90": p90, "min": ordered[0], "max": ordered[-1]}


def main(argv: list[str] | None = None) -> int:
    import httpx

    args = parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlwatch-ttft-"))
    (work / "inbox").mkdir(parents=True, exist_ok=True)
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(work, args, port)
    env = {**os.environ, "VLWATCH_PLUGINS": args.plugin, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    log = open(out / "api_ttft-daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "-v", "run", "--config", str(config)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(args.start_timeout))
    request_image = "data:image/png;base64," + base64.b64encode(noise_png(10**6, width, height)).decode()
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode}; see {out / 'api_ttft-daemon.log'}")
            try:
                if client.get("/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon's API did not come up")
            time.sleep(0.2)
        print("warming up (model load)...", file=sys.stderr)
        for _ in range(2):
            stream_once(client, request_image, args.max_tokens)

        idle = [stream_once(client, request_image, args.max_tokens) for _ in range(args.requests)]
        print(f"idle: TTFT median {summary([r[0] for r in idle])['median']:.3f}s", file=sys.stderr)

        # Written outside the inbox first and then renamed in at once, so the whole
        # backlog is queued before the measured requests (writing 400 noise PNGs
        # takes longer than the engine needs for many of them).
        print(f"writing {args.backlog} images, then linking them into the inbox...", file=sys.stderr)
        staging = args.images or work / "staging"
        make_backlog(staging, args.backlog, width, height)
        for i in range(args.backlog):  # a hard link appears whole, as a rename does
            os.link(staging / f"b{i:05d}.png", work / "inbox" / f"b{i:05d}.png")
        while True:  # busy: jobs claimed, the engine working
            counts = client.get("/api/v1/status").json()["counts"]
            if counts["running"] > 0 or counts["done"] > 0:
                break
            if time.monotonic() > deadline + args.start_timeout:
                raise RuntimeError("the backlog never started")
            time.sleep(0.2)
        time.sleep(args.gap + args.ask_after)
        saturated = []
        for _ in range(args.requests):
            saturated.append(stream_once(client, request_image, args.max_tokens))
            time.sleep(args.gap)
        counts = client.get("/api/v1/status").json()["counts"]
        still = counts["queued"] + counts["running"]
        ti, ts = summary([r[0] for r in idle]), summary([r[0] for r in saturated])
        result.update({
            "idle": {"ttft": ti, "total": summary([r[1] for r in idle]), "chunks": [r[2] for r in idle],
                     "longest_gap": summary([r[3] for r in idle])},
            "saturated": {"ttft": ts, "total": summary([r[1] for r in saturated]),
                          "chunks": [r[2] for r in saturated], "longest_gap": summary([r[3] for r in saturated])},
            "ttft_median_difference_s": ts["median"] - ti["median"],
            "backlog_left_at_end": still,
            "still_saturated": still > 0,
            "raw": {"idle": idle, "saturated": saturated},
        })
        print(f"{'':10} {'TTFT median':>12} {'TTFT max':>9} {'answer median':>14} {'p90':>7} {'max':>7}"
              f" {'longest gap':>12}")
        for name in ("idle", "saturated"):
            r = result[name]
            print(f"{name:10} {r['ttft']['median']:11.3f}s {r['ttft']['max']:8.3f}s {r['total']['median']:13.3f}s"
                  f" {r['total']['p90']:6.3f}s {r['total']['max']:6.3f}s {r['longest_gap']['max']:11.3f}s")
        print(f"difference of TTFT medians: {result['ttft_median_difference_s']:+.3f}s (goal: <= +0.5s); "
              f"{still} folder jobs were still queued or running at the end"
              + ("" if still else " -- NOT saturated to the end: raise --backlog"))
        (out / "api_ttft.json").write_text(json.dumps(result, indent=2))
        return 0
    finally:
        client.close()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
