"""Stock ``model.generate``: ``engine: hf``, models the slot engine does not know, and the reference.

The slot engine (``slots.SlotEngine``) is what runs in production; this is
the path it is checked against (``vlwatch bench --verify``: token for token
in fp32) and the fallback where it does not apply.  Batches of what the feed
has, one ``generate`` call per sampling setting; a CUDA out-of-memory error
halves the batch, any other failure of a batch runs its requests one by one
so that one bad request fails alone.

With ``model.kv_cache_dtype: fp8`` stock ``generate`` keeps its usual
cache but rounds every key and value through e4m3 as the slot engine's FP8
cache stores them (``rounding_cache``): it computes what the engine
computes, without the memory saved, so ``bench --verify --kv-cache-dtype
fp8`` can hold the two to the same tokens.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from typing import Any, Callable, Sequence

from daemon.backends import Answer, DeviceLostError, Feed, Item, Request, is_sticky_cuda_error
from daemon.backends.transformers import loading
from daemon.errors import BackendError

log = logging.getLogger(__name__)

Run = Callable[[list[Request]], list[Answer]]


def serve_batches(feed: Feed, size: int, each: Callable[[list[Request]], list[Answer | BaseException]]) -> None:
    """Take up to ``size`` items at a time from ``feed`` and deliver what ``each`` makes of them."""
    while not feed.stopping():
        items: list[Item] = []
        while len(items) < size:
            item = feed.next()
            if item is None:
                break
            items.append(item)
        if not items:
            if not feed.more():
                return
            feed.wait(0.05)
            continue
        # One sampling setting per model.generate call.
        for temperature in sorted({i.request.temperature for i in items}):
            group = [i for i in items if i.request.temperature == temperature]
            for item, got in zip(group, each([i.request for i in group])):
                if isinstance(got, Answer) and item.request.stream is not None and got.text:
                    try:
                        item.request.stream(got.text)  # no token stream here: the text at once
                    except Exception as exc:
                        got = exc
                feed.deliver(item.key, got)


def each(requests: list[Request], run: Run) -> list[Answer | BaseException]:
    """``run`` on the batch (halved on out-of-memory); if it fails otherwise, one request at a time."""
    try:
        return list(split_on_oom(requests, run))
    except Exception as exc:
        if is_sticky_cuda_error(exc):
            raise DeviceLostError(f"the GPU is in an unrecoverable state: {loading.describe(exc)}") from exc
        if len(requests) == 1:
            return [exc]
        log.warning("a batch of %d failed (%s); running it one request at a time", len(requests),
                    loading.describe(exc))
        return [a for r in requests for a in each([r], run)]


def split_on_oom(requests: list[Request], run: Run) -> list[Answer]:
    """``run(requests)``; a CUDA out-of-memory error halves the batch, down to one request."""
    import torch

    try:
        return run(requests)
    except torch.cuda.OutOfMemoryError:
        if len(requests) == 1:
            raise BackendError("out of GPU memory on a single image; lower model.max_pixels") from None
        half = len(requests) // 2
        log.warning("out of GPU memory on a batch of %d; retrying as %d + %d", len(requests), half, len(requests) - half)
        loading.empty_cuda_cache()
        return split_on_oom(requests[:half], run) + split_on_oom(requests[half:], run)


def generate(model: Any, processor: Any, requests: Sequence[Request], *, ignore_eos: bool = False,
             kv_cache_dtype: str = "auto") -> tuple[list[list[int]], list[bool], dict[str, Any]]:
    """One ``model.generate`` call for ``requests`` (one temperature): token ids up to end-of-sequence per
    request, whether each ended there (not at its budget), and what the call measured.  With
    ``kv_cache_dtype`` fp8 the cache rounds keys and values as the engine's FP8 cache does."""
    inputs = _inputs(model, processor, requests)
    max_new = max(r.max_new_tokens for r in requests)
    # Forced length (bench): the same work whatever random weights say.
    forced: dict[str, Any] = {"min_new_tokens": max_new} if ignore_eos else {}
    temperature = requests[0].temperature  # callers group requests by temperature
    # Plain temperature sampling, as the slot engine does (no top-k/top-p from the generation config).
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    started = time.perf_counter()
    out = _generate(model, inputs, kv_cache_dtype, max_new_tokens=max_new, **sampling, **forced)
    stats = {"wall_s": time.perf_counter() - started, "requests": len(requests),
             "new_tokens": int(out.shape[0] * (out.shape[1] - inputs["input_ids"].shape[1]))}
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = loading.eos_ids(model, processor)
    tokens, ended = [], []
    for row, request in zip(new.tolist(), requests):
        budget = row[: request.max_new_tokens]  # the batch ran to its longest budget
        kept = until_eos(budget, eos)
        tokens.append(kept)
        ended.append(len(kept) < len(budget))
    return tokens, ended, stats


