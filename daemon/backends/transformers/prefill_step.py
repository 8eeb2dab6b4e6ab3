"""The arithmetic of a packed prefill: several prompts' text layers as one sequence, keys straight into slots.

``slots.SlotEngine`` prefills a round of prompts (their images already
through the vision tower) by laying their tokens end to end and running each
decoder layer once over all of them:

- ``pack``: the host-side layout of a round (where each token's keys go in
  the slot cache, and where each prompt starts and ends);
- ``prefill_layer``: one decoder layer over the packed tokens, its keys and
  values written into the slot cache as it goes (no per-prompt cache copied
  afterwards), attention causal within each prompt;
- ``causal``: that attention, through FlashAttention-2's varlen entry on CUDA
  in half precision (one call per layer for the whole round), else SDPA per
  prompt exactly as transformers calls it (the CPU, and fp32 for ``bench
  --verify``);
- ``vision_block``: one block of the vision tower, its windowed (or full)
  attention through the same varlen entry, for CUDA in half precision
  (``patches.VisionAttentionPatch`` runs it as one compiled call per block).

Why by hand: the stock text model prefills one prompt per call, and each
call is ~40 small kernels per layer around the GEMMs (the rotary embedding,
the cache update, the copy into the slot) plus the Python of eight modules
per layer; on an H100 that host work and those kernels were a fifth of a
1036x1036 image's prefill (benchmarks/NOTES.md, call P2).  Packed, a round
is one compiled function call per layer, and the GEMMs see a few thousand
rows instead of ~1400.

The operations are the stock ones in the stock order (RMSNorm in fp32, the
rotary embedding from the model's own ``rotary_emb``, SDPA with
``enable_gqa``), so on the CPU the tokens equal ``generate``'s.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from daemon.backends.transformers.decode_step import Weight, _rms, linear, rotate, store
from daemon.backends.transformers.qwen2_5_vl import flash_attention


class Packed(NamedTuple):
    """Where a round's packed tokens belong (host tensors; ``spans`` for the per-prompt path)."""

    slot_of: torch.Tensor  # (tokens,) the slot row each token's keys go to
    col_of: torch.Tensor  # (tokens,) and the column
    cu: torch.Tensor  # (prompts + 1,) int32: prompt i is tokens cu[i]..cu[i + 1]
    last: torch.Tensor  # (prompts,) the index of each prompt's last token
    spans: tuple[tuple[int, int], ...]


def pack(lengths: list[int], slots: list[int]) -> Packed:
    """The layout of prompts of ``lengths`` tokens going into ``slots``, laid end to end."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    sizes = torch.tensor(lengths)
    return Packed(
        slot_of=torch.repeat_interleave(torch.tensor(slots), sizes),
        col_of=torch.cat([torch.arange(n) for n in lengths]),
        cu=torch.tensor(bounds, dtype=torch.int32),
        last=torch.tensor(bounds[1:]) - 1,
        spans=tuple(zip(bounds[:-1], bounds[1:])),
    )


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, spans: tuple[tuple[int, int], ...],
           scale: float, kind: str) -> torch.Tensor:
    """Causal attention within each prompt of packed ``(tokens, heads, dim)`` tensors: ``(tokens, heads * dim)``.

    ``flash``: one varlen call for every prompt (grouped-query heads native).
    The longest-prompt bound is the total length: it only sizes the grid, and
    a bound that does not change with the prompts keeps the compiled layer
    from specialising on it.  Otherwise SDPA per prompt with ``enable_gqa``,
    the call transformers' sdpa attention makes for one unpadded prompt.
    """
    t, heads, dim = q.shape
    if kind == "flash":
        o = flash_attention(q, k, v, cu, cu, t, t, True, scale)
        return o.reshape(t, heads * dim)
    out = []
    for start, end in spans:
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None], scale=scale, is_causal=end - start > 1,
            enable_gqa=k.shape[1] != heads)
        out.append(o[0].transpose(0, 1).reshape(end - start, heads * dim))
    return torch.cat(out) if len(out) > 1 else out[0]


def prefill_layer(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_of: torch.Tensor, col_of: torch.Tensor, cu: torch.Tensor,
                  spans: tuple[tuple[int, int], ...], qkv_w: Weight, qkv_b: torch.Tensor, gate_up: Weight,
                  ln1: torch.Tensor, ln2: torch.Tensor, o_w: Weight, down_w: Weight, eps: float,
                  scale: float, n_kv: int, group: int, kind: str, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer over a round's packed tokens ``x`` (tokens, hidden); keys and values into the cache.

    ``cos``/``sin``: (tokens, 1, head dim), the model's M-RoPE for each
    token's 3D position.  The stock layer's arithmetic (Qwen2DecoderLayer):
    q/k/v through the fused weights of ``decode_step.fuse_projections``.
    An FP8 cache (``k_scale``/``v_scale`` given) takes the keys and values
    quantized; the round's own attention reads them unrounded, as vLLM's
    prefill does.
    """
    t, dim = x.shape[0], k_cache.shape[-1]
    qkv = linear(_rms(x, ln1, eps), qkv_w, qkv_b)
    q, k, v = qkv.split([n_kv * group * dim, n_kv * dim, n_kv * dim], dim=-1)
    q = rotate(q.reshape(t, n_kv * group, dim), cos, sin)
    k = rotate(k.reshape(t, n_kv, dim), cos, sin)
    v = v.reshape(t, n_kv, dim).contiguous()
    store(k_cache, k_scale, slot_of, col_of, k)
    store(v_cache, v_scale, slot_of, col_of, v)
    x = x + linear(causal(q, k, v, cu, spans, scale, kind), o_w)
    gate, up = linear(_rms(x, ln2, eps), gate_up).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, down_w)


def vision_block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor, longest: int,
                 ln1: torch.Tensor, ln2: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor, proj_w: torch.Tensor,
                 proj_b: torch.Tensor, gate_w: torch.Tensor, gate_b: torch.Tensor, up_w: torch.Tensor,
                 up_b: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, heads: int, scale: float,
                 eps: float) -> torch.Tensor:
    """One Qwen2.5-VL vision block over ``x`` (patches, hidden), attention within each span of ``cu``.

    The stock block's arithmetic (Qwen2_5_VLVisionBlock: RMSNorm, the rotary
    embedding in fp32, attention, the SiLU-gated MLP), with the attention as
    one varlen call instead of one per window: ``longest`` (the longest span,
    known on the host) sizes its grid.  CUDA, half precision only.
    """
    t = x.shape[0]
    q, k, v = F.linear(_rms(x, ln1, eps), qkv_w, qkv_b).reshape(t, 3, heads, -1).unbind(1)
    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # apply_rotary_pos_emb_vision: in fp32
    q, k = rotate(q.float(), c, s).to(x.dtype), rotate(k.float(), c, s).to(x.dtype)
    o = flash_attention(q, k, v, cu, cu, longest, longest, False, scale)
    x = x + F.linear(o.reshape(t, -1), proj_w, proj_b)
    h = _rms(x, ln2, eps)
    return x + F.linear(F.silu(F.linear(h, gate_w, gate_b)) * F.linear(h, up_w, up_b), down_w, down_b)
