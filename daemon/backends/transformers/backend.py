"""Qwen2.5-VL in this process through Hugging Face ``transformers``: answering requests.

The model loads lazily on the first request and can be unloaded when idle,
so the daemon holds no GPU memory while nothing happens.  How it loads
(device, dtype, attention, weights, the memory cap and plan, the fast paths
and their checks) is ``daemon.backends.transformers.loading``.

Generation (``engine``): for Qwen2.5-VL, ``daemon.backends.transformers.slots`` runs
greedy decoding over a static KV cache of ``batch_size`` slots that are
refilled as sequences end (continuous batching), with the decode step
replayed as a CUDA graph on GPUs, and the vision tower's windowed attention
grouped into a few calls; the tokens equal ``model.generate``'s.  Any other
model, or ``engine="hf"``, goes through ``model.generate`` with left-padded
batches (the processor pads right by default, which breaks batched
generation for a decoder-only model).

Admission (``serve``): the daemon's engine hands this backend a live feed;
a free slot takes the next request at once (interactive ones first), and
each answer goes back as soon as its sequence ends.  A request that fails
(a bad image, non-finite logits, a prompt whose image tokens do not match
its images) fails alone.  ``generate`` runs a fixed list the same way.
Chat requests (``Request.messages``) go through the processor's chat
template, images in their turns; ``temperature > 0`` samples that request;
``stream`` gets the text as it is decoded.

Engine options (``engine:``, ``daemon.config.EngineOptions``) arrive as
``options`` and go down as plain arguments: nothing below reads the
environment.

Memory: ``batch_size: auto`` sizes the slots to what is left under
``max_gpu_memory`` (the cap ``loading`` applies) after the weights.  A CUDA
out-of-memory error (in prefill, decoding, or while capturing the CUDA graph
or compiling) halves the slots and runs the requests in hand again, down to
one slot; on a single image it fails that request.  The fast paths stay on.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

from daemon.backends import (Answer, BaseBackend, Capabilities, DeviceLostError, Feed, Item, ListFeed, Request,
                             Sizing, is_sticky_cuda_error)
from daemon.backends.transformers import e4m3, loading, stock
from daemon.backends.transformers.live import LiveSource
from daemon.backends.transformers.oom import is_out_of_memory
from daemon import plan
from daemon.config import EngineOptions, ModelConfig
from daemon.errors import BackendError, VlwatchError

if TYPE_CHECKING:
    from daemon.backends.transformers.slots import SlotEngine

log = logging.getLogger(__name__)

#: Idle time after a run before the daemon's engine captures the decode widths it has not yet
#: (``SlotEngine.warm``): longer than the gap between two questions asked back to back.
WARM_AFTER_S = 0.5
GiB = 2**30


class TransformersBackend(BaseBackend):
    name = "transformers"
    capabilities = Capabilities(serve=True)

    def __init__(self, config: ModelConfig, *, load_format: str = "auto", engine: str = "auto",
                 options: EngineOptions = EngineOptions()) -> None:
        """Args:
        config: the ``model:`` section.
        options: the ``engine:`` section.
        load_format: ``auto`` loads real weights; ``dummy`` builds the same
            architecture from the model's config with random weights (bench only).
        engine: ``auto`` uses the slot engine (``slots``) where the model supports it, ``hf``
            always ``model.generate`` (the bench's baseline).
        """
        self.config = config
        self.model = config.name
        self.load_format = load_format
        self.engine = engine
        self.options = options
        self.dtype = ""  # what was actually loaded
        self.attention: str | None = None  # what was actually loaded
        #: bench: generate every request to its full budget (random weights
        #: would otherwise stop at an arbitrary early end-of-sequence token)
        self.ignore_eos = False
        #: what the last generate() measured (the slot engine only), for the bench
        self.last_stats: dict[str, Any] | None = None
        self._model: Any = None
        self._processor: Any = None
        self._fast: Any = None  # slots.SlotEngine
        self._vision: Any = None  # patches.VisionAttentionPatch
        self._text: Any = None  # patches.TextPrefillPatch (CUDA)
        #: qwen2_5_vl_check.Checked: the model's private touchpoints that failed their check at load (none, normally)
        self.touchpoints: Any = None
        self._oom_slots: int | None = None  # slot limit learnt from an out-of-memory error
        self._text_counts: dict[str, int] = {}  # a rule prompt's text tokens (_counted_text)
        self._tried_slots = 0  # slots of the slot engine's run in progress (halved after an OOM)
        self._lock = threading.Lock()
        #: bf16 | fp8: the text model's linear weights as loaded (model.quantization resolved)
        self.precision: str | None = None
        #: auto | fp8: the slot engine's KV cache as it runs (model.kv_cache_dtype resolved at load)
        self.kv_cache_dtype = "auto"
        #: what daemon.plan said before loading (CUDA only): logged, and shown by `status`
        self.plan: plan.Plan | None = None
        #: called after the model is loaded or unloaded (the daemon records it for `status`)
        self.on_state_change: Callable[[], None] | None = None

    def _state_changed(self) -> None:
        if self.on_state_change is not None:
            try:
                self.on_state_change()
            except Exception:  # a status write must not break loading
                log.exception("recording the model state failed")

    @property
    def slot_engine(self) -> "SlotEngine | None":
        """The loaded model's slot engine, or None (not loaded yet, or a model it does not run).

        Public for watching it (``SlotEngine.trace``, ``events``) and for
        tests; requests go through ``serve`` and ``generate``.
        """
        return self._fast

    @property
    def hf_model(self) -> Any:
        """The loaded transformers model, None until loaded: for checks against its stock modules
        (``benchmarks/fp8_check.py``); requests go through ``serve`` and ``generate``."""
        return self._model

    @property
    def processor(self) -> Any:
        """The loaded model's Hugging Face processor (its ``tokenizer`` decodes answers); None until loaded."""
        return self._processor

    @property
    def oom_slot_limit(self) -> int | None:
        """The most slots runs use from now on, learnt from a CUDA out-of-memory error; None: none met."""
        return self._oom_slots

    @property
    def continuous_batching(self) -> bool:
        """Whether generate() refills finished slots itself (the worker then hands it whole chunks)."""
        return self.engine != "hf" and (self._model is None or self._fast is not None)

    @property
    def scheduler_options(self) -> Any:
        """The slot engine's scheduler knobs, from ``engine:``."""
        from daemon.backends.transformers.scheduler import SchedulerOptions

        o = self.options
        return SchedulerOptions(step_tokens=o.step_tokens, backlog_share=o.backlog_share,
                                interactive_slots=o.interactive_slots)

    @property
    def provenance(self) -> str:
        """The engine choices that can change an answer's text, as they are in effect (sidecars record it).

        Precision, the decode step's attention kernel, packed or stock prefill,
        what is compiled (fused kernels round differently), the vision
        tower's fused blocks and varlen attention, and whether FP8 decodes few
        rows with activations rounded or not all change the arithmetic,
        so a near-tie between two tokens can go the other way.  CUDA graphs
        (the same kernels replayed), overlapped rounds (when a result is
        read) and the scheduler's knobs (who runs when; every slot's row is
        computed on its own) change no number, so they are not recorded.
        Empty before the model is loaded.
        """
        if self._model is None:
            return ""
        parts = [self.dtype]
        fast, vision = self._fast, self._vision
        if fast is not None and self.engine != "hf":
            # (e4m3 widened by moved bits: the same numbers but where tensor cores flush subnormals, so shown)
            parts.append(f"decode {fast.attention}" + (", bits" if fast.attention == "fp8_kv" and e4m3.widen() == "bits"
                                                       else ""))
            if fast.fp8_cache and fast.attention != "fp8_kv":  # rounds every key and value attended to
                parts.append("kv cache fp8")
            parts.append("prefill " + ("packed" if fast.packed else "stock"))
            compiled = [p for p, on in (("decode", fast._layer_fn is not None),
                                        ("vision", vision is not None and vision.use_compiled),
                                        ("prefill", fast._prefill_fn is not None or self._text is not None)) if on]
            parts.append("compiled " + ("+".join(compiled) or "nothing"))
            if vision is not None:
                parts.append("vision " + ("fused blocks" if vision._block is not None else "stock blocks")
                             + (", varlen" if vision.varlen is not None else ""))
            if self.precision == "fp8":
                from daemon.backends.transformers import fp8, fp8_gemv

                if fp8.runs_scaled_mm(self._model):  # few rows: weight-only (activations unrounded) or not
                    parts.append("fp8 few rows " + (f"weight-only kernel (up to {fp8_gemv.rows()} rows, split "
                                                    f"{fp8_gemv.split() or 'auto'}, {e4m3.widen()})"
                                                    if fp8_gemv.enabled() else "_scaled_mm"))
        else:
            parts.append("stock generate")
        return "engine " + ", ".join(parts)

    # ---------------------------------------------------------------- loading

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self, sizing: Sizing | None = None) -> None:
        """Load the model (once).  ``sizing``: what the feed that asked declares (the daemon's rules): the
        memory plan at load counts it, as the runs will (``status`` and the log then say what they get)."""
        with self._lock:
            if self._model is not None:
                return
            self._load(sizing or Sizing())
        self._state_changed()

    def _load(self, sizing: Sizing) -> None:
        # In this order (loading's docstring); what each step says is kept as soon as it is known.
        loading.quiet_progress_bar()
        device = loading.pick_device(self.config.device)
        dtype = loading.pick_dtype(self.config.dtype, device)
        source = loading.model_source(self.config.name, self.load_format)
        loading.refuse_fp16(dtype, source, allow=self.options.allow_fp16)
        self.dtype = str(dtype).removeprefix("torch.")
        processor = loading.load_processor(source)
        # Refuses a setup that cannot fit, with advice.
        demand = loading.demand(sizing, lambda prompt: _text_tokens(processor, prompt))
        e4m3.configure(self.options.fp8_widen)  # before the FP8 kernels (KV cache, few-row weights) are probed
        self.kv_cache_dtype = loading.resolve_kv_cache(self.config, device)
        self.plan = loading.plan_memory(self.config, source, device, dtype, demand, self.kv_cache_dtype)
        self.precision = loading.resolve_precision(self.config, source, device, self.plan)
        if self.precision == "fp8":
            from daemon.backends.transformers import fp8_gemv

            # before the FP8 layers probe their kernels
            fp8_gemv.configure(self.options.fp8_rows_kernel, split=self.options.fp8_rows_split,
                               rows=self.options.fp8_rows_max)
        model, attention = loading.load_weights(self.config, source, device, dtype, name=self.model,
                                                precision=self.precision, load_format=self.load_format)
        self._processor, self._model, self.attention = processor, model, attention
        log.info("loaded %s on %s (%s, attention=%s)", self.model, device, str(dtype).removeprefix("torch."), attention)
        paths = loading.speed_up(model, processor, attention, engine=self.engine, options=self.options,
                                 kv_cache_dtype=self.kv_cache_dtype)
        if paths is None:  # a model the slot engine does not support: model.generate runs it
            return
        self._fast, self._vision, self._text = paths.fast, paths.vision, paths.text
        self.touchpoints = paths.touchpoints
        self._choose_sdpa_kernels()

    def set_engine(self, engine: str) -> None:
        """Switch between ``auto`` (the slot engine and the vision patch) and ``hf`` (stock transformers)."""
        self.engine = engine
        if self._vision is not None:
            self._vision.enabled = engine != "hf"
        if self._text is not None:
            self._text.enabled = engine != "hf"
        self._choose_sdpa_kernels()

    def _choose_sdpa_kernels(self) -> None:
        """cuDNN's SDPA kernels for the stock path only (``loading.choose_sdpa_kernels`` says why)."""
        loading.choose_sdpa_kernels(self._model, stock=self.engine == "hf" or self._fast is None)

    def reconfigure(self, config: ModelConfig) -> None:
        """Take a new ``model:`` section without reloading (the bench's setups): batch size, memory cap."""
        with self._lock:
            self.config = config
            if self._fast is not None:
                self._fast.release()  # the next batch sizes its own cache
            if self._model is not None:
                loading.empty_cuda_cache()
                loading.limit_memory(self._model.device, self.config.max_gpu_memory)

    def describe(self) -> dict[str, Any]:
        """What runs the model, for the bench's header."""
        info: dict[str, Any] = {"attention": self.attention, "precision": self.precision}
        if self.plan is not None:
            info["plan"] = self.plan.summary()
        if self._model is not None:  # what ends a sequence and the penalty, as the engine applies them
            info["eos_ids"] = sorted(loading.eos_ids(self._model, self._processor))
            info["repetition_penalty"] = getattr(self._model.generation_config, "repetition_penalty", None) or 1.0
        if self._fast is not None:
            info["engine"] = "slot engine" + (" + CUDA graphs" if self._fast.use_cuda_graphs else "")
            info["decode_compiled"] = self._fast._layer_fn is not None
            info["kv_cache"] = "fp8" if self._fast.fp8_cache else self.dtype
        if self._vision is not None:
            info["vision_attention"] = self._vision.last_path or "stock"
            info["vision_compiled"] = self._vision.use_compiled
        if self.touchpoints is not None:  # qwen2_5_vl's check at load: which fast paths it turned off
            info["touchpoints"] = self.touchpoints.summary()
        if self._fast is not None and self._fast.packed:
            info["prefill"] = "packed" + (", compiled" if self._fast._prefill_fn is not None else "")
        else:
            info["prefill"] = "stock text model" + (", norms/MLPs compiled" if self._text is not None else "")
        return info

    @property
    def device_in_use(self) -> str | None:
        """Where the loaded model runs, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu" (``status``: not the
        configured ``auto``, issue 27); None while not loaded."""
        model = self._model
        if model is None:
            return None
        device = model.device
        if device.type == "cuda":
            import torch

            return f"{device} ({torch.cuda.get_device_name(device)})"
        return str(device)

    @property
    def touchpoints_summary(self) -> str | None:
        """What the load-time check of Qwen2.5-VL's touchpoints found (``status``), once loaded."""
        return self.touchpoints.summary() if self.touchpoints is not None else None

    @property
    def plan_summary(self) -> str | None:
        """"7B fp8 on 23.6 GiB: 96 slots of 1664 tokens" (``status``), once the model was planned."""
        return self.plan.summary() if self.plan is not None else None

    def unload(self) -> None:
        with self._lock:
            if self._model is None:
                return
            if self._fast is not None:
                self._fast.release()
            self._model = None
            self._processor = None
            self._fast = self._vision = self._text = None
            gc.collect()
            loading.empty_cuda_cache()
            log.info("unloaded %s (idle)", self.model)
        self._state_changed()

    # -------------------------------------------------------------- inference

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        """Answer every request; raises the first request's error if any failed (see ``generate_each``)."""
        answers = self.generate_each(requests)
        for a in answers:
            if isinstance(a, BaseException):
                raise a if isinstance(a, VlwatchError) else BackendError(loading.describe(a)) from a
        return answers  # type: ignore[return-value]

    def generate_each(self, requests: Sequence[Request]) -> list[Answer | BaseException]:
        """An answer or the error for each request: one failing request does not fail the others."""
        if not requests:
            return []
        # Longest first: the long prefills go in while the batch is full anyway.
        order = sorted(range(len(requests)), key=lambda i: -sum(im.width * im.height for im in requests[i].images))
        feed = ListFeed([requests[i] for i in order])
        self.serve(feed)
        got = feed.answers()
        out: list[Answer | BaseException] = [None] * len(requests)  # type: ignore[list-item]
        for pos, i in enumerate(order):
            out[i] = got[pos]
        return out

    def serve(self, feed: Feed) -> None:
        """Run what ``feed`` gives until it has nothing more or asks to stop (continuous admission).

        Raises ``DeviceLostError`` on a sticky CUDA error (after putting
        back what was in hand), and the loading errors (model missing...).
        """
        self.load(feed.sizing())
        started = time.perf_counter()
        with self._lock, _on_device(self._model.device):
            if self._fast is not None and self.engine != "hf":
                self._serve_fast(feed)
            else:
                self._serve_batches(feed)
        if self.last_stats is not None:
            self.last_stats["wall_s"] = time.perf_counter() - started

    # ------------------------------------------------------------ the slot engine

    def _serve_fast(self, feed: Feed, tokens: dict[Hashable, list[int]] | None = None) -> None:
        import torch

        fast = self._fast
        fast.ignore_eos = self.ignore_eos
        live = LiveSource(feed, self._prompt, self._processor.tokenizer)
        live_feed = not feed.sizing().requests  # the daemon: load comes and goes, interactive requests may come
        totals: dict[str, Any] = {}
        started = time.perf_counter()
        lost = False
        try:
            with torch.inference_mode():
                while not feed.stopping() and live.busy():
                    slots, cache_length, max_new = self._live_plan(live)
                    self._tried_slots = slots
                    try:
                        fast.run(live, slots=slots, cache_length=cache_length, max_new=max_new,
                                 shrink=live_feed, reserve=live_feed and feed.interactive(),
                                 options=self.scheduler_options)
                        if live_feed and feed.interactive() and fast.unwarmed() and _quiet(live, WARM_AFTER_S):
                            # Idle now, and a person may ask next: the widths the next backlog will want,
                            # captured before it comes (not where nothing waits on latency: a scan's end;
                            # not between two questions asked back to back: each would wait for a capture).
                            fast.warm(busy=lambda: live.busy() or feed.stopping())
                    except Exception as exc:
                        if is_sticky_cuda_error(exc):
                            lost = True  # the feed records what was in hand, with the attempt spent
                            raise DeviceLostError(f"the GPU is in an unrecoverable state: {loading.describe(exc)}") from exc
                        if not is_out_of_memory(exc):
                            # A fault of the decode step itself, not of one prompt
                            # (those fail alone inside run): the requests in slots fail.
                            log.exception("the decode loop failed; failing the %d requests in slots", len(live.taken))
                            live.fail_taken(exc)
                            continue
                        fast.release()  # its cache was sized for the slots that did not fit
                        loading.empty_cuda_cache()
                        if slots <= 1:
                            live.fail_taken(BackendError("out of GPU memory on a single image; lower model.max_pixels"))
                        else:
                            self._oom_slots = max(1, slots // 2)
                            # torch's message says how much was asked for and how much was held: what
                            # tells a plan that over-counts (issue 23) from a prompt that is simply large
                            log.warning("out of GPU memory with %d slots, in %s; going on with %d (%s)", slots,
                                        _where(exc), self._oom_slots, loading.describe(exc)[:400])
                            live.requeue_taken()
                    finally:
                        _add_stats(totals, asdict(fast.stats))
        finally:
            live.close(put_back=not lost)
            self.last_stats = totals or None
            if tokens is not None:
                tokens.update(live.tokens)
            if live_feed and totals.get("requests"):
                # where a session's time went: the end-to-end bench reads this line (issue 22.6)
                log.info("engine: %d requests in %.1fs: prefill %.1fs, decode %.1fs in %d steps, of which %.1fs "
                         "with free slots and nothing ready; %d queued sequences gave their slot to a question",
                         totals["requests"], time.perf_counter() - started, totals.get("prefill_s", 0.0),
                         totals.get("decode_s", 0.0), totals.get("decode_steps", 0), totals.get("starved_s", 0.0),
                         totals.get("preempted", 0))

    def token_ids(self, requests: Sequence[Request], *, engine: str) -> list[list[int]]:
        """Generated token ids (end-of-sequence excluded) per request: ``auto`` the slot engine, ``hf``
        stock ``model.generate`` one request per call (``bench --verify`` compares the two)."""
        self.load()
        with self._lock, _on_device(self._model.device):
            if engine == "hf":
                return [self._generate_hf_tokens([r])[0] for r in requests]
            if self._fast is None:
                raise BackendError("this model has no slot engine (it supports qwen2_5_vl only)")
            got: dict[Hashable, list[int]] = {}
            feed = ListFeed(requests)
            # Stock generate has no loop stop: compare like with like.
            detect, self._fast.detect_loops = self._fast.detect_loops, False
            try:
                self._serve_fast(feed, got)
            finally:
                self._fast.detect_loops = detect
        for answer in feed.answers():
            if isinstance(answer, BaseException):
                raise answer
        return [got[i] for i in range(len(requests))]

    def _live_plan(self, live: LiveSource) -> tuple[int, int, int]:
        """Slots, cache length and the largest budget for the next run."""
        sizing = live.feed.sizing()
        longest, budget = live.largest()
        if sizing.requests:  # a fixed list (generate): sized for exactly these requests
            _, slots, cache_length, max_new = self._plan(sizing.requests)
            return slots, max(cache_length, longest + budget), max(max_new, budget)
        # The daemon: sized for the configured largest image and budget, and
        # for every rule's prompt as the tokenizer counts it (a larger request,
        # a long question, waits for a run sized for it).
        tokens = max(plan.prompt_tokens(self.config.max_pixels), longest,
                     *(e.image_tokens + self._counted_text(e.prompt) for e in sizing.expected))
        max_new = max(self.config.max_new_tokens, budget, *(e.max_new_tokens for e in sizing.expected))
        slots = self.slots_for(1 << 20, max_new_tokens=max_new, tokens=tokens)
        return slots, tokens + max_new, max_new

    def _counted_text(self, prompt: str) -> int:
        """Tokens of a one-image prompt's text: the chat template and ``prompt``, the image placeholder
        counted once (its expansion is the image's tokens).  Cached: each rule's prompt is counted once."""
        counted = self._text_counts.get(prompt)
        if counted is None:
            counted = self._text_counts[prompt] = _text_tokens(self._processor, prompt)
        return counted

    def _prompt(self, index: int, item: Item) -> Any:
        from daemon.backends.transformers.prompts import Prompt

        r = item.request
        return Prompt(index, self._inputs(r), r.max_new_tokens, temperature=max(0.0, r.temperature),
                      stream=r.stream is not None, urgent=item.urgent)

    # ------------------------------------------------------------ model.generate (stock.py)

    def _serve_batches(self, feed: Feed) -> None:
        """``model.generate`` (engine hf, or a model the slot engine does not know): batches of what is there."""
        stock.serve_batches(feed, max(1, self.config.batch_size or 4), self._each_hf)

    def _each_hf(self, requests: list[Request]) -> list[Answer | BaseException]:
        return stock.each(requests, self._generate_hf)

    def _generate_split(self, requests: list[Request]) -> list[Answer]:
        return stock.split_on_oom(requests, self._generate_hf)

    def _plan(self, requests: Sequence[Request]) -> tuple[list[int], int, int, int]:
        """Prompt lengths, slots, cache length and the largest budget for these requests."""
        lengths = [self._prompt_length(r) for r in requests]
        max_new = max(r.max_new_tokens for r in requests)
        cache_length = max(n + r.max_new_tokens for n, r in zip(lengths, requests))
        slots = self.slots_for(len(requests), max_new_tokens=max_new, tokens=max(lengths))
        return lengths, slots, cache_length, max_new

    def warmup(self, requests: Sequence[Request]) -> None:
        """Do now what the first generate(requests) would do once: allocate, capture, load kernels."""
        import torch

        if not requests:
            return
        self.load()
        short = [replace(requests[0], max_new_tokens=min(4, requests[0].max_new_tokens), stream=None)]
        if self._fast is not None and self.engine != "hf":
            with self._lock, _on_device(self._model.device):
                _, slots, cache_length, max_new = self._plan(requests)
                with torch.inference_mode():
                    self._fast.prepare(slots, cache_length, max_new)
            self.generate(short)
            return
        with self._lock:
            self._generate_split(short)

    def prompt_inputs(self, request: Request) -> dict[str, Any]:
        """What a slot engine ``Prompt`` carries for ``request`` (``Prompt.inputs``): the processor's tensors
        on the CPU, pixels in the model's dtype, rotary positions added, as the processor threads make them."""
        return self._inputs(request)

    def _inputs(self, request: Request) -> dict[str, Any]:
        """The processor's tensors for one request (CPU), pixels already in the model's dtype."""
        processor = self._processor
        text = processor.apply_chat_template(stock.messages(request), tokenize=False, add_generation_prompt=True)
        # do_resize=False: daemon.images already sized the images (see _generate_hf).
        inputs = dict(processor(text=[text], images=list(request.images) or None, return_tensors="pt", do_resize=False))
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        if "mm_token_type_ids" not in inputs:  # what get_rope_index reads to find the images
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self._model.config.image_token_id).int()
        from daemon.backends.transformers.prefill import rope_positions

        inputs.update(rope_positions(self._model, inputs))  # here, on the CPU thread
        return inputs

    def _prompt_length(self, request: Request) -> int:
        """Tokens the prompt will take, image placeholders expanded, without processing pixels."""
        n = _template_tokens(self._processor, request)
        return n + sum(image_tokens(img.width, img.height) - 1 for img in request.images)

    def slots_for(self, n: int, *, max_new_tokens: int | None = None, tokens: int | None = None) -> int:
        """Sequences to decode together for ``n`` requests."""
        slots = self.config.batch_size or self.auto_batch_size(max_new_tokens=max_new_tokens, tokens=tokens)
        if self._oom_slots is not None:
            slots = min(slots, self._oom_slots)
        return max(1, min(slots, n))

    def auto_batch_size(self, *, max_new_tokens: int | None = None, tokens: int | None = None) -> int:
        """Slots that fit the free GPU memory (under ``max_gpu_memory``); 4 on a CPU.

        Args:
            max_new_tokens: output budget per request (default: the config's).
            tokens: prompt tokens per request (default: an image of
                ``max_pixels`` plus a typical prompt).
        """
        if self._model is None:  # generate() calls this holding the lock, with the model loaded
            self.load()
        if self._model.device.type != "cuda":
            return 4  # CPU: batching barely helps and latency grows with it
        if tokens is None:
            tokens = plan.prompt_tokens(self.config.max_pixels)
        max_new = max_new_tokens or self.config.max_new_tokens
        budget = loading.available_gpu_memory(self._model.device, self.config.max_gpu_memory)
        if self._fast is not None:
            budget += self._fast.held_bytes()  # the cache in hand is reused or replaced, not added to
        shape = loading.model_shape(self._model)
        slots, packing = plan.fit(shape, budget, tokens=tokens, max_new=max_new, itemsize=self._model.dtype.itemsize,
                                  kv=self.kv_cache_dtype)
        if self._fast is not None and packing != self._fast.packing:
            self._fast.packing = packing
            log.info("prefill: %s", "one prompt per round (packed rounds leave no room for a slot here)"
                     if packing.lean else "prompts packed per round")
        slots = max(1, slots)
        log.debug("auto batch size: %d slots of %d tokens (%.2f GiB available)",
                  slots, plan.cache_length(tokens + max_new), budget / GiB)
        return slots

    def _generate_hf(self, requests: list[Request]) -> list[Answer]:
        tokenizer = self._processor.tokenizer
        tokens, ended = self._generate_hf_raw(requests)
        return [Answer(text=tokenizer.decode(t, skip_special_tokens=True), new_tokens=len(t), finished=full)
                for t, full in zip(tokens, ended)]

    def stock_scores(self, request: Request, step: int) -> Any:
        """Stock ``generate``'s scores for new token ``step`` of ``request`` (``stock.scores_at``): what
        ``bench --verify`` reads where the engine parts from stock."""
        self.load()
        with self._lock, _on_device(self._model.device):
            return stock.scores_at(self._model, self._processor, request, step, ignore_eos=self.ignore_eos,
                                   kv_cache_dtype=self.kv_cache_dtype)

    def _generate_hf_tokens(self, requests: list[Request]) -> list[list[int]]:
        return self._generate_hf_raw(requests)[0]

    def _generate_hf_raw(self, requests: list[Request]) -> tuple[list[list[int]], list[bool]]:
        tokens, ended, self.last_stats = stock.generate(self._model, self._processor, requests,
                                                         ignore_eos=self.ignore_eos,
                                                         kv_cache_dtype=self.kv_cache_dtype)
        return tokens, ended

