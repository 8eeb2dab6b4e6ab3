"""Where the GPU waits in a real batched run: the bench's own setup, profiled in two windows (issue 12).

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/profile_engine.py --size 1008x1288 --new-tokens 768 --images 256 [--out DIR]

``profile_prefill.py`` and ``profile_decode.py`` time the engine's parts
alone; this runs what ``vlwatch bench`` times (``auto`` slots, the worker,
the processor threads, continuous admission) on random bf16 weights and,
inside that run, turns the CUDA profiler on twice:

- for ``--prefill-rounds`` packs of the admission (from the 20th pack on),
- for ``--decode-syncs`` runs of decode steps (from the 50th on).

For each window it reports the GPU's span (first kernel start to last kernel
end), its busy time (the union of kernels and copies), the idle gaps
(largest first), and the kernels grouped by name, per page (prefill) or per
step (decode).  Only CUDA activity is recorded: a CPU trace would slow the
host, which is what the prefill window measures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends.transformers import slots as fastgen  # noqa: E402
from daemon.bench.run import add_arguments  # noqa: E402
from daemon.bench.setups import Setup, load_backend, model_config, run_setup, synthetic_images  # noqa: E402


class Window:
    """The CUDA profiler between the ``start``-th and the ``start + length``-th call of a method."""

    def __init__(self, name: str, start: int, length: int) -> None:
        self.name, self.start, self.length = name, start, length
        self.calls = 0
        self.armed = False
        self.prof: Any = None
        self.steps = 0  # decode steps (or prompts, for prefill) inside the window
        self.host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [seconds, calls]
        self.wall = 0.0
        self._t0 = 0.0

    def before(self) -> None:
        if not self.armed:
            return
        self.calls += 1
        if self.calls == self.start:
            from torch.profiler import ProfilerActivity, profile

            cuda = torch.cuda.is_available()  # (a dry run on the CPU profiles the CPU)
            self.prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
            self.prof.start()
            self._t0 = time.perf_counter()

    def after(self, units: int) -> None:
        if self.prof is None or self.wall:
            return
        if self.calls < self.start + self.length:
            self.steps += units
            return
        self.steps += units
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._t0
        self.prof.stop()


    @property
    def open(self) -> bool:
        return self.prof is not None and not self.wall

    def time(self, cls: Any, name: str) -> None:
        """Add up the host seconds spent in ``cls.name`` (any thread) while the window is open."""
        inner = getattr(cls, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            if not self.open:
                return inner(*a, **kw)
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                cell = self.host[f"{cls.__name__}.{name}"]
                cell[0] += time.perf_counter() - t0
                cell[1] += 1

        setattr(cls, name, wrapper)


def summarise(window: Window) -> dict[str, Any]:
    if window.prof is None or not window.wall:
        return {"window": window.name, "error": "the window was not reached"}
    kind = "CUDA" if torch.cuda.is_available() else "CPU"
    events = [e for e in window.prof.events() if e.device_type.name == kind and e.time_range.elapsed_us() > 0]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    if not spans:
        return {"window": window.name, "units": window.steps, "error": "no activity recorded"}
    busy, gaps, end = 0.0, [], spans[0][0]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, name))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - spans[0][0]
    groups: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for start, stop, name in spans:
        key = _short(name)
        groups[key] += stop - start
        counts[key] += 1
    per = max(1, window.steps)
    gaps.sort(reverse=True)
    # The CUDA runtime calls the host made (launches, copies, and anything that waits or allocates).
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for e in window.prof.events():
        if e.device_type.name == "CPU" and e.name.startswith("cuda"):
            cell = calls[e.name]
            us = e.time_range.elapsed_us()
            cell[0] += 1
            cell[1] += us / 1e3
            cell[2] = max(cell[2], us / 1e3)
    return {
        "window": window.name, "units": window.steps, "wall_ms": round(window.wall * 1e3, 1),
        "host_ms_per_unit (seconds in each, any thread; calls)": {
            k: (round(v[0] * 1e3 / per, 2), v[1]) for k, v in sorted(window.host.items(), key=lambda kv: -kv[1][0])},
        "gpu_span_ms_per_unit": round(span / 1e3 / per, 3),
        "gpu_busy_ms_per_unit": round(busy / 1e3 / per, 3),
        "gpu_idle_ms_per_unit": round((span - busy) / 1e3 / per, 3),
        "gaps_over_50us": sum(1 for g, _ in gaps if g > 50),
        "idle_in_gaps_over_50us_ms": round(sum(g for g, _ in gaps if g > 50) / 1e3, 2),
        "largest_gaps_us_before": [(round(g), n[:60]) for g, n in gaps[:12]],
        "runtime_calls (count, total ms, longest ms)": {
            k: (int(v[0]), round(v[1], 2), round(v[2], 2)) for k, v in sorted(calls.items(), key=lambda kv: -kv[1][1])},
        "kernels_ms_per_unit": sorted(((k[:90], round(v / 1e3 / per, 3), counts[k]) for k, v in groups.items()),
                                      key=lambda kv: -kv[1])[:25],
    }


def _short(name: str) -> str:
    name = re.sub(r"<.*", "", name)  # template arguments
    return re.sub(r"_\d+$", "", name)  # triton kernels' numbered copies


def main() -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile-engine"))
    parser.add_argument("--prefill-rounds", type=int, default=10, help="packs profiled (from the 20th)")
    parser.add_argument("--decode-syncs", type=int, default=10, help="runs of decode steps profiled (from the 50th)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.split("x"))
    model = model_config(args, width * height)
    backend = load_backend(model, args.load_format)
    prefill, decode = Window("prefill", 20, args.prefill_rounds), Window("decode", 50, args.decode_syncs)

    launch, step = fastgen.SlotEngine._launch, fastgen.SlotEngine._decode

    def launched(self: Any, source: Any, pack: Any, free: Any) -> Any:
        prefill.before()
        out = launch(self, source, pack, free)
        prefill.after(len(pack))
        return out

    def decoded(self: Any, source: Any, eos: Any) -> None:
        decode.before()
        before = self.stats.decode_steps
        step(self, source, eos)
        decode.after(self.stats.decode_steps - before)

    fastgen.SlotEngine._launch, fastgen.SlotEngine._decode = launched, decoded  # type: ignore[method-assign]
    from daemon.backends.transformers import backend as hf, live, prefill as prefill_module

    # Where the host's time goes while the prefill window is open: the
    # processor threads (_inputs), waiting for them (take), and the engine
    # thread's parts of a round.
    for cls, name in ((hf.TransformersBackend, "_inputs"), (live.LiveSource, "take"),
                      (fastgen.SlotEngine, "_group"), (fastgen.SlotEngine, "_settle"),
                      (prefill_module.PrefillRounds, "_image_features"), (prefill_module.PrefillRounds, "_vision_layout"),
                      (prefill_module.PrefillRounds, "_prefill"), (prefill_module._Staging, "to_device"),
                      (prefill_module._Staging, "reset")):
        prefill.time(cls, name)
    images = synthetic_images(args.images, width, height)
    from daemon.engine.loop import worker

    infer = worker.Worker.infer

    def timed(self: Any, *a: Any, **kw: Any) -> Any:  # only the timed run, not the warm-up
        prefill.armed = decode.armed = True
        try:
            return infer(self, *a, **kw)
        finally:
            prefill.armed = decode.armed = False

    worker.Worker.infer = timed  # type: ignore[method-assign]
    result = run_setup(backend, model, Setup("batched worker", args.images, None), images, args)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    import os

    report = {"torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "size": args.size,
              "new_tokens": args.new_tokens, "images_per_min (profiled run)": round(result.images_per_min, 1),
              "decode_tok_s": result.decode_tok_s, "ttft_s": result.ttft_s,
              "prefill (per prompt)": summarise(prefill), "decode (per step)": summarise(decode)}
    for window in (prefill, decode):
        if window.prof is not None and window.wall:
            window.prof.export_chrome_trace(str(args.out / f"trace-{window.name}-{args.size}.json"))
    text = json.dumps(report, indent=1)
    (args.out / f"profile_engine_{args.size}_{args.new_tokens}.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
