"""Where a prefill's time goes: the stock text model per prompt against the packed prefill (issue 12).

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/profile_prefill.py [--out DIR] [--size WxH]

Full-size Qwen2.5-VL-7B architecture, random bf16 weights.  Prefills groups
of three images as the engine does (one vision call, then the text layers)
and reports, per image, for the stock text model one prompt at a time
(``SlotEngine.packed`` off, its norms/MLPs compiled by TextPrefillPatch) and
for the packed prefill (``prefill_step``: the three prompts as one sequence,
one compiled function per layer):

- wall time, and the GPU's busy time inside it (kernel time summed from a
  profile): the difference is the GPU waiting for the host;
- the 20 kernels taking the most time;
- whether the two paths put the same first tokens out (bf16: near-ties may
  differ) and how far apart their caches are.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def per_image(fn: Callable[[], Any], images: int, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / images


def profile(fn: Callable[[], Any], images: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    busy = sum(e.device_time_total for e in kernels) / 1e6
    top = sorted(kernels, key=lambda e: e.device_time_total, reverse=True)[:20]
    return {"wall_ms_per_image_profiled": round(wall / images * 1e3, 2),
            "gpu_busy_ms_per_image": round(busy / images * 1e3, 2),
            "top_kernels_ms_per_image": [(e.key[:110], round(e.device_time_total / 1e3 / images, 3), e.count)
                                         for e in top]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/profile-prefill"))
    p.add_argument("--size", default="1036x1036")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace of one group per path")
    p.add_argument("--syncs", action="store_true", help="list the operations of a round that wait for the GPU")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.split("x"))
    results: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "size": args.size}
    backend = TransformersBackend(ModelConfig(), load_format="dummy")
    backend.load()
    fast = backend.slot_engine
    prompts = [Prompt(i, backend.prompt_inputs(Request((img,), "Describe this image in detail.", 256)), 256)
               for i, img in enumerate(synthetic_images(3, width, height))]
    results["prompt_tokens"] = prompts[0].length
    slots = [0, 1, 2]

    def group() -> torch.Tensor:
        return fast._prefill(list(zip(prompts, fast._image_features(prompts))), slots)

    def vision() -> None:
        fast._image_features(prompts)

    features: list[Any] = []

    def text() -> torch.Tensor:  # the text layers alone, the image features made once beforehand
        return fast._prefill(list(zip(prompts, features)), slots)

    def caches() -> list[torch.Tensor]:
        return [k[:3, :prompts[0].length].float().clone() for k, _ in fast._kv[::7]]

    with torch.inference_mode():
        fast.prepare(4, 2048, 256)
        results["vision_ms_per_image"] = round(per_image(vision, 3) * 1e3, 2)
        features.extend(fast._image_features(prompts))
        heads = {}
        for name, packed in (("stock", False), ("packed", True), ("stock_again", False)):
            fast.packed = packed
            results[name] = {"prefill_ms_per_image": round(per_image(group, 3) * 1e3, 2),
                             "text_ms_per_image": round(per_image(text, 3) * 1e3, 2),
                             "text_gpu_busy_ms_per_image": profile(text, 3)["gpu_busy_ms_per_image"],
                             **profile(group, 3)}
            heads[name] = (group().tolist(), caches())
            print(name, json.dumps(results[name], indent=1), flush=True)
        fast.packed = True
        compiled = fast._prefill_fn
        results["packed_compiled"] = compiled is not None and compiled.compiled is not None
        results["same_first_tokens"] = heads["packed"][0] == heads["stock"][0]
        results["cache_rel_err"] = max(f"{((a - b).norm() / b.norm()).item():.2e}"
                                       for a, b in zip(heads["packed"][1], heads["stock"][1]))
        if args.syncs:  # every operation in a warm round that waits for the GPU, with where it was called
            import traceback
            import warnings

            found: list[str] = []

            def record(message: Any, *rest: Any, **kw: Any) -> None:
                stack = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                         for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-6:]
                found.append(f"{str(message)[:80]} <- " + " <- ".join(reversed(stack)))

            group()
            torch.cuda.synchronize()
            shown = warnings.showwarning
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = record
                    group()
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = shown
            results["syncs"] = found
            print("\n".join(found) or "no syncs", flush=True)
        if args.trace:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            for name, packed in (("packed", True), ("stock", False)):
                fast.packed = packed
                group()
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    group()
                    torch.cuda.synchronize()
                prof.export_chrome_trace(str(args.out / f"trace-{name}.json"))
            fast.packed = True
    (args.out / f"profile_prefill_{args.size}.json").write_text(json.dumps(results, indent=1))
    print({k: v for k, v in results.items() if not isinstance(v, dict)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
