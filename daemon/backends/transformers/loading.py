"""Loading Qwen2.5-VL for the transformers backend: device, dtype, attention, weights, memory.

``backend.TransformersBackend`` loads in this order, one function here per
step: the device and dtype (``pick_device``, ``pick_dtype``,
``refuse_fp16``), the processor, the KV cache's dtype (``resolve_kv_cache``:
its kernel is tried on the card first), the memory plan (``plan_memory``, counting
the feed's declared requests: ``demand``) on the memory the card has free
before any weight arrives, the precision of the text weights
(``resolve_precision``), then the weights themselves under the memory cap,
quantized on their way to the device (``load_weights``).  ``speed_up`` then
builds the slot engine and the stock modules' faster forwards and checks
Qwen2.5-VL's private touchpoints against the stock path.  The backend keeps
what each step hands back and answers the requests.

Loading is local-files-only: the weights come from a directory or from the
local Hugging Face cache, never from the network (``vlwatch pull`` is the one
command that downloads).

``attention: auto`` tries flash_attention_2 (CUDA and the flash-attn package
both present), then sdpa, then eager, and logs what it got and why it fell
back.  An explicit choice that cannot be honoured is an error, not a silent
fallback.

Precision: float16 is refused for Qwen2.5-VL (trained in bfloat16, its
activations overflow fp16 and the logits turn NaN) unless
``engine.allow_fp16: true``; ``dtype: auto`` picks bfloat16, or
float32 on a GPU without bfloat16.

Memory: ``max_gpu_memory`` caps this process's CUDA allocator
(``torch.cuda.set_per_process_memory_fraction``).  A setup whose plan
(``daemon.plan``) cannot hold one slot beside the weights is refused before
loading, with what would fit.

Deliberately not here: when to load or unload (the backend loads lazily on
the first request), and sizing the runs once loaded (the backend's
``auto_batch_size``, with ``available_gpu_memory`` and ``model_shape``).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from daemon import env, plan
from daemon.backends import Sizing
from daemon.backends.transformers.oom import is_out_of_memory, load_oom_message
from daemon.config import EngineOptions, ModelConfig, local_model_path
from daemon.errors import BackendError, ModelMissingError, VlwatchError, first_line

log = logging.getLogger(__name__)

GiB = 2**30


@dataclass(frozen=True)
class FastPaths:
    """What ``speed_up`` hands back: the parts of the fast path that passed their check, None for the others."""

    fast: Any  # slots.SlotEngine
    vision: Any  # patches.VisionAttentionPatch
    text: Any  # patches.TextPrefillPatch (CUDA)
    touchpoints: Any  # qwen2_5_vl_check.Checked: the model's private touchpoints that failed their check


def missing_model_message(name: str) -> str:
    return (
        f"model {name!r} is not on this machine: run `vlwatch pull {name}` (the only command that "
        "downloads), or set model.name to a local directory holding the weights"
    )


def resolve_model(name: str) -> Path:
    path = local_model_path(name)
    if path is None:
        raise ModelMissingError(missing_model_message(name))
    return path


def model_source(name: str, load_format: str) -> str:
    """The directory to load from: the local model, or (``dummy``) the bench's config-only copy of it."""
    if load_format == "dummy":
        from daemon.backends.transformers.dummy import dummy_source

        return str(dummy_source(name))
    return str(resolve_model(name))


def quiet_progress_bar() -> None:
    """No weight-loading progress bar from transformers unless on a terminal: in a journal it is noise."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def pick_device(requested: str) -> Any:
    env.cuda_allocator_defaults()  # for a backend built outside the command line; before CUDA starts
    import torch

    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str, device: Any) -> Any:
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        # No float16 fallback: Qwen2.5-VL overflows it (see refuse_fp16).
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32  # bf16 matmuls on most CPUs are slow and fp16 is unsupported


def refuse_fp16(dtype: Any, source: str, *, allow: bool = False) -> None:
    """float16 for Qwen2.5-VL only when the user insists (``engine.allow_fp16: true``)."""
    import torch

    if dtype != torch.float16 or allow:
        return
    try:
        import json

        model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        raise BackendError("model.dtype float16: Qwen2.5-VL was trained in bfloat16 and overflows float16 "
                           "(NaN logits); use bfloat16 or float32, or set engine.allow_fp16: true to insist")


def load_processor(source: str) -> Any:
    """The model's Hugging Face processor, padding on the left."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    # Batched generation of a decoder-only model needs the padding on the left.
    processor.tokenizer.padding_side = "left"
    return processor


