"""Decode attention over an FP8 KV cache (``kv_fp8``) against the engine's bf16 FlashAttention-2, on the GPU.

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/kv_fp8_probe.py [--out DIR] [--budget SECONDS]

For Qwen2.5-VL-7B's attention (28 query heads over 4 KV heads, head dim
128) and the 3B's (16 over 2), rows 1, 16, 71, 128 and 256, cache rows of
2,560 columns (pages) and 1,664 (images), every row filled to length - 7:

- ``kv_fp8.decode_attention`` over a sweep of tiles (BLOCK_N 32/64/128,
  4/8 warps, 2/3 stages; parts chosen by ``splits_for``), then the best tile
  with 1-32 parts forced;
- beside it FlashAttention-2's varlen entry as ``decode_step.attend`` calls it
  (kind ``flash``, ``seqused_k``) on a bf16 cache of the same shape, holding
  the dequantized FP8 values;
- each as the median of 50 replays of a CUDA graph (the engine replays its
  decode step the same way) that runs the call over enough copies of the
  cache (one per "layer", up to 64) that they pass 256 MiB, four times an
  H100's L2: the cache comes from HBM as in a step, not from L2;
- the bandwidth on the bytes the call must read (the first ``used`` columns:
  keys, values and, for FP8, their scales), the ratio FA2 / FP8, and the
  largest difference of each from ``kv_fp8.reference`` (float32).

Expected on an H100: ~25 Triton compiles of ~1 s, ~20 timings of 20-60 ms
for each of the 20 shapes, and the references: 60-90 s.  ``--budget``
(default 100 s) bounds it: past it the remaining shapes time the default
configuration alone.  Writes ``kv-fp8-probe.json`` to ``--out``; exit 1 if
the kernel's error passes 2% of the output's largest value anywhere, 2 with
no CUDA card that Triton's FP8 runs on.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends.transformers import kv_fp8  # noqa: E402
from daemon.backends.transformers.decode_step import Where, attend, attention_kind  # noqa: E402

#: query heads, KV heads
MODELS = {"7b": (28, 4), "3b": (16, 2)}
DIM = 128
ROWS = (1, 16, 71, 128, 256)
#: cache row lengths: the pages plan (2,560 tokens) and the images plan (1,664)
LENGTHS = {"pages": 2560, "images": 1664}
#: columns a row leaves unfilled: nearly full, and not a whole block
SHORT = 7
TILES = [{"BLOCK_N": b, "num_warps": w, "num_stages": s}
         for b, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3))]
#: parts forced at each shape's best tile (besides splits_for's choice)
SPLITS = (1, 2, 4, 8, 16, 32)
#: cache bytes one graph replay reads at least (copies of the cache, one per layer): 4x an H100's 50 MB L2
WORKING_SET = 256 * 2**20
MAX_COPIES = 64
REPLAYS = 50
#: the kernel's error bound, relative to the reference's largest value (bf16 output and probabilities)
TOLERANCE = 0.02


def graph_us(calls: list[Callable[[], Any]], replays: int = REPLAYS) -> float:
    """Median microseconds a call, over ``replays`` replays of one CUDA graph running ``calls`` in turn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and allocates outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1000 / len(calls)


def _repeat(t: torch.Tensor, copies: int) -> torch.Tensor:
    # through uint8: not every torch has repeat for float8
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    out = raw.unsqueeze(0).repeat(copies, *([1] * t.dim()))
    return out.view(t.dtype)


