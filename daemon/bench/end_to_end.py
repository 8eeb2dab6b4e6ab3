"""``vlwatch bench --end-to-end``: the real daemon, files in, sidecars out (issue 22.6).

The engine-only setups time ``Worker.infer`` on images already in memory.
What a user gets also has the watcher, the queue in SQLite, decoding PNGs
from disk, prompt rendering, sidecar writes and the job loop between
batches.  This setup measures all of it:

1. writes a config in a temp folder: one watched inbox, one rule (the
   bench's prompt and ``--new-tokens``), the bench's model section (model,
   attention, dtype, device, pixels, batch size); ``--load-format dummy``
   runs the ``transformers-dummy`` plugin backend (``daemon.bench.dummy_backend``,
   the same random weights: they are seeded);
2. starts ``python -m daemon run`` on it;
3. warms it up: as many other images as the timed run, dropped in and
   answered (model load, compilation, CUDA graphs, cache sizing);
4. writes the timed images (the engine-only setups' images, as PNG, so
   the pixels are the same) beside the inbox and renames them in, as a
   scanner or ``mv`` does, and waits for every sidecar;
5. reports images/min from the first rename to the last sidecar written
   (its modification time), then stops the daemon with SIGTERM.

Nothing is sent anywhere: the daemon's API is off and the queue counts are
read from its state file (``status_info``, what ``vlwatch status`` prints).
A failed job ends the setup with its reason; the daemon's log is kept in
the temp folder then, and the folder's path is in the message.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from daemon import env as vlwatch_env
from daemon.bench.results import SetupResult
from daemon.errors import VlwatchError

log = logging.getLogger(__name__)

RULE = "bench"
#: Sidecar of an image under RULE (``output: md``): ``<image>.bench.md``.
SIDECAR_SUFFIX = f".{RULE}.md"
PLUGIN = "daemon.bench.dummy_backend"


#: Issue 22.6's goal: what users get end to end is at least this share of the engine-only figure.
END_TO_END_TARGET = 0.9


def end_to_end_setup(model: Any, args: argparse.Namespace, images: list[Any],
                     batch: int | None) -> tuple[SetupResult, tuple[str, ...]]:
    """The real daemon on a temp watched folder, files in, sidecars out: the setup's table row, and the
    daemon's own account of the timed run (its "engine: ..." log lines: prefill, decode, starved)."""
    got = run_end_to_end(model, args, images, batch)
    n, seconds = got.images, got.seconds
    result = SetupResult(setup="end to end (daemon: files in, sidecars out)",
                         batch="auto" if batch is None else str(batch), images=n, seconds=round(seconds, 3), images_per_min=round(60 * n / seconds, 2),
                         s_per_image=round(seconds / n, 3), ttft_s=None, decode_tok_s=None, peak_gpu_gib=None,
                         new_tokens=n * args.new_tokens if args.ignore_eos else None)
    log.info("bench: end to end: %.1f images/min (warm-up, model load included: %.1fs)",
             result.images_per_min, got.warmup_seconds)
    return result, got.engine_log


def compare(end_to_end: SetupResult, engine_only: SetupResult) -> dict[str, Any]:
    """The end-to-end figure beside the engine-only one it is measured against (JSON ``end_to_end``)."""
    ratio = end_to_end.images_per_min / engine_only.images_per_min
    return {"images_per_min": end_to_end.images_per_min, "engine_only_images_per_min": engine_only.images_per_min,
            "engine_only_setup": f"{engine_only.setup}, batch {engine_only.batch}", "ratio": round(ratio, 3),
            "target": END_TO_END_TARGET, "met": ratio >= END_TO_END_TARGET}


def format_comparison(c: dict[str, Any]) -> str:
    return (f"end to end {c['images_per_min']:.1f} images/min = {100 * c['ratio']:.1f}% of engine-only "
            f"{c['engine_only_images_per_min']:.1f} ({c['engine_only_setup']}); target >= {100 * c['target']:.0f}%"
            + ("" if c["met"] else ": BELOW TARGET")
            + "".join(f"\n  daemon: {line}" for line in c.get("daemon_engine_log", ())))


@dataclass(frozen=True)
class EndToEnd:
    """What one end-to-end run measured."""

    images: int
    seconds: float  # first file renamed in .. last sidecar written
    warmup_seconds: float  # daemon start .. warm-up sidecars (model load included)
    engine_log: tuple[str, ...] = ()  # the daemon's "engine: ..." lines logged during the timed run


def run_end_to_end(model: Any, args: argparse.Namespace, images: list[Any], batch_size: int | None) -> EndToEnd:
    """Run the daemon on ``images`` (PIL images) as described in the module doc.

    Args:
        model: the bench's ``ModelConfig`` (max_pixels already fits the images).
        args: the bench's arguments (prompt, new tokens, load format, ignore_eos, timeout).
        images: the timed images, then as many warm-up images.
        batch_size: the daemon's ``batch_size`` (None: auto), that of the
            engine-only setup it is compared with.
    """
    n = len(images) // 2
    timed, warm = images[:n], images[n:]
    work = Path(tempfile.mkdtemp(prefix="vlwatch-bench-e2e-"))
    deadline = time.monotonic() + args.end_to_end_timeout
    config_path = write_config(work, model, args, batch_size)
    if args.load_format == "dummy":
        import daemon.bench.dummy_backend  # noqa: F401  (registers the backend the config names, here too)
    from daemon.config_reader import load_config

    config = load_config(config_path)  # read here for the queue counts, as `vlwatch status` reads it
    process = _start(work, config_path, args)
    ok = False
    try:
        started = time.monotonic()
        _drop(work, warm, "warmup")
        _wait_for_sidecars(work, [f"warmup-{i:05d}.png" for i in range(n)], process, config, deadline)
        warmup = time.monotonic() - started
        log.info("bench: end to end: daemon warm after %.1fs; dropping %d images in", warmup, n)
        logged = (work / "daemon.log").stat().st_size  # what the daemon says from here on is the timed run's
        first = _drop(work, timed, "image")
        names = [f"image-{i:05d}.png" for i in range(n)]
        _wait_for_sidecars(work, names, process, config, deadline)
        last = max((work / "inbox" / (name + SIDECAR_SUFFIX)).stat().st_mtime for name in names)
        _stop(process)  # its engine session ends and says where the time went
        ok = True
        return EndToEnd(images=n, seconds=max(last - first, 1e-6), warmup_seconds=warmup,
                        engine_log=_engine_lines(work / "daemon.log", logged))
    finally:
        _stop(process)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.error("bench: end to end: the daemon's log and files are kept in %s", work)