def demand(sizing: Sizing, text_tokens: Callable[[str], int]) -> plan.Demand | None:
    """What a live feed's declared requests need of a slot (``plan.Demand``), for the memory plan.

    Args:
        sizing: what the feed that asked for the model declares (the daemon's rules).
        text_tokens: a one-image prompt's text tokens, as the loaded processor's chat
            template and tokenizer count them (the backend's count).

    Returns None when nothing is declared.
    """
    if not sizing.expected:
        return None
    try:
        lengths = [e.image_tokens + text_tokens(e.prompt) for e in sizing.expected]
    except Exception as exc:  # noqa: BLE001 - a processor that cannot count them: the plan without the rules
        log.info("memory plan: the rules' prompts not counted (%s)", exc)
        return None
    budget = max(e.max_new_tokens for e in sizing.expected)
    return plan.Demand(text_tokens=0, tokens=max(lengths), max_new_tokens=budget,
                       why=f"the rules' requests (up to {max(lengths)} prompt tokens, {budget} new tokens)")


def resolve_kv_cache(config: ModelConfig, device: Any) -> str:
    """What ``model.kv_cache_dtype`` comes to here: ``auto`` as asked; ``fp8`` where its attention kernel
    runs (``kv_fp8.runs``), refused on a card before compute capability 8.9 with what to set instead, kept
    in the model's dtype (a warning) where the kernel fails its check; on a CPU FP8 through the widening
    reference path (correct, slow: the tests).
    """
    import torch

    from daemon.backends.transformers import kv_fp8

    if config.kv_cache_dtype != "fp8":
        return "auto"
    if device.type != "cuda":
        log.warning("an FP8 KV cache on %s is widened to the model's dtype at every step (slow): its kernel "
                    "needs CUDA compute capability 8.9+", device)
        return "fp8"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < plan.FP8_MIN_CAPABILITY:
        raise BackendError(f"model.kv_cache_dtype: fp8 needs a GPU with compute capability 8.9 or later (RTX 40xx, "
                           f"L4, L40S, H100); this one has {'.'.join(map(str, capability))}. Set "
                           "model.kv_cache_dtype: auto")
    return "fp8" if kv_fp8.runs(device) else "auto"


def plan_memory(config: ModelConfig, source: str, device: Any, dtype: Any,
                demand: plan.Demand | None, kv_cache_dtype: str = "auto") -> plan.Plan | None:
    """The plan for this model on this card, logged; a clear error when nothing fits.

    The same arithmetic as ``vlwatch plan`` and ``auto_batch_size``
    (daemon.plan), on the memory the card has free now (under
    ``max_gpu_memory``), so a setup that cannot hold one slot beside the
    weights stops here with what would fit, not later with an
    out-of-memory traceback while capturing the decode graph (issue 23).
    """
    import torch

    if device.type != "cuda":
        return None
    try:
        checkpoint = plan.read_config(Path(source))
        shape = plan.shape_from_config(checkpoint, config.name)
    except ValueError as exc:
        log.info("no memory plan: %s", exc)
        return None
    free, total = torch.cuda.mem_get_info(device)
    cap = config.max_gpu_memory
    memory = min(free, cap) if cap else free
    capability = tuple(torch.cuda.get_device_capability(device))
    capable = capability >= plan.FP8_MIN_CAPABILITY
    prequantized = plan.checkpoint_precision(checkpoint) == "fp8"
    quantization = config.quantization
    if quantization == "fp8" and not capable and not prequantized:
        quantization = "none"  # refused below, with what fits in bf16
    planned = plan.plan_with_advice(
        shape, memory, quantization=quantization, max_pixels=config.max_pixels,
        max_new_tokens=config.max_new_tokens, capped=True,  # free memory: the context is counted already
        fp8_capable=capable, prequantized=prequantized, itemsize=dtype.itemsize, demand=demand,
        kv_cache_dtype=kv_cache_dtype)
    if quantization != config.quantization:
        raise BackendError(plan.fp8_unsupported_message(".".join(map(str, capability)), planned))
    log.info("memory plan: %s (weights %.1f GiB, prefill reserve %.1f GiB, %.0f MiB per slot; %s)",
             planned.summary(), planned.weights_gib, planned.reserve_gib, planned.kv_per_slot_mib,
             "; ".join(planned.notes))
    if not planned.fits:
        raise BackendError(plan.nothing_fits_message(planned))
    if planned.advice:
        log.info("memory plan: more slots with %s", " or ".join(planned.advice))
    return planned


