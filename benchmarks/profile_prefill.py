"""Where a prefill's time goes, and what two candidate changes buy (issue 12, throughput).

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/profile_prefill.py [--out DIR]

Full-size Qwen2.5-VL-7B architecture, random bf16 weights.  At 256 slots
the 1036x1036/256-token workload spends ~80% of its time in prefill
(benchmarks/NOTES.md), ~78 ms per image against a ~35 ms FLOP floor.  This
prefills groups of three 1036x1036 images as the engine does (one vision
call, then each prompt's text forward) and reports, per image:

- wall time, and the GPU's busy time inside it (kernel time summed from a
  profile): the difference is the GPU waiting for the host;
- the 20 kernels taking the most time;
- the same wall time after each candidate, cumulatively:
  ``patch_linear`` (the patch embedding's Conv3d, whose stride equals its
  kernel, as one GEMM) and ``text_compiled`` (the text layers' RMSNorms and
  MLPs through torch.compile with dynamic shapes, as the vision tower's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends import Request  # noqa: E402
from daemon.backends.fastgen import Prompt  # noqa: E402
from daemon.backends.patches import TextPrefillPatch  # noqa: E402
from daemon.backends.transformers import TransformersBackend  # noqa: E402
from daemon.bench import synthetic_images  # noqa: E402
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


def patch_linear(model: Any) -> None:
    embed = model.model.visual.patch_embed
    weight = embed.proj.weight.reshape(embed.proj.weight.shape[0], -1)
    assert embed.proj.bias is None

    def forward(module: Any, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(weight.dtype), weight)

    embed.forward = types.MethodType(forward, embed)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/profile-prefill"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    backend = TransformersBackend(ModelConfig(), load_format="dummy")
    backend.load()
    fast, model = backend._fast, backend._model
    # The backend compiles the text layers for prefill on CUDA (patches.TextPrefillPatch, adopted from this
    # script's first run): off for the base, on again as the last candidate.
    text = backend._text or TextPrefillPatch(model)
    text.enabled = False

    def text_compiled(model: Any) -> None:
        text.enabled = True
    prompts = [Prompt(i, backend._inputs(Request((img,), "Describe this image in detail.", 256)), 256)
               for i, img in enumerate(synthetic_images(3, 1036, 1036))]
    results["prompt_tokens"] = prompts[0].length

    def group() -> None:
        features = fast._image_features(prompts)
        for slot, (prompt, feats) in enumerate(zip(prompts, features)):
            fast._prefill(prompt, slot, feats)

    def vision() -> None:
        fast._image_features(prompts)

    with torch.inference_mode():
        fast.prepare(4, 2048, 256)
        results["base"] = {"prefill_ms_per_image": round(per_image(group, 3) * 1e3, 2),
                           "vision_ms_per_image": round(per_image(vision, 3) * 1e3, 2), **profile(group, 3)}
        print(json.dumps(results, indent=1), flush=True)
        for name, change in (("patch_linear", patch_linear), ("text_compiled", text_compiled)):
            before = fast._image_features(prompts[:1])[0].float()
            change(model)
            after = fast._image_features(prompts[:1])[0].float()
            results[name] = {"prefill_ms_per_image": round(per_image(group, 3) * 1e3, 2),
                             "vision_ms_per_image": round(per_image(vision, 3) * 1e3, 2),
                             "vision_rel_err": f"{((after - before).norm() / before.norm()).item():.2e}"}
            print(name, results[name], flush=True)
        results["final"] = profile(group, 3)
    (args.out / "profile_prefill.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["final"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
