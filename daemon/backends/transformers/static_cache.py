"""The slot engine's static KV cache and its decode step, captured as CUDA graphs.

``CacheAndStep`` is the half of ``slots.SlotEngine`` that holds the slots
(the engine mixes it in, as it does ``prefill.PrefillRounds``; the loop that
admits prompts and hands results back is ``slots``):

- the **static cache** (``_ensure``): ``slots`` rows of ``length`` tokens per
  layer, token-major (the layout FlashAttention's varlen entry reads), and
  the per-slot state the step updates on the device (token fed next, its
  position and cache column, tokens so far, budget, active flag, output);
  with ``model.kv_cache_dtype: fp8`` the keys and values are e4m3 with a
  float32 scale per token and KV head beside them (``_scales``, ``kv_fp8``);
- the **decode step** (``_step``): one token for the first ``n`` slots,
  written against the model's own modules and weights (the fused layer
  function of ``decode_step``, compiled on CUDA), greedy or per-slot
  temperature sampling, in place on the state so that it can be captured;
- its **CUDA graphs** (``_graph``, ``_capture``), one per width a run decodes
  over, and ``warm``, which captures them while the engine is idle.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from daemon.backends import is_sticky_cuda_error
from daemon.backends.transformers import kv_fp8
from daemon.backends.transformers.decode_step import (Where, at_eos, attend, choose, layer_step, penalize, rotate,
                                                      store, weight_of)
from daemon.backends.transformers.oom import is_out_of_memory
from daemon.backends.transformers.scheduler import decode_widths
from daemon.plan import cache_length, kv_head_bytes

log = logging.getLogger(__name__)


class CacheAndStep:
    """Cache and decode-step methods of ``slots.SlotEngine`` (see the module's docstring); not used on its own.

    What they work on, set up by ``SlotEngine.__init__``:
    """

    layers: list[Any]
    fused: dict[int, tuple[torch.Tensor, ...]]  # decode_step.fuse_projections
    embed: Any
    norm: Any
    lm_head: Any
    device: torch.device
    dtype: torch.dtype
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    rope_scale: float
    inv_freq: torch.Tensor
    eos: torch.Tensor  # end-of-sequence ids (a -1 when there are none)
    penalty: float | None
    attention: str  # decode_step.attention_kind
    use_cuda_graphs: bool
    _silu: bool
    _layer_fn: Callable[..., torch.Tensor] | None  # decode_step.layer_step, compiled (CUDA)
    _slots: int
    _length: int
    _graphs: dict[tuple[int, bool], Any]
    _state: dict[str, torch.Tensor]
    _kv: list[tuple[torch.Tensor, torch.Tensor]]
    #: per layer, an FP8 cache's scales (keys, values), each (slots, length, kv heads) float32; (None, None)
    #: for a cache in the model's dtype: what the layer functions take as ``k_scale``/``v_scale``
    _scales: list[tuple[torch.Tensor | None, torch.Tensor | None]]
    kv_cache_dtype: str  # auto (the model's dtype) | fp8

    # ------------------------------------------------------------ memory

    @property
    def fp8_cache(self) -> bool:
        return self.kv_cache_dtype == "fp8"

    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.n_kv * kv_head_bytes(self.head_dim, self.dtype.itemsize,
                                                                self.kv_cache_dtype)

    def held_bytes(self) -> int:
        """Device memory the cache and state hold now (reused by the next run that fits)."""
        tensors = [t for pair in self._kv + self._scales for t in pair if t is not None] + list(self._state.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> None:
        """Drop the static cache and the captured graphs (their memory goes back to the allocator)."""
        self._graphs.clear()
        self._kv = []
        self._scales = []
        self._state = {}
        self._slots = self._length = 0

    def _ensure(self, slots: int, length: int, max_new: int) -> bool:
        """Allocate (or keep) a cache of at least ``slots`` x ``length``; whether it was (re)allocated."""
        length = cache_length(length)  # rounded up as daemon.plan counts it: fewer shapes, aligned masks
        fits = slots <= self._slots and length <= self._length <= 2 * length
        cols = max_new + 1  # + a scratch column that idle slots write into
        if fits and self._state["out"].shape[1] >= cols and ("seen" in self._state) == (self.penalty is not None):
            return False
        if self._length:
            # Every captured decode graph goes with the old cache: seconds of captures follow (issue 22's
            # first ask under a backlog waited for them).  A live feed's Sizing is meant to make this rare.
            log.info("static cache re-sized: %d x %d -> %d x %d tokens (the decode graphs are captured again)",
                     self._slots, self._length, slots, length)
        self.release()
        # Token-major (slot, column, kv head, dim): one column is one token's
        # keys for every head, the layout FlashAttention's varlen entry reads.
        shape = (slots, length, self.n_kv, self.head_dim)
        cache_dtype = torch.float8_e4m3fn if self.fp8_cache else self.dtype
        self._kv = [(torch.zeros(shape, dtype=cache_dtype, device=self.device),
                     torch.zeros(shape, dtype=cache_dtype, device=self.device)) for _ in self.layers]
        self._scales = [(None, None)] * len(self.layers)
        if self.fp8_cache:  # ones: a column never written reads as zeros, never as NaN
            self._scales = [(torch.ones(shape[:3], dtype=torch.float32, device=self.device),
                             torch.ones(shape[:3], dtype=torch.float32, device=self.device)) for _ in self.layers]
        dev, vocab = self.device, self.lm_head.weight.shape[0]
        self._state = {
            "tok": torch.zeros(slots, dtype=torch.long, device=dev),  # token fed to the next step
            "pos": torch.zeros(slots, dtype=torch.long, device=dev),  # its rotary position
            "wpos": torch.zeros(slots, dtype=torch.long, device=dev),  # its cache column
            "n_gen": torch.zeros(slots, dtype=torch.long, device=dev),  # tokens produced so far
            "budget": torch.ones(slots, dtype=torch.long, device=dev),
            "active": torch.zeros(slots, dtype=torch.bool, device=dev),
            "out": torch.zeros(slots, cols, dtype=torch.long, device=dev),
            "cols": torch.arange(length, device=dev),
            "rows": torch.arange(slots, device=dev),
            # FlashAttention's varlen bounds: row i's query is token i, its keys start at column i * length.
            "cu_q": torch.arange(slots + 1, device=dev, dtype=torch.int32),
            "cu_k": torch.arange(slots + 1, device=dev, dtype=torch.int32) * length,
            "ignore_eos": torch.zeros((), dtype=torch.bool, device=dev),
            "temp": torch.zeros(slots, dtype=torch.float32, device=dev),  # 0: greedy
            "bad": torch.zeros(slots, dtype=torch.bool, device=dev),  # stopped on non-finite logits
        }
        if self.penalty is not None:
            self._state["seen"] = torch.zeros(slots, vocab, dtype=torch.bool, device=dev)
        self._slots, self._length = slots, length
        # INFO: what the daemon's runs really hold, where the rules' prompts and budgets (backends.Sizing)
        # make the rows longer than the plan at load assumed (the olmocr pack's 8000-token budget, say).
        log.info("static cache: %d slots x %d tokens (%.2f GiB%s)", slots, length,
                 slots * length * self.kv_bytes_per_token() / 2**30, ", fp8" if self.fp8_cache else "")
        return True

    def device_active(self) -> list[int]:
        """The slots the device is decoding, by its own flags (set on the GPU as it chooses a first token).

        Reads the device (a host sync): for tests and debugging, not for the
        loop.  The host's side of the same is ``events.Settled.decoding``;
        the two must agree (a slot the device decodes and the host does not
        know is work wasted, one the host waits on and the device does not
        decode ends early).
        """
        active = self._state.get("active")
        return [] if active is None else [i for i, on in enumerate(active.tolist()) if on]

    def cached(self, slot: int, columns: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the keys and values in the first ``columns`` columns of ``slot``'s cache row, per layer.

        Each ``(columns, kv heads, head dim)``: what prefill and decoding
        wrote there (a prompt's tokens, then the generated ones).  For tests
        and debugging: whether a packed prefill leaves what the stock text
        model would, for instance.  An FP8 cache's columns come back
        dequantized, in the model's dtype.
        """
        if self.fp8_cache:
            return [(kv_fp8.dequantize(k[slot, :columns], ks[slot, :columns], self.dtype),
                     kv_fp8.dequantize(v[slot, :columns], vs[slot, :columns], self.dtype))
                    for (k, v), (ks, vs) in zip(self._kv, self._scales)]
        return [(k[slot, :columns].clone(), v[slot, :columns].clone()) for k, v in self._kv]

    def warm(self, busy: Callable[[], bool]) -> list[int]:
        """Capture the decode step for each width a shrinking run may use and has not yet, until ``busy()``.

        A width is otherwise captured (and compiled) the first time a run
        decodes over it: 0.1-1.75 s each on an H100, and in call S1 a person's
        first question waited for six of them as the backlog widened the
        batch.  Called while the engine has nothing to do (the daemon, between
        runs); work that arrives waits for the one capture in progress at
        most.  Returns the widths captured.  Out of GPU memory stops it (the
        next run captures what it needs, as before).
        """
        done: list[int] = []
        started = time.perf_counter()
        for n in self.unwarmed():
            if busy() or not self.use_cuda_graphs:
                break
            try:
                self._graph(n, False)
            except torch.cuda.OutOfMemoryError:
                log.info("warming the decode step: out of GPU memory at %d slots; the rest are captured when used", n)
                break
            done.append(n)
        if done:
            log.info("decode step captured ahead for %s slots in %.1fs%s", ", ".join(map(str, done)),
                     time.perf_counter() - started, "" if not self.unwarmed() else " (work came: the rest later)")
        return done

    def unwarmed(self) -> list[int]:
        """The decode widths of the cache in hand not captured yet, smallest first ([] without CUDA graphs)."""
        if not (self.use_cuda_graphs and self._slots):
            return []
        return [n for n in decode_widths(self._slots) if (n, False) not in self._graphs]

    def prepare(self, slots: int, cache_length: int, max_new: int) -> None:
        """Allocate the cache and capture the decode step for ``slots`` ahead of a run."""
        self._ensure(slots, cache_length, max_new)
        self._graph(slots, False)

    # ------------------------------------------------------------ decode step

    def _view(self, n: int) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, ...]]]:
        """The state and, per layer, (keys, values, key scales, value scales) of the first ``n`` slots
        (the scales None for a cache in the model's dtype)."""
        state = {k: (v[:n] if v.dim() and k not in ("cols", "cu_q", "cu_k") else v) for k, v in self._state.items()}
        state["cu_q"], state["cu_k"] = self._state["cu_q"][:n + 1], self._state["cu_k"][:n + 1]
        return state, [(k[:n], v[:n], ks if ks is None else ks[:n], vs if vs is None else vs[:n])
                       for (k, v), (ks, vs) in zip(self._kv, self._scales)]

    def decode_attention(self, n: int) -> str:
        """The attention kind a decode step over ``n`` slots runs (``decode_step.attend``): ``one`` for a
        single row, except over an FP8 cache, which only ``kv_fp8``'s kernel (or its widening) reads."""
        return "one" if n == 1 and self.attention != "fp8_kv" else self.attention

    def _step(self, n: int, sample: bool = False) -> None:
        """One decode step for the first ``n`` slots, in place on the state (graph-safe).

        Greedy, or with ``sample`` each slot whose temperature is above 0 draws
        its token (Gumbel-max: argmax of logits / T + Gumbel noise, which is a
        draw from softmax(logits / T)); the greedy slots' tokens are the same
        either way.
        """
        s, kv = self._view(n)
        rows, wpos = s["rows"], s["wpos"]
        x = self.embed(s["tok"])
        cos, sin = self._rope(s["pos"])
        kind = self.decode_attention(n)
        if kind in ("flash", "fp8_kv"):  # each row's filled columns, the current token included
            bias, used = None, (wpos + 1).to(torch.int32)
        else:  # an additive mask over the cache columns
            visible = s["cols"][None, :] <= wpos[:, None]
            bias = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            bias, used = bias.masked_fill(~visible, float("-inf"))[:, None, None, :], None
        where = Where(rows, wpos, bias, used, s["cu_q"], s["cu_k"])
        group = self.n_heads // self.n_kv
        # The fused weights' layer function: compiled on CUDA, else as it is
        # (on the CPU the tests hold it to stock generate token for token).
        layer_fn = self._layer_fn or (layer_step if self.fused and self._silu else None)
        for layer, (k_cache, v_cache, k_scale, v_scale) in zip(self.layers, kv):
            attn = layer.self_attn
            if layer_fn is not None:
                x = layer_fn(x, cos, sin, k_cache, v_cache, *where, *self.fused[id(layer)],
                             layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                             weight_of(attn.o_proj), weight_of(layer.mlp.down_proj), self.eps, attn.scaling,
                             self.n_kv, group, kind, k_scale, v_scale)
                continue
            # A layout fuse_projections does not know: the model's own modules.
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, self.n_heads, self.head_dim)
            k = attn.k_proj(h).view(n, self.n_kv, self.head_dim)
            v = attn.v_proj(h).view(n, self.n_kv, self.head_dim)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            store(k_cache, k_scale, rows, wpos, k)
            store(v_cache, v_scale, rows, wpos, v)
            o = attend(q, k_cache, v_cache, where, attn.scaling, group, kind, k_scale, v_scale)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(self.norm(x)).float()
        if "seen" in s:
            logits = penalize(logits, s["seen"], self.penalty)
        nxt, bad = choose(logits, s["temp"] if sample else None)
        self._advance(s, nxt, bad)

    def _advance(self, s: dict[str, torch.Tensor], nxt: torch.Tensor, bad: torch.Tensor) -> None:
        active, rows, n_gen = s["active"], s["rows"], s["n_gen"]
        # A row whose logits are not finite stops here, flagged, instead of
        # emitting token 0 (what argmax of NaNs gives) for the rest of its budget.
        bad = bad & active
        s["bad"] |= bad
        active &= ~bad
        scratch = s["out"].shape[1] - 1
        s["out"][rows, torch.where(active, n_gen, scratch)] = nxt
        n_gen += active.long()
        if "seen" in s:
            s["seen"][rows, nxt] |= active
        active &= ~((n_gen >= s["budget"]) | at_eos(nxt, self.eos, s["ignore_eos"]))
        s["tok"].copy_(nxt)
        s["pos"] += 1
        s["wpos"].copy_(torch.clamp(s["wpos"] + 1, max=self._length - 1))

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # In decoding the three M-RoPE components (time, height, width) are the
        # same text position, so M-RoPE reduces to plain RoPE at that position.
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[:, None, :]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)[:, None, :]
        return cos, sin

    def _graph(self, n: int, sample: bool) -> Callable[[], None]:
        if not self.use_cuda_graphs:
            return lambda: self._step(n, sample)
        graph = self._graphs.get((n, sample))
        if graph is None:
            try:
                graph = self._capture(n, sample)
            except RuntimeError as exc:
                if is_out_of_memory(exc):
                    # Out of memory while capturing: the caller shrinks the
                    # slots and tries again; the fast path stays on.
                    self._graphs.clear()
                    raise torch.cuda.OutOfMemoryError(f"CUDA out of memory while capturing the decode step: {exc}") from exc
                if is_sticky_cuda_error(exc):
                    raise
                # A kernel that cannot be captured: correct, only slower.
                log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
                self.use_cuda_graphs = False
                return lambda: self._step(n, sample)
            self._graphs[(n, sample)] = graph
        return graph.replay

    def _capture(self, n: int, sample: bool) -> Any:
        started = time.perf_counter()
        saved = {k: v.clone() for k, v in self._state.items()}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up kernels and workspaces off the capture
            for _ in range(2):
                self._step(n, sample)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # An explicit capture stream on this engine's device: torch.cuda.graph's
        # default stream is made once, on the first device that captured
        # (with one engine per GPU, the second engine's capture failed on it).
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
            self._step(n, sample)
        for k, v in saved.items():  # the warm-up and capture ran the step: undo it
            self._state[k].copy_(v)
        log.debug("captured the decode step for %d slots%s in %.2fs", n, " (sampling)" if sample else "",
                  time.perf_counter() - started)
        return graph
