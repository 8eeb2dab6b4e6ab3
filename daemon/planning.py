"""``vlwatch plan``: will it run on this card? Offline, without a GPU or the weights (issue 23).

The arithmetic is daemon.plan's, the same the engine sizes its slots with;
this module only finds the model's shape (a local folder's config.json, or
the bundled published configs of the supported models), reads the config's
``model:`` section for defaults, and prints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from daemon import plan
from daemon.config import SIZE_UNITS, Config, ModelConfig, local_model_path, size_parts
from daemon.errors import ExitCode, VlwatchError

log = logging.getLogger(__name__)

#: What ``plan`` assumes without --gpu-memory or model.max_gpu_memory: the
#: common consumer card (RTX 3090/4090 report 24 GiB).
DEFAULT_CARD = 24 * plan.GiB


@dataclass(frozen=True)
class PlanRequest:
    model: str | None = None
    gpu_memory: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    max_pixels: int | None = None
    max_new_tokens: int | None = None


def parse_size(text: str) -> int:
    """``24GiB``, ``12GB``, ``8192MiB``; a bare number is refused (GB or GiB differ by 7%)."""
    parts = size_parts(text)
    if parts is None or parts[1] in (None, "b"):
        raise VlwatchError(f"--gpu-memory {text!r}: expected a size with a unit, like 24GiB or 12GB",
                           ExitCode.USAGE)
    size = int(parts[0] * SIZE_UNITS[parts[1]])
    if size <= 0:
        raise VlwatchError(f"--gpu-memory {text!r}: must be more than 0", ExitCode.USAGE)
    return size


def shape_for(name: str) -> plan.ModelShape:
    """The shape of ``name``: a model folder's config.json, a model in the HF cache, or a bundled one."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        known = plan.known_shape(name)
        if known is not None:
            return known
        folder = local_model_path(plan.canonical_name(name)) or folder
    if folder.is_dir():
        try:
            config = plan.read_config(folder)
            return plan.shape_from_config(config, name)
        except ValueError as exc:
            raise VlwatchError(str(exc), ExitCode.USAGE) from None
    names = ", ".join([*plan.ALIASES, *plan.KNOWN_MODELS])
    raise VlwatchError(f"--model {name!r}: not a folder with a config.json, and not one of {names}",
                       ExitCode.USAGE)


def _prequantized(name: str) -> bool:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        folder = local_model_path(plan.canonical_name(name)) or folder
    if folder.is_dir():
        try:
            return plan.checkpoint_precision(plan.read_config(folder)) == "fp8"
        except ValueError:
            return False
    return "fp8" in name.lower()


#: Bytes of prompt text per token where the tokenizer is not at hand: Qwen's BPE averages about 4 on
#: English; 3 errs towards longer prompts (a plan that counts a few more tokens than the engine will).
BYTES_PER_TEXT_TOKEN = 3
#: The chat template's tokens around a one-image prompt (Qwen2.5-VL's: the default system turn, role and
#: vision markers come to ~25), rounded up: the plan should count no fewer tokens than the engine.
TEMPLATE_TOKENS = 32


