"""What fits: weights, activation reserve and KV cache slots for a model on a card (issue 23).

One module holds the memory arithmetic so that ``vlwatch plan`` (offline, no
GPU, no weights) and the engine (sizing its slots after loading) cannot
drift: the engine's ``auto_batch_size`` calls :func:`slots_for_budget`, the
slot engine rounds its cache with :func:`cache_length`, and the command asks
:func:`make_plan`, which calls the same two.

The model's shape comes from its ``config.json`` (a local model folder) or
from the published configs of the two supported models, bundled here as
data.  No torch import: ``vlwatch plan`` must answer on a machine without
one.

Deliberately not here: how much memory the device has free (the engine asks
CUDA; the command is told ``--gpu-memory``), and anything about speed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

GiB = 1 << 30

#: Most slots ``batch_size: auto`` picks (memory permitting).  On the H100
#: (issue 12) 256 slots gave +20% images/min over 64 for 1036 px images and
#: +57% for document pages; past that the KV reads dominate the step.
MAX_AUTO_SLOTS = 256
#: Text tokens around an image in a typical prompt (system prompt, chat
#: markup, the rule's prompt), for sizing the cache before tokenizing.
TEXT_TOKENS_ALLOWANCE = 128
#: Vision patches per vision-tower call when several prompts are prefilled
#: (16384: three 1036x1036 images, or sixteen 512x512): amortises the tower's
#: fixed per-call CPU work, bounds its activation memory (~1 GiB).
VISION_BATCH_PATCHES = 16384
#: Most tokens one packed text prefill takes (several prompts laid end to end,
#: ``prefill_step``): three 1036x1036 images or three document pages; bounds
#: the activations (~140 KB per token in bf16 for the 7B: prefill_reserve).
PREFILL_TOKENS = 6144
#: The allocator's fragmentation, cuBLAS workspaces and the decode graph's pool.
WORKING_MARGIN = GiB
#: What the CUDA context and kernels' modules take outside torch's allocator
#: on a whole card (about 0.5 GiB with torch 2.x; ``max_gpu_memory`` caps the
#: allocator alone, so a cap is planned without it).
CUDA_CONTEXT = GiB // 2
#: Below this many slots bf16 "leaves no room for a useful batch", and the
#: plan's advice names FP8 (``quantization: auto`` takes FP8 only where bf16
#: fits nothing, until FP8's reference check passes).  Why 32: decoding is bound by reading
#: the weights once per step, so throughput grows almost linearly with the
#: slots up to a few dozen (issue 23: the 7B under 22 GiB had 32 slots and
#: made 522 images/min against 869 with 256); with fewer, FP8's halved
#: weights buy more slots than its small accuracy cost is worth.
USEFUL_SLOTS = 32
#: FP8 needs tensor cores that take e4m3 inputs: Ada (8.9) and Hopper (9.0) on.
FP8_MIN_CAPABILITY = (8, 9)
PRECISIONS = ("bf16", "fp8")
#: ``model.kv_cache_dtype`` (vLLM's word and values): the model's dtype, or e4m3 with one float32 scale per
#: token and KV head (``backends.transformers.kv_fp8``; the same cards as FP8 weights).
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2.5-VL model that its memory depends on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_out: int
    vision_patch: int = 14
    vision_temporal: int = 2
    vision_merge: int = 2

    def text_linear_params(self) -> int:
        """Parameters of the decoder layers' linear weights (what FP8 quantizes), biases excluded."""
        kv = self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        attn = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    def text_linear_rows(self) -> int:
        """Output channels of those weights (one FP8 scale each)."""
        kv = self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return self.layers * (q + 2 * kv + self.hidden + 2 * self.intermediate + self.hidden)

    def other_params(self) -> int:
        """Everything else: embeddings, lm_head, norms, biases and the vision tower (kept in bf16)."""
        kv = self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        per_layer = (q + 2 * kv) + 2 * self.hidden  # q/k/v biases, two RMSNorms
        text = self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden
        return text + self.vision_params()

    def vision_params(self) -> int:
        h, i = self.vision_hidden, self.vision_intermediate
        patch = 3 * self.vision_temporal * self.vision_patch**2 * h  # Conv3d, no bias
        block = (h * 3 * h + 3 * h) + (h * h + h) + (3 * h * i + 2 * i + h) + 2 * h
        merged = h * self.vision_merge**2
        merger = h + (merged * merged + merged) + (merged * self.vision_out + self.vision_out)
        return patch + self.vision_depth * block + merger

    def parameters(self) -> int:
        return self.text_linear_params() + self.other_params()


