"""The arithmetic of one decode step over the slot cache (what ``slots.SlotEngine`` runs per layer).

Pure tensor functions, graph-safe (no host syncs), so that the step can be
captured as one CUDA graph and each layer compiled with ``torch.compile``:

- ``fuse_projections``: q/k/v and gate/up weights in one tensor each;
- ``layer_step``: one decoder layer for one new token per row;
- ``attend``: the attention of each row's new query against its own cache
  row, through the kernel ``attention_kind`` picks (FlashAttention-2's varlen
  entry on CUDA in half precision, two small matmuls for a lone row, SDPA
  with a mask otherwise; over an FP8 cache, ``kv_fp8``'s kernel);
- ``store``: a token's keys or values into the cache (quantized, for an FP8
  cache, with their scales beside);
- ``choose``, ``penalize``: the next token (greedy or sampled) and the
  repetition penalty, as transformers computes them.

The cache is token-major: ``(slot, column, kv head, dim)``; an FP8 cache
(``model.kv_cache_dtype: fp8``) has a float32 scale per ``(slot, column, kv
head)`` beside it, passed as ``k_scale`` / ``v_scale`` (None otherwise).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from daemon.backends.transformers import kv_fp8
from daemon.backends.transformers.fp8 import Fp8Linear, fp8_linear
from daemon.backends.transformers.fp8 import concat as fp8_concat
from daemon.backends.transformers.qwen2_5_vl import flash_attention, flash_takes_seqused_k, flash_varlen


#: A projection's weight as the fused layer functions take it: a plain tensor, or an FP8 weight
#: (``backends.fp8``) as (e4m3 weight, float32 row scales, whether ``_scaled_mm`` runs here).
Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor, bool]


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or its FP8 form for an FP8 weight (inside the compiled layer functions too: the
    activations' per-row quantization then fuses into the kernels around the GEMM)."""
    if isinstance(w, tuple):
        weight, scale, fast = w
        return fp8_linear(x, weight, scale, bias, fast=fast)
    return F.linear(x, w, bias)


def weight_of(module: Any) -> Weight:
    """A linear module's weight as ``linear`` takes it."""
    if isinstance(module, Fp8Linear):
        return (module.weight, module.weight_scale, module.fast)
    return module.weight


def fuse_projections(layers: list[Any]) -> dict[int, tuple[Weight, torch.Tensor, Weight]]:
    """Put q/k/v and gate/up weights of each layer into one tensor each, the modules keeping views.

    Decoding reads every weight once per step; one GEMV over a fused matrix
    runs closer to memory bandwidth than three small ones (k and v are 3.5 MB
    each), and launches fewer kernels.  The HF modules' parameters become
    views into the fused tensors, so prefill (the stock forward) computes the
    same thing and no memory is duplicated.  FP8 projections (all of a
    layer's, ``backends.fp8``) fuse the same way, their row scales stacked
    with their rows.  Returns {} when the layout is not the expected one
    (then the modules are used as they are).
    """
    fused: dict[int, tuple[Weight, torch.Tensor, Weight]] = {}
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        gates = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
        if any(p is None or p.bias is None for p in projections) or any(g is None or g.bias is not None for g in gates):
            return {}
        kinds = {type(m) for m in projections + gates}
        if kinds == {Fp8Linear}:
            fused[id(layer)] = _fuse_fp8(projections, gates)
            continue
        if kinds != {torch.nn.Linear}:
            return {}
        with torch.no_grad():
            qkv_w = torch.cat([p.weight for p in projections])
            qkv_b = torch.cat([p.bias for p in projections])
            gate_up = torch.cat([g.weight for g in gates])
            _repoint([p.weight for p in projections], qkv_w)
            _repoint([p.bias for p in projections], qkv_b)
            _repoint([g.weight for g in gates], gate_up)
        fused[id(layer)] = (qkv_w, qkv_b, gate_up)
    return fused


