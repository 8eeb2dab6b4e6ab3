"""GPU check of the FP8 path (issue 23): the FP8 engine against a reference with the same quantized weights.

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/fp8_check.py [--model NAME] [--load-format dummy] [--out DIR]

FP8 cannot be checked token for token against bf16 (other weights, other
answers).  What is checked instead, on a fixed prompt set (four synthetic
images of different shapes, each with its prompt):

1. the slot engine (FP8 ``_scaled_mm`` linears, CUDA graphs) against stock
   ``model.generate`` on the same FP8 modules: the first divergence per
   prompt;
2. the FP8 forward against the *reference*: the same FP8 weights
   dequantized, the activations rounded through FP8 per row exactly as the
   fast path does (``fp8.set_emulate``), every other weight and all the
   arithmetic in fp32.  Teacher-forced on the engine's own tokens:
   - the last layer's hidden states within ``--hidden-tolerance`` (relative
     Frobenius error over the prompt and answer positions; the FP8 side
     runs bf16 activations, so some error is expected: 5% by default);
   - the engine's greedy token equal to the reference's argmax at every
     answer position, except where the reference itself has a near tie:
     its top-1 margin over the engine's token is below the logit error
     measured at that position (then either choice is right).

Prints one line per prompt and a verdict; writes ``fp8_check.json`` to
``--out``.  Exit 0 when check 2 passes, 1 otherwise (check 1 in bf16 is
reported, not judged: two kernels' roundings may part late, as probe.py
notes; the CPU tests hold the engine to stock generate on FP8 modules
exactly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends import Request  # noqa: E402
from daemon.backends.transformers import fp8  # noqa: E402
from daemon.backends.transformers.backend import TransformersBackend, _messages  # noqa: E402
from daemon.bench import synthetic_images  # noqa: E402
from daemon.config import ModelConfig  # noqa: E402

SIZES = ((1036, 1036), (644, 980), (812, 476), (448, 448))
PROMPTS = ("Read the text.", "Describe this image in detail.", "Extract all text as Markdown.",
           "What is shown in the picture?")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--load-format", default="dummy", choices=("auto", "dummy"))
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--hidden-tolerance", type=float, default=0.05)
    p.add_argument("--quantization", default="fp8", choices=("fp8", "none"),
                   help="none: the control: the same comparison for bf16 weights (bf16 arithmetic against fp32), "
                        "to tell FP8's error from what bf16 alone does to these (random) weights")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    started = time.perf_counter()
    config = ModelConfig(name=args.model, quantization=args.quantization, max_pixels=max(w * h for w, h in SIZES),
                         max_new_tokens=args.new_tokens)
    backend = TransformersBackend(config, load_format=args.load_format)
    backend.ignore_eos = True  # random weights: run every answer to its budget
    backend.load()
    model = backend._model
    linears = [m for m in model.modules() if isinstance(m, fp8.Fp8Linear)]
    report: dict[str, Any] = {"model": args.model, "load_format": args.load_format, "describe": backend.describe(),
                              "fp8_linears": len(linears), "fast": all(m.fast for m in linears),
                              "load_s": round(time.perf_counter() - started, 1), "prompts": []}
    print(f"loaded: {report['describe']}; {len(linears)} FP8 linears, _scaled_mm path: {report['fast']}")
    requests = [Request((img,), prompt, args.new_tokens)
                for (w, h), prompt in zip(SIZES, PROMPTS) for img in synthetic_images(1, w, h)]

    engine = backend.token_ids(requests, engine="auto")
    stock = backend.token_ids(requests, engine="hf")
    same_stock = [a == b for a, b in zip(engine, stock)]
    for i, (a, b) in enumerate(zip(engine, stock)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        print(f"prompt {i}: engine vs stock generate (FP8 both): "
              + ("identical" if first is None and len(a) == len(b) else f"first differs at step {first}"))

    fast = [_forward(backend, r, toks) for r, toks in zip(requests, engine)]
    fp8.set_emulate(model, True)
    model.to(torch.float32)
    reference = [_forward(backend, r, toks) for r, toks in zip(requests, engine)]

    ok_hidden = ok_tokens = True
    for i, (r, toks, f, ref) in enumerate(zip(requests, engine, fast, reference)):
        rel = float((f["hidden"] - ref["hidden"]).norm() / ref["hidden"].norm())
        cos = float(torch.nn.functional.cosine_similarity(f["hidden"].flatten(), ref["hidden"].flatten(), dim=0))
        mismatches, ties = _compare_tokens(toks, f["logits"], ref["logits"], f["prompt_len"])
        ok_hidden &= rel <= args.hidden_tolerance
        ok_tokens &= mismatches == ties
        entry = {"size": "x".join(map(str, r.images[0].size)), "tokens": len(toks), "hidden_rel_error": rel,
                 "hidden_cosine": cos, "token_mismatches": mismatches, "near_ties": ties,
                 "engine_equals_stock": same_stock[i]}
        report["prompts"].append(entry)
        print(f"prompt {i} ({entry['size']}): hidden rel error {rel:.4f} (cos {cos:.5f}); "
              f"{mismatches} of {len(toks)} tokens differ from the fp32 reference's argmax, {ties} of them near ties")
    report["pass"] = {"hidden": ok_hidden, "tokens": ok_tokens, "engine_equals_stock": all(same_stock)}
    report["hidden_tolerance"] = args.hidden_tolerance
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_check.json").write_text(json.dumps(report, indent=2))
    # Engine vs stock generate in bf16 may part late between two kernels' roundings: reported, not judged.
    verdict = ok_hidden and ok_tokens
    print(f"FP8 check: {'PASS' if verdict else 'FAIL'} {report['pass']} in {report['wall_s']} s")
    return 0 if verdict else 1


def _forward(backend: TransformersBackend, request: Request, answer: list[int]) -> dict[str, Any]:
    """The prompt followed by ``answer``, through the stock forward: last hidden states and logits (CPU, fp32)."""
    processor, model = backend._processor, backend._model
    text = processor.apply_chat_template(_messages(request), tokenize=False, add_generation_prompt=True)
    inputs = dict(processor(text=[text], images=list(request.images), return_tensors="pt", do_resize=False))
    prompt_len = inputs["input_ids"].shape[1]
    extra = torch.tensor([answer], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    return {"hidden": out.hidden_states[-1][0].float().cpu(),
            "logits": out.logits[0, prompt_len - 1: prompt_len - 1 + len(answer)].float().cpu(),
            "prompt_len": prompt_len}


def _compare_tokens(tokens: list[int], fast: torch.Tensor, ref: torch.Tensor, prompt_len: int) -> tuple[int, int]:
    """Answer positions where the reference's argmax is not the engine's token, and how many are near ties."""
    mismatches = ties = 0
    for j, tok in enumerate(tokens):
        best = int(ref[j].argmax())
        if best == tok:
            continue
        mismatches += 1
        margin = float(ref[j, best] - ref[j, tok])
        error = float(max(abs(fast[j, best] - ref[j, best]), abs(fast[j, tok] - ref[j, tok])))
        ties += margin <= 2 * error
    return mismatches, ties


if __name__ == "__main__":
    sys.exit(main())