def scores_at(model: Any, processor: Any, request: Request, step: int, *, ignore_eos: bool = False,
              kv_cache_dtype: str = "auto") -> Any:
    """Greedy stock ``generate``'s scores for new token ``step`` of ``request`` (float32, on the CPU): the
    logits after its processors (the repetition penalty), which its token is the largest of.

    Where ``bench --verify`` finds the engine parting from stock, how far stock's own token was ahead of the
    engine's there tells a near-tie (two correct computations a rounding apart) from a clear choice.
    """
    inputs = _inputs(model, processor, [request])
    forced: dict[str, Any] = {"min_new_tokens": step + 1} if ignore_eos else {}
    out = _generate(model, inputs, kv_cache_dtype, max_new_tokens=step + 1, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, **forced)
    return out.scores[step][0].float().cpu()


def _inputs(model: Any, processor: Any, requests: Sequence[Request]) -> Any:
    texts = [processor.apply_chat_template(messages(r), tokenize=False, add_generation_prompt=True) for r in requests]
    images = [img for r in requests for img in r.images]
    # do_resize=False: daemon.images already sized every image to multiples
    # of 28; resizing again would move the boxes the model answers with.
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt", do_resize=False)
    return inputs.to(model.device)


def _generate(model: Any, inputs: Any, kv_cache_dtype: str, **kwargs: Any) -> Any:
    import torch

    with torch.inference_mode():
        cache = {"past_key_values": rounding_cache()} if kv_cache_dtype == "fp8" else {}
        with warnings.catch_warnings():
            # transformers 5.2x renames generate's past_key_values to cache; 5.17 (the device's) knows
            # only the old name, which works in both until 6.0.
            warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
            return model.generate(**inputs, **kwargs, **cache)


def rounding_cache() -> Any:
    """A ``transformers.DynamicCache`` that keeps keys and values as the slot engine's FP8 cache does.

    Each key and value vector is rounded through e4m3 with its own scale
    (``kv_fp8.quantize``, then back) before it is cached.  A prompt's own
    pass attends to its keys and values unrounded, as the engine's prefill
    does (it stores them rounded afterwards); every later step reads them
    rounded, its own token's included (the engine writes, then reads).
    """
    return _rounding_cache_class()()


@functools.cache
def _rounding_cache_class() -> type:
    # Made on first use, as this module's other transformers and torch imports are: importing the
    # backend package (the CLI does) must not load transformers.
    from transformers import DynamicCache

    from daemon.backends.transformers import kv_fp8

    def rounded(x: Any) -> Any:
        return kv_fp8.dequantize(*kv_fp8.quantize(x), x.dtype)

    class RoundingCache(DynamicCache):  # type: ignore[misc,valid-type]
        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[Any, Any]:
            keys, values = super().update(rounded(key_states), rounded(value_states), layer_idx, *args, **kwargs)
            if keys.shape[-2] == key_states.shape[-2]:  # the prompt's own pass: nothing was cached before it
                return key_states, value_states
            return keys, values

    return RoundingCache


def messages(request: Request) -> list[dict[str, Any]]:
    """The chat template's messages: a folder job's one user turn, or the request's conversation."""
    if not request.messages:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in request.images]
        content.append({"type": "text", "text": request.prompt})
        return [{"role": "user", "content": content}]
    out = []
    for message in request.messages:
        parts = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in message.parts]
        out.append({"role": message.role, "content": parts})
    return out


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    """The generated tokens before the first end-of-sequence token (padding comes after it)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row
