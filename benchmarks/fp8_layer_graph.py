"""One decoder layer's four projections timed as the decode step runs them: inside a CUDA graph, weights cold.

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/fp8_layer_graph.py [--model 7b|3b] [--layers 8] [--out DIR]

Why not ``fp8_gemv_probe.py``: it times each launch from the host with
``triton.testing.do_bench``, and a Triton launch (plus split-K's second
kernel and its buffer) takes the host longer than q/k/v's or o's kernel
takes the GPU at a few rows, so those figures moved 2-4x between row counts
(session 11, call Q3).  The engine never pays that: its decode step is one
captured graph.  Here ``--layers`` distinct layers (their weights together
far larger than the L2 cache, so each is read from HBM as in a real step)
run their projections in one graph, replayed; a projection's time is the
graph's over the layer count.  Rows 1-16: batch 1 to a few slots.

For each projection and row count: bf16 ``F.linear`` (cuBLAS) and the
few-row FP8 kernel (``fp8_gemv``) in the ``WAYS`` below: split-K 1 and
automatic, the weight widened by conversion (the engine's) or by moving its
bits (``SHIFT`` 1 in Triton's operations, 2 in PTX), one program a tile or
persistent (``PERSIST`` 2: two programs an SM taking the tiles in turn); in
microseconds a layer and in TB/s on the weight's bytes.  Writes ``fp8_layer_graph.json``
to ``--out``.  ``--cpu`` runs the same arithmetic eagerly under
``TRITON_INTERPRET=1`` on small shapes, as a smoke test (its times mean nothing).

``--sweep`` then times every tile of ``SWEEP`` (rows per program ``BN``,
columns a step ``BK``, pipeline depth, warps; each in the ``VARIANTS``: split-K
1 and automatic, one program a tile or persistent) at
``--sweep-rows`` rows, the same way, and writes ``fp8_layer_sweep.json``: the
best tile for each projection beside the engine's one (``fp8_gemv.CONFIGS``).
Session 5's host-timed sweep chose that tile by the wide projections alone;
whether the narrow ones want another is what a tile table would be for.  It
stops after ``--sweep-seconds`` (Triton compiles each tile once, ~0.5 s) and
keeps what it has; a tile the card cannot run (shared memory) is skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends.transformers import fp8, fp8_gemv  # noqa: E402

#: hidden, MLP width, k (or v) width of Qwen2.5-VL's published configs
MODELS = {"7b": (3584, 18944, 512), "3b": (2048, 11008, 256)}
ROWS = (1, 2, 4, 8, 16)
#: (BN, BK, num_stages, num_warps) tried by ``--sweep``, each in every one of ``VARIANTS``; the engine's
#: tile's neighbours first, so that a sweep cut short by ``--sweep-seconds`` has timed those
SWEEP = [(bn, bk, stages, warps) for bn, bk in itertools.product((32, 16, 64), (512, 256, 1024))
         for stages, warps in ((3, 4), (4, 4), (2, 4), (4, 8))]
#: the engine's launch as it is, then the bits moved in PTX (SHIFT 2) with split-K 1 or automatic (0), the
#: parts added up by the last of them (FUSE), a program for each tile (PERSIST 0) or two an SM taking the
#: tiles in turn
VARIANTS = ({"SPLIT": 0, "PERSIST": 0, "SHIFT": 0}, {"SPLIT": 0, "PERSIST": 0, "SHIFT": 2},
            {"SPLIT": 0, "PERSIST": 0, "SHIFT": 2, "FUSE": 1},
            {"SPLIT": 1, "PERSIST": 0, "SHIFT": 2}, {"SPLIT": 1, "PERSIST": 2, "SHIFT": 2},
            {"SPLIT": 0, "PERSIST": 2, "SHIFT": 2})
#: the main table's launches of the FP8 kernel, by name (bf16 ``F.linear`` runs beside them)
WAYS = {"fp8_split1": {"SPLIT": 1}, "fp8_split_auto": {"SPLIT": 0},
        "fp8_persist2": {"SPLIT": 1, "PERSIST": 2},
        "fp8_shift1_auto": {"SPLIT": 0, "SHIFT": 1},
        "fp8_shift2_split1": {"SPLIT": 1, "SHIFT": 2}, "fp8_shift2_auto": {"SPLIT": 0, "SHIFT": 2},
        "fp8_shift2_auto_fused": {"SPLIT": 0, "SHIFT": 2, "FUSE": 1},
        "fp8_shift2_persist2": {"SPLIT": 1, "PERSIST": 2, "SHIFT": 2},
        "fp8_shift2_persist2_auto": {"SPLIT": 0, "PERSIST": 2, "SHIFT": 2}}


def timed(fn: Callable[[], None], *, graph: bool, reps: int) -> float:
    """Median seconds of ``fn``: replayed from a CUDA graph (no launch cost) on the GPU, eager on the CPU."""
    fn()  # Triton compiles on the first call, outside the capture
    if not graph:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def sweep(stack: list[dict], shapes: dict[str, tuple[int, int]], *, rows: int, dev: torch.device,
          graph: bool, reps: int, seconds: float, grid: list[tuple[int, int, int, int]]) -> dict[str, object]:
    """Every tile of ``grid`` in each of ``VARIANTS``, a layer's time per projection at ``rows`` rows."""
    xs = {name: torch.randn(rows, k, device=dev, dtype=torch.bfloat16) for name, (_, k) in shapes.items()}
    deadline = time.monotonic() + seconds
    tried: list[dict[str, object]] = []
    for (bn, bk, stages, warps), variant in itertools.product(grid, VARIANTS):
        if time.monotonic() > deadline:
            print(f"sweep: stopped after {seconds:.0f} s, {len(tried)} timings")
            break
        config = {"BN": bn, "BK": bk, "num_stages": stages, "num_warps": warps, **variant}
        for name, (n, k) in shapes.items():
            def run(name=name) -> None:
                for layer in stack:
                    fp8_gemv.launch(xs[name], layer[name][1], layer[name][2], None, config)
            try:
                us = timed(run, graph=graph, reps=reps) / len(stack) * 1e6
            except Exception as e:  # noqa: BLE001 - a tile past the card's shared memory, or a bad capture
                print(f"sweep: {config} on {name} does not run: {type(e).__name__}: {str(e)[:120]}")
                if graph:
                    torch.cuda.synchronize()
                continue
            tried.append({"shape": name, **config, "us": us, "tbs": n * k / (us / 1e6) / 1e12})
    default = fp8_gemv.CONFIGS[fp8_gemv.block_m(rows)]
    best: dict[str, dict[str, object]] = {}
    for entry in tried:
        name = str(entry["shape"])
        if name not in best or float(entry["us"]) < float(best[name]["us"]):
            best[name] = entry
    same = [e for e in tried if all(e[key] == default[key] for key in default) and e["SPLIT"] == 0
            and e["PERSIST"] == 0 and e["SHIFT"] == 0 and not e.get("FUSE")]
    for name, entry in best.items():
        print(f"sweep rows {rows} {name}: best " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in entry.items() if k != "shape"))
    total_best = sum(float(e["us"]) for e in best.values())
    total_default = sum(float(e["us"]) for e in same) if len(same) == len(shapes) else None
    print(f"sweep rows {rows}: a layer's four projections, each at its best tile {total_best:.1f} us; the engine's "
          f"tile (split auto) " + (f"{total_default:.1f} us" if total_default is not None else "not timed"))
    return {"rows": rows, "default": default, "best": best, "layer_best_us": total_best,
            "layer_default_us": total_default, "tried": tried}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(MODELS), default="7b")
    p.add_argument("--layers", type=int, default=8, help="distinct layers in the graph (default 8)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--cpu", action="store_true", help="a smoke run on small shapes (TRITON_INTERPRET=1)")
    p.add_argument("--sweep", action="store_true", help="then time every tile of SWEEP (fp8_layer_sweep.json)")
    p.add_argument("--sweep-rows", type=int, default=1)
    p.add_argument("--sweep-seconds", type=float, default=240)
    args = p.parse_args()
    h, i, kv = (64, 128, 32) if args.cpu else MODELS[args.model]
    dev = torch.device("cpu" if args.cpu else "cuda")
    shapes = {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}
    torch.manual_seed(0)
    stack = []
    for _ in range(args.layers):
        layer = {}
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=dev) * 0.02
            q, s = fp8.quantize_rows(w)
            layer[name] = (w.to(torch.bfloat16), q, s)
        stack.append(layer)
    ways: dict[str, Callable[[torch.Tensor, tuple], torch.Tensor]] = {"bf16": lambda x, t: F.linear(x, t[0])}
    for name, config in WAYS.items():
        ways[name] = lambda x, t, config=config: fp8_gemv.launch(x, t[1], t[2], None, config)
    rows_out = []
    for m in ROWS:
        xs = {name: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for name, (_, k) in shapes.items()}
        for name, (n, k) in shapes.items():
            entry: dict[str, object] = {"rows": m, "shape": name, "n": n, "k": k}
            for way, op in ways.items():
                def run(op=op, name=name) -> None:
                    for layer in stack:
                        op(xs[name], layer[name])
                seconds = timed(run, graph=not args.cpu, reps=args.reps) / args.layers
                weight_bytes = n * k * (2 if way == "bf16" else 1)
                entry[f"{way}_us"] = seconds * 1e6
                entry[f"{way}_tbs"] = weight_bytes / seconds / 1e12
            want = F.linear(xs[name].float(), fp8.dequantize(stack[0][name][1], stack[0][name][2], torch.float32))
            got = ways["fp8_split_auto"](xs[name], stack[0][name]).float()
            entry["rel_error"] = float((got - want).norm() / want.norm())
            # each tile's sums are made the same way whichever program takes it: the same bits
            one_each = ways["fp8_split1"](xs[name], stack[0][name])
            entry["persist_same"] = bool(torch.equal(ways["fp8_persist2"](xs[name], stack[0][name]), one_each))
            # moved bits are the converted numbers 2^120 too small, put back exactly, so the same bits too,
            # unless the tensor cores flush the few e4m3 subnormals (bf16 subnormals there): then a trace
            for way in ("fp8_shift1_auto", "fp8_shift2_split1"):
                moved = ways[way](xs[name], stack[0][name]).float()
                entry[f"{way}_same"] = bool(torch.equal(moved, one_each.float()))
                entry[f"{way}_rel_error"] = float((moved - want).norm() / want.norm())
            # the last part adds the parts up as the second kernel would: the same bits, launch after launch
            # (a missing fence would show as a tile now and then summed before its parts were all in)
            second = ways["fp8_shift2_auto"](xs[name], stack[0][name])
            entry["fused_same"] = all(torch.equal(ways["fp8_shift2_auto_fused"](xs[name], layer[name]),
                                                  ways["fp8_shift2_auto"](xs[name], layer[name]))
                                      for layer in stack for _ in range(4)) and bool(torch.isfinite(second).all())
            rows_out.append(entry)
            print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in entry.items()))
        sel = [r for r in rows_out if r["rows"] == m]
        print(f"rows {m}, one layer's four projections: " + ", ".join(
            f"{way} {sum(float(r[f'{way}_us']) for r in sel):.1f} us" for way in ways))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_layer_graph.json").write_text(json.dumps(
        {"device": "cpu (smoke)" if args.cpu else torch.cuda.get_device_name(), "model": args.model,
         "layers": args.layers, "config": fp8_gemv.CONFIG, "rows": rows_out}, indent=2))
    if args.sweep:
        grid = SWEEP[:2] if args.cpu else SWEEP
        found = sweep(stack, shapes, rows=args.sweep_rows, dev=dev, graph=not args.cpu, reps=args.reps,
                      seconds=args.sweep_seconds, grid=grid)
        (args.out / "fp8_layer_sweep.json").write_text(json.dumps(
            {"device": "cpu (smoke)" if args.cpu else torch.cuda.get_device_name(), "model": args.model,
             "layers": args.layers, **found}, indent=2))
    worst = max(float(r[key]) for r in rows_out for key in r if str(key).endswith("rel_error"))
    for way in ("fp8_shift1_auto", "fp8_shift2_split1"):
        apart = [f"{r['shape']}@{r['rows']}" for r in rows_out if not r[f"{way}_same"]]
        print(f"{way}: " + (f"not the same bits as the conversion at {', '.join(apart)}" if apart
                            else "the same bits as the conversion everywhere"))
    unfused = [f"{r['shape']}@{r['rows']}" for r in rows_out if not r["fused_same"]]
    print("fp8_shift2_auto_fused: " + (f"NOT the second kernel's bits at {', '.join(unfused)}" if unfused
                                       else "the second kernel's bits everywhere"))
    differ = [f"{r['shape']}@{r['rows']}" for r in rows_out if not r["persist_same"]]
    print(f"worst relative error against the dequantized product: {worst:.5f}; persistent programs "
          + (f"DIFFER from one a tile at {', '.join(differ)}" if differ else "give the same bits as one a tile"))
    return 0 if worst <= 0.01 and not differ and not unfused else 1


if __name__ == "__main__":
    sys.exit(main())