def _fuse_fp8(projections: list[Fp8Linear], gates: list[Fp8Linear]) -> tuple[Weight, torch.Tensor, Weight]:
    with torch.no_grad():
        qkv_w, qkv_s, qkv_b = fp8_concat(projections)
        gate_up, gate_up_s, _ = fp8_concat(gates)
        for mods, whole, scales in ((projections, qkv_w, qkv_s), (gates, gate_up, gate_up_s)):
            _repoint([m.weight for m in mods], whole)
            _repoint([m.weight_scale for m in mods], scales)
        assert qkv_b is not None
        _repoint([p.bias for p in projections], qkv_b)
    fast = projections[0].fast
    return (qkv_w, qkv_s, fast), qkv_b, (gate_up, gate_up_s, fast)


def _repoint(params: list[torch.Tensor], whole: torch.Tensor) -> None:
    start = 0
    for p in params:
        p.data = whole[start:start + p.shape[0]]
        start += p.shape[0]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Qwen2.5-VL's RMSNorm, same operation order (normalise in fp32, cast, scale).
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Where(NamedTuple):
    """Where each row of a decode step writes its token and which columns it reads (see ``attend``)."""

    rows: torch.Tensor
    wpos: torch.Tensor  # the column this step writes
    bias: torch.Tensor | None  # additive mask over the columns (``sdpa`` and ``one``)
    used: torch.Tensor | None  # filled columns per row, int32 (``flash``)
    cu_q: torch.Tensor
    cu_k: torch.Tensor


def attention_kind(device: torch.device, dtype: torch.dtype, *, flash: bool = True, fp8_cache: bool = False) -> str:
    """``flash`` where FlashAttention-2's varlen kernel takes per-row key lengths, else ``sdpa``; ``fp8_kv``
    for an FP8 cache where ``kv_fp8``'s kernel runs (CUDA with Triton).

    On an H100 the SDPA call with a mask (the memory-efficient kernel) was
    12 of a 19.6 ms step at 256 slots; the flash kernel read the same cache
    at 1.3-1.4x its bandwidth (benchmarks/NOTES.md, call D1).
    ``flash=False`` (``engine.decode_attention: sdpa``) turns it off.  An FP8
    cache elsewhere (a CPU: the tests) is widened to the model's dtype per
    step and read by ``sdpa``: correct, slow.
    """
    if fp8_cache:
        return "fp8_kv" if device.type == "cuda" and kv_fp8.runs(device) else "sdpa"
    if not flash or not flash_varlen(device, dtype) or not flash_takes_seqused_k():
        return "sdpa"
    return "flash"