def resolve_precision(config: ModelConfig, source: str, device: Any, planned: plan.Plan | None) -> str:
    """What ``model.quantization`` comes to here: the plan's choice on CUDA, bf16 elsewhere unless asked.

    On a CPU (or a card without FP8 tensor cores, for a pre-quantized
    checkpoint) FP8 weights run through the dequantizing reference path:
    correct, slower; ``auto`` never picks it there.
    """
    import torch

    from daemon.backends.transformers import fp8

    try:
        checkpoint = plan.read_config(Path(source))
    except ValueError:
        checkpoint = {}
    prequantized = fp8.compressed_tensors_fp8(checkpoint)
    if planned is not None:
        precision = planned.precision
    else:
        precision = "fp8" if config.quantization == "fp8" or prequantized else "bf16"
    if device.type == "cuda" and precision == "fp8" and not fp8.fp8_capable(device) and not prequantized:
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise BackendError(plan.fp8_unsupported_message(capability, planned))
    if precision == "fp8" and not fp8.fast_fp8(device):
        log.warning("FP8 weights on %s run through the dequantizing reference path (slow): "
                    "FP8 tensor cores need CUDA compute capability 8.9+", device)
    return precision


def limit_memory(device: Any, cap: int | None) -> None:
    """Apply ``max_gpu_memory`` (``cap``, bytes; None: the whole card) to this process's CUDA allocator."""
    import torch

    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0, index)
    if cap:
        log.info("GPU memory capped at %.1f GiB of %.1f GiB", cap / GiB, total / GiB)


def load_weights(config: ModelConfig, source: str, device: Any, dtype: Any, *, name: str, precision: str,
                 load_format: str) -> tuple[Any, str]:
    """The model on ``device`` in eval mode under the memory cap, and the attention implementation it loaded with.

    Args:
        config: the ``model:`` section.
        source: the directory to load from (``model_source``).
        name: what messages call the model.
        precision: ``resolve_precision``'s answer.
        load_format: ``auto`` loads real weights; ``dummy`` builds the same
            architecture from the model's config with random weights (bench only).
    """
    # Dummy weights are built on the GPU in bf16 and quantized there: the
    # cap (a smaller card simulated) applies once they are FP8.  A real
    # checkpoint is quantized one linear at a time on its way to the GPU.
    late_cap = load_format == "dummy" and precision == "fp8"
    if not late_cap:
        limit_memory(device, config.max_gpu_memory)
    model, attention = load_model(config, source, device, dtype, name=name, precision=precision,
                                  load_format=load_format)
    if late_cap:
        limit_memory(device, config.max_gpu_memory)
    model.eval()
    return model, attention


def load_model(config: ModelConfig, source: str, device: Any, dtype: Any, *, name: str, precision: str,
               load_format: str) -> tuple[Any, str]:
    """The weights on ``device`` and the attention implementation that loaded, the best of the candidates."""
    failures: list[str] = []
    for attention in attention_candidates(config.attention, device):
        try:
            model = instantiate(config, source, dtype, attention, precision=precision, load_format=load_format)
        except (ImportError, ValueError, RuntimeError) as exc:
            if is_out_of_memory(exc):  # not an attention problem: say so, with numbers (issue 11.5)
                raise BackendError(load_oom_message(name, source, dtype, device, config)) from exc
            if config.attention != "auto":
                raise BackendError(f"attention {attention!r} is not usable here: {exc}") from exc
            log.warning("attention %s failed to load (%s); falling back", attention, first_line(exc))
            failures.append(attention)
            continue
        return place(model, config, source, device, dtype, name=name, precision=precision,
                     load_format=load_format), attention
    raise BackendError(f"no attention implementation could be loaded (tried {', '.join(failures)})")


def attention_candidates(requested: str, device: Any) -> list[str]:
    """The attention implementations to try, best first, logging why any is skipped."""
    if requested != "auto":
        return [requested]
    out = []
    reason = flash_attention_unusable(device)
    if reason is None:
        out.append("flash_attention_2")
    else:
        log.info("attention: flash_attention_2 not used (%s); trying sdpa", reason)
    return out + ["sdpa", "eager"]