def shape_from_config(config: Mapping[str, Any], name: str = "") -> ModelShape:
    """A model's shape from its ``config.json`` contents (the flat layout or ``text_config``).

    Raises ``ValueError`` naming the missing key when the config is not a Qwen2.5-VL one.
    """
    text = dict(config)
    text.update(config.get("text_config") or {})
    vision = config.get("vision_config") or {}
    try:
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        return ModelShape(
            name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
            hidden=hidden,
            layers=int(text["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate=int(text["intermediate_size"]),
            vocab=int(text["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            # A model without a vision tower (model.generate's path) plans with none.
            vision_hidden=int(vision.get("hidden_size", 0)),
            vision_intermediate=int(vision.get("intermediate_size", 0)),
            vision_depth=int(vision.get("depth", 0)),
            vision_out=int(vision.get("out_hidden_size") or hidden),
            vision_patch=int(vision.get("patch_size", 14)),
            vision_temporal=int(vision.get("temporal_patch_size", 2)),
            vision_merge=int(vision.get("spatial_merge_size", 2)),
        )
    except KeyError as exc:
        raise ValueError(f"not a Qwen2.5-VL config: no {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a Qwen2.5-VL config: {exc}") from None


#: The published config.json values of the supported models (only what memory depends on).
_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "patch_size": 14,
           "temporal_patch_size": 2, "spatial_merge_size": 2}
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False,
        "vision_config": {**_VISION, "out_hidden_size": 3584},
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "intermediate_size": 11008, "vocab_size": 151936, "tie_word_embeddings": True,
        "vision_config": {**_VISION, "out_hidden_size": 2048},
    },
}
#: Short names people type (``--model 3b``).
ALIASES = {"7b": "Qwen/Qwen2.5-VL-7B-Instruct", "3b": "Qwen/Qwen2.5-VL-3B-Instruct"}


def canonical_name(name: str) -> str:
    """``3b`` -> ``Qwen/Qwen2.5-VL-3B-Instruct``; a pre-quantized variant keeps its own name."""
    return ALIASES.get(name.strip().lower(), name)


def known_shape(name: str) -> ModelShape | None:
    """The bundled shape of a supported model (``-FP8...`` variants share their base's)."""
    name = canonical_name(name)
    for known, config in KNOWN_MODELS.items():
        base = known.split("/")[-1].lower()
        if name == known or name.split("/")[-1].lower().startswith(base):
            return shape_from_config(config, known)
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json``, with a clear ``ValueError`` when it is missing or broken."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def checkpoint_precision(config: Mapping[str, Any]) -> str | None:
    """``fp8`` when the checkpoint's ``quantization_config`` says its weights are FP8 already."""
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None
    if quant.get("quant_method") == "fp8":
        return "fp8"
    for group in (quant.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if isinstance(weights, Mapping) and weights.get("type") == "float" and weights.get("num_bits") == 8:
            return "fp8"
    return None


# ------------------------------------------------------------------ arithmetic


def cache_length(length: int) -> int:
    """The static cache's columns for sequences of ``length`` tokens (the slot engine allocates this).

    Rounded up to 64: fewer distinct shapes, aligned masks.
    """
    return -(-max(1, length) // 64) * 64


def image_tokens_for(max_pixels: int) -> int:
    """Tokens of the largest image: one per 28x28 pixels after the 2x2 merge."""
    return max(1, max_pixels // (28 * 28))


def prompt_tokens(max_pixels: int) -> int:
    """Tokens of a prompt with the largest image and a typical text."""
    return image_tokens_for(max_pixels) + TEXT_TOKENS_ALLOWANCE


@dataclass(frozen=True)
class Demand:
    """What the config's rules need of a slot, beyond the model's ``max_pixels`` and ``max_new_tokens``.

    The daemon's engine sizes its rows for every rule's requests before the
    first comes (``backends.Sizing``); the plan counts the same, so that what
    it says is what the engine then allocates.
    """

    text_tokens: int  # the longest text beside an image of the model's max_pixels (the rules that use it)
    tokens: int  # the longest prompt of a rule with its own max_pixels or reference images (0: none)
    max_new_tokens: int  # the largest budget a rule sets itself (0: every rule takes the model's)
    rule: str = ""  # the rule that needs the most (its name), or ""
    why: str = ""  # for the plan's notes: "rule olmocr (2116 image tokens, 8000 new tokens)"


def kv_head_bytes(head_dim: int, itemsize: int = 2, kv: str = "auto") -> int:
    """One KV head's keys (or values) of one token: in the model's dtype, or (``kv`` fp8) one byte each
    plus its float32 scale (the slot engine allocates by this too)."""
    return head_dim + 4 if kv == "fp8" else head_dim * itemsize


def kv_bytes_per_token(shape: ModelShape, itemsize: int = 2, kv: str = "auto") -> int:
    """Keys and values of one token in every layer."""
    return 2 * shape.layers * shape.kv_heads * kv_head_bytes(shape.head_dim, itemsize, kv)


def slot_bytes(shape: ModelShape, length: int, itemsize: int = 2, kv: str = "auto") -> int:
    """One slot of ``length`` tokens: its cache columns, plus its logits and the penalty's mask."""
    return cache_length(length) * kv_bytes_per_token(shape, itemsize, kv) + 3 * shape.vocab * 4


@dataclass(frozen=True)
class Packing:
    """The most one prefill round takes: prompt tokens in one packed text pass, patches in one vision call.

    Packing several prompts per round is what makes prefill fast, and what
    its activations cost: on a card where that leaves no room for a single
    slot, :func:`fit` takes one prompt (and its image) per round instead,
    ``LEAN``: prefill runs at one image's pace, and the model runs at all.
    """

    tokens: int = PREFILL_TOKENS
    patches: int = VISION_BATCH_PATCHES

    @property
    def lean(self) -> bool:
        return self.tokens == 0

    def take_tokens(self, tokens: int) -> int:
        """Prompt tokens a round may pack, for prompts of ``tokens``: one prompt when lean."""
        return tokens if self.lean else max(tokens, self.tokens)

    def take_patches(self, tokens: int) -> int:
        return 4 * tokens if self.lean else max(4 * tokens, self.patches)  # 2x2 patches merge into one token


PACKED = Packing()
#: One prompt per prefill round, its images in one tower call.
LEAN = Packing(tokens=0, patches=0)


def prefill_reserve(shape: ModelShape, tokens: int, itemsize: int = 2, packing: Packing = PACKED) -> int:
    """Peak working memory of one prefill round for prompts of ``tokens`` tokens, with a margin.

    The prefill's own KV cache (copied into a slot afterwards, where the stock
    text model prefills), the widest activations of a text layer (the MLP's
    gate and up projections) and of the vision tower, plus ``WORKING_MARGIN``.
    Activations stay in the model's dtype under FP8 weights too.
    """
    # Several prompts are prefilled as one sequence (up to PREFILL_TOKENS), unless lean.
    text = packing.take_tokens(tokens) * (4 * shape.hidden + 3 * shape.intermediate) * itemsize
    # Several images go through the tower together (up to about this many patches), unless lean.
    patches = packing.take_patches(tokens)
    vision = patches * (6 * shape.vision_hidden + 3 * shape.vision_intermediate) * itemsize
    return tokens * kv_bytes_per_token(shape, itemsize) + 2 * max(text, vision) + WORKING_MARGIN


def weight_bytes(shape: ModelShape, precision: str, itemsize: int = 2) -> int:
    """The weights on the device: bf16 everywhere, or FP8 text linears (1 byte + a float32 scale per row)."""
    if precision == "fp8":
        return shape.text_linear_params() + 4 * shape.text_linear_rows() + shape.other_params() * itemsize
    return shape.parameters() * itemsize


def round_slots(slots: int) -> int:
    """Slots the engine takes out of ``slots`` that fit: all of them, at most MAX_AUTO_SLOTS.

    No rounding down to a multiple of 8 (the first engine's unmeasured habit):
    a decode step is bound by reading the weights, so its time hardly moves
    with the row count, and on a small card the rounding threw away up to
    half the slots (15 that fit ran as 8: the 3B on 8 GiB for pages).  The
    decode graphs are captured per width anyway (powers of two and the slot
    count: ``scheduler.decode_widths``).
    """
    return min(MAX_AUTO_SLOTS, slots)


def slots_for_budget(shape: ModelShape, budget: int, *, tokens: int, max_new: int, itemsize: int = 2,
                     packing: Packing = PACKED, kv: str = "auto") -> int:
    """Slots of ``tokens + max_new`` that fit ``budget`` bytes (free after the weights) beside one prefill.

    0 when not even one fits (the engine then refuses to start rather than
    run out of memory capturing its decode graph).
    """
    room = budget - prefill_reserve(shape, tokens, itemsize, packing)
    return max(0, round_slots(int(room // slot_bytes(shape, tokens + max_new, itemsize, kv))))


def fit(shape: ModelShape, budget: int, *, tokens: int, max_new: int, itemsize: int = 2,
        kv: str = "auto") -> tuple[int, Packing]:
    """Slots and the prefill packing for ``budget``: packed rounds, or one prompt a round where only that fits."""
    slots = slots_for_budget(shape, budget, tokens=tokens, max_new=max_new, itemsize=itemsize, kv=kv)
    if slots >= 1:
        return slots, PACKED
    return slots_for_budget(shape, budget, tokens=tokens, max_new=max_new, itemsize=itemsize, packing=LEAN,
                            kv=kv), LEAN


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """What one model in one precision does with one amount of memory."""

    model: str
    precision: str  # bf16 | fp8
    memory_gib: float  # what was planned for (a card, or a max_gpu_memory cap)
    capped: bool  # memory is a max_gpu_memory cap (no CUDA context taken off)
    max_pixels: int
    max_new_tokens: int
    tokens: int  # cache columns per slot
    weights_gib: float
    reserve_gib: float
    kv_per_slot_mib: float
    slots: int
    fits: bool
    lean: bool = False  # one prompt per prefill round (Packing): what lets it fit at all
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES
    advice: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """One line for logs and ``status``: "7B fp8 on 23.6 GiB: 96 slots of 1664 tokens"."""
        label = short_label(self.model)
        if not self.fits:
            return f"{label} {self.precision} on {self.memory_gib:.1f} GiB: does not fit"
        return (f"{label} {self.precision} on {self.memory_gib:.1f} GiB: {self.slots} slots of {self.tokens} tokens"
                + (", fp8 KV cache" if self.kv_cache_dtype == "fp8" else "")
                + (", one prompt per prefill" if self.lean else ""))

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["advice"], data["notes"] = list(self.advice), list(self.notes)
        data["summary"] = self.summary()
        return data


def short_label(name: str) -> str:
    for size in ("7B", "3B"):
        if f"-{size}-" in name or name.lower() == size.lower():
            return size
    return name.rstrip("/").split("/")[-1]


def make_plan(shape: ModelShape, memory: int, *, precision: str, max_pixels: int, max_new_tokens: int,
              capped: bool = False, itemsize: int = 2, tokens: int | None = None, kv: str = "auto") -> Plan:
    """Slots for ``shape`` in ``precision`` in ``memory`` bytes (a whole card, or a cap when ``capped``).

    ``tokens``: the longest prompt a slot must hold (default: an image of
    ``max_pixels`` and a typical text; the config's rules can need more).
    """
    tokens = prompt_tokens(max_pixels) if tokens is None else tokens
    weights = weight_bytes(shape, precision, itemsize)
    budget = memory - weights - (0 if capped else CUDA_CONTEXT)
    slots, packing = fit(shape, budget, tokens=tokens, max_new=max_new_tokens, itemsize=itemsize, kv=kv)
    return Plan(model=shape.name, precision=precision, memory_gib=round(memory / GiB, 2), capped=capped,
                max_pixels=max_pixels, max_new_tokens=max_new_tokens,
                tokens=cache_length(tokens + max_new_tokens), weights_gib=round(weights / GiB, 2),
                reserve_gib=round(prefill_reserve(shape, tokens, itemsize, packing) / GiB, 2),
                kv_per_slot_mib=round(slot_bytes(shape, tokens + max_new_tokens, itemsize, kv) / 2**20, 2),
                slots=slots, fits=slots >= 1, lean=packing.lean and slots >= 1, kv_cache_dtype=kv)


def choose_precision(shape: ModelShape, memory: int, *, quantization: str, max_pixels: int, max_new_tokens: int,
                     capped: bool = False, fp8_capable: bool | None = None,
                     prequantized: bool = False, tokens: int | None = None, kv: str = "auto") -> tuple[str, str]:
    """The precision ``quantization`` (auto | none | fp8) comes to, and why.

    ``fp8_capable`` None means "unknown card" (the offline command): FP8 is
    then assumed possible, and the plan says which cards it needs.
    """
    if prequantized:
        return "fp8", "the checkpoint's weights are FP8 already"
    if quantization == "none":
        return "bf16", "quantization: none"
    if quantization == "fp8":
        return "fp8", "quantization: fp8"
    if fp8_capable is False:
        return "bf16", "this card has no FP8 tensor cores (compute capability below 8.9)"
    bf16 = make_plan(shape, memory, precision="bf16", max_pixels=max_pixels, max_new_tokens=max_new_tokens,
                     capped=capped, tokens=tokens, kv=kv)
    # Only where bf16 fits nothing: FP8's check against its reference has not passed yet on the GPU
    # (benchmarks/NOTES.md, call F1), so auto does not trade a working bf16 setup for it. Where bf16
    # leaves fewer than USEFUL_SLOTS, the plan's advice names fp8 and its slots instead.
    if bf16.slots >= 1:
        return "bf16", f"bf16 fits ({bf16.slots} slots)"
    return "fp8", "bf16 does not fit here: FP8 halves the text weights"


def plan_with_advice(shape: ModelShape, memory: int, *, quantization: str = "auto", max_pixels: int,
                     max_new_tokens: int, capped: bool = False, fp8_capable: bool | None = None,
                     prequantized: bool = False, itemsize: int = 2, demand: "Demand | None" = None,
                     kv_cache_dtype: str = "auto") -> Plan:
    """The plan for the configured setup; where nothing fits, what would (3B, fp8, lower max_pixels).

    ``demand``: what the config's rules need of a slot, where that is more
    than ``max_pixels`` and ``max_new_tokens`` give (``Demand``).
    """
    tokens = None
    if demand is not None and (_demanded(demand, max_pixels) > prompt_tokens(max_pixels)
                               or demand.max_new_tokens > max_new_tokens):
        tokens = _demanded(demand, max_pixels)
        max_new_tokens = max(max_new_tokens, demand.max_new_tokens)
    else:
        demand = None
    precision, why = choose_precision(shape, memory, quantization=quantization, max_pixels=max_pixels,
                                      max_new_tokens=max_new_tokens, capped=capped, fp8_capable=fp8_capable,
                                      prequantized=prequantized, tokens=tokens, kv=kv_cache_dtype)
    plan = make_plan(shape, memory, precision=precision, max_pixels=max_pixels, max_new_tokens=max_new_tokens,
                     capped=capped, itemsize=itemsize, tokens=tokens, kv=kv_cache_dtype)
    notes = [f"precision {precision}: {why}"]
    if kv_cache_dtype == "fp8":
        notes.append("KV cache fp8: e4m3 keys and values, a float32 scale per token and KV head")
    if demand is not None and demand.why:
        notes.append(f"slots sized for {demand.why}")
    if (precision == "fp8" or kv_cache_dtype == "fp8") and fp8_capable is None:
        notes.append("fp8 needs a card with compute capability 8.9 or later (RTX 40xx, L4, L40S, H100, ...)")
    if plan.fits and plan.slots >= USEFUL_SLOTS:
        return replace(plan, notes=tuple(notes))
    advice = _advice(shape, memory, plan, capped=capped, fp8_capable=fp8_capable, tokens=tokens, demand=demand)
    return replace(plan, advice=tuple(advice), notes=tuple(notes))


def _advice(shape: ModelShape, memory: int, plan: Plan, *, capped: bool, fp8_capable: bool | None,
            tokens: int | None = None, demand: "Demand | None" = None) -> list[str]:
    """Setups that would fit (or fit more), the smallest change first."""
    kw: dict[str, Any] = {"max_new_tokens": plan.max_new_tokens, "capped": capped, "tokens": tokens,
                          "kv": plan.kv_cache_dtype}
    out: list[str] = []
    if plan.precision == "bf16" and fp8_capable is not False:
        fp8 = make_plan(shape, memory, precision="fp8", max_pixels=plan.max_pixels, **kw)
        if fp8.slots > plan.slots:
            out.append(f"model.quantization: fp8 ({fp8.slots} slots; needs compute capability 8.9+)")
    if plan.kv_cache_dtype != "fp8" and fp8_capable is not False:
        kv8 = make_plan(shape, memory, precision=plan.precision, max_pixels=plan.max_pixels, **{**kw, "kv": "fp8"})
        if kv8.slots > plan.slots:
            out.append(f"model.kv_cache_dtype: fp8 ({kv8.slots} slots; needs compute capability 8.9+)")
    small = known_shape("3b")
    if small is not None and shape.hidden > small.hidden:
        for precision in ("bf16", "fp8") if fp8_capable is not False else ("bf16",):
            alt = make_plan(small, memory, precision=precision, max_pixels=plan.max_pixels, **kw)
            if alt.slots > plan.slots:
                q = "" if precision == "bf16" else ", model.quantization: fp8"
                out.append(f"model.name: Qwen/Qwen2.5-VL-3B-Instruct{q} ({alt.slots} slots)")
                break
    if demand is not None and demand.rule and plan.max_new_tokens == demand.max_new_tokens > 2048:
        # A rule's budget makes every row long (the olmocr pack's 8000 tokens): the rule is what to change.
        alt = make_plan(shape, memory, precision=plan.precision, max_pixels=plan.max_pixels,
                        **{**kw, "max_new_tokens": 2048})
        if alt.slots > plan.slots:
            out.append(f"rule {demand.rule}: max_new_tokens: 2048 ({alt.slots} slots; a longer answer stops there)")
    if demand is None or demand.tokens < _demanded(demand, plan.max_pixels):
        # the model's max_pixels sizes the longest prompt (no rule with pixels of its own needs more)
        pixels = plan.max_pixels
        while pixels > 200_704:  # 256 image tokens: below that documents stop being legible
            pixels = pixels // 2 // 784 * 784
            need = None if demand is None else _demanded(demand, pixels)
            alt = make_plan(shape, memory, precision=plan.precision, max_pixels=pixels, **{**kw, "tokens": need})
            if alt.slots >= max(1, min(USEFUL_SLOTS, 2 * plan.slots)):
                out.append(f"model.max_pixels: {pixels} ({alt.slots} slots)")
                break
    if plan.max_new_tokens > 512 and (demand is None or plan.max_new_tokens > demand.max_new_tokens):
        alt = make_plan(shape, memory, precision=plan.precision, max_pixels=plan.max_pixels,
                        **{**kw, "max_new_tokens": 512})
        if alt.slots > plan.slots:
            out.append(f"model.max_new_tokens: 512 ({alt.slots} slots)")
    if not out and not plan.fits:
        need = weight_bytes(shape, plan.precision) + prefill_reserve(
            shape, prompt_tokens(plan.max_pixels) if tokens is None else tokens, packing=LEAN)
        what = "the weights and one prefill" if plan.capped else "the weights, one prefill and the CUDA context"
        out.append(f"more GPU memory: {what} alone need {(need + _context(plan)) / GiB:.1f} GiB")
    return out


def _context(plan: Plan) -> int:
    """The CUDA context's bytes where ``plan`` is for a whole card (a cap limits torch's allocator alone)."""
    return 0 if plan.capped else CUDA_CONTEXT


def _demanded(demand: Demand, max_pixels: int) -> int:
    """The longest prompt the rules make when the model's images are ``max_pixels``."""
    return max(prompt_tokens(max_pixels), image_tokens_for(max_pixels) + demand.text_tokens, demand.tokens)


def nothing_fits_message(plan: Plan) -> str:
    """The engine's refusal and the command's verdict when not one slot fits."""
    need = plan.weights_gib + plan.reserve_gib + _context(plan) / GiB
    context = "" if plan.capped else f", the CUDA context (~{CUDA_CONTEXT / GiB:.1f} GiB)"
    text = (f"{plan.summary()}: the weights ({plan.weights_gib:.1f} GiB){context} and one prefill "
            f"({plan.reserve_gib:.1f} GiB) need {need:.1f} GiB before the first slot "
            f"({plan.kv_per_slot_mib:.0f} MiB)")
    if plan.advice:
        text += ". What would fit: " + "; ".join(plan.advice)
    return text + " (`vlwatch plan --help` tries other setups offline)"


def fp8_unsupported_message(capability: str, bf16: Plan | None) -> str:
    """``quantization: fp8`` on a card without FP8 tensor cores: why not, and the smallest setup that fits."""
    text = (f"model.quantization: fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or later: "
            f"RTX 40xx, L4, L40S, H100); this one has {capability}. Set model.quantization: auto or none")
    if bf16 is not None:
        text += f" ({bf16.summary()})" if bf16.fits else ""
        smaller = [a for a in bf16.advice if "fp8" not in a]
        if smaller:
            text += "; what fits in bf16: " + "; ".join(smaller)
    return text
