"""``vlwatch bench``: measure the inference worker on this machine (issue 5).

One run loads the backend once (as configured, or with ``--load-format
dummy`` the configured architecture with random weights) and times, on the
same synthetic images, side by side:

1. the one-at-a-time baseline: stock ``model.generate``, one request per call
   (for a server backend: one request per call);
2. batch 1 through the worker (the latency of a lone image, warm);
3. the batching worker at each ``--batch-sizes`` entry (``auto`` and numbers);
4. with ``--max-gpu-memory``, the worker under that cap, ``batch_size: auto``;
5. with ``--devices``, one engine per device (``batch_size: auto`` each),
   the images split between them and run at once (issue 12.5): engine 0 in
   this process, each other one in a process of its own, as the daemon
   runs them (``daemon.engine.processes``);
6. with ``--end-to-end``, the real daemon on a temp watched folder, files in,
   sidecars out, compared with the batched setup (``daemon.bench.end_to_end``).

Requests are generated as the daemon generates them: the model's generation
config applies (its repetition penalty and end-of-sequence ids), and the
engine's stop for sequences stuck in a loop, so a request may end before
``--new-tokens``; the ``tokens`` column says how many came.  ``--ignore-eos``
instead makes every request generate exactly ``--new-tokens`` (random weights
stop at arbitrary points): a fixed amount of work per image, for comparing
engines.  The header says which (``eos``).  The table gives images/min, seconds per image, time to first token,
decode tokens/s and peak GPU memory (the CUDA allocator's reserved bytes,
which the cap bounds; the CUDA context's few hundred MiB come on top).

``--verify`` checks exactness instead of speed: the slot engine against
stock ``model.generate`` (one request per call) in float32, on images of
several sizes run through fewer slots than requests (so slots are refilled
mid-run) with different budgets, token for token; exit 1 on any mismatch.
Run it after upgrading torch or transformers.

Time to first token is the mean, over requests, of the time from when a
batch slot was free for the request to its first token: in a batch it
includes waiting for the other prefills of the same round; for the baseline
it is a one-token generate of one image.  Decode tokens/s is over all
sequences together, prefill excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from daemon.bench.results import SetupResult
from daemon.errors import ExitCode, VlwatchError

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe this image in detail."
GiB = 2**30
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
#: --verify's image sizes: small to a full 1036 px image, square, wide and tall,
#: one wider than an attention window and several with clipped edge windows.
VERIFY_SIZES = ("224x224", "448x336", "336x672", "1036x1036", "812x476", "112x112", "644x980", "560x560")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="dummy: random weights of the real architecture (no download)")
    parser.add_argument("--model", metavar="NAME", help="model id or directory (default: model.name of the config)")
    parser.add_argument("--backend", choices=("transformers", "openai"), help="default: model.backend of the config")
    parser.add_argument("--quantization", choices=("auto", "none", "fp8"),
                        help="FP8 text weights or not (default: model.quantization of the config)")
    parser.add_argument("--attention", choices=("auto", "flash_attention_2", "sdpa", "eager"),
                        help="default: model.attention of the config")
    parser.add_argument("--images", type=int, default=128, metavar="N", help="images per batched setup (default 128)")
    parser.add_argument("--size", default="1036x1036", metavar="WxH",
                        help="synthetic image size, rounded to multiples of 28 (default 1036x1036)")
    parser.add_argument("--new-tokens", type=int, default=256, metavar="N",
                        help="most tokens generated per image (default 256)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate exactly --new-tokens per image, past end-of-sequence (fixed work per image); "
                             "default: stop where the daemon would")
    parser.add_argument("--batch-sizes", default="auto", metavar="LIST",
                        help="batched setups, comma-separated: auto and/or numbers (default auto)")
    parser.add_argument("--max-gpu-memory", metavar="SIZE",
                        help="add a setup capped at this much GPU memory, e.g. 22GiB")
    parser.add_argument("--baseline-images", type=int, default=2, metavar="N",
                        help="images for the one-at-a-time baseline (default 2; 0 skips it)")
    parser.add_argument("--latency-images", type=int, default=3, metavar="N",
                        help="images for the batch-1 latency setup (default 3; 0 skips it)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt sent with each image")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--devices", metavar="LIST",
                        help="add a setup with one engine per device: auto (every GPU) or e.g. cuda:0,cuda:1")
    parser.add_argument("--verify", action="store_true",
                        help="check the engine's tokens against stock model.generate in float32 (exit 1 on a mismatch)")
    parser.add_argument("--verify-sizes", default=",".join(VERIFY_SIZES), metavar="LIST",
                        help="--verify: image sizes, comma-separated WxH")
    parser.add_argument("--verify-slots", type=int, default=4, metavar="N",
                        help="--verify: engine slots, fewer than the sizes (default 4)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="add the end-to-end setup: the real daemon on a temp watched folder, --images files in, "
                             "sidecars out, beside the engine-only figure")
    parser.add_argument("--end-to-end-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="--end-to-end: give up after this long, model load and warm-up included (default 1800)")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option over the config's engine: section, for A/Bs (repeatable; "
                             "e.g. --engine packed_prefill=false --engine compile=[decode])")
    parser.add_argument("--save", metavar="DIR", type=Path,
                        help="also write the table (.md) and the JSON, with the command line, into DIR")


@dataclass
class Setup:
    name: str
    images: int
    batch_size: int | None  # None: auto
    engine: str = "auto"  # transformers only: "hf" is stock model.generate
    cap: int | None = None  # max_gpu_memory for this setup


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "verify", False):
        return run_verify(args)
    width, height = parse_size(args.size)
    model, options = _configs(args, width * height)
    setups = plan(args, model)
    backend = _backend(model, args.load_format, options)
    started = time.perf_counter()
    # --end-to-end warms the daemon up on as many other images as it times.
    images = synthetic_images(max([s.images for s in setups] + [2 * args.images] * args.end_to_end), width, height)
    results = [run_setup(backend, model, setup, images, args) for setup in setups]
    if getattr(args, "devices", None):
        results.append(run_engines(backend, model, images[:args.images], args))
    header = describe(backend, model, args, width, height)
    report: dict[str, Any] = {"command": command_line(), "header": header}
    if args.end_to_end:
        reference = next(r for s, r in zip(setups, results) if s.name == "batched worker")
        batch = next(s.batch_size for s in setups if s.name == "batched worker")
        backend.unload()  # the daemon loads its own copy: the card is its alone, as in use
        from daemon.bench.end_to_end import compare, end_to_end_setup

        row, engine_log = end_to_end_setup(model, args, images[:2 * args.images], batch)
        results.append(row)
        report["end_to_end"] = compare(row, reference) | {"daemon_engine_log": list(engine_log)}
    report.update(results=[asdict(r) for r in results], seconds=time.perf_counter() - started)
    table = format_table(header, results)
    if args.end_to_end:
        from daemon.bench.end_to_end import format_comparison

        table += "\n\n" + format_comparison(report["end_to_end"])
    print(json.dumps(report, indent=2) if args.json else table)
    if args.save:
        save(args.save, report, table)
    return ExitCode.OK


# ------------------------------------------------------------------ verify


@dataclass
class VerifyRow:
    size: str
    image_tokens: int
    budget: int
    engine_tokens: int
    stock_tokens: int
    first_difference: int | None  # index of the first differing token, None when equal

    @property
    def same(self) -> bool:
        return self.first_difference is None


def run_verify(args: argparse.Namespace) -> int:
    """The engine against stock ``model.generate`` in float32, token for token; exit 1 on a mismatch."""
    from daemon.backends import Request

    sizes = [parse_size(item) for item in args.verify_sizes.split(",") if item.strip()]
    slots = max(1, args.verify_slots)
    if len(sizes) <= slots:
        log.warning("--verify: %d sizes through %d slots: no slot is refilled", len(sizes), slots)
    largest = max(w * h for w, h in sizes)
    model, options = _configs(args, largest)
    model = replace(model, dtype="float32", batch_size=slots)
    if model.backend != "transformers":
        raise VlwatchError("--verify needs the transformers backend", ExitCode.USAGE)
    backend = _backend(model, args.load_format, options)
    # Budgets differ, so sequences end at different steps and slots refill mid-run.
    step = max(1, args.new_tokens // (2 * len(sizes)))
    budgets = [max(2, args.new_tokens - step * i) for i in range(len(sizes))]
    requests = [Request((synthetic_images(1, w, h)[0],), args.prompt, n) for (w, h), n in zip(sizes, budgets)]
    started = time.perf_counter()
    backend.set_engine("auto")
    engine = backend.token_ids(requests, engine="auto")
    backend.set_engine("hf")
    stock = backend.token_ids(requests, engine="hf")
    rows = []
    for (w, h), n, a, b in zip(sizes, budgets, engine, stock):
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        rows.append(VerifyRow(f"{w}x{h}", (w // 28) * (h // 28), n, len(a), len(b), diff))
    same = sum(r.same for r in rows)
    header = describe(backend, model, args, *sizes[0])
    header.pop("image", None), header.pop("image_tokens", None)
    header.pop("eos", None)  # both sides stop at end-of-sequence; neither has the loop stop
    header.update(dtype="float32", slots=slots, requests=len(rows))
    table = format_verify(header, rows, same)
    report = {"command": command_line(), "header": header, "rows": [asdict(r) for r in rows], "same": same,
              "requests": len(rows), "seconds": time.perf_counter() - started}
    print(json.dumps(report, indent=2) if args.json else table)
    if args.save:
        save(args.save, report, table, prefix="verify")
    return ExitCode.OK if same == len(rows) else ExitCode.FAILED


def format_verify(header: dict[str, Any], rows: list[VerifyRow], same: int) -> str:
    first = ", ".join(f"{k} {v}" for k, v in header.items())
    lines = ["| image | image tokens | budget | engine tokens | stock tokens | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = "same" if r.same else f"DIFFERENT from token {r.first_difference}"
        lines.append(f"| {r.size} | {r.image_tokens} | {r.budget} | {r.engine_tokens} | {r.stock_tokens} | {result} |")
    verdict = f"{same} of {len(rows)} requests gave the same tokens" + ("" if same == len(rows) else ": MISMATCH")
    return f"vlwatch bench --verify: {first}\n\n" + "\n".join(lines) + f"\n\n{verdict}"


# ------------------------------------------------------------------ setup


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if m is None:
        raise VlwatchError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1036x1036", ExitCode.USAGE)
    w, h = (max(28, round(int(v) / 28) * 28) for v in m.groups())
    if (w, h) != (int(m.group(1)), int(m.group(2))):
        log.warning("--size %s: using %dx%d (the model takes multiples of 28 pixels)", text, w, h)
    return w, h


def parse_bytes(text: str) -> int:
    m = _BYTES.match(text)
    if m is None or (m.group(2) or "b").lower() not in _UNITS:
        raise VlwatchError(f"{text!r}: expected a size such as 22GiB", ExitCode.USAGE)
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def _model_config(args: argparse.Namespace, pixels: int) -> Any:
    return _configs(args, pixels)[0]


def _configs(args: argparse.Namespace, pixels: int) -> tuple[Any, Any]:
    """The ``model:`` section for the bench (the config's, with the command line over it) and the
    ``engine:`` options (the config's, with each ``--engine KEY=VALUE`` over them, read as the config is)."""
    from daemon.config import EngineOptions, ModelConfig, find_config
    from daemon.config_reader import load_config, parse_engine_options
    from daemon.plan import canonical_name

    model, options = ModelConfig(), EngineOptions()
    path = args.config
    if path is None:
        try:
            path = find_config(None)
        except VlwatchError:
            path = None  # no config anywhere: the bench runs on the defaults
    if path is not None:
        config = load_config(path)
        model, options = config.model, config.engine
    options = parse_engine_options(list(getattr(args, "engine", None) or []), base=options)
    overrides: dict[str, Any] = {"max_new_tokens": args.new_tokens, "batch_size": None,
                                 # the images are shown at exactly --size
                                 "max_pixels": max(model.max_pixels, pixels)}
    for key in ("model", "backend", "attention", "quantization"):
        value = getattr(args, key, None)
        if value is not None:
            overrides["name" if key == "model" else key] = canonical_name(value) if key == "model" else value
    return replace(model, **overrides), options


def plan(args: argparse.Namespace, model: Any) -> list[Setup]:
    if args.images < 1 or args.new_tokens < 1:
        raise VlwatchError("--images and --new-tokens must be at least 1", ExitCode.USAGE)
    local = model.backend == "transformers"
    if args.baseline_images < 0 or args.latency_images < 0:
        raise VlwatchError("--baseline-images and --latency-images must be 0 (skip that setup) or more", ExitCode.USAGE)
    setups = []
    if args.baseline_images:
        setups.append(Setup("one at a time (baseline)" + (": stock model.generate" if local else ""),
                            args.baseline_images, 1, engine="hf" if local else "auto"))
    if args.latency_images:
        setups.append(Setup("batch 1 (latency, warm)", args.latency_images, 1))
    for item in filter(None, (p.strip() for p in args.batch_sizes.split(","))):
        if item == "auto":
            setups.append(Setup("batched worker", args.images, None))
        elif item.isdigit() and int(item) > 0:
            setups.append(Setup("batched worker", args.images, int(item)))
        else:
            raise VlwatchError(f"--batch-sizes: {item!r} is neither auto nor a positive number", ExitCode.USAGE)
    if args.max_gpu_memory:
        cap = parse_bytes(args.max_gpu_memory)
        setups.append(Setup(f"batched worker, max_gpu_memory {args.max_gpu_memory}", args.images, None, cap=cap))
    if not setups:
        raise VlwatchError("bench: every setup was skipped; nothing to run", ExitCode.USAGE)
    if getattr(args, "end_to_end", False):
        if not any(s.name == "batched worker" for s in setups):
            raise VlwatchError("--end-to-end is compared with a batched setup: give --batch-sizes", ExitCode.USAGE)
        if args.ignore_eos and args.load_format != "dummy":
            raise VlwatchError("--end-to-end --ignore-eos needs --load-format dummy: on real weights the daemon "
                               "always stops at end-of-sequence", ExitCode.USAGE)
    return setups


def _backend(model: Any, load_format: str, options: Any = None) -> Any:
    from daemon.config import EngineOptions

    options = options or EngineOptions()
    if model.backend == "transformers":
        from daemon.backends.transformers.backend import TransformersBackend

        backend = TransformersBackend(model, load_format=load_format, options=options)
        backend.load()
        return backend
    if load_format == "dummy":
        raise VlwatchError("--load-format dummy needs the transformers backend", ExitCode.USAGE)
    from daemon.backends import create_backend

    return create_backend(model, options)


def synthetic_images(n: int, width: int, height: int, *, start: int = 0, step: int = 1) -> list[Any]:
    """``n`` different noise images (flat colour would make every patch alike), or every ``step``-th
    of them from ``start``: the same ones in every process."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if i >= start and (i - start) % step == 0:
            out.append(Image.fromarray(pixels))
    return out


# ------------------------------------------------------------------ running


def run_setup(backend: Any, model: Any, setup: Setup, images: list[Any], args: argparse.Namespace) -> SetupResult:
    from daemon.backends import Request

    config = replace(model, batch_size=setup.batch_size)
    if setup.cap is not None:
        config = replace(config, max_gpu_memory=setup.cap, batch_size=None)
    _configure(backend, config, setup, args.ignore_eos)
    requests = [Request((img,), args.prompt, args.new_tokens) for img in images[:setup.images]]
    worker = _worker(config, backend)
    try:
        batch = str(worker.batch_size()) if setup.batch_size is not None else f"auto ({worker.batch_size()})"
        log.info("bench: %s, batch %s, %d images: warming up", setup.name, batch, setup.images)
        first_token = _warm_up(backend, requests, worker.batch_size())
        _reset_peak_memory(backend)
        stats: list[dict[str, Any]] = []
        _record_stats(backend, stats)
        t0 = time.perf_counter()
        answers = worker.infer([_prepared(r, i) for i, r in enumerate(requests)])
        seconds = time.perf_counter() - t0
    finally:
        worker.close()
        _record_stats(backend, None)
    failed = [a for a in answers if isinstance(a, str)]
    if failed:
        raise VlwatchError(f"bench: {setup.name}: {failed[0]}")
    produced = sum(a.new_tokens for got in answers for a in got)  # type: ignore[union-attr]
    result = _summarise(setup, batch, seconds, stats, first_token, _peak_memory(backend), produced)
    log.info("bench: %s: %.1f images/min", setup.name, result.images_per_min)
    return result


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
        _configure(first, replace(config, device=devices[0]), setup, args.ignore_eos)
        share = [Request((img,), args.prompt, args.new_tokens) for img in images[0::len(devices)]]
        worker = _worker(replace(config, device=devices[0]), first)
        log.info("bench: engine 0 on %s, %d images: warming up", devices[0], len(share))
        _warm_up(first, share, worker.batch_size())
        _reset_peak_memory(first)
        batches = [worker.batch_size()] + [_expect(p, c, "ready")[1] for p, c in children]
        done: list[Any] = []
        own = threading.Thread(target=lambda: done.extend(worker.infer([_prepared(r, k) for k, r in enumerate(share)])),
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
    peaks = [p for p in [_peak_memory(first)] + [r[4] for r in reports] if p is not None]
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

        backend = _backend(job.model, job.load_format, job.options)
        setup = Setup("engine", job.images, None)
        _configure(backend, job.model, setup, job.ignore_eos)
        images = synthetic_images(job.images, *job.size, start=job.index, step=job.engines)
        share = [Request((img,), job.prompt, job.new_tokens) for img in images]
        worker = _worker(job.model, backend)
        log.info("bench: engine %d on %s, %d images: warming up", job.index, named, len(share))
        _warm_up(backend, share, worker.batch_size())
        _reset_peak_memory(backend)
        conn.send(("ready", worker.batch_size()))
        if conn.recv() != "go":
            return
        t0 = time.perf_counter()
        answers = worker.infer([_prepared(r, k) for k, r in enumerate(share)])
        seconds = time.perf_counter() - t0
        worker.close()
        failed = [a for a in answers if isinstance(a, str)]
        produced = sum(a.new_tokens for got in answers if not isinstance(got, str) for a in got)
        conn.send(("done", seconds, len(answers) - len(failed), failed[:1], _peak_memory(backend), produced))
    except Exception as exc:  # reported to the bench, which stops with it
        log.exception("bench: engine %d failed", job.index)
        conn.send(("error", job.index, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _configure(backend: Any, config: Any, setup: Setup, ignore_eos: bool) -> None:
    if callable(getattr(backend, "reconfigure", None)):
        backend.reconfigure(config)  # batch size, memory cap; each setup sizes its own cache
    else:
        backend.config = config
    if hasattr(backend, "ignore_eos"):
        backend.ignore_eos = ignore_eos
    if hasattr(backend, "set_engine"):
        backend.set_engine(setup.engine)


def _worker(config: Any, backend: Any) -> Any:
    from daemon.config import Config
    from daemon.engine.worker import Worker

    return Worker(Config(model=config, state=Path("bench-state.db"), include=(), watch=(), rules=()), backend)


def _prepared(request: Any, i: int) -> Any:
    from daemon.config import Rule
    from daemon.engine.worker import Prepared
    from daemon.intake.rules import Match

    rule = Rule(name="bench", match=("*",), task="describe", prompt=request.prompt, output="md")
    return Prepared(Match(Path(f"bench-{i}.png"), rule, Path(".")), (), (request,))


def _warm_up(backend: Any, requests: list[Any], batch: int) -> float | None:
    """Load kernels, allocate and capture as the timed run will; return a lone request's prefill time."""
    warm = getattr(backend, "warmup", None)
    if callable(warm):
        warm(requests[:max(1, batch)])
    else:
        backend.generate(requests[:1])
    # Time to first token of one request alone: a one-token generate.
    one = replace(requests[0], max_new_tokens=1)
    t0 = time.perf_counter()
    backend.generate([one])
    return time.perf_counter() - t0


def _record_stats(backend: Any, sink: list[dict[str, Any]] | None) -> None:
    """Collect ``backend.last_stats`` after every generate()/generate_each() call while ``sink`` is set."""
    names = [n for n in ("generate", "generate_each") if callable(getattr(type(backend), n, None))]
    if sink is None:
        for name in names:
            backend.__dict__.pop(name, None)
        return
    for name in names:
        backend.__dict__[name] = _recording(backend, getattr(type(backend), name), sink)


def _recording(backend: Any, stock: Any, sink: list[dict[str, Any]]) -> Any:
    def call(requests: Sequence[Any]) -> Any:
        depth = backend.__dict__.get("_bench_depth", 0)
        backend.__dict__["_bench_depth"] = depth + 1
        try:
            out = stock(backend, requests)
        finally:
            backend.__dict__["_bench_depth"] = depth
        stats = getattr(backend, "last_stats", None)
        if stats and depth == 0:  # generate() calls generate_each(): count the work once
            sink.append(dict(stats))
        return out

    return call


def _summarise(setup: Setup, batch: str, seconds: float, stats: list[dict[str, Any]],
               first_token: float | None, peak: float | None, produced: int) -> SetupResult:
    n = setup.images
    # A backend that reports no stats (a server) is taken at its answers' word.
    new_tokens = sum(int(s.get("new_tokens", 0)) for s in stats) or produced
    ttfts = [t for s in stats for t in s.get("ttft", [])]
    decode_s = sum(float(s.get("decode_s", 0.0)) for s in stats)
    if decode_s <= 0 and first_token is not None:
        # model.generate reports no split: its decode time is the rest after
        # each call's prefill (the one-token time measured alone).
        decode_s = seconds - first_token * len(stats)
    decoded = new_tokens - n  # the first token of each request comes from its prefill
    return SetupResult(
        setup=setup.name, batch=batch, images=n, seconds=round(seconds, 3),
        images_per_min=round(60 * n / seconds, 2), s_per_image=round(seconds / n, 3),
        ttft_s=round(sum(ttfts) / len(ttfts), 3) if ttfts else (round(first_token, 3) if first_token else None),
        decode_tok_s=round(decoded / decode_s, 1) if decode_s > 0 and decoded > 0 else None,
        peak_gpu_gib=round(peak / GiB, 2) if peak is not None else None, new_tokens=new_tokens,
    )


# ------------------------------------------------------------------ memory


def _cuda(backend: Any) -> bool:
    model = getattr(backend, "_model", None)
    return model is not None and getattr(model.device, "type", "") == "cuda"


def _reset_peak_memory(backend: Any) -> None:
    if _cuda(backend):
        import torch

        device = backend._model.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(backend: Any) -> float | None:
    if not _cuda(backend):
        return None
    import torch

    device = backend._model.device
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_reserved(device))


# ------------------------------------------------------------------ output


def describe(backend: Any, model: Any, args: argparse.Namespace, width: int, height: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "model": model.name, "backend": model.backend, "weights": "random (dummy)" if args.load_format == "dummy" else "real",
        "image": f"{width}x{height}", "image_tokens": (width // 28) * (height // 28), "new_tokens": args.new_tokens,
        # What ends a request: as in the daemon, or never before --new-tokens (a fixed amount of work).
        "eos": f"ignored (exactly {args.new_tokens} tokens per image)" if getattr(args, "ignore_eos", False)
        else "as the daemon (generation config, loop stop)",
        "python": platform.python_version(),
    }
    try:
        import torch
        import transformers

        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
        info["device"] = torch.cuda.get_device_name() if _cuda(backend) else platform.processor() or "cpu"
        if _cuda(backend):
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
    except ImportError:
        pass
    if callable(getattr(backend, "describe", None)):
        info.update(backend.describe())
    if getattr(backend, "options", None) is not None:
        info["engine_options"] = backend.options.line()  # what an A/B changed (--engine)
    return info


def format_table(header: dict[str, Any], results: list[SetupResult]) -> str:
    first = ", ".join(f"{k} {v}" for k, v in header.items())
    rows = [["setup", "batch", "images", "tokens/image", "images/min", "s/image", "TTFT s", "decode tok/s",
             "peak GPU GiB"]]
    for r in results:
        per_image = None if r.new_tokens is None else r.new_tokens / r.images
        rows.append([r.setup, r.batch, str(r.images), _num(per_image, "{:.1f}"), f"{r.images_per_min:.1f}",
                     f"{r.s_per_image:.3f}",
                     _num(r.ttft_s, "{:.3f}"), _num(r.decode_tok_s, "{:.0f}"), _num(r.peak_gpu_gib, "{:.2f}")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return f"vlwatch bench: {first}\n\n" + "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def command_line() -> str:
    return "vlwatch " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "vlwatch bench"


def save(folder: Path, report: dict[str, Any], table: str, prefix: str = "bench") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (folder / f"{prefix}-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / f"{prefix}-{stamp}.md").write_text(f"    {report['command']}\n\n{table}\n")
    log.info("bench: wrote %s/%s-%s.{md,json}", folder, prefix, stamp)