def flash_attention_unusable(device: Any) -> str | None:
    """Why flash-attn cannot be used here, or None if it can."""
    if getattr(device, "type", str(device)) != "cuda":
        return "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install 'vlwatch[flash]')"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "flash-attn is installed but not usable with this torch/GPU"
    return None


def instantiate(config: ModelConfig, source: str, dtype: Any, attention: str, *, precision: str,
                load_format: str) -> Any:
    """The model built from ``source`` (on the CPU, or for dummy weights on ``config.device``)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if load_format == "dummy":  # random weights, with the model's generation config (issue 22.6)
        from daemon.backends.transformers.dummy import dummy_model

        return dummy_model(source, dtype=dtype, attention=attention, device=pick_device(config.device))
    extra: dict[str, Any] = {}
    if precision == "fp8":
        checkpoint = AutoConfig.from_pretrained(source, local_files_only=True)
        if getattr(checkpoint, "quantization_config", None) is not None:
            # backends.fp8 puts the checkpoint's FP8 weights in as they are;
            # transformers' compressed-tensors path would decompress them.
            del checkpoint.quantization_config
            extra["config"] = checkpoint
    return AutoModelForImageTextToText.from_pretrained(
        source, local_files_only=True, dtype=dtype, attn_implementation=attention, **extra
    )


def place(model: Any, config: ModelConfig, source: str, device: Any, dtype: Any, *, name: str, precision: str,
          load_format: str) -> Any:
    """FP8 where asked, then onto the device; not an attention problem when it fails (issue 23)."""
    try:
        return quantize(model, source, device, precision=precision, load_format=load_format).to(device)
    except ValueError as exc:  # a checkpoint that is not the FP8 layout it says
        raise BackendError(f"FP8 weights of {name}: {exc}") from exc
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise BackendError(load_oom_message(name, source, dtype, device, config)) from exc
        raise


def quantize(model: Any, source: str, device: Any, *, precision: str, load_format: str) -> Any:
    """The text model's linears in FP8 when ``precision`` says so (``daemon.backends.transformers.fp8``)."""
    if precision != "fp8":
        return model
    from daemon.backends.transformers import fp8

    checkpoint = plan.read_config(Path(source)) if load_format != "dummy" else {}
    if fp8.compressed_tensors_fp8(checkpoint):
        count = fp8.load_compressed_tensors(model, Path(source), device)
        log.info("FP8: %d text linears loaded as they are from the compressed-tensors checkpoint", count)
    else:
        count = fp8.quantize_text_linears(model, device)
        log.info("FP8: %d text linears quantized at load (row-wise e4m3; vision tower and lm_head in %s)",
                 count, str(model.dtype).removeprefix("torch."))
    return model


def speed_up(model: Any, processor: Any, attention: str, *, engine: str, options: EngineOptions,
             kv_cache_dtype: str = "auto") -> FastPaths | None:
    """The slot engine and the vision/prefill patches for ``model``, each checked against the stock path.

    Returns None for a model the slot engine does not support (the stock
    path, ``model.generate``, runs it).

    Args:
        engine: ``auto`` builds the slot engine, ``hf`` does not (stock ``model.generate``).
        options: the ``engine:`` section.
        kv_cache_dtype: the slot engine's cache, ``resolve_kv_cache``'s answer.
    """
    if getattr(model.config, "model_type", None) != "qwen2_5_vl":
        log.info("generation: model.generate (the slot engine supports qwen2_5_vl only)")
        return None
    from daemon.backends.transformers import patches, qwen2_5_vl_check, slots

    if model.device.type == "cuda" and patches.pad_vision_mlp(model):
        log.debug("vision MLP width padded for the Hopper/Ampere GEMM kernels")
    o = options
    vision = text = fast = None
    if attention != "flash_attention_2":  # flash-attn already runs the windows as one varlen call
        vision = patches.VisionAttentionPatch(
            model, varlen=o.vision_varlen, compile=patches.compile_enabled(model.device, o.compiles("vision")),
            fused_blocks=o.vision_blocks)
    if patches.compile_enabled(model.device, o.compiles("prefill")):
        text = patches.TextPrefillPatch(model)
    # Each of Qwen2.5-VL's private touchpoints once, on a tiny input, against the stock path: a
    # transformers or torch that changed one turns its fast path off (qwen2_5_vl's docstring, qwen2_5_vl_check).
    started = time.perf_counter()
    checked = qwen2_5_vl_check.check_rope_index(model)
    if engine != "hf" and checked.ok("rope_index"):
        candidate = slots.SlotEngine(model, eos_ids=eos_ids(model, processor), options=o,
                                     kv_cache_dtype=kv_cache_dtype)
        checked += check_engine(candidate)
        fast = candidate if checked.ok("text_layers") else None
    if not checked.ok("flash_attention") and vision is not None:
        vision.without_flash()
    checked += qwen2_5_vl_check.check_vision(model, vision)
    if not checked.ok("vision_attention"):
        vision = None  # left disabled: the stock forwards run
    if fast is not None:
        fast.vision = vision
        fast.vision_layout = checked.ok("vision_layout")
        log.info("generation: the slot engine (static cache, continuous batching%s)",
                 ", CUDA graphs" if fast.use_cuda_graphs else "")
    log.info("Qwen2.5-VL touchpoints checked in %.1f s: %s", time.perf_counter() - started, checked.summary())
    return FastPaths(fast=fast, vision=vision, text=text, touchpoints=checked)