def image_tokens(width: int, height: int) -> int:
    """Tokens an image of this (already sized, multiple-of-28) size takes: one per 28x28 pixels."""
    return max(1, (width // 28) * (height // 28))


def _template_tokens(processor: Any, request: Request) -> int:
    """Tokens of ``request`` through the chat template, each image placeholder one token."""
    text = processor.apply_chat_template(stock.messages(request), tokenize=False, add_generation_prompt=True)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def _text_tokens(processor: Any, prompt: str) -> int:
    """Tokens of a one-image prompt's text: the chat template and ``prompt``, the image placeholder's
    three tokens (vision start, pad, end) counted once (the pad's expansion is the image's tokens)."""
    return _template_tokens(processor, Request((), prompt, 1)) + 3


def _quiet(live: LiveSource, seconds: float) -> bool:
    """Whether no work comes for ``seconds`` (waiting on the feed, so work that comes ends the wait at once)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if live.busy():
            return False
        live.wait(min(left, 0.05))
    return not live.busy()


def _add_stats(totals: dict[str, Any], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        if isinstance(value, list):
            totals.setdefault(key, []).extend(value)
        elif isinstance(value, bool):
            totals[key] = value
        elif key in ("slots", "cache_length"):
            totals[key] = max(totals.get(key, 0), value)
        else:
            totals[key] = totals.get(key, 0) + value


def _on_device(device: Any) -> Any:
    """Make ``device`` CUDA's current device (streams, graphs and caches are per device; engine per GPU)."""
    import contextlib

    import torch

    return torch.cuda.device(device) if getattr(device, "type", "") == "cuda" else contextlib.nullcontext()


def _where(exc: BaseException) -> str:
    """The innermost line of vlwatch's own code that ``exc`` passed through: "slots.py:412 (_prefill)"."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}daemon{os.sep}" in f.filename]
    if not frames:
        return "an unknown place"
    f = frames[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} ({f.name})"