class Case:
    """One shape's caches (``copies`` of each, FP8 with scales and the bf16 dequantized), query and bounds."""

    def __init__(self, model: str, n: int, length: int, dev: torch.device) -> None:
        heads, n_kv = MODELS[model]
        self.model, self.n, self.length, self.heads, self.n_kv = model, n, length, heads, n_kv
        self.used_cols = length - SHORT
        self.fp8_bytes = n * self.used_cols * n_kv * (2 * DIM + 2 * 4)  # keys, values, their float32 scales
        self.bf16_bytes = n * self.used_cols * n_kv * DIM * 2 * 2
        self.copies = max(1, min(MAX_COPIES, -(-WORKING_SET // self.fp8_bytes)))
        self.scale = DIM ** -0.5
        self.q = torch.randn(n, heads, DIM, device=dev).to(torch.bfloat16)
        k, k_s = kv_fp8.quantize(torch.randn(n, length, n_kv, DIM, device=dev) * 2.0)
        v, v_s = kv_fp8.quantize(torch.randn(n, length, n_kv, DIM, device=dev))
        self.k, self.k_s, self.v, self.v_s = (_repeat(t, self.copies) for t in (k, k_s, v, v_s))
        self.k_bf16 = _repeat(kv_fp8.dequantize(k, k_s, torch.bfloat16), self.copies)
        self.v_bf16 = _repeat(kv_fp8.dequantize(v, v_s, torch.bfloat16), self.copies)
        del k, k_s, v, v_s
        self.used = torch.full((n,), self.used_cols, device=dev, dtype=torch.int32)
        # decode_step.Where as static_cache builds it: row i's query is token i, its keys start at column i * length
        rows = torch.arange(n, device=dev)
        self.where = Where(rows, self.used.long() - 1, None, self.used,
                           torch.arange(n + 1, device=dev, dtype=torch.int32),
                           torch.arange(n + 1, device=dev, dtype=torch.int32) * length)

    def fp8(self, config: dict[str, int], c: int = 0) -> torch.Tensor:
        return kv_fp8.decode_attention(self.q, self.k[c], self.k_s[c], self.v[c], self.v_s[c], self.used,
                                       self.scale, config)

    def flash(self, c: int = 0) -> torch.Tensor:
        return attend(self.q, self.k_bf16[c], self.v_bf16[c], self.where, self.scale, self.heads // self.n_kv,
                      "flash")

    def reference(self) -> torch.Tensor:
        return kv_fp8.reference(self.q.float(), self.k[0], self.k_s[0], self.v[0], self.v_s[0], self.used,
                                self.scale)

    def splits(self, config: dict[str, int]) -> int:
        return kv_fp8.splits_of(self.n, self.n_kv, self.length, config["BLOCK_N"], config.get("SPLITS", 0),
                                self.q.device)

    def time_fp8(self, config: dict[str, int]) -> dict[str, Any]:
        entry: dict[str, Any] = {"config": config, "splits": self.splits(config)}
        try:
            us = graph_us([functools.partial(self.fp8, config, c) for c in range(self.copies)])
        except Exception as exc:  # noqa: BLE001 -- a tile Triton cannot build (shared memory, registers)
            first = (str(exc).splitlines() or [""])[0][:200]
            return entry | {"error": f"{type(exc).__name__}: {first}"}
        return entry | {"us": round(us, 2), "gbs": round(self.fp8_bytes / us / 1e3, 1)}


def _errors(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    err = float((got.float() - want).abs().max())
    return {"max_abs_err": err, "rel_err": err / float(want.abs().max())}


def probe(case: Case, tiles: list[dict[str, int]], sweep_splits: bool, flash: bool) -> dict[str, Any]:
    """One shape: FA2, the tiles at splits_for's parts, then the best tile with its parts forced."""
    out: dict[str, Any] = {"model": case.model, "rows": case.n, "length": case.length, "used": case.used_cols,
                           "copies": case.copies, "fp8_bytes": case.fp8_bytes, "bf16_bytes": case.bf16_bytes}
    want = case.reference()
    if flash:
        us = graph_us([functools.partial(case.flash, c) for c in range(case.copies)])
        out["fa2"] = {"us": round(us, 2), "gbs": round(case.bf16_bytes / us / 1e3, 1)} | _errors(case.flash(), want)
    runs = [case.time_fp8(tile | {"SPLITS": 0}) for tile in tiles]
    timed = [r for r in runs if "us" in r]
    if timed and sweep_splits:
        tile = {k: v for k, v in min(timed, key=lambda r: r["us"])["config"].items() if k != "SPLITS"}
        seen = {r["splits"] for r in timed if r["config"] == tile | {"SPLITS": 0}}
        for parts in SPLITS:
            config = tile | {"SPLITS": parts}
            if case.splits(config) not in seen:  # more parts asked than blocks: one already timed
                seen.add(case.splits(config))
                runs.append(case.time_fp8(config))
        timed = [r for r in runs if "us" in r]
    out["fp8"] = runs
    default = next((r for r in timed if r["config"] == kv_fp8.CONFIG | {"SPLITS": 0}), None)
    if default is not None:
        out["default"] = default | _errors(case.fp8(default["config"]), want)
    if timed:
        best = min(timed, key=lambda r: r["us"])
        out["best"] = best | _errors(case.fp8(best["config"]), want)
        if "fa2" in out:
            out["fa2_over_best"] = round(out["fa2"]["us"] / best["us"], 3)
            if default is not None:
                out["fa2_over_default"] = round(out["fa2"]["us"] / default["us"], 3)
    return out


def _line(r: dict[str, Any]) -> str:
    head = f"{r['model']} {r['length']:>4} x {r['rows']:>3} rows:"
    if "error" in r:
        return f"{head} {r['error']}"
    fa2 = f"FA2 {r['fa2']['us']:8.1f} us {r['fa2']['gbs']:6.0f} GB/s" if "fa2" in r else "FA2 -"
    d = r.get("default")
    dflt = f"default {d['us']:8.1f} us ({d['splits']:>2} parts)" if d else "default -"
    b = r.get("best")
    if not b:
        return f"{head} {fa2} | {dflt} | no configuration built"
    c = b["config"]
    ratio = f"x{r['fa2_over_best']:.2f}" if "fa2_over_best" in r else ""
    return (f"{head} {fa2} | {dflt} | best {b['us']:8.1f} us {b['gbs']:6.0f} GB/s "
            f"(BN {c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']} {b['splits']:>2} parts) {ratio} "
            f"| err {b['rel_err']:.1e}")


def _overall(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tile at splits_for's parts over the swept shapes where it built: the geometric mean of its time
    over the shape's best (1.0: the best everywhere), the pick for ``kv_fp8.CONFIG``."""
    rows = []
    for tile in TILES:
        config = tile | {"SPLITS": 0}
        ratios = [x["us"] / r["best"]["us"] for r in results if r.get("swept") and "best" in r
                  for x in r["fp8"] if x["config"] == config and "us" in x]
        if ratios:
            rows.append({"config": tile, "shapes": len(ratios),
                         "geomean_over_best": round(statistics.geometric_mean(ratios), 3)})
    return sorted(rows, key=lambda x: x["geomean_over_best"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("."), help="where kv-fp8-probe.json goes")
    p.add_argument("--budget", type=float, default=100.0,
                   help="seconds after which the remaining shapes time the default configuration alone")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kv_fp8_probe: needs a CUDA GPU (none here); run it on the device machine", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        print(f"kv_fp8_probe: {torch.cuda.get_device_name()} has no float8e4nv in Triton (compute capability "
              "8.9+ needed)", file=sys.stderr)
        return 2
    import triton

    flash = attention_kind(dev, torch.bfloat16) == "flash"
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "default_config": kv_fp8.CONFIG, "fa2": flash,
                              "replays": REPLAYS, "working_set_bytes": WORKING_SET, "shapes": []}
    print(f"{report['device']}, torch {torch.__version__}, triton {triton.__version__}; FA2 varlen with seqused_k: "
          f"{flash}", flush=True)
    began, worst = time.monotonic(), 0.0
    torch.manual_seed(0)
    for length_name, model, n in itertools.product(LENGTHS, MODELS, ROWS):  # pages first: the capped plans
        length = LENGTHS[length_name]
        full = time.monotonic() - began < args.budget
        case = None
        try:
            case = Case(model, n, length, dev)
            r = probe(case, TILES if full else [dict(kv_fp8.CONFIG)], full, flash)
        except Exception as exc:  # noqa: BLE001 -- out of memory at a shape: report it, go on
            r = {"model": model, "rows": n, "length": length, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        r["plan"], r["swept"] = length_name, full
        del case
        torch.cuda.empty_cache()
        for key in ("default", "best"):
            if key in r:
                worst = max(worst, r[key]["rel_err"])
        report["shapes"].append(r)
        print(_line(r), flush=True)
    report["overall"] = _overall(report["shapes"])
    report["worst_rel_err"], report["seconds"] = worst, round(time.monotonic() - began, 1)
    for row in report["overall"][:4]:
        print(f"tile {row['config']}: {row['geomean_over_best']:.3f} x the best, over {row['shapes']} shapes")
    print(f"worst error {worst:.2e} of the output's largest value; {report['seconds']} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv-fp8-probe.json").write_text(json.dumps(report, indent=1))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