def _engine_lines(daemon_log: Path, offset: int) -> tuple[str, ...]:
    """The daemon's "engine: N requests in ..." lines after ``offset`` (the backend logs one per session)."""
    with open(daemon_log, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return tuple(line.split(": ", 1)[1] for line in text.splitlines() if ".backend: engine: " in line)


def write_config(work: Path, model: Any, args: argparse.Namespace, batch_size: int | None) -> Path:
    """The daemon's config: the bench's model section, one inbox, one rule; API off, nothing periodic."""
    (work / "inbox").mkdir(parents=True)
    section: dict[str, Any] = {
        "backend": "transformers-dummy" if args.load_format == "dummy" else model.backend,
        "name": model.name, "attention": model.attention, "dtype": model.dtype, "device": model.device,
        "min_pixels": model.min_pixels, "max_pixels": model.max_pixels,
        "batch_size": "auto" if batch_size is None else batch_size,
        "max_new_tokens": args.new_tokens,
        "idle_unload": "0s",  # the warm-up's model stays loaded for the timed run
    }
    if model.max_gpu_memory:
        section["max_gpu_memory"] = f"{model.max_gpu_memory}B"
    if model.backend == "openai":
        section.update(base_url=list(model.base_url), max_concurrency=model.max_concurrency,
                       timeout=f"{model.timeout}s")
        if model.api_key_env:
            section["api_key_env"] = model.api_key_env
    config = {
        "model": section,
        "state": str(work / "state.db"),
        "include": [],
        "watch": [{"path": str(work / "inbox"), "recursive": False}],
        # $ starts a template variable: the bench's prompt is sent as written.
        "rules": [{"name": RULE, "match": ["*.png"], "task": "custom", "prompt": args.prompt.replace("$", "$$"),
                   "output": "md", "max_new_tokens": args.new_tokens}],
        # One attempt: a failure is final at once, and the bench stops with it.
        "jobs": {"attempts": 1, "rescan": "0s"},
        "api": {"listen": None},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start(work: Path, config: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    import daemon

    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # the bench's own systemd, if any, is not this daemon's
    env.pop("VLWATCH_CONFIG", None)
    # The daemon imports this same copy of vlwatch, installed or a checkout.
    root = str(Path(daemon.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if args.load_format == "dummy":
        plugins = [p for p in env.get("VLWATCH_PLUGINS", "").split(",") if p.strip()]
        env["VLWATCH_PLUGINS"] = ",".join(plugins + [PLUGIN])
        env[vlwatch_env.DUMMY_IGNORE_EOS] = "1" if args.ignore_eos else "0"
    with open(work / "daemon.log", "wb") as out:
        log.info("bench: end to end: starting the daemon (config %s)", config)
        return subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is not None:
        return
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(60)
    except subprocess.TimeoutExpired:
        log.warning("bench: end to end: the daemon did not stop within 60s; killing it")
        daemon.kill()
        daemon.wait()


def _drop(work: Path, images: list[Any], stem: str) -> float:
    """Write ``images`` as PNG beside the inbox, then rename them in; return when the first went in."""
    staging = work / "staging"
    staging.mkdir(exist_ok=True)
    names = [f"{stem}-{i:05d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        data = io.BytesIO()
        image.save(data, format="PNG", compress_level=1)  # lossless: the engine-only setups' very pixels
        (staging / name).write_bytes(data.getvalue())
    first = time.time()
    for name in names:
        (staging / name).rename(work / "inbox" / name)
    return first


def _wait_for_sidecars(work: Path, names: list[str], daemon: subprocess.Popen[bytes], config: Any,
                       deadline: float) -> None:
    """Until every image in ``names`` has its sidecar; a failed job, a dead daemon or the deadline stop it."""
    missing = [work / "inbox" / (name + SIDECAR_SUFFIX) for name in names]
    checked = 0.0
    while missing:
        missing = [p for p in missing if not p.exists()]
        if not missing:
            return
        if daemon.poll() is not None:
            raise VlwatchError(f"bench: end to end: the daemon exited with {daemon.returncode}: "
                               f"{_tail(work / 'daemon.log')}")
        now = time.monotonic()
        if now > deadline:
            raise VlwatchError(f"bench: end to end: {len(missing)} of {len(names)} sidecars still missing after "
                               f"--end-to-end-timeout; see {work / 'daemon.log'}")
        if now - checked > 1.0:  # the queue's word on failures, once a second
            checked = now
            _raise_on_failure(config)
        time.sleep(0.02)


def _raise_on_failure(config: Any) -> None:
    from daemon.commands import status_info

    info = status_info(config, failures=1)
    failures = info.get("failures") or []
    if failures:
        f = failures[0]
        raise VlwatchError(f"bench: end to end: {f.get('path')}: {f.get('error')}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
