"""Decode attention over an FP8 (e4m3) KV cache: one new query per row against its own cache row.

Why a cache in FP8: a page slot of the 7B holds 141.7 MiB of bf16 keys and
values (benchmarks/NOTES.md, "What would reach the capped pages targets"), so
under a memory cap the slot count, not the step, bounds pages per minute.
e4m3 with one float32 scale per token and KV head halves the bytes a slot
takes (twice the slots fit under the same cap) and halves what the decode
attention reads per row, which at 256 slots was 9.4 of a 16.6 ms step.

Why by hand: FlashAttention-2 as torch ships it (``_flash_attention_forward``,
what ``decode_step.attend`` calls) reads bf16/fp16 caches only.
Dequantizing each layer's cache into a bf16 buffer before it would read 1
byte, write 2 and read 2 again per element: 2.5x the traffic of the bf16
cache it replaces.  So the kernel reads the e4m3 bytes and widens them in
registers, never in memory.  The models followed: SGLang's grouped decode
attention (one program per row and KV head, the group's query heads as the
rows of one ``tl.dot`` tile, the keys split across programs and the parts
merged by their log-sum-exp: flash-decoding) and vLLM's ``kv_cache_dtype=fp8``
(e4m3 keys and values, scales applied inside the attention kernel).

The scales never touch the tile: a column's key scale factors out of its dot
products (``q . (k * s) = (q . k) * s``), so it multiplies the column's scores;
a column's value scale multiplies its probability before the second product.

What it does not do: write the cache (``quantize`` is plain torch, so
torch.compile fuses it into the decode step around the cache write), prefill
(many queries a row), or run on cards before compute capability 8.9 (Triton
has no ``float8e4nv`` there).  ``TRITON_INTERPRET=1`` runs it on a CPU (the
tests): Triton 3.8's interpreter loads e4m3 tensors and widens them as the
GPU does; only its bf16 dot (hence ``WIDE``) and its float32-to-bf16 cast
(toward zero, where the GPU rounds to nearest) differ.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from daemon.backends import is_sticky_cuda_error
from daemon.backends.transformers import e4m3
from daemon.backends.transformers.fp8 import fp8_capable

log = logging.getLogger(__name__)

#: e4m3's largest finite value (``torch.finfo(torch.float8_e4m3fn).max``): a vector's amax maps onto it.
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
#: The smallest scale: an all-zero vector quantizes to zeros with a finite, positive scale (as ``fp8.quantize_rows``).
SCALE_FLOOR = 1e-12
#: Columns per step (``BLOCK_N``) and the pipeline: the best over the 20 shapes of the H100 probe
#: (benchmarks/results/h100-s8-kv-fp8-probe.json: 1.06x the best tile of each shape on average, within 10% of it
#: from 71 rows on; 64/4/2, the first guess, was 1.1-1.3x slower).  A ``config`` may also name ``SPLITS``: parts
#: of each row's columns run by separate programs (0: ``splits_for`` chooses from the shapes and the card's SMs).
CONFIG = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
#: Programs per SM that the split-KV aims at (as ``fp8_gemv.PROGRAMS_PER_SM``).
PROGRAMS_PER_SM = 4
#: The most parts ``splits_for`` cuts a row into; a ``config`` may ask for more (the probe does).
MAX_SPLITS = 16
#: ``tl.dot``'s smallest tile side: a group's query heads (7 for the 7B, 8 for the 3B) are padded to it.
MIN_HEADS_TILE = 16
_LOG2E = 1.4426950408889634


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., dim) -> (e4m3 (..., dim), float32 scale (...)) with ``x ~= q * scale[..., None]``.

    One scale per token and KV head (per vector of ``dim``): amax / FP8_MAX.
    Plain torch without host syncs, so the compiled decode step fuses it into
    the kernels around its cache write.
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp(min=SCALE_FLOOR)
    return (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantize``: (..., dim) e4m3 and (...) scales -> (..., dim) in ``dtype``."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def reference(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor, v_cache: torch.Tensor,
              v_scale: torch.Tensor, used: torch.Tensor, scale: float) -> torch.Tensor:
    """What ``decode_attention`` computes, in plain torch and float32: ``(n, heads * dim)`` in ``q.dtype``.

    Row i reads the first ``used[i]`` columns of cache row i, dequantized;
    query head h reads KV head h // (heads // n_kv) (HF's repeat_kv).  Masked
    rather than sliced, so no host sync (the check at load can run it on the
    device); memory is two float32 copies of the first n cache rows.
    """
    n, heads, dim = q.shape
    length, n_kv = k_cache.shape[1], k_cache.shape[2]
    live = torch.arange(length, device=q.device)[None, :] < used[:, None].to(torch.long)  # (n, length)
    # where, not a product: columns past ``used`` may hold anything (a finished row's, inf scales)
    k = torch.where(live[:, :, None, None], dequantize(k_cache[:n], k_scale[:n], torch.float32), 0.0)
    v = torch.where(live[:, :, None, None], dequantize(v_cache[:n], v_scale[:n], torch.float32), 0.0)
    qf = q.float().reshape(n, n_kv, heads // n_kv, dim)
    scores = torch.einsum("nkgd,nckd->nkgc", qf, k) * scale
    probs = scores.masked_fill(~live[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("nkgc,nckd->nkgd", probs, v).reshape(n, heads * dim).to(q.dtype)


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    e4m3.load()

    # The shape counts stay unspecialised: Triton would otherwise compile a variant per divisibility by 16
    # of each (28 heads and 16, 14 parts and 16), and the probe's sweep or a new slot count would pay it.
    @triton.jit(do_not_specialize=["group", "heads", "splits", "per_split"])
    def fp8_kv_decode(q_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, used_ptr, o_ptr, acc_ptr, m_ptr, l_ptr,
                      qk_scale, group, heads, splits, per_split,
                      stride_qn, stride_qh, stride_kn, stride_kc, stride_kh, stride_vn, stride_vc, stride_vh,
                      stride_ksn, stride_ksc, stride_ksh, stride_vsn, stride_vsc, stride_vsh, stride_on, stride_oh,
                      DIRECT: tl.constexpr, WIDE: tl.constexpr, IEEE: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr, DIM: tl.constexpr, SHIFT: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)  # which per_split columns of the row (split-KV); 0 when DIRECT
        row64 = row.to(tl.int64)  # a big cache's row offset passes 2**31 elements
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, DIM)
        in_group = h < group  # the tile's rows past the group's heads are padding
        head = kvh * group + h
        q = tl.load(q_ptr + row64 * stride_qn + head[:, None] * stride_qh + d[None, :], mask=in_group[:, None],
                    other=0.0)
        if WIDE:  # the CPU interpreter's bf16 dot is wrong (see fp8_gemv): it multiplies in float32
            q = q.to(tl.float32)
        used = tl.load(used_ptr + row)
        k_row = k_ptr + row64 * stride_kn + kvh * stride_kh
        v_row = v_ptr + row64 * stride_vn + kvh * stride_vh
        ks_row = ks_ptr + row64 * stride_ksn + kvh * stride_ksh
        vs_row = vs_ptr + row64 * stride_vsn + kvh * stride_vsh
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores, log2 units
        l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_H, DIM], tl.float32)
        lo = part * per_split
        # A part starting at or past ``used`` runs no step and leaves (m, l) = (-inf, 0): the combine weighs it 0.
        for start in range(lo, tl.minimum(lo + per_split, used), BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            live = cols < used
            # e4m3 is exact in bf16 and fp16 (3 mantissa bits, exponents -9..8): widening loses nothing
            k = tl.load(k_row + cols[:, None] * stride_kc + d[None, :], mask=live[:, None], other=0.0)
            k = e4m3.tile(k, SHIFT)  # with SHIFT, 2^120 too small: qk_scale carries it back
            k_s = tl.load(ks_row + cols * stride_ksc, mask=live, other=0.0)
            if IEEE:  # a float32 model (the fp32 check against stock generate): no TF32 in its sums
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(q.dtype)))
            s = s * (k_s * qk_scale)[None, :]
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the step's first column is live
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_row + cols[:, None] * stride_vc + d[None, :], mask=live[:, None], other=0.0)
            v = e4m3.tile(v, SHIFT)
            v_s = tl.load(vs_row + cols * stride_vsc, mask=live, other=0.0)
            if SHIFT:
                v_s = v_s * 1.329227995784916e36  # e4m3.UNBIAS, 2^120
            if IEEE:
                pv = tl.dot((p * v_s[None, :]).to(q.dtype), v.to(q.dtype), input_precision="ieee")
            else:
                pv = tl.dot((p * v_s[None, :]).to(q.dtype), v.to(q.dtype))
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if DIRECT:  # one part: normalise and write the output; used 0 (never asked) gives zeros, not NaN
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + row64 * stride_on + head[:, None] * stride_oh + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=in_group[:, None])
        else:  # this part's unnormalised sums, [n, heads, splits(, DIM)]; fp8_kv_combine merges them
            at = (row64 * heads + head) * splits + part
            tl.store(m_ptr + at, m_i, mask=in_group)
            tl.store(l_ptr + at, l_i, mask=in_group)
            tl.store(acc_ptr + at[:, None] * DIM + d[None, :], acc, mask=in_group[:, None])

    @triton.jit(do_not_specialize=["heads", "splits"])
    def fp8_kv_combine(acc_ptr, m_ptr, l_ptr, o_ptr, heads, splits, stride_on, stride_oh,
                       BLOCK_S: tl.constexpr, DIM: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, DIM)
        real = s < splits
        at = (row * heads + head) * splits + s
        m = tl.load(m_ptr + at, mask=real, other=float("-inf"))
        l_s = tl.load(l_ptr + at, mask=real, other=0.0)
        top = tl.max(m, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # every part empty (used 0): weights 0, not NaN
        w = tl.exp2(m - top)  # an empty part's -inf gives 0
        total = tl.sum(l_s * w, 0)
        acc = tl.load(acc_ptr + at[:, None] * DIM + d[None, :], mask=real[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(o_ptr + row * stride_on + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))

    return fp8_kv_decode, fp8_kv_combine


def splits_of(n: int, n_kv: int, length: int, block_n: int, asked: int, device: torch.device) -> int:
    """The parts ``decode_attention`` cuts each row into: ``asked`` (``config["SPLITS"]``) made whole blocks,
    none past the end; 0 asks ``splits_for`` on CUDA, one part elsewhere."""
    if asked:
        return _whole_blocks(-(-length // block_n), asked)
    if device.type != "cuda":
        return 1
    return splits_for(n, n_kv, length, block_n, _sms(torch.cuda.current_device() if device.index is None
                                                      else device.index))


def splits_for(n: int, n_kv: int, length: int, block_n: int, sms: int) -> int:
    """Parts of each row's columns so that about PROGRAMS_PER_SM programs run on each of ``sms`` SMs.

    From the shapes only, never from ``used`` (no host sync: the call is
    captured in the decode step's CUDA graph); at most MAX_SPLITS and one
    part per ``block_n`` columns, each part whole blocks, none wholly past
    ``length``.  On an H100 (132 SMs), 7B pages (4 KV heads, 2,560 columns
    in blocks of 128): 10 parts at 1 row, 7 at 16, 2 at 71, 1 from 128 rows
    on (the probe's automatic column; a fixed 4 parts was 0.2% faster at 71).
    """
    blocks = -(-length // block_n)
    want = max(1, min(MAX_SPLITS, blocks, round(PROGRAMS_PER_SM * sms / (n * n_kv))))
    return _whole_blocks(blocks, want)


def _whole_blocks(blocks: int, want: int) -> int:
    per = -(-blocks // max(1, min(want, blocks)))
    return -(-blocks // per)


@functools.lru_cache(maxsize=8)
def _sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _check(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor, v_cache: torch.Tensor,
           v_scale: torch.Tensor, used: torch.Tensor) -> None:
    n, heads, dim = q.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[-1] != dim:
        raise ValueError(f"caches must be (slots, length, n_kv, {dim}), got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    slots, length, n_kv, _ = k_cache.shape
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head dim must be a power of two from 16 (tl.arange, tl.dot), got {dim}")
    if heads % n_kv or slots < n:
        raise ValueError(f"{heads} query heads over {n_kv} KV heads, {n} rows over {slots} slots")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float8_e4m3fn or t.stride(-1) != 1:  # a head's vector read in wide loads
            raise ValueError(f"{name} must be float8_e4m3fn with contiguous head vectors, got {t.dtype} "
                             f"strides {t.stride()}")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.shape != (slots, length, n_kv) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {(slots, length, n_kv)}, got {t.dtype} {tuple(t.shape)}")
    if used.shape != (n,) or used.dtype != torch.int32:
        raise ValueError(f"used must be int32 ({n},), got {used.dtype} {tuple(used.shape)}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor, v_cache: torch.Tensor,
                     v_scale: torch.Tensor, used: torch.Tensor, scale: float,
                     config: dict[str, int] | None = None) -> torch.Tensor:
    """Attention of each row's new query against its FP8 cache row: ``(n, heads * dim)`` in ``q.dtype``.

    Args:
        q: (n, heads, dim), bf16 on the GPU (fp16 works; fp32 takes full float32 dots, no TF32: the fp32
            check against stock ``generate``, session 11's call Q1, parted at token 25 with TF32).
        k_cache, v_cache: (slots >= n, length, n_kv, dim) float8_e4m3fn, token-major as the engine keeps
            it; rows 0..n-1 belong to the n queries.  Any strides but the last (``k[:n]`` of a bigger cache).
        k_scale, v_scale: (slots, length, n_kv) float32, ``quantize``'s scales.
        used: (n,) int32, the filled columns of each row, 1 <= used[i] <= length; nothing past them is read.
        scale: the softmax scale (head dim ** -0.5).
        config: overrides of ``CONFIG`` (``BLOCK_N``, ``num_warps``, ``num_stages``, ``SPLITS``; ``SHIFT``, how
            e4m3 is widened, ``e4m3``: the engine's, ``engine.fp8_widen``, without it).

    The same as ``reference`` up to accumulation order and bf16 rounding of
    the probabilities (as FlashAttention-2): the e4m3 values are exact in bf16.
    """
    _check(q, k_cache, k_scale, v_cache, v_scale, used)
    n, heads, dim = q.shape
    length, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = heads // n_kv
    c = CONFIG | {"SPLITS": 0} | (config or {})
    # How the kernel widens e4m3: converted (0) or its bits moved (1, 2).  Not under float16 queries: a
    # value 2^120 too small is zero there (and the 2^120 on the probabilities infinite).
    shift = e4m3.shift(c.get("SHIFT")) if q.dtype != torch.float16 else 0
    block_n = c["BLOCK_N"]
    splits = splits_of(n, n_kv, length, block_n, c["SPLITS"], q.device)
    per_split = -(-length // (splits * block_n)) * block_n  # whole blocks a part
    q = q if q.stride(-1) == 1 else q.contiguous()
    used = used.contiguous()  # read as used_ptr + row
    out = torch.empty((n, heads, dim), device=q.device, dtype=q.dtype)
    if splits == 1:
        acc = m = l_ = out  # not written (DIRECT)
    else:
        acc = torch.empty((n, heads, splits, dim), device=q.device, dtype=torch.float32)
        m = torch.empty((n, heads, splits), device=q.device, dtype=torch.float32)
        l_ = torch.empty((n, heads, splits), device=q.device, dtype=torch.float32)
    decode, combine = _kernels()
    keys, values = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if shift else (k_cache, v_cache)
    decode[(n, n_kv, splits)](
        q, keys, k_scale, values, v_scale, used, out, acc, m, l_,
        scale * _LOG2E * (e4m3.UNBIAS if shift else 1.0), group, heads, splits, per_split,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        k_scale.stride(2), v_scale.stride(0), v_scale.stride(1), v_scale.stride(2), out.stride(0), out.stride(1),
        DIRECT=splits == 1, WIDE=e4m3.interpreted(), IEEE=q.dtype == torch.float32,
        BLOCK_H=max(MIN_HEADS_TILE, 1 << (group - 1).bit_length()), BLOCK_N=block_n, DIM=dim, SHIFT=shift,
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    if splits > 1:
        combine[(n, heads)](acc, m, l_, out, heads, splits, out.stride(0), out.stride(1),
                            BLOCK_S=1 << (splits - 1).bit_length(), DIM=dim, num_warps=4)
    return out.reshape(n, heads * dim)


@torch.library.custom_op("vlwatch::fp8_kv_attention", mutates_args=())
def fp8_kv_attention(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor, v_cache: torch.Tensor,
                     v_scale: torch.Tensor, used: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel as an opaque op: torch.compile keeps it whole, CUDA graphs capture its launches."""
    return decode_attention(q, k_cache, k_scale, v_cache, v_scale, used, scale)


@fp8_kv_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor, v_cache: torch.Tensor,
      v_scale: torch.Tensor, used: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


#: The kernel's largest error against ``reference`` at load, relative to the output's largest value, beyond
#: which it is not used (the H100 probe's worst over 20 shapes: 6.5e-3, bf16 probabilities).
LOAD_TOLERANCE = 0.03


@functools.lru_cache(maxsize=8)
def runs(device: torch.device) -> bool:
    """Whether the kernel runs on ``device`` and agrees with ``reference`` there: tried once per device, at
    load (before any decode step is captured), on three rows of a small cache (one, half and all columns).

    False on a CPU, before compute capability 8.9 (no ``float8e4nv`` in Triton), without Triton, or when
    the kernel fails or disagrees (logged: the engine then keeps its cache in the model's dtype).
    """
    if not fp8_capable(device):
        return False
    try:
        _kernels()
        gen = torch.Generator().manual_seed(0)
        n, heads, n_kv, dim, length = 3, 8, 2, 128, 300
        q = torch.randn(n, heads, dim, generator=gen).to(device, torch.bfloat16)
        k, ks = quantize(torch.randn(n, length, n_kv, dim, generator=gen).to(device))
        v, vs = quantize(torch.randn(n, length, n_kv, dim, generator=gen).to(device))
        used = torch.tensor([1, length // 2, length], dtype=torch.int32, device=device)
        got = decode_attention(q, k, ks, v, vs, used, dim ** -0.5).float()
        want = reference(q, k, ks, v, vs, used, dim ** -0.5).float()
        err = float((got - want).abs().max() / want.abs().max())
    except Exception as exc:  # noqa: BLE001 - an old Triton, a driver without the instructions: whatever it raises
        if is_sticky_cuda_error(exc):
            raise
        log.warning("the FP8 KV cache's attention kernel does not run on %s (%s): the cache stays in the "
                    "model's dtype", device, exc)
        return False
    if not err <= LOAD_TOLERANCE:  # NaN too
        log.warning("the FP8 KV cache's attention kernel disagrees with its reference on %s (error %.3g of the "
                    "largest output, allowed %.3g): the cache stays in the model's dtype", device, err,
                    LOAD_TOLERANCE)
        return False
    log.debug("FP8 KV attention kernel checked on %s: error %.2g of the largest output", device, err)
    return True