def store(cache: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor,
          x: torch.Tensor) -> None:
    """``x`` (rows, kv heads, dim) into ``cache[rows, cols]``; for an FP8 cache (``scale`` given) quantized,
    one scale per token and KV head."""
    if scale is None:
        cache[rows, cols] = x
        return
    q, s = kv_fp8.quantize(x)
    # Straight into the float8 tensor, the same pattern as the bf16 cache's write (index_put_ takes float8 since
    # torch 2.4).  Session 8's first version wrote through uint8 views of both; inductor (2.13, 2.14, CPU) wrote
    # either form in place, the device's 2.11 is timed both ways by benchmarks/profile_decode.py --store-variants.
    cache[rows, cols] = q
    scale[rows, cols] = s


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, where: Where, scale: float,
           group: int, kind: str, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each row's one new query against its cache row: ``(rows, heads * dim)``.

    Query head j uses KV head j // group (HF's repeat_kv), against the
    un-expanded cache ``(slots, columns, kv heads, dim)``:

    - ``flash``: FlashAttention-2's varlen entry, rows packed as sequences of
      ``length`` columns of which the first ``used`` are read;
    - ``one``: a single row as two small matrix products, the query heads of a
      group as rows against their KV head (the fused kernels give one row too
      little parallelism: 2.1 of an 8 ms batch-1 step on an H100, call D1);
    - ``sdpa``: the group's queries as rows against one KV head, with the mask;
    - ``fp8_kv``: ``kv_fp8``'s kernel over the FP8 cache and its scales (``used`` columns per row).

    An FP8 cache for another kind is widened to ``q``'s dtype first (a CPU).
    """
    n, n_kv, dim = q.shape[0], k_cache.shape[2], q.shape[-1]
    if k_scale is not None and v_scale is not None:
        if kind == "fp8_kv":
            assert where.used is not None
            o = kv_fp8.fp8_kv_attention(q, k_cache, k_scale, v_cache, v_scale, where.used, scale)
            return o.reshape(n, n_kv * group * dim)
        k_cache = kv_fp8.dequantize(k_cache[:n], k_scale[:n], q.dtype)
        v_cache = kv_fp8.dequantize(v_cache[:n], v_scale[:n], q.dtype)
    if kind == "flash":
        length = k_cache.shape[1]
        o = flash_attention(
            q.reshape(n, n_kv * group, dim), k_cache.view(n * length, n_kv, dim), v_cache.view(n * length, n_kv, dim),
            where.cu_q, where.cu_k, 1, length, False, scale, seqused_k=where.used)
        return o.reshape(n, n_kv * group * dim)
    assert where.bias is not None
    if kind == "one":
        keys, values = k_cache[0].transpose(0, 1), v_cache[0].transpose(0, 1)  # (kv heads, columns, dim)
        scores = torch.matmul(q.reshape(n_kv, group, dim), keys.transpose(1, 2)).float() * scale
        probs = (scores + where.bias[0, 0].float()).softmax(-1).to(q.dtype)
        return torch.matmul(probs, values).reshape(1, n_kv * group * dim)
    o = F.scaled_dot_product_attention(q.reshape(n, n_kv, group, dim), k_cache.transpose(1, 2),
                                       v_cache.transpose(1, 2), attn_mask=where.bias, scale=scale)
    return o.reshape(n, n_kv * group * dim)


def layer_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rows: torch.Tensor, wpos: torch.Tensor, bias: torch.Tensor | None,
               used: torch.Tensor | None, cu_q: torch.Tensor, cu_k: torch.Tensor, qkv_w: Weight,
               qkv_b: torch.Tensor, gate_up: Weight, ln1: torch.Tensor, ln2: torch.Tensor, o_w: Weight,
               down_w: Weight, eps: float, scale: float, n_kv: int, group: int, kind: str,
               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer for one new token per row (the compiled form of slots.SlotEngine._step's loop body).

    ``k_scale`` / ``v_scale``: an FP8 cache's scales (module docstring), None for a cache in the model's dtype.
    """
    n, dim = x.shape[0], k_cache.shape[-1]
    qkv = linear(_rms(x, ln1, eps), qkv_w, qkv_b)
    q, k, v = qkv.split([n_kv * group * dim, n_kv * dim, n_kv * dim], dim=-1)
    q = rotate(q.reshape(n, n_kv * group, dim), cos, sin)
    k = rotate(k.reshape(n, n_kv, dim), cos, sin)
    store(k_cache, k_scale, rows, wpos, k)
    store(v_cache, v_scale, rows, wpos, v.reshape(n, n_kv, dim))
    o = attend(q, k_cache, v_cache, Where(rows, wpos, bias, used, cu_q, cu_k), scale, group, kind, k_scale, v_scale)
    x = x + linear(o, o_w)
    gate, up = linear(_rms(x, ln2, eps), gate_up).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, down_w)


def choose(logits: torch.Tensor, temp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row (greedy, or sampled where ``temp`` > 0) and whether the row's logits were not finite.

    The check is on the greedy pick's logit: NaN wins argmax, +inf is the max,
    and a row of -inf has -inf there, so one gathered value per row tells.
    Graph-safe (no host sync); the random draw uses the CUDA generator, which
    graph replays advance.
    """
    greedy = logits.argmax(-1)
    bad = ~torch.isfinite(logits.gather(-1, greedy[:, None]))[:, 0]
    if temp is None:
        return greedy, bad
    u = torch.rand_like(logits).clamp_(min=1e-20, max=1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    sampled = (logits / temp.clamp(min=1e-4)[:, None] + gumbel).argmax(-1)
    return torch.where(temp > 0, sampled, greedy), bad


def at_eos(tokens: torch.Tensor, eos: torch.Tensor, ignore_eos: torch.Tensor) -> torch.Tensor:
    """Which ``tokens`` end their sequence: one of the ``eos`` ids, unless ``ignore_eos`` (a GPU bool: the bench)."""
    return (tokens[:, None] == eos[None, :]).any(-1) & ~ignore_eos


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, over a seen-token mask instead of the ids."""
    scaled = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, scaled, logits)
