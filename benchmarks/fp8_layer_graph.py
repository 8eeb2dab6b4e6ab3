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

For each projection and row count: bf16 ``F.linear`` (cuBLAS), the few-row
FP8 kernel (``fp8_gemv``) with split-K 1 and automatic, in microseconds a
layer and in TB/s on the weight's bytes.  Writes ``fp8_layer_graph.json``
to ``--out``.  ``--cpu`` runs the same arithmetic eagerly under
``TRITON_INTERPRET=1`` on small shapes, as a smoke test (its times mean nothing).
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(MODELS), default="7b")
    p.add_argument("--layers", type=int, default=8, help="distinct layers in the graph (default 8)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--cpu", action="store_true", help="a smoke run on small shapes (TRITON_INTERPRET=1)")
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
    ways: dict[str, Callable[[torch.Tensor, tuple], torch.Tensor]] = {
        "bf16": lambda x, t: F.linear(x, t[0]),
        "fp8_split1": lambda x, t: fp8_gemv.launch(x, t[1], t[2], None, {"SPLIT": 1}),
        "fp8_split_auto": lambda x, t: fp8_gemv.launch(x, t[1], t[2], None, {"SPLIT": 0}),
    }
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
            rows_out.append(entry)
            print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in entry.items()))
        sel = [r for r in rows_out if r["rows"] == m]
        print(f"rows {m}, one layer's four projections: " + ", ".join(
            f"{way} {sum(float(r[f'{way}_us']) for r in sel):.1f} us" for way in ways))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_layer_graph.json").write_text(json.dumps(
        {"device": "cpu (smoke)" if args.cpu else torch.cuda.get_device_name(), "model": args.model,
         "layers": args.layers, "config": fp8_gemv.CONFIG, "rows": rows_out}, indent=2))
    worst = max(float(r["rel_error"]) for r in rows_out)
    print(f"worst relative error against the dequantized product: {worst:.5f}")
    return 0 if worst <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
