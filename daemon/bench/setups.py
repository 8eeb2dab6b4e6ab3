"""The engine-only setups of ``vlwatch bench``: what each one is, how it runs, what it reports.

``run`` (the command) picks the setups and prints the table; ``verify``
(``--verify``) and ``engines`` (``--devices``) run on the same helpers: the
backend loaded once (``load_backend``), synthetic images, a worker per setup
with the model's generation config applied as the daemon applies it, the
peak-memory readings and the table's header and rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from daemon.bench.results import SetupResult
from daemon.config import SIZE_UNITS, size_parts
from daemon.errors import ExitCode, VlwatchError

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe this image in detail."
GiB = 2**30


@dataclass
class Setup:
    name: str
    images: int
    batch_size: int | None  # None: auto
    engine: str = "auto"  # transformers only: "hf" is stock model.generate
    cap: int | None = None  # max_gpu_memory for this setup



def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if m is None:
        raise VlwatchError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1036x1036", ExitCode.USAGE)
    w, h = (max(28, round(int(v) / 28) * 28) for v in m.groups())
    if (w, h) != (int(m.group(1)), int(m.group(2))):
        log.warning("--size %s: using %dx%d (the model takes multiples of 28 pixels)", text, w, h)
    return w, h


def parse_bytes(text: str) -> int:
    parts = size_parts(text)
    if parts is None:
        raise VlwatchError(f"{text!r}: expected a size such as 22GiB", ExitCode.USAGE)
    return int(parts[0] * SIZE_UNITS[parts[1] or "b"])  # a bare number is bytes here


def model_config(args: argparse.Namespace, pixels: int) -> Any:
    return configs(args, pixels)[0]


def configs(args: argparse.Namespace, pixels: int) -> tuple[Any, Any]:
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
    for key in ("model", "backend", "attention", "quantization", "kv_cache_dtype"):
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


def load_backend(model: Any, load_format: str, options: Any = None) -> Any:
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
    configure(backend, config, setup, args.ignore_eos)
    requests = [Request((img,), args.prompt, args.new_tokens) for img in images[:setup.images]]
    worker = worker_for(config, backend)
    try:
        batch = str(worker.batch_size()) if setup.batch_size is not None else f"auto ({worker.batch_size()})"
        log.info("bench: %s, batch %s, %d images: warming up", setup.name, batch, setup.images)
        first_token = warm_up(backend, requests, worker.batch_size())
        reset_peak_memory(backend)
        stats: list[dict[str, Any]] = []
        _record_stats(backend, stats)
        t0 = time.perf_counter()
        answers = worker.infer([prepared(r, i) for i, r in enumerate(requests)])
        seconds = time.perf_counter() - t0
    finally:
        worker.close()
        _record_stats(backend, None)
    failed = [a for a in answers if isinstance(a, str)]
    if failed:
        raise VlwatchError(f"bench: {setup.name}: {failed[0]}")
    produced = sum(a.new_tokens for got in answers for a in got)  # type: ignore[union-attr]
    result = _summarise(setup, batch, seconds, stats, first_token, peak_memory(backend), produced)
    log.info("bench: %s: %.1f images/min", setup.name, result.images_per_min)
    return result


def configure(backend: Any, config: Any, setup: Setup, ignore_eos: bool) -> None:
    if callable(getattr(backend, "reconfigure", None)):
        backend.reconfigure(config)  # batch size, memory cap; each setup sizes its own cache
    else:
        backend.config = config
    if hasattr(backend, "ignore_eos"):
        backend.ignore_eos = ignore_eos
    if hasattr(backend, "set_engine"):
        backend.set_engine(setup.engine)


def worker_for(config: Any, backend: Any) -> Any:
    from daemon.config import Config
    from daemon.engine.worker import Worker

    return Worker(Config(model=config, state=Path("bench-state.db"), include=(), watch=(), rules=()), backend)


def prepared(request: Any, i: int) -> Any:
    from daemon.config import Rule
    from daemon.engine.worker import Prepared
    from daemon.intake.rules import Match

    rule = Rule(name="bench", match=("*",), task="describe", prompt=request.prompt, output="md")
    return Prepared(Match(Path(f"bench-{i}.png"), rule, Path(".")), (), (request,))


def warm_up(backend: Any, requests: list[Any], batch: int) -> float | None:
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


def reset_peak_memory(backend: Any) -> None:
    if _cuda(backend):
        import torch

        device = backend._model.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(backend: Any) -> float | None:
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
