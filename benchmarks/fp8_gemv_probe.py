"""Few-row FP8 linears on the GPU: bf16 ``F.linear`` vs ``_scaled_mm`` (+ compiled quantization) vs ``fp8_gemv``.

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/fp8_gemv_probe.py [--model 7b|3b] [--out DIR]

For each projection of one 7B decoder layer (fused q/k/v, o, fused gate/up,
down) and each row count: the median time of the three (``triton.testing.
do_bench``, L2 flushed between calls: the weights come from HBM as in a real
step), the bandwidth the FP8 kernel reaches on the weight bytes, and its
error against the dequantized fp32 product.  First it sweeps the kernel's
tile configurations at one row and keeps the fastest overall, then times
split-K at that tile per shape (1, 2, 4, 8 parts and ``split_for``'s choice);
then sweeps the 32-, 64- and 128-row tiles at their own row counts; the row counts
where the kernel beats ``_scaled_mm`` give ``engine.fp8_rows_max``'s default.

Writes ``fp8_gemv_probe.json`` to ``--out``.  Exit 1 if the kernel is wrong
(relative error above 1%) anywhere.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends.transformers import fp8, fp8_gemv  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("7b", "3b"), default="7b", help="the shapes of one decoder layer")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--kv", type=int, default=None, help="width of k (and of v): kv heads x head dim")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    import triton.testing

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    # Qwen2.5-VL's published configs: 7B hidden 3584, MLP 18944, 4 KV heads of 128; 3B 2048, 11008, 2 of 128.
    h0, i0, kv0 = {"7b": (3584, 18944, 512), "3b": (2048, 11008, 256)}[args.model]
    h, i, kv = args.hidden or h0, args.intermediate or i0, args.kv or kv0
    shapes = {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}
    dev = torch.device("cuda")
    torch.manual_seed(0)
    weights = {}
    for name, (n, k) in shapes.items():
        q, s = fp8.quantize_rows(torch.randn(n, k, device=dev) * 0.02)
        weights[name] = (q, s, fp8.dequantize(q, s, torch.bfloat16))
    quantize = torch.compile(fp8.quantize_activations, dynamic=False)

    def scaled(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize(x)
        return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.t(), out_dtype=torch.bfloat16)

    # 1. the tile sweep, at one row: the sum over the four projections
    sweep = []
    for bn, bk, warps, stages in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 4)):
        config = {"BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages}
        try:
            each = {}
            for name, (n, k) in shapes.items():
                q, s, _ = weights[name]
                x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
                each[name] = bench(lambda: fp8_gemv.launch(x, q, s, None, config))
            sweep.append({"config": config, "ms_layer": sum(each.values()), "ms_each": each})
        except Exception as exc:  # a configuration Triton cannot build (shared memory)
            sweep.append({"config": config, "error": str(exc).splitlines()[0][:200]})
    ok = [r for r in sweep if "ms_layer" in r]
    best = min(ok, key=lambda r: r["ms_layer"])["config"]
    print(f"sweep: {len(ok)} of {len(sweep)} configurations built; best {best} "
          f"({min(r['ms_layer'] for r in ok) * 1000:.1f} us a layer at one row; default {fp8_gemv.CONFIG})")
    for name in shapes:  # a tile per shape would gain this much (the narrow layers leave SMs idle)
        fastest = min(ok, key=lambda r: r["ms_each"][name])
        print(f"  {name}: best alone {fastest['config']} {fastest['ms_each'][name] * 1000:.1f} us")

    # 1b. split-K at that tile, at one row: each shape's K cut into parts (0: fp8_gemv.split_for's choice)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    splits = []
    for name, (n, k) in shapes.items():
        q, s, _ = weights[name]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        each = {str(part): bench(lambda: fp8_gemv.launch(x, q, s, None, best | {"SPLIT": part})) * 1000
                for part in (1, 2, 4, 8)}
        auto = fp8_gemv.split_for(n, k, best["BN"], best["BK"], sms)
        each["auto"] = bench(lambda: fp8_gemv.launch(x, q, s, None, best | {"SPLIT": 0})) * 1000
        splits.append({"shape": name, "n": n, "k": k, "auto_split": auto, "us": each,
                       "auto_gbs": (n * k) / each["auto"] / 1e3})
        print(f"  split-K {name}: " + ", ".join(f"{p_} {t:.1f} us" for p_, t in each.items())
              + f" (auto = {auto} parts: {(n * k) / each['auto'] / 1e3:.0f} GB/s)")
    print(f"split-K, one layer at one row: SPLIT 1 {sum(r['us']['1'] for r in splits):.1f} us, "
          f"auto {sum(r['us']['auto'] for r in splits):.1f} us, best per shape "
          f"{sum(min(r['us'].values()) for r in splits):.1f} us")

    # 1c. the wider row tiles (fp8_gemv.block_m: 32, 64 and 128 rows), each swept at its own row count; a
    # configuration Triton cannot build (shared memory) is skipped
    tiles = {16: best}
    for m in (32, 64, 128):
        tried = []
        for bn, bk, stages in itertools.product((32, 64), (128, 256, 512), (3,)):  # each new one compiles: few
            config = {"BN": bn, "BK": bk, "num_warps": 4, "num_stages": stages}
            try:
                total = 0.0
                for name, (n, k) in shapes.items():
                    q, s, _ = weights[name]
                    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    total += bench(lambda: fp8_gemv.launch(x, q, s, None, config))
                tried.append((total, config))
            except Exception:  # noqa: BLE001
                continue
        if tried:
            tiles[m] = min(tried, key=lambda t: t[0])[1]
            print(f"rows {m}: {len(tried)} configurations built; best {tiles[m]} "
                  f"({min(tried, key=lambda t: t[0])[0] * 1000:.1f} us a layer; default {fp8_gemv.CONFIGS[m]})")

    # 2. the three ways, each shape and row count
    rows_out, worst = [], 0.0
    for name, (n, k) in shapes.items():
        q, s, wb = weights[name]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = bench(lambda: F.linear(x, wb))
            t_scaled = bench(lambda: scaled(x, q, s))
            entry = {"shape": name, "n": n, "k": k, "rows": m, "bf16_us": t_bf16 * 1000, "scaled_mm_us": t_scaled * 1000}
            tile = tiles.get(fp8_gemv.block_m(m)) if m <= fp8_gemv.MAX_ROWS else None
            if tile is not None:
                t_rows = bench(lambda: fp8_gemv.launch(x, q, s, None, tile))
                want = F.linear(x.float(), fp8.dequantize(q, s, torch.float32))
                err = float((fp8_gemv.launch(x, q, s, None, tile).float() - want).norm() / want.norm())
                worst = max(worst, err)
                entry |= {"rows_kernel_us": t_rows * 1000, "rows_kernel_gbs": (n * k) / t_rows / 1e6,
                          "bf16_gbs": (2 * n * k) / t_bf16 / 1e6, "rel_error": err}
            rows_out.append(entry)
            print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in entry.items()))
    per_layer = {}
    for m in ROWS:
        sel = [r for r in rows_out if r["rows"] == m]
        per_layer[m] = {key: sum(r[key] for r in sel) for key in ("bf16_us", "scaled_mm_us", "rows_kernel_us")
                        if all(key in r for r in sel)}
        print(f"rows {m}: one layer's four projections, us: " + ", ".join(f"{k_} {v:.1f}" for k_, v in per_layer[m].items()))
    wins = [m for m in ROWS if per_layer[m].get("rows_kernel_us", 1e9) < per_layer[m]["scaled_mm_us"]]
    print(f"rows kernel faster than _scaled_mm at rows {wins}; worst relative error {worst:.5f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_gemv_probe.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "best_config": best, "row_tiles": {str(m): c for m, c in tiles.items()},
         "sweep": sweep, "split_k": splits, "rows": rows_out,
         "per_layer_us": per_layer, "rows_kernel_wins_at": wins, "worst_rel_error": worst,
         "median_error": statistics.median(r["rel_error"] for r in rows_out if "rel_error" in r)}, indent=2))
    return 0 if worst <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
