"""Qwen2.5-VL in this process through Hugging Face ``transformers``.

Loading is local-files-only: the weights come from a directory or from the
local Hugging Face cache, never from the network (``vlwatch pull`` is the one
command that downloads).  The model loads lazily on the first request and can
be unloaded when idle, so the daemon holds no GPU memory while nothing
happens.

``attention: auto`` tries flash_attention_2 (CUDA and the flash-attn package
both present), then sdpa, then eager, and logs what it got and why it fell
back.  An explicit choice that cannot be honoured is an error, not a silent
fallback.

Batches are left-padded (the processor pads right by default, which breaks
batched generation for a decoder-only model).  A CUDA out-of-memory error
splits the batch in two and retries each half, down to single requests.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from daemon.backends import Answer, Request
from daemon.config import ModelConfig, local_model_path
from daemon.errors import BackendError, ModelMissingError

log = logging.getLogger(__name__)


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


class TransformersBackend:
    name = "transformers"

    def __init__(self, config: ModelConfig, *, load_format: str = "auto") -> None:
        """Args:
        config: the ``model:`` section.
        load_format: ``auto`` loads real weights; ``dummy`` builds the same
            architecture from the model's config with random weights (bench only).
        """
        self.config = config
        self.model = config.name
        self.load_format = load_format
        self.attention: str | None = None  # what was actually loaded
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- loading

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        with self._lock:
            if self._model is None:
                self._load()

    def _load(self) -> None:
        import torch
        from transformers import AutoProcessor

        if not sys.stderr.isatty():
            # transformers draws a weight-loading progress bar; in a journal it is noise.
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        device = _pick_device(self.config.device)
        dtype = _pick_dtype(self.config.dtype, device)
        source = self._source()
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
        # Batched generation of a decoder-only model needs the padding on the left.
        processor.tokenizer.padding_side = "left"
        model, attention = self._load_model(source, device, dtype)
        model.eval()
        self._processor, self._model, self.attention = processor, model, attention
        log.info("loaded %s on %s (%s, attention=%s)", self.model, device, str(dtype).removeprefix("torch."), attention)
        del torch

    def _source(self) -> str:
        if self.load_format == "dummy":
            from daemon.bench_model import dummy_source

            return str(dummy_source(self.config.name))
        return str(resolve_model(self.config.name))

    def _load_model(self, source: str, device: Any, dtype: Any) -> tuple[Any, str]:
        failures: list[str] = []
        for attention in attention_candidates(self.config.attention, device):
            try:
                model = self._instantiate(source, dtype, attention).to(device)
            except (ImportError, ValueError, RuntimeError) as exc:
                if self.config.attention != "auto":
                    raise BackendError(f"attention {attention!r} is not usable here: {exc}") from exc
                log.warning("attention %s failed to load (%s); falling back", attention, _one_line(exc))
                failures.append(attention)
                continue
            return model, attention
        raise BackendError(f"no attention implementation could be loaded (tried {', '.join(failures)})")

    def _instantiate(self, source: str, dtype: Any, attention: str) -> Any:
        from transformers import AutoConfig, AutoModelForImageTextToText

        if self.load_format == "dummy":
            config = AutoConfig.from_pretrained(source, local_files_only=True)
            config._attn_implementation = attention  # honoured by from_config below
            return AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attention)
        return AutoModelForImageTextToText.from_pretrained(
            source, local_files_only=True, dtype=dtype, attn_implementation=attention
        )

    def unload(self) -> None:
        with self._lock:
            if self._model is None:
                return
            self._model = None
            self._processor = None
            gc.collect()
            _empty_cuda_cache()
            log.info("unloaded %s (idle)", self.model)

    # -------------------------------------------------------------- inference

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        if not requests:
            return []
        self.load()
        with self._lock:
            return self._generate_split(list(requests))

    def _generate_split(self, requests: list[Request]) -> list[Answer]:
        import torch

        try:
            return self._generate(requests)
        except torch.cuda.OutOfMemoryError:
            if len(requests) == 1:
                raise BackendError("out of GPU memory on a single image; lower model.max_pixels") from None
            half = len(requests) // 2
            log.warning("out of GPU memory on a batch of %d; retrying as %d + %d", len(requests), half, len(requests) - half)
            _empty_cuda_cache()
            return self._generate_split(requests[:half]) + self._generate_split(requests[half:])

    def _generate(self, requests: list[Request]) -> list[Answer]:
        import torch

        processor, model = self._processor, self._model
        texts = [processor.apply_chat_template(_messages(r), tokenize=False, add_generation_prompt=True) for r in requests]
        images = [img for r in requests for img in r.images]
        # do_resize=False: daemon.images already sized every image to multiples
        # of 28; resizing again would move the boxes the model answers with.
        inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt", do_resize=False)
        inputs = inputs.to(model.device)
        max_new = max(r.max_new_tokens for r in requests)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        eos = _eos_ids(model, processor)
        answers = []
        for row, request in zip(new.tolist(), requests):
            budget = row[: request.max_new_tokens]  # the batch ran to its longest budget
            tokens = _until_eos(budget, eos)
            text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append(Answer(text=text, new_tokens=len(tokens), finished=len(tokens) < len(budget)))
        return answers


def _messages(request: Request) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in request.images]
    content.append({"type": "text", "text": request.prompt})
    return [{"role": "user", "content": content}]


def _eos_ids(model: Any, processor: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if processor.tokenizer.eos_token_id is not None:
        ids.add(processor.tokenizer.eos_token_id)
    return ids


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    """The generated tokens before the first end-of-sequence token (padding comes after it)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


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


def _pick_device(requested: str) -> Any:
    import torch

    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pick_dtype(requested: str, device: Any) -> Any:
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 matmuls on most CPUs are slow and fp16 is unsupported


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
