"""``vlwatch bench --devices``: one engine per device, the images split between them, run at once.

Engine 0 runs in the bench's process; every other device gets a process of
its own, as the daemon runs them (``daemon.engine.processes``), which loads,
warms up, says ready and runs its share at a common "go".
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from daemon.bench.results import SetupResult
from daemon.bench.setups import (GiB, Setup, configure, load_backend, parse_size, peak_memory, prepared,
                                 reset_peak_memory, synthetic_images, warm_up, worker_for)
from daemon.errors import VlwatchError

log = logging.getLogger(__name__)


def run_engines(first: Any, model: Any, images: list[Any], args: argparse.Namespace) -> SetupResult:
    """One engine per device, the images split evenly, all running at once, as the daemon runs them.

    Engine 0 runs here (on the backend the other setups loaded); every other
    device gets a process of its own (``daemon.engine.processes``), which
    loads, warms up and then waits for the common start.  The time is from
    that start until the last engine is done.
    """
    import threading

    from daemon.backends import Request, engine_devices
    from daemon.engine.processes import spawn_context

    wanted = ("auto",) if args.devices.strip() == "auto" else tuple(d.strip() for d in args.devices.split(",") if d.strip())
    devices = [d or model.device for d in engine_devices(replace(model, devices=wanted))]
    if len(devices) < 2:
        log.warning("bench: --devices %s gives %d device(s)", args.devices, len(devices))
    config = replace(model, batch_size=None)
    setup = Setup(f"batched worker, {len(devices)} engines ({', '.join(devices)})", len(images), None)
    context = spawn_context()
    children = []
    for i, device in enumerate(devices[1:], start=1):
        ours, theirs = context.Pipe()
        job = _EngineJob(i, len(devices), replace(config, device=device), args.load_format, args.prompt,
                         args.new_tokens, len(images), parse_size(args.size), os.getpid(),
                         logging.getLogger().getEffectiveLevel(), args.ignore_eos, getattr(first, "options", None))
        process = context.Process(target=_engine_child, args=(job, theirs), name=f"vlwatch-bench-engine-{i}")
        process.start()
        theirs.close()
        children.append((process, ours))
    try:
        configure(first, replace(config, device=devices[0]), setup, args.ignore_eos)
        share = [Request((img,), args.prompt, args.new_tokens) for img in images[0::len(devices)]]
        worker = worker_for(replace(config, device=devices[0]), first)
        log.info("bench: engine 0 on %s, %d images: warming up", devices[0], len(share))
        warm_up(first, share, worker.batch_size())
        reset_peak_memory(first)
        batches = [worker.batch_size()] + [_expect(p, c, "ready")[1] for p, c in children]
        done: list[Any] = []
        own = threading.Thread(target=lambda: done.extend(worker.infer([prepared(r, k) for k, r in enumerate(share)])),
                               name="bench-engine-0")
        t0 = time.perf_counter()
        for _, conn in children:
            conn.send("go")
        own.start()
        reports = [_expect(p, c, "done") for p, c in children]
        own.join()
        seconds = time.perf_counter() - t0
        worker.close()
    finally:
        for process, conn in children:
            conn.close()
            process.join(30)
            if process.exitcode is None:
                process.kill()
                process.join()
    failed = [a for a in done if isinstance(a, str)] + [f for r in reports for f in r[3]]
    finished = len(done) + sum(r[2] for r in reports)
    if failed or finished != len(images):
        raise VlwatchError(f"bench: {setup.name}: {failed[0] if failed else 'an engine did not finish'}")
    peaks = [p for p in [peak_memory(first)] + [r[4] for r in reports] if p is not None]
    produced = sum(a.new_tokens for got in done for a in got) + sum(r[5] for r in reports)  # type: ignore[union-attr]
    n = len(images)
    result = SetupResult(setup=setup.name, batch=f"auto ({', '.join(str(b) for b in batches)})", images=n,
                         seconds=round(seconds, 3), images_per_min=round(60 * n / seconds, 2),
                         s_per_image=round(seconds / n, 3), ttft_s=None, decode_tok_s=None,
                         peak_gpu_gib=round(max(peaks) / GiB, 2) if peaks else None, new_tokens=produced)
    log.info("bench: %s: %.1f images/min (engines: %s s)", setup.name, result.images_per_min,
             ", ".join(f"{r[1]:.1f}" for r in reports))
    return result


@dataclass(frozen=True)
class _EngineJob:
    """What a bench engine process needs (pickled to it)."""

    index: int
    engines: int
    model: Any  # ModelConfig on its device
    load_format: str
    prompt: str
    new_tokens: int
    images: int
    size: tuple[int, int]
    parent_pid: int
    log_level: int
    ignore_eos: bool
    options: Any = None  # EngineOptions, as engine 0's


def _expect(process: Any, conn: Any, what: str) -> tuple[Any, ...]:
    """The next message of a bench engine process, which must be ``what``; its failure otherwise."""
    try:
        message = conn.recv()
    except (EOFError, OSError):
        process.join(5)
        raise VlwatchError(f"bench: an engine process ended (exit code {process.exitcode})") from None
    if message[0] == "error":
        raise VlwatchError(f"bench: engine {message[1]}: {message[2]}")
    if message[0] != what:
        raise VlwatchError(f"bench: an engine process said {message[0]!r}, expected {what!r}")
    return message


def _engine_child(job: _EngineJob, conn: Any) -> None:
    """A bench engine process: load, warm up, say ready, run its share at "go", report."""
    from daemon.engine.child import child_logging, die_with_parent, pin_device

    named = job.model.device
    job = replace(job, model=replace(job.model, device=pin_device(named)))  # before torch loads
    die_with_parent(job.parent_pid)
    child_logging(job.log_level, f"engine {job.index}")
    try:
        from daemon.backends import Request

        backend = load_backend(job.model, job.load_format, job.options)
        setup = Setup("engine", job.images, None)
        configure(backend, job.model, setup, job.ignore_eos)
        images = synthetic_images(job.images, *job.size, start=job.index, step=job.engines)
        share = [Request((img,), job.prompt, job.new_tokens) for img in images]
        worker = worker_for(job.model, backend)
        log.info("bench: engine %d on %s, %d images: warming up", job.index, named, len(share))
        warm_up(backend, share, worker.batch_size())
        reset_peak_memory(backend)
        conn.send(("ready", worker.batch_size()))
        if conn.recv() != "go":
            return
        t0 = time.perf_counter()
        answers = worker.infer([prepared(r, k) for k, r in enumerate(share)])
        seconds = time.perf_counter() - t0
        worker.close()
        failed = [a for a in answers if isinstance(a, str)]
        produced = sum(a.new_tokens for got in answers if not isinstance(got, str) for a in got)
        conn.send(("done", seconds, len(answers) - len(failed), failed[:1], peak_memory(backend), produced))
    except Exception as exc:  # reported to the bench, which stops with it
        log.exception("bench: engine %d failed", job.index)
        conn.send(("error", job.index, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
