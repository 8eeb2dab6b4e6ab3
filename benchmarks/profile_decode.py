"""Where a decode step's time goes, and what the attention kernels on offer cost (issue 12, throughput).

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--out DIR] [--quantization fp8] [--kv-cache-dtype fp8]
        [--cases SLOTSxLENGTHxFILL,...] [--no-variants] [--model NAME] [--engine KEY=VALUE ...]

Full-size Qwen2.5-VL-7B architecture (``--model`` another, e.g. the 3B), random weights.  For a few
(slots, cache length) pairs the engine's workloads use -- batch 1 and 256
slots, 1036x1036 images with 256 new tokens (cache 1728) and document
pages with 768 (cache 2496) -- it reports:

- the captured decode step's time (CUDA events over 40 graph replays), with
  every row's cache filled to ``fill`` tokens, and the floor set by reading
  the weights and the filled KV once at the card's memory bandwidth;
- the kernels of one step (uncaptured, same kernels), grouped, so the
  attention's share is plain;
- the attention alone, on the same shapes, through each kernel we could
  call: SDPA with the additive mask (what the step uses), SDPA restricted to
  the cuDNN or the memory-efficient backend, and FlashAttention-2's varlen
  entry point (``aten._flash_attention_forward`` with ``seqused_k``: each
  row reads only its own filled columns, split over the key length), with
  the bandwidth each reaches and its largest difference from the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends.transformers.backend import TransformersBackend
from daemon.config import EngineOptions, ModelConfig
from daemon.config_reader import parse_engine_options

CASES = [  # (slots, cache length, tokens filled per row)
    (1, 1728, 1500),
    (64, 1728, 1500),
    (256, 1728, 1500),
    (256, 2496, 2040),
]


def cuda_ms(fn: Callable[[], Any], reps: int = 40) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def kernels(fn: Callable[[], Any]) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    return [(e.key[:100], round(e.device_time_total / 1e3, 3), e.count) for e in rows[:25]]


def fill_state(fast: Any, slots: int, fill: int) -> None:
    s = fast._state
    s["active"][:slots] = True
    s["wpos"][:slots] = fill
    s["pos"][:slots] = fill
    s["n_gen"][:slots] = 1
    s["budget"][:slots] = 10_000
    s["ignore_eos"].fill_(True)


def attention_variants(slots: int, length: int, fill: int, n_heads: int, n_kv: int, dim: int,
                       scale: float) -> dict[str, Any]:
    dev, dt = "cuda", torch.bfloat16
    group = n_heads // n_kv
    q = torch.randn(slots, n_heads, dim, device=dev, dtype=dt)
    # The step's layout: (slots, kv heads, columns, dim); flash's: (slots, columns, kv heads, dim).
    k_flash = torch.randn(slots, length, n_kv, dim, device=dev, dtype=dt)
    v_flash = torch.randn(slots, length, n_kv, dim, device=dev, dtype=dt)
    k_step, v_step = k_flash.transpose(1, 2).contiguous(), v_flash.transpose(1, 2).contiguous()
    used = torch.full((slots,), fill, device=dev, dtype=torch.int32)
    cols = torch.arange(length, device=dev)
    bias = torch.zeros(slots, length, device=dev, dtype=dt).masked_fill(cols[None, :] >= used[:, None].long(),
                                                                        float("-inf"))[:, None, None, :]
    out: dict[str, Any] = {}

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.view(slots, n_kv, group, dim), k_step, v_step, attn_mask=bias,
                                              scale=scale).reshape(slots, n_heads, dim)

    reference = sdpa()
    variants: dict[str, Callable[[], torch.Tensor]] = {"sdpa_mask (as built)": sdpa}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def restricted(backend: Any = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return sdpa()
        variants[name] = restricted
    cu_q = torch.arange(slots + 1, device=dev, dtype=torch.int32)
    cu_k = cu_q * length
    kf, vf = k_flash.view(slots * length, n_kv, dim), v_flash.view(slots * length, n_kv, dim)

    def flash(splits: int | None = None) -> Callable[[], torch.Tensor]:
        extra = {} if splits is None else {"num_splits": splits}

        def call() -> torch.Tensor:
            return torch.ops.aten._flash_attention_forward(q, kf, vf, cu_q, cu_k, 1, length, 0.0, False, False,
                                                           scale=scale, seqused_k=used, **extra)[0]
        return call
    variants["flash_varlen_seqused"] = flash()
    for splits in (1, 4, 16):
        variants[f"flash_varlen_seqused_splits{splits}"] = flash(splits)
    kv_bytes = 2 * slots * fill * n_kv * dim * 2
    for name, fn in variants.items():
        try:
            got = fn()
            ms = cuda_ms(fn, reps=20)
            out[name] = {"ms": round(ms, 4), "GB_per_s": round(kv_bytes / ms / 1e6, 1),
                         "max_abs_diff": float((got.float() - reference.float()).abs().max())}
        except Exception as exc:  # noqa: BLE001 -- a kernel this torch lacks is a result too
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


def store_variants(slots: int, length: int, heads: int, n_kv: int, dim: int) -> dict[str, float]:
    """One layer's FP8 cache write (keys and values, a column per row) compiled as the decode step compiles
    it, two ways: straight into the float8 tensor (``decode_step.store``) and through uint8 views of it (session
    8's first version); then the attention kernel reading the cache alone, and after the straight write in the
    same compiled function (the decode step's order).  Milliseconds per call (CUDA graph replays): a write that
    copies the cache shows as ~0.1 ms per 180 MB of cache instead of a few microseconds, and
    ``direct_then_read`` well above ``direct`` + ``read_only`` would be the read forcing that copy."""
    from daemon.backends.transformers import kv_fp8

    dev = "cuda"
    big_k = torch.zeros(slots + 8, length, n_kv, dim, device=dev, dtype=torch.float8_e4m3fn)
    big_s = torch.ones(slots + 8, length, n_kv, device=dev)
    rows = torch.arange(slots, device=dev)
    cols = torch.full((slots,), length // 2, device=dev)
    x = torch.randn(slots, n_kv, dim, device=dev, dtype=torch.bfloat16)

    def direct(kc: torch.Tensor, ks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, s = kv_fp8.quantize(x)
        kc[rows, cols] = q
        ks[rows, cols] = s
        return x + 1

    def via_uint8(kc: torch.Tensor, ks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, s = kv_fp8.quantize(x)
        kc.view(torch.uint8)[rows, cols] = q.view(torch.uint8)
        ks[rows, cols] = s
        return x + 1

    # The decode step reads the cache right after writing it (kv_fp8's custom op, declared as mutating nothing):
    # whether that read makes the compiled write copy the cache is what these two tell, beside the read alone.
    query = torch.randn(slots, heads, dim, device=dev, dtype=torch.bfloat16)
    big_v = torch.zeros_like(big_k)
    big_vs = torch.ones_like(big_s)
    used = torch.full((slots,), length // 2 + 1, device=dev, dtype=torch.int32)

    def read_only(kc: torch.Tensor, ks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return kv_fp8.fp8_kv_attention(query, kc, ks, big_v[:slots], big_vs[:slots], used, dim ** -0.5)

    def direct_then_read(kc: torch.Tensor, ks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        direct(kc, ks, x)
        return read_only(kc, ks, x)

    out = {}
    for name, fn in (("direct", direct), ("via_uint8", via_uint8), ("read_only", read_only),
                     ("direct_then_read", direct_then_read)):
        try:
            compiled = torch.compile(fn, fullgraph=True)
            for _ in range(3):
                compiled(big_k[:slots], big_s[:slots], x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                compiled(big_k[:slots], big_s[:slots], x)
            out[name] = round(cuda_ms(graph.replay, reps=50), 4)
        except Exception as exc:  # noqa: BLE001 -- a variant this torch cannot compile is a result too
            out[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/profile-decode"))
    p.add_argument("--quantization", choices=("none", "fp8"), default="none", help="the text weights (default bf16)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto", help="the slot cache (default bf16)")
    p.add_argument("--cases", help="SLOTSxLENGTHxFILL,... instead of the built-in four, e.g. 71x2560x2300")
    p.add_argument("--no-variants", action="store_true", help="skip the attention kernels timed on their own")
    p.add_argument("--model", default=ModelConfig().name, help="a published Qwen2.5-VL (default the 7B)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option, as in bench (e.g. fp8_widen=bits); repeatable")
    p.add_argument("--store-variants", action="store_true",
                   help="time the FP8 cache write two ways per case (straight, through uint8 views), and with the read")
    args = p.parse_args()
    cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")] if args.cases else CASES
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "cases": []}
    backend = TransformersBackend(ModelConfig(name=args.model, quantization=args.quantization,
                                              kv_cache_dtype=args.kv_cache_dtype),
                                  load_format="dummy", options=parse_engine_options(args.engine, base=EngineOptions()))
    backend.load()
    fast = backend.slot_engine
    weight_bytes = sum(t.numel() * t.element_size() for layer in fast.layers for t in layer.parameters())
    weight_bytes += fast.lm_head.weight.numel() * 2
    bandwidth = 3.35e12  # H100 SXM HBM3, bytes/s
    with torch.inference_mode():
        for slots, length, fill in cases:
            fast.release()
            fast._ensure(slots, length, 300)
            fill_state(fast, slots, fill)
            saved = {k: v.clone() for k, v in fast._state.items()}
            step = fast._graph(slots, False)

            def replay(saved: dict[str, torch.Tensor] = saved, step: Callable[[], None] = step) -> None:
                for k, v in saved.items():
                    fast._state[k].copy_(v)
                step()
            step_ms = cuda_ms(replay)
            kv = slots * fill * fast.kv_bytes_per_token()
            case: dict[str, Any] = {
                "slots": slots, "cache_length": fast._length, "filled": fill,
                "attention": fast.decode_attention(slots),
                "kv_cache": fast.kv_cache_dtype, "precision": backend.precision,
                "step_ms": round(step_ms, 3),
                "floor_ms": round((weight_bytes + kv) / bandwidth * 1e3, 3),
                "weights_GB": round(weight_bytes / 1e9, 2), "kv_GB": round(kv / 1e9, 2),
            }
            for k, v in saved.items():
                fast._state[k].copy_(v)
            case["kernels_ms"] = kernels(lambda slots=slots: fast._step(slots))
            if not args.no_variants:
                case["attention_kernels"] = attention_variants(slots, fast._length, fill, fast.n_heads, fast.n_kv,
                                                               fast.head_dim, fast.layers[0].self_attn.scaling)
            if args.store_variants:
                case["fp8_store_ms"] = store_variants(slots, fast._length, fast.n_heads, fast.n_kv, fast.head_dim)
            results["cases"].append(case)
            print(json.dumps(case, indent=1), flush=True)
    (args.out / "profile_decode.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