def text_counter(name: str) -> Callable[[str], int]:
    """Tokens of a prompt's text: by the model's own tokenizer.json where the model is on this machine
    (the ``tokenizers`` library: no torch, no transformers), else estimated from its bytes."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        folder = local_model_path(plan.canonical_name(name)) or folder
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
        except Exception as exc:  # noqa: BLE001 - an unreadable tokenizer: the estimate still plans
            log.debug("%s: tokenizer.json not read (%s); estimating prompt lengths", folder, exc)
    return lambda text: -(-len(text.encode()) // BYTES_PER_TEXT_TOKEN)


def demand_of(config: Config, count: Callable[[str], int] | None = None) -> plan.Demand | None:
    """What the config's rules need of a slot, as the daemon's engine sizes for them (``plan.Demand``).

    A rule that shows the model's ``max_pixels`` images counts by its text
    (so that another ``max_pixels`` can be tried); one with pixels of its own
    or reference images by its whole prompt.  The longest prompt and the
    largest budget may come from different rules: a slot holds both.  The
    rule named is the one that needs the most.
    """
    from daemon.backends import expected_requests

    count = count or text_counter(config.model.name)
    texts, whole, needs = [0], [0], []
    for rule, e in zip(config.rules, expected_requests(config)):
        text = TEMPLATE_TOKENS + count(e.prompt)
        (whole.append(e.image_tokens + text) if rule.max_pixels or rule.reference else texts.append(text))
        needs.append((e.image_tokens + text + e.max_new_tokens, rule.name, e, text))
    if not needs:
        return None
    _, name, e, text = max(needs, key=lambda n: n[0])
    why = f"rule {name} ({e.image_tokens} image tokens, ~{text} of text, {e.max_new_tokens} new tokens)"
    own_budgets = [r.max_new_tokens for r in config.rules if r.max_new_tokens]  # the others take the model's
    return plan.Demand(text_tokens=max(texts), tokens=max(whole), max_new_tokens=max(own_budgets, default=0),
                       rule=name, why=why)


def make(request: PlanRequest, model: ModelConfig, config: Config | None = None) -> plan.Plan:
    """The plan for ``request``, its gaps filled from the config's ``model:`` section (and its rules)."""
    name = plan.canonical_name(request.model or model.name)
    quantization = request.quantization or model.quantization
    kv_cache_dtype = request.kv_cache_dtype or model.kv_cache_dtype
    if request.gpu_memory is not None:
        memory, capped = parse_size(request.gpu_memory), False
    elif model.max_gpu_memory:
        memory, capped = model.max_gpu_memory, True
    else:
        memory, capped = DEFAULT_CARD, False
    for flag, value in (("--max-pixels", request.max_pixels), ("--max-new-tokens", request.max_new_tokens)):
        if value is not None and value < 1:
            raise VlwatchError(f"{flag} must be at least 1", ExitCode.USAGE)
    max_pixels = request.max_pixels or model.max_pixels
    max_new_tokens = request.max_new_tokens or model.max_new_tokens
    demand = None
    if config is not None:  # the rules as they would run with the asked-for model settings
        sized = replace(model, max_pixels=max_pixels, max_new_tokens=max_new_tokens)
        demand = demand_of(replace(config, model=sized), text_counter(request.model or model.name))
    return plan.plan_with_advice(shape_for(name), memory, quantization=quantization, max_pixels=max_pixels,
                                 max_new_tokens=max_new_tokens, capped=capped, prequantized=_prequantized(name),
                                 demand=demand, kv_cache_dtype=kv_cache_dtype)


def format_plan(p: plan.Plan, *, assumed_card: bool) -> str:
    where = "under a max_gpu_memory cap" if p.capped else "on a whole card"
    lines = [
        f"{p.model}, {p.precision}, {p.memory_gib:.1f} GiB {where}"
        + (" (assumed: pass --gpu-memory SIZE for yours)" if assumed_card else ""),
        f"  weights          {p.weights_gib:6.1f} GiB" + ("  (text linears FP8; vision tower, embeddings, "
                                                          "lm_head bf16)" if p.precision == "fp8" else ""),
        f"  prefill reserve  {p.reserve_gib:6.1f} GiB  (one prefill's activations and KV, working margin)",
        f"  per slot         {p.kv_per_slot_mib:6.1f} MiB  ({p.tokens} tokens of "
        + ("fp8 " if p.kv_cache_dtype == "fp8" else "") + f"KV cache: max_pixels "
        f"{p.max_pixels}, max_new_tokens {p.max_new_tokens})",
    ]
    lines += [f"  {n}" for n in p.notes]
    if p.fits:
        lines.append(f"fits: {p.slots} slots ({p.summary()})")
    else:
        lines.append(plan.nothing_fits_message(p))
    if p.advice and p.fits:
        lines.append("more slots with: " + "; ".join(p.advice))
    return "\n".join(lines)


def run_plan(request: PlanRequest, config: Config | None, *, as_json: bool = False) -> int:
    """``vlwatch plan``: print the plan; exit 1 when not one slot fits."""
    model = config.model if config is not None else ModelConfig()
    p = make(request, model, config)
    assumed = request.gpu_memory is None and not model.max_gpu_memory
    if as_json:
        print(json.dumps({**p.as_json(), "assumed_memory": assumed}, indent=2))
    else:
        print(format_plan(p, assumed_card=assumed))
    return ExitCode.OK if p.fits else ExitCode.FAILED
