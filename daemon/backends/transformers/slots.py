"""Fast generation for Qwen2.5-VL: slot-based continuous batching and CUDA graphs.

``transformers``' ``generate`` spends most of a decode step outside the GPU's
work (Python per layer, a fresh mask each step, KV expanded to every query
head), runs a batch until its longest member is done, and its continuous
batching does not carry images.  This module keeps the model and its weights
and replaces the generation loop (measurements: ``benchmarks/NOTES.md``):

- **prefill** (``prefill.PrefillRounds``, mixed in) without padding: the
  vision tower on the images of a few prompts at once, then the text layers
  once over those prompts laid end to end, each prompt's keys written
  straight into its **slot** of a preallocated static cache (``slots`` rows
  of ``length`` tokens per layer); nothing in a round waits for the GPU, and
  a round's first tokens are read (``_settle``) once the next round is
  queued behind it;
- **decode** (``static_cache.CacheAndStep``, mixed in) runs all slots together in a step written against the
  model's own modules and weights (q/k/v and gate/up fused into one GEMV each), with
  grouped-query attention against the un-expanded cache: on CUDA in half
  precision through FlashAttention-2's varlen kernel, each row reading only
  the columns it has filled (``decode_step``); on CUDA the step is one CUDA graph
  replay, and each layer runs as a function compiled with ``torch.compile``;
- a slot whose sequence ends (EOS or budget) is **refilled** with the next
  request at once, so a long answer does not hold up short ones; requests
  come from a live ``Source`` (continuous admission) and each result goes
  back as soon as it ends;
- per slot: greedy or temperature sampling (Gumbel-max in the captured
  step), a stop for sequences stuck repeating (``LOOP_WINDOW``), and a
  non-finite-logits check that fails that request alone.

Greedy tokens equal ``model.generate(do_sample=False)``'s, including the
repetition penalty of the model's generation config (tests compare them on
the CPU, where the arithmetic is the stock one; on a GPU, bf16 kernels that
differ from the stock ones can flip near-ties after a while).

The vision tower's stock modules are sped up in place by
``daemon.backends.transformers.patches``.

Switches (``options``, the config's ``engine:``; all default on where they
apply): ``cuda_graphs``, ``compile`` (decode, vision, prefill),
``decode_attention``, ``packed_prefill``, ``overlap_rounds``;
``vision_varlen: true`` opts into varlen attention.

Observing it (tests, the bench, an operator): ``trace`` receives an event
per pack prefilled, round read and decode stretch (``events``);
``device_active`` and ``cached`` read the device's slot flags and cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from daemon.backends import reraise_if_fatal
from daemon.backends.transformers.decode_step import attention_kind, fuse_projections, layer_step
from daemon.backends.transformers.events import Decode, Prefill, Settled, Trace
from daemon.backends.transformers.patches import Compiled, compile_enabled
from daemon.backends.transformers.prefill import FAILED, PrefillRounds, Staging, _Shipped, take_pack
from daemon.backends.transformers.prefill_step import prefill_layer
from daemon.backends.transformers.qwen2_5_vl import allow_shared_compiles, flash_varlen, text_model
from daemon.backends.transformers.prompts import Generated, NonFiniteLogitsError, Prompt, RunStats, Source
from daemon.backends.transformers.scheduler import Scheduler, SchedulerOptions
from daemon.backends.transformers.static_cache import CacheAndStep
from daemon.plan import PACKED
from daemon.config import EngineOptions

log = logging.getLogger(__name__)

#: Most decode steps between two looks at which sequences ended (each look is
#: a device-to-host sync); capped by the smallest remaining budget and by
#: SYNC_SECONDS.
SYNC_EVERY = 16
#: Longest a run of decode steps between two host syncs should take (from the
#: measured step time): an interactive request that arrives meanwhile waits
#: for the run to end before its prefill (16 steps of 256 slots took ~0.3 s
#: on an H100).  A sync costs the GPU well under a millisecond.
SYNC_SECONDS = 0.08
#: The same while an interactive answer is being decoded: its stream gets its tokens at each sync, and the
#: longest pause it sees is one queued prefill turn plus one stretch (session 8, H100: 0.256 s at worst
#: with 0.08 s stretches, against issue 22's 0.25).  Shorter stretches cost a host sync more per step
#: or two, while a person waits only.
SYNC_SECONDS_STREAMING = 0.04
#: Repetition loops (issue 12.4; Qwen2.5-VL loops on long tables and OCR): a
#: sequence whose last LOOP_WINDOW tokens repeat with a period of at most
#: LOOP_MAX_PERIOD tokens (so at least three copies of a 48-token phrase, or
#: 96 copies of one token) is stopped at the next host sync.
LOOP_WINDOW = 96
LOOP_MAX_PERIOD = 48


class SlotEngine(PrefillRounds, CacheAndStep):
    """Static-cache greedy decoding over ``slots`` sequences of a Qwen2.5-VL model."""

    def __init__(self, model: Any, *, eos_ids: set[int], use_cuda_graphs: bool | None = None,
                 options: EngineOptions = EngineOptions(), kv_cache_dtype: str = "auto") -> None:
        self.model = model
        text = text_model(model)
        self.layers = list(text.layers)
        self.norm = text.norm
        self.embed = text.embed_tokens
        self.lm_head = model.lm_head
        rotary = text.rotary_emb
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        cfg = text.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.inv_freq = rotary.inv_freq.detach().to(self.device, torch.float32)
        self.eos = torch.tensor(sorted(eos_ids) or [-1], device=self.device)
        penalty = getattr(model.generation_config, "repetition_penalty", None)
        self.penalty = float(penalty) if penalty not in (None, 1.0) else None
        if use_cuda_graphs is None:
            # engine.cuda_graphs: false turns them off (debugging, or a driver that misbehaves).
            use_cuda_graphs = self.device.type == "cuda" and options.cuda_graphs
        self.use_cuda_graphs = use_cuda_graphs
        self.ignore_eos = False  # bench: run every sequence to its budget
        self.detect_loops = True  # stop sequences stuck repeating (LOOP_WINDOW)
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.fused = fuse_projections(self.layers)
        #: auto (the model's dtype) | fp8 (``model.kv_cache_dtype``: e4m3 with scales, ``static_cache``)
        self.kv_cache_dtype = kv_cache_dtype
        self.attention = attention_kind(self.device, self.dtype, flash=options.decode_attention == "flash",
                                        fp8_cache=kv_cache_dtype == "fp8")
        # On CUDA one decoder layer's step runs through torch.compile (one
        # compiled function for all layers): it fuses the norms, the rotary
        # embedding and the residual adds, ~30 small kernels per layer.
        self._layer_fn: Callable[..., torch.Tensor] | None = None
        self._silu = getattr(cfg, "hidden_act", "") == "silu"  # what layer_step and prefill_layer compute
        if self.fused and compile_enabled(self.device, options.compiles("decode")) and self._silu:
            allow_shared_compiles()
            self._layer_fn = Compiled(layer_step, fullgraph=True)
        # Prefill packs a round's prompts into one pass of our own layer
        # function (prefill_step); engine.packed_prefill: false runs the stock
        # text model per prompt instead (the A/B of benchmarks/NOTES.md).
        self.packed = bool(self.fused) and self._silu and options.packed_prefill
        self._prefill_fn: Callable[..., torch.Tensor] | None = None
        # A round's first tokens are read once the next round is queued (_admit);
        # engine.overlap_rounds: false reads each round at once (the A/B).
        self.overlap_rounds = options.overlap_rounds
        # Prefill's attention: FlashAttention-2's varlen entry wherever it runs
        # (engine.decode_attention is about the decode step only), else SDPA per prompt.
        self.prefill_kind = "flash" if flash_varlen(self.device, self.dtype) else "sdpa"
        if self.packed and self.prefill_kind == "flash" and compile_enabled(self.device, options.compiles("prefill")):
            allow_shared_compiles()
            self._prefill_fn = Compiled(prefill_layer, dynamic=None)  # the tokens' count only: patches.rows_vary
        self._slots = 0
        self._length = 0
        self._graphs: dict[tuple[int, bool], Any] = {}
        self._step_s: dict[int, float] = {}  # last measured seconds per decode step, by slots stepped
        self._state: dict[str, torch.Tensor] = {}
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._scales: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        self._staging = Staging(self.device)
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self.vision: Any = None  # patches.VisionAttentionPatch, told the window bounds ahead (_vision_layout)
        self.vision_layout = True  # the tower's layout worked out on the CPU (off where qwen2_5_vl's check says)
        #: how much a prefill round packs (daemon.plan.fit: one prompt a round where only that fits the card)
        self.packing = PACKED
        self.stats = RunStats()
        #: Called with each ``events`` event (a pack prefilled, a round read, a decode stretch), on the
        #: engine's thread: tests, the bench, an operator.  None: no event is built (``events``' docstring).
        self.trace: Trace | None = None

    @property
    def layer_functions(self) -> bool:
        """Whether decode and packed prefill run the fused layer functions (``decode_step``, ``prefill_step``)."""
        return bool(self.fused) and self._silu

    def without_flash(self) -> None:
        """SDPA for decode and prefill instead of FlashAttention's varlen entry (its check at load failed)."""
        if self.attention == "flash":
            self.attention = "sdpa"
        self.prefill_kind = "sdpa"
        self._prefill_fn = None
        self._graphs.clear()

    # ------------------------------------------------------------ the loop

    def run(self, source: Source, *, slots: int, cache_length: int, max_new: int, shrink: bool = False,
            reserve: bool = False, options: SchedulerOptions = SchedulerOptions()) -> None:
        """Generate for what ``source`` gives until it has nothing more: continuous admission.

        A free slot takes the next prompt at once (between two host syncs,
        at most ``SYNC_EVERY`` steps apart); each result goes to
        ``source.finished`` as soon as its sequence ends.  The decode step
        runs over all ``slots``, or with ``shrink`` (the daemon, where load
        comes and goes) over the first power of two of slots covering the
        busy ones: a lone request then decodes at batch-1 speed in a cache
        sized for many (each size is compiled and captured once per process).
        With ``reserve`` (a source that may bring interactive requests: the
        daemon) the lowest slots are theirs: queued prompts take them last,
        and an interactive prompt that finds no slot free takes one back
        (``_preempt``); a fixed list (the bench, ``process --local``) has no
        interactive prompts to make room for.  Which
        prompts are admitted and which slots decode, turn by turn, is the
        ``scheduler.Scheduler``'s decision (``options``).

        Failures stay with their request: a prompt whose prefill raises (or
        whose logits are not finite) is finished with the exception and the
        others go on.  Out of memory and sticky CUDA errors propagate (the
        caller shrinks the slots, or gives up the device); prompts still in
        slots then have no result, and the source knows which it handed out.
        """
        allocated = self._ensure(slots, cache_length, max_new)
        s = self._state
        s["ignore_eos"].fill_(self.ignore_eos)
        s["active"].zero_()
        slots = self._slots
        stats = self.stats = RunStats(slots=slots, cache_length=self._length, cuda_graphs=self.use_cuda_graphs,
                                      cache_allocations=int(allocated))
        eos = set(self.eos.tolist())
        self._owner: dict[int, Prompt] = {}  # slot -> the prompt it is generating for
        # Time to first token counts from when a slot was free for the request
        # (the start, or the end of the sequence before it): waiting for the
        # prefills of its own round is included, waiting for a slot is not.
        self._free_since = dict.fromkeys(range(slots), time.perf_counter())
        self._ttft: dict[int, float] = {}
        self._carry: list[tuple[Prompt, Any]] = []  # prompts with image features, prefilled next
        self._admitted = 0  # sequences admitted so far in this run
        self._began: dict[int, int] = {}  # slot -> its sequence's place in that count (which came last)
        self._shrink = shrink
        self._sched = Scheduler(slots, options, reserve=reserve)
        admitting = True
        while True:
            self._sched.end()
            if source.stopping():
                break
            self._sched.begin(interactive_running=bool(self._interactive_slots()))
            self._dry = False  # set when the source had no prompt ready for a free slot this turn
            if admitting:
                admitting = self._admit(source, max_new, eos)
            if not self._owner:
                if self._carry and not source.urgent():
                    continue  # admitted next round (while an interactive prompt is being made: wait below)
                if not admitting or not source.busy():
                    break
                source.wait(0.02)
                continue
            starving = self._dry and len(self._owner) < slots and source.busy()
            decoded = stats.decode_s
            self._decode(source, eos)
            if starving:
                stats.starved_s += stats.decode_s - decoded
        self._sched.end()
        s["active"].zero_()
        for prompt, _ in reversed(self._carry):  # stopping: they were taken, so the source hears back, in order
            source.defer(prompt)
        self._carry = []
        stats.ttft = list(self._ttft.values())

    def _admit(self, source: Source, max_new: int, eos: set[int]) -> bool:
        """Fill free slots from ``source``; False once a prompt had to be deferred (admission stops).

        How many prompts, and how many prompt tokens, a turn may admit is the
        scheduler's decision (``Scheduler.admission``); a round of queued
        work ends as soon as an interactive prompt is waiting: the prompts of
        the round whose images already went through the vision tower are kept
        (``_carry``) for the next round.

        Rounds overlap: a round's first tokens are read (``_settle``) once
        the next round is queued behind it, so the GPU is not left idle while
        the host prepares that round (the vision tower's launches take the
        host longer than its GPU work).  A round with an interactive prompt
        is read at once: its first token should not wait for another round.
        """
        pending: _Shipped | None = None
        spent = 0  # prompt tokens admitted in this turn
        try:
            while True:
                held = set(self._owner) | (pending.slots() if pending else set())
                free = [i for i in range(self._slots) if i not in held]
                urgent = source.urgent()
                allowed = self._sched.admission(free, urgent_waiting=urgent,
                                                interactive_running=bool(self._interactive_slots()))
                room = allowed.urgent_room if urgent else allowed.queued_room
                if urgent and room <= 0 and self._preempt(source):
                    continue
                if allowed.tokens is not None and spent >= allowed.tokens and not urgent:
                    return True  # this turn's prefill budget is spent: decode first
                if room <= 0:
                    return True
                left = None if allowed.tokens is None else allowed.tokens - spent
                group, admitting = self._group(source, room, max_new, left, at_least_one=spent == 0)
                if not group:
                    return admitting
                t0 = time.perf_counter()
                launched: list[tuple[Prompt, int, torch.Tensor]] = []
                while group:
                    batch = take_pack(group, self.packing)
                    launched += self._launch(source, batch, free)
                    if group and not batch[-1][0].urgent and source.urgent():
                        # An interactive prompt goes first; it waits for at most
                        # the prefills already queued on the GPU (one pack).
                        self._carry = group + self._carry
                        break
                spent += sum(p.length for p, _, _ in launched)
                shipped = _Shipped.start(launched)
                if pending is not None:
                    self._settle(source, pending, eos)
                pending = None
                if not self.overlap_rounds or any(p.urgent or p.stream for p, _, _ in launched):
                    self._settle(source, shipped, eos)
                else:
                    pending = shipped
                self.stats.prefill_s += time.perf_counter() - t0
                if not admitting:
                    return False
        except BaseException:
            pending = None  # out of memory or a lost device: the caller takes back what is in hand
            raise
        finally:
            if pending is not None:
                self._settle(source, pending, eos)

    def _preempt(self, source: Source) -> bool:
        """An interactive prompt finds no slot free: take one back from a queued sequence, if the
        scheduler names one (``Scheduler.victim``); it goes back to the source and is prefilled again
        from the start later (its tokens so far are dropped: a few hundred at most, of one row)."""
        queued = {i: self._began[i] for i, p in self._owner.items()
                  if not (p.urgent or p.stream or p.preempted)}  # each prompt gives its slot up once at most
        slot = self._sched.victim(queued, interactive=len(self._interactive_slots()))
        if slot is None:
            return False
        prompt = self._owner.pop(slot)
        self._state["active"][slot] = False  # queued on the stream like a step: no host sync
        self._free_since[slot] = time.perf_counter()
        prompt.preempted = True
        self.stats.preempted += 1
        self.stats.requests -= 1  # counted again when it is admitted again
        source.give_back(prompt)
        return True

    def _group(self, source: Source, room: int, max_new: int, tokens: int | None = None, *,
               at_least_one: bool = True) -> tuple[list[tuple[Prompt, Any]], bool]:
        """Prompts to prefill next, with their image features: carried-over ones, or a new group.

        A new group's images go through the vision tower together (up to
        ``packing.patches``; one prompt's when lean), and its prompts while they hold at most ``tokens``
        prompt tokens (what is left of the turn's budget; ``at_least_one``: the turn's first group takes
        one prompt whatever its length).  An
        interactive prompt is taken ahead of any carried-over one.  The flag
        is False once a prompt was deferred.
        """
        urgent = source.urgent()
        if self._carry and not urgent:
            return [self._carry.pop(0)], True
        group: list[Prompt] = []
        patches = length = 0
        admitting = True
        while len(group) < room and (not group or (patches < self.packing.patches
                                                   and (tokens is None or length < tokens))):
            prompt = source.take()
            if prompt is None:
                self._dry = True
                break
            over = tokens is not None and length + prompt.length > tokens and not prompt.urgent
            if over and (group or not at_least_one):
                source.give_back(prompt)  # over the turn's budget: the next turn's first
                break
            if prompt.length + prompt.max_new_tokens > self._length or prompt.max_new_tokens > max_new:
                source.defer(prompt)  # the next run sizes its cache for it
                for carried, _ in reversed(self._carry):  # and they are admitted after it
                    source.defer(carried)
                self._carry = []
                admitting = False
                break
            group.append(prompt)
            patches += prompt.patches
            length += prompt.length
            if prompt.urgent:
                break  # its own vision call: nothing queued delays its first token
        return [(p, f) for p, f in zip(group, self._features_each(group, source)) if f is not FAILED], admitting

    def _launch(self, source: Source, pack: list[tuple[Prompt, Any]],
                free: list[int]) -> list[tuple[Prompt, int, torch.Tensor]]:
        """Queue a pack's prefill into the first ``free`` slots (taken from the list); what was launched.

        A prompt that fails is finished with its error alone and its slot
        stays free: a pack that fails is prefilled again a prompt at a time
        to find the culprit.
        """
        slots = self._sched.place([prompt.urgent for prompt, _ in pack], free)
        if self.trace is not None:
            self.trace(Prefill(tuple(prompt for prompt, _ in pack), tuple(slots)))
        try:
            heads = self._prefill(pack, slots)
        except Exception as exc:
            free.extend(slots)  # not taken after all
            free.sort()
            reraise_if_fatal(exc)
            if len(pack) == 1:
                source.finished(pack[0][0], exc)
                return []
            launched: list[tuple[Prompt, int, torch.Tensor]] = []
            for item in pack:
                launched += self._launch(source, [item], free)
            return launched
        return [(prompt, slot, heads[i]) for i, ((prompt, _), slot) in enumerate(zip(pack, slots))]

    def _settle(self, source: Source, shipped: _Shipped, eos: set[int]) -> None:
        """Read a round's first tokens (one wait, for that round alone); the sequences that go on take their slots.

        The GPU already decided which go on (finite, budget left, not at EOS)
        and marked their slots active (``_first_tokens``); only a stream whose
        client left is turned off here.
        """
        launched, heads = shipped.launched, shipped.read()
        now = time.perf_counter()
        for (prompt, slot, _), (first, bad, going_on) in zip(launched, heads):
            if bad:
                source.finished(prompt, NonFiniteLogitsError(_NON_FINITE))
                continue
            ttft = self._ttft[prompt.index] = now - self._free_since[slot]
            self.stats.requests += 1
            if not going_on:
                source.finished(prompt, _result([first], eos, ttft))
                continue
            gone = not source.partial(prompt, [first]) if prompt.stream else prompt.urgent and source.abandoned(prompt)
            if gone:
                self._state["active"][slot] = False  # its client went away already (rare: a sync is fine)
                continue
            self._owner[slot] = prompt
            self._admitted += 1
            self._began[slot] = self._admitted
        if self.trace is not None and launched:
            self.trace(Settled(tuple(p for p, _, _ in launched), tuple(slot for _, slot, _ in launched),
                               tuple(self._owner.get(slot) is p for p, slot, _ in launched)))

    def _decode(self, source: Source, eos: set[int]) -> None:
        """Run decode steps up to the next host sync, then hand over what ended or streamed."""
        s, owner, stats = self._state, self._owner, self.stats
        # All slots, the power of two covering the busy ones, or (an interactive turn) those covering the
        # interactive ones: the scheduler's choice.  Slots above n wait, untouched.
        n = self._sched.decode_width(owner, self._interactive_slots(), shrink=self._shrink)
        stepped = [i for i in owner if i < n]
        if self.trace is not None:
            busy = sorted(stepped)
            self.trace(Decode(n, tuple(busy), tuple(owner[i] for i in busy)))
        sample = any(owner[i].temperature > 0 for i in stepped)
        step = self._graph(n, sample)
        # Run until the first sequence can have reached its budget, at most
        # SYNC_EVERY steps: an end of sequence is noticed within that many.
        n_gen = s["n_gen"].tolist()
        left = min(owner[i].max_new_tokens - n_gen[i] for i in stepped)
        steps = min(SYNC_EVERY, left)
        if n in self._step_s:
            within = SYNC_SECONDS_STREAMING if any(i < n for i in self._interactive_slots()) else SYNC_SECONDS
            steps = min(steps, int(within / self._step_s[n]))
        steps = max(1, steps)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        stats.decode_steps += steps
        looping = self._looping(n) if self.detect_loops and not self.ignore_eos else None
        active = s["active"].tolist()
        elapsed = time.perf_counter() - t0
        stats.decode_s += elapsed
        self._step_s[n] = elapsed / steps  # GPU-bound on CUDA: the sync waited for every step
        looped: set[int] = set()
        if looping is not None:
            looped = {i for i, flag in enumerate(looping.tolist()) if flag and i in owner and active[i]}
            for i in looped:
                s["active"][i] = False
                active[i] = False
        # An interactive request whose client went away stops here (a non-streaming one; a stream
        # learns it from ``partial`` below): its slot is free for the next prompt.
        for i in [i for i in stepped if active[i] and owner[i].urgent and not owner[i].stream]:
            if source.abandoned(owner[i]):
                s["active"][i] = False  # rare: the host copy's sync is fine
                del owner[i]
                self._free_since[i] = time.perf_counter()
        stepped = [i for i in stepped if i in owner]
        done = [i for i in stepped if not active[i]]
        streaming = [i for i in stepped if active[i] and owner[i].stream]
        if not done and not streaming:
            return
        rows = done + streaming
        out = s["out"][rows].cpu()
        n_gen = s["n_gen"].tolist()
        bad = s["bad"].tolist()
        now = time.perf_counter()
        for row, i in enumerate(rows):
            prompt = owner[i]
            tokens = out[row, :n_gen[i]].tolist()
            if i in streaming:
                if not source.partial(prompt, tokens):
                    s["active"][i] = False  # cancelled by its client
                    del owner[i]
                    self._free_since[i] = now
                continue
            del owner[i]
            self._free_since[i] = now
            if bad[i]:
                source.finished(prompt, NonFiniteLogitsError(_NON_FINITE))
                continue
            result = _result(tokens, eos, self._ttft.get(prompt.index, 0.0))
            if i in looped:
                result.looped = True
                stats.loops += 1
            stats.new_tokens += result.generated
            source.finished(prompt, result)

    def _interactive_slots(self) -> list[int]:
        """Slots generating for interactive requests (the API, ``vlwatch ask``)."""
        return [i for i, p in self._owner.items() if p.urgent or p.stream]

    def _looping(self, n: int) -> torch.Tensor:
        """Which of the first ``n`` slots are stuck repeating: the last LOOP_WINDOW tokens have a period
        of at most LOOP_MAX_PERIOD (a few small kernels per host sync, no sync of their own)."""
        s = self._state
        out, n_gen = s["out"][:n], s["n_gen"][:n]
        span = LOOP_WINDOW + LOOP_MAX_PERIOD
        if out.shape[1] <= span:
            return torch.zeros(n, dtype=torch.bool, device=out.device)
        back = torch.arange(span, device=out.device)
        tail = out.gather(1, (n_gen[:, None] - 1 - back[None, :]).clamp(min=0))  # newest first
        windows = tail.unfold(1, LOOP_WINDOW, 1)  # [:, p] = the window shifted back by p tokens
        periodic = (windows[:, 1:] == windows[:, :1]).all(-1).any(-1)
        return periodic & (n_gen >= span) & s["active"][:n]


_NON_FINITE = ("the model produced non-finite logits (NaN or infinity) for this request; with "
               "model.dtype float16 that is an overflow: use bfloat16 (what Qwen2.5-VL was trained in)")


def bucket(n: int, most: int) -> int:
    """``n`` rounded up to 1, 2, 4, 8, 16 or a multiple of 16 (at most ``most``): few graph shapes."""
    b = 1
    while b < n and b < 16:
        b *= 2
    if b < n:
        b = -(-n // 16) * 16
    return max(n, min(b, most))


def _result(tokens: list[int], eos: set[int], ttft: float) -> Generated:
    for i, t in enumerate(tokens):
        if t in eos:
            return Generated(tokens[:i], True, ttft, len(tokens))
    return Generated(tokens, False, ttft, len(tokens))


