"""Device probe for issue 5: where the time goes, each piece timed alone.

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/probe.py [--out DIR]

Full-size Qwen2.5-VL-7B architecture, random bf16 weights (``--load-format
dummy``), one 1036x1036 image.  Prints one line per measurement and a JSON
file under --out.  What it measures:

- environment: versions, varlen_attn's signature, flash-attn presence;
- the two ceilings (METHOD.md): device-to-device copy bandwidth, bf16 GEMM rate;
- correctness on the GPU: fastgen's tokens against stock ``model.generate``
  (bf16, so a late divergence between two kernels' roundings is possible:
  the first differing step is reported), vision patch against stock;
- vision tower per image: stock, grouped SDPA, varlen_attn;
- prefill per image (vision + text + cache copy);
- one decode step: eager vs CUDA graph, at 1..96 slots;
- stock ``model.generate`` at batch 1: sdpa vs eager decode, with a profile of
  the sdpa step (the issue's "why does sdpa decode slower than eager").
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends import Request  # noqa: E402
from daemon.backends.transformers.prompts import Prompt  # noqa: E402
from daemon.backends.transformers.backend import TransformersBackend  # noqa: E402
from daemon.bench.setups import synthetic_images  # noqa: E402
from daemon.config import ModelConfig  # noqa: E402

RESULTS: dict[str, Any] = {}


def note(key: str, value: Any) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def cuda_time(fn: Callable[[], Any], reps: int = 10, warm: int = 2) -> float:
    """Median seconds of ``fn`` on the GPU (events around each call)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    times.sort()
    return times[len(times) // 2]


def wall_time(fn: Callable[[], Any], reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def environment() -> None:
    import transformers

    note("torch", torch.__version__)
    note("transformers", transformers.__version__)
    note("gpu", torch.cuda.get_device_name())
    try:
        from torch.nn.attention.varlen import varlen_attn

        note("varlen_attn_signature", str(inspect.signature(varlen_attn)))
    except ImportError as exc:
        note("varlen_attn_signature", f"absent: {exc}")
    try:
        import flash_attn  # noqa: F401

        note("flash_attn", "present")
    except ImportError:
        note("flash_attn", "absent")


def ceilings() -> None:
    n = 1 << 30  # 1 GiB per buffer
    a = torch.randn(n // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a))
    note("copy_TB_s", round(2 * n / t / 1e12, 2))
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = cuda_time(lambda: x @ y)
    note("gemm_bf16_TFLOP_s", round(2 * 8192**3 / t / 1e12, 1))
    del a, b, x, y
    torch.cuda.empty_cache()


def correctness(backend: TransformersBackend, images: list[Any]) -> None:
    reqs = [Request((img,), "Describe this image in detail.", 32) for img in synthetic_images(4, 1036, 1036)]
    backend.ignore_eos = True
    backend.set_engine("auto")
    fast = backend.generate(reqs)
    backend.set_engine("hf")
    stock = [backend.generate([r])[0] for r in reqs]
    backend.set_engine("auto")
    tok = backend._processor.tokenizer
    for i, (f, s) in enumerate(zip(fast, stock)):
        a, b = tok(f.text)["input_ids"], tok(s.text)["input_ids"]
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        note(f"tokens_equal_prefix_req{i}", f"{same} of {len(b)} (texts equal: {f.text == s.text})")
    # Vision: stock vs patched on one image.
    inputs = backend._inputs(reqs[0])
    note("first_tokens_equal", sum(f.text[:1] == s.text[:1] for f, s in zip(fast, stock)))
    pv = inputs["pixel_values"].cuda()
    grid = inputs["image_grid_thw"].cuda()
    visual = backend._model.model.visual
    patch = backend._vision
    with torch.inference_mode():
        patch.enabled = False
        ref = _pooled(visual(pv, grid_thw=grid)).float()
        patch.enabled = True
        got = _pooled(visual(pv, grid_thw=grid)).float()
    note("vision_patched_rel_err", f"{((got - ref).norm() / ref.norm()).item():.2e}")


def _pooled(out: Any) -> torch.Tensor:
    pooled = getattr(out, "pooler_output", out)
    return torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled


def vision_and_prefill(backend: TransformersBackend, images: list[Any]) -> None:
    req = Request((images[0],), "Describe this image in detail.", 256)
    inputs = backend._inputs(req)
    pv, grid = inputs["pixel_values"].cuda(), inputs["image_grid_thw"].cuda()
    visual, patch = backend._model.model.visual, backend._vision
    with torch.inference_mode():
        patch.enabled = False
        note("vision_stock_s", round(cuda_time(lambda: visual(pv, grid_thw=grid), reps=5), 4))
        patch.enabled = True
        compiled = patch.use_compiled
        patch.use_compiled = False
        note("vision_grouped_sdpa_s", round(cuda_time(lambda: visual(pv, grid_thw=grid), reps=5), 4))
        patch.use_compiled = compiled
        note("vision_grouped_default_s", round(cuda_time(lambda: visual(pv, grid_thw=grid), reps=5), 4))
        # The MLP GEMM at the stock width (3420) against the padded one (3456).
        x = torch.randn(5476, 1280, dtype=torch.bfloat16, device="cuda")
        for width in (3420, 3456):
            w = torch.randn(width, 1280, dtype=torch.bfloat16, device="cuda")
            b = torch.randn(width, dtype=torch.bfloat16, device="cuda")
            t = cuda_time(lambda: torch.nn.functional.linear(x, w, b), reps=20)
            note(f"vision_mlp_gemm_{width}", {"ms": round(t * 1e3, 3), "TFLOP_s": round(2 * 5476 * 1280 * width / t / 1e12)})
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            visual(pv, grid_thw=grid)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        (OUT / "vision_profile.txt").write_text(table)
        print(table[:3000], flush=True)
        fast = backend._fast
        fast.prepare(1, 2048, 256)
        prompt = Prompt(0, inputs, 256)
        note("prompt_tokens", prompt.length)

        def prefill_one(p: Prompt = prompt) -> None:
            fast._prefill(p, 0, fast._image_features([p])[0])

        note("prefill_s", round(wall_time(prefill_one, reps=5), 4))
        features = fast._image_features([prompt])[0]
        note("prefill_text_only_s", round(wall_time(lambda: fast._prefill(prompt, 0, features), reps=5), 4))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fast._prefill(prompt, 0, features)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        cpu_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        (OUT / "prefill_profile.txt").write_text(table + "\n\n" + cpu_table)
        # Cold prefill: an image size and prompt length not seen yet, cuDNN attention on and off.
        for cudnn, size, k in ((True, (1008, 1008), 2), (False, (952, 1008), 3)):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            img = synthetic_images(1, *size)[0]
            cold = Prompt(0, backend._inputs(Request((img,), "Describe this image in detail. " * k, 256)), 256)
            t_cold = wall_time(lambda: prefill_one(cold), reps=1)
            t_warm = wall_time(lambda: prefill_one(cold), reps=3)
            note(f"prefill_cudnn_{cudnn}", {"cold_s": round(t_cold, 4), "warm_s": round(t_warm, 4)})
        backend._choose_sdpa_kernels()
        cpu_t0 = time.perf_counter()
        for _ in range(5):
            backend._inputs(req)
        note("processor_cpu_s", round((time.perf_counter() - cpu_t0) / 5, 4))


def prefill_groups(backend: TransformersBackend, images: list[Any]) -> None:
    """Prefill per image when the vision tower takes 1 or 3 images per call."""
    fast = backend._fast
    prompts = [Prompt(i, backend._inputs(Request((img,), "Describe this image in detail.", 256)), 256)
               for i, img in enumerate(synthetic_images(3, 1036, 1036))]
    patch = backend._vision
    compiled = patch.use_compiled
    with torch.inference_mode():
        fast.prepare(4, 2048, 256)
        for size, use_compiled in ((1, False), (3, False), (1, True), (3, True)):
            patch.use_compiled = use_compiled
            group = prompts[:size]
            size = f"{size}{'_compiled' if use_compiled else ''}"  # type: ignore[assignment]

            def run() -> None:
                features = fast._image_features(group)
                for slot, (prompt, feats) in enumerate(zip(group, features)):
                    fast._prefill(prompt, slot, feats)

            note(f"prefill_per_image_group_{size}_s", round(wall_time(run, reps=3) / len(group), 4))
            note(f"vision_per_image_group_{size}_s",
                 round(wall_time(lambda: fast._image_features(group), reps=3) / len(group), 4))
    patch.use_compiled = compiled
    fast.release()


def decode_steps(backend: TransformersBackend) -> None:
    fast = backend._fast
    fused, compiled = fast.fused, fast._layer_fn
    variants = [("modules", {}, None), ("fused", fused, None), ("compiled", fused, compiled)]
    with torch.inference_mode():
        for slots in (1, 64):
            for cudnn in (True, False):
                torch.backends.cuda.enable_cudnn_sdp(cudnn)
                fast.release()
                torch.cuda.empty_cache()
                line = {}
                for name, fmap, layer_fn in variants:
                    if layer_fn is None and name == "compiled":
                        continue
                    fast.fused, fast._layer_fn = fmap, layer_fn
                    fast._graphs.clear()
                    t0 = time.perf_counter()
                    fast.prepare(slots, 1403 + 256, 256)
                    capture = time.perf_counter() - t0
                    s = fast._state
                    s["active"].fill_(True)
                    s["budget"].fill_(10**6)
                    s["wpos"].fill_(1403)
                    s["pos"].fill_(1403)
                    s["n_gen"].zero_()
                    line[f"{name}_ms"] = round(cuda_time(fast._graphs[slots].replay, reps=30, warm=3) * 1e3, 2)
                    line[f"{name}_capture_s"] = round(capture, 1)
                note(f"decode_step_{slots}_slots_cudnn_{cudnn}", line)
        backend._choose_sdpa_kernels()
        fast.fused, fast._layer_fn = fused, compiled
        fast.release()
        fast._graphs.clear()
        torch.cuda.empty_cache()


def stock_generate(backend: TransformersBackend, images: list[Any]) -> None:
    """Stock model.generate, batch 1, 32 tokens: sdpa vs eager, and the profile of the sdpa run."""
    model, processor = backend._model, backend._processor
    req = Request((images[0],), "Describe this image in detail.", 32)
    inputs = {k: v.cuda() for k, v in backend._inputs(req).items()}
    backend.set_engine("hf")

    def gen(n: int) -> None:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    for impl in ("sdpa", "eager"):
        try:
            model.set_attn_implementation(impl)
        except Exception as exc:  # noqa: BLE001
            note(f"stock_{impl}", f"cannot switch: {exc}")
            continue
        gen(2)
        t1 = wall_time(lambda: gen(1), reps=2)
        t33 = wall_time(lambda: gen(33), reps=2)
        note(f"stock_generate_{impl}", {"prefill_s": round(t1, 3), "decode_ms_per_step": round((t33 - t1) / 32 * 1e3, 2)})
    model.set_attn_implementation(backend.attention)
    # Cold vs warm decode lengths, cuDNN attention on and off: a prompt of a
    # new length makes every decode step's KV length one not seen before.
    for k, cudnn in ((1, True), (2, False)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        longer = Request((images[0],), "Describe this image in detail. " * (20 * k), 32)
        inputs = {key: v.cuda() for key, v in backend._inputs(longer).items()}
        t1 = wall_time(lambda: gen(1), reps=1)
        cold = wall_time(lambda: gen(49), reps=1)
        warm = wall_time(lambda: gen(49), reps=1)
        note(f"stock_sdpa_cudnn_{cudnn}", {"cold_ms_per_step": round((cold - t1) / 48 * 1e3, 2),
                                           "warm_ms_per_step": round((warm - t1) / 48 * 1e3, 2)})
    torch.backends.cuda.enable_cudnn_sdp(True)
    inputs = {k: v.cuda() for k, v in backend._inputs(req).items()}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen(9)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (OUT / "stock_sdpa_profile.txt").write_text(table + "\n\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(table[:6000], flush=True)
    backend.set_engine("auto")


OUT = Path(os.environ.get("OUT", "."))


def main() -> int:
    global OUT
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--skip", default="", help="comma-separated parts to skip")
    args = p.parse_args()
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    skip = set(args.skip.split(","))
    environment()
    if "ceilings" not in skip:
        ceilings()
    t0 = time.perf_counter()
    backend = TransformersBackend(ModelConfig(), load_format="dummy")
    backend.load()
    note("load_s", round(time.perf_counter() - t0, 1))
    note("weights_gib", round(torch.cuda.memory_allocated() / 2**30, 2))
    images = synthetic_images(2, 1036, 1036)
    parts = [("correctness", correctness, (backend, images)), ("vision", vision_and_prefill, (backend, images)),
             ("groups", prefill_groups, (backend, images)),
             ("decode", decode_steps, (backend,)), ("stock", stock_generate, (backend, images))]
    for name, fn, fargs in parts:
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
            logging.exception("probe part %s failed", name)
            note(f"{name}_error", repr(exc))
        note(f"{name}_part_s", round(time.perf_counter() - t, 1))
        (OUT / "probe.json").write_text(json.dumps(RESULTS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
