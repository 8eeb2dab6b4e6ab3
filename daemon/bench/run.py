"""``vlwatch bench``: measure the inference worker on this machine (issue 5): the command.

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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon.bench.engines import run_engines
from daemon.bench.setups import (DEFAULT_PROMPT, command_line, configs, describe, format_table, load_backend,
                                 parse_size, plan, run_setup, save, synthetic_images)
from daemon.bench.verify import VERIFY_SIZES, run_verify
from daemon.errors import ExitCode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="dummy: random weights of the real architecture (no download)")
    parser.add_argument("--model", metavar="NAME", help="model id or directory (default: model.name of the config)")
    parser.add_argument("--backend", choices=("transformers", "openai"), help="default: model.backend of the config")
    parser.add_argument("--quantization", choices=("auto", "none", "fp8"),
                        help="FP8 text weights or not (default: model.quantization of the config)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"),
                        help="the KV cache in the model's dtype or FP8 (default: model.kv_cache_dtype of the config)")
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




def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "verify", False):
        return run_verify(args)
    width, height = parse_size(args.size)
    model, options = configs(args, width * height)
    setups = plan(args, model)
    backend = load_backend(model, args.load_format, options)
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