def check_engine(fast: Any) -> Any:
    """The engine's layer functions against the stock decoder layer; FlashAttention's kinds on their own."""
    from daemon.backends.transformers import qwen2_5_vl_check

    if not fast.fused or not fast.layer_functions:
        return qwen2_5_vl_check.Checked()  # the engine runs the model's own modules: nothing of ours to check
    checked = qwen2_5_vl_check.check_text_layers(fast)
    flash = ("flash",) if fast.attention == "flash" else ()
    if checked.ok("text_layers") and (flash or fast.prefill_kind == "flash"):
        checked += qwen2_5_vl_check.check_text_layers(
            fast, kinds=flash, prefill_kind=fast.prefill_kind, touchpoint="flash_attention",
            fallback="SDPA runs instead of FlashAttention's varlen entry (decode, prefill, vision blocks)")
        if not checked.ok("flash_attention"):
            fast.without_flash()
    return checked


def choose_sdpa_kernels(model: Any, *, stock: bool) -> None:
    """The slot engine: no cuDNN attention (it plans anew for every sequence length); stock: torch's default.

    On the H100 with torch 2.11, SDPA picks cuDNN's kernel, which builds an
    execution plan for each new shape: a prefill of an unseen length took
    0.24 s instead of 0.145 s, and stock decoding (a new KV length every
    step) 72 ms a step instead of 34 (benchmarks/NOTES.md).  Flash and
    memory-efficient attention run as fast once warm and need no plans.
    The switch is process-wide; the daemon owns its process.

    Args:
        model: the loaded model, or None (nothing to choose for).
        stock: whether the stock path (``model.generate``) runs, not the slot engine.
    """
    import torch

    if model is not None and model.device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(stock)


def eos_ids(model: Any, processor: Any) -> set[int]:
    """The tokens that end a sequence: the model's generation config's and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if processor.tokenizer.eos_token_id is not None:
        ids.add(processor.tokenizer.eos_token_id)
    return ids


def describe(exc: BaseException) -> str:
    """One line for a log entry or an error: vlwatch's own errors as they are, others with their type's name."""
    return str(exc) if isinstance(exc, VlwatchError) else f"{type(exc).__name__}: {first_line(exc)}"


# ------------------------------------------------------------ the loaded model's memory


def model_shape(model: Any) -> "plan.ModelShape":
    """The loaded model's sizes, for daemon.plan's arithmetic."""
    return plan.shape_from_config(model.config.to_dict(), str(getattr(model, "name_or_path", "")))


def empty_cuda_cache() -> None:
    """Hand the allocator's cached blocks back (after an out-of-memory error, a re-size, an unload)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_gpu_memory(device: Any, cap: int | None) -> int:
    """Bytes this process can still allocate on ``device``: free memory, and room under ``cap``."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - held  # reserved by us but unused: ours to reuse
    room = free + cached
    if cap:
        room = min(room, cap - torch.cuda.memory_reserved(device) + cached)
    return max(0, room)
