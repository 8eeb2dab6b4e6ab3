"""FP8 weights times a few bf16 rows: the decode of a small batch (issue 23, batch 1).

With one to a few dozen rows a linear layer is bound by reading its weight,
which FP8 halves.  ``torch._scaled_mm`` does not get there: its row-wise
CUTLASS kernels are tiled for many rows, and the activations must first be
quantized by a kernel of their own; session 4 measured FP8 at batch 1 *slower*
than bf16 (1.358 s against 1.292 s for one image and 256 tokens, H200), and
the H100 probe (session 5) found ``_scaled_mm`` no faster than bf16 at 32 and
64 rows either (206-208 us a 7B layer against 207-211), where this kernel took
145 us at 16 rows.  Rows come in tiles of 16, 32, 64 or 128 (``block_m``); how
many rows take the kernel is ``engine.fp8_rows_max`` (16 until an H100 measures
the wider tiles).

This kernel reads the FP8 weight once, widens it to bf16 in registers and
multiplies it with the activations as they are (weight-only FP8, "W8A16", as
vLLM's Marlin FP8 kernel does on cards without FP8 tensor cores): no
activation quantization, so the result is closer to the bf16 model than the
many-row path, and the reference for these rows is the dequantized weight
times the unrounded activations (``fp8.fp8_linear``'s ``emulate`` knows the
threshold).

Why by hand: no library on the device does this (vLLM's Marlin and
FBGEMM's FP8 GEMV are not installed there, torchao is not either), and
Triton is: the kernel is ~30 lines and runs inside the compiled decode step
and its CUDA graph as an opaque custom op.  ``TRITON_INTERPRET=1`` runs it on
a CPU (the tests).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from daemon.backends.transformers import e4m3

#: Rows up to which a CUDA FP8 linear takes this kernel instead of ``_scaled_mm`` by default (decode with
#: few slots): it was faster at every row count up to 16 on the H100 (benchmarks/fp8_gemv_probe.py), the
#: widest it then took.  ``engine.fp8_rows_max`` moves it, up to ``MAX_ROWS``.
SMALL_M = 16
#: The most rows one launch takes: one tile of rows, every weight tile read once (``block_m``).  128
#: covers the slots a memory cap leaves for pages (71 for the 7B in fp8 under 22 GiB).
MAX_ROWS = 128


#: Whether few-row FP8 linears take this kernel: asked for (``engine.fp8_rows_kernel``), Triton runs, and
#: the kernel passed its probe.  A module global that ``configure`` sets outside torch.compile's tracing,
#: so the compiled decode step reads a constant.
_enabled = False
#: the kernel failed its probe on a device (``fp8.scaled_mm_works``): off for the process
_broken = False
#: parts of K per output tile when the caller names none (``engine.fp8_rows_split``; 0: ``split_for``)
_split = 0
#: rows up to which FP8 linears take the kernel (``engine.fp8_rows_max``)
_rows = SMALL_M


def configure(wanted: bool, *, split: int = 0, rows: int = SMALL_M) -> None:
    """Use the kernel or not (``engine.fp8_rows_kernel``), its split-K (``engine.fp8_rows_split``) and up to
    how many rows (``engine.fp8_rows_max``), where Triton runs; the loader calls it before FP8 layers exist.
    How it widens the weight is ``e4m3.configure``'s (``engine.fp8_widen``)."""
    global _enabled, _split, _rows
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"fp8_gemv takes 1 to {MAX_ROWS} rows, asked for {rows}")
    _enabled = wanted and not _broken and _triton_imports()
    _split, _rows = split, rows


def split() -> int:
    """The split-K the engine's launches use (``configure``)."""
    return _split


def rows() -> int:
    """Rows up to which FP8 linears take the kernel (``configure``)."""
    return _rows


def block_m(m: int) -> int:
    """The row tile for ``m`` rows: 16 (``tl.dot``'s smallest), 32, 64 or 128; every row in one tile, so
    each weight tile is read from memory once whatever the row count."""
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"fp8_gemv takes 1 to {MAX_ROWS} rows, got {m}")
    return max(16, 1 << (m - 1).bit_length())


def enabled() -> bool:
    return _enabled


def limit_rows(rows: int) -> None:
    """Take at most ``rows`` rows from now on (a wider tile failed its probe: ``fp8.scaled_mm_works``)."""
    global _rows
    _rows = min(_rows, rows)


def disable() -> None:
    """Send every row count to ``_scaled_mm`` for good (the kernel failed its probe: ``fp8.scaled_mm_works``)."""
    global _enabled, _broken
    _enabled, _broken = False, True


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    try:
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a Triton that cannot find its driver
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    e4m3.load()

    @triton.jit
    def widen_tile(w, SHIFT: tl.constexpr, WIDE: tl.constexpr):
        """An e4m3 tile as bf16 (float32 in the interpreter); with SHIFT, read as bytes and 2^120 too small."""
        w = e4m3.tile(w, SHIFT)
        if WIDE:  # the CPU interpreter's bf16 dot is wrong (Triton 3.9): it multiplies in float32
            w = w.to(tl.float32)
        else:
            w = w.to(tl.bfloat16)
        return w

    @triton.jit
    def finish(acc, s_ptr, b_ptr, y_ptr, rows, cols, M, N, stride_ym, HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr):
        """An output tile's float32 sums times the row scales (and 2^120 with SHIFT), plus the bias, stored."""
        scale = tl.load(s_ptr + cols, mask=cols < N, other=0.0)
        if SHIFT:
            scale = scale * 1.329227995784916e36  # e4m3.UNBIAS, 2^120
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    @triton.jit
    def fp8_rows_tile(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, o_ptr, c_ptr, tile, part, M, N, K, K_PER,
                      stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SHIFT: tl.constexpr,
                      FUSE: tl.constexpr):
        rows = tl.arange(0, BM)
        cols = tile * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = part * K_PER  # which K_PER columns of K (split-K); 0 when SPLIT is 1
        for k0 in range(k_lo, tl.minimum(k_lo + K_PER, K), BK):
            k = k0 + ks
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                        mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :],
                        mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
            if WIDE:
                acc += tl.dot(x.to(tl.float32), tl.trans(widen_tile(w, SHIFT, WIDE)))
            else:
                acc += tl.dot(x, tl.trans(widen_tile(w, SHIFT, WIDE)))
        if SPLIT == 1:
            finish(acc, s_ptr, b_ptr, y_ptr, rows, cols, M, N, stride_ym, HAS_BIAS, SHIFT)
        else:  # this part's fp32 sums, [SPLIT, M, N]: fp8_rows_reduce adds them up, or with FUSE the last part
            inside = (rows[:, None] < M) & (cols[None, :] < N)
            tl.store(y_ptr + part * M * N + rows[:, None] * N + cols[None, :], acc, mask=inside)
            if FUSE:
                # CUTLASS's serial split-K: every thread's sums stored, then one release by the program; the
                # part that counts last reads them all from L2 (.cg) in order (the reduce kernel's bits), writes
                # the output (o_ptr) and zeroes the tile's counter for the next launch.
                tl.debug_barrier()
                if tl.atomic_add(c_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                    total = tl.zeros((BM, BN), dtype=tl.float32)
                    for p in tl.static_range(SPLIT):
                        total += tl.load(y_ptr + p * M * N + rows[:, None] * N + cols[None, :], mask=inside,
                                         other=0.0, cache_modifier=".cg")
                    finish(total, s_ptr, b_ptr, o_ptr, rows, cols, M, N, stride_ym, HAS_BIAS, SHIFT)
                    tl.atomic_xchg(c_ptr + tile, 0, sem="relaxed", scope="gpu")

    # Triton looks a jitted function's callees up among its module's globals, not in this closure.
    globals().update(widen_tile=widen_tile, finish=finish, fp8_rows_tile=fp8_rows_tile)

    @triton.jit
    def fp8_rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, o_ptr, c_ptr, M, N, K, K_PER,
                        stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr,
                        SHIFT: tl.constexpr, FUSE: tl.constexpr):
        if PROGRAMS == 0:  # a program for each output tile and part: grid (tiles, SPLIT)
            fp8_rows_tile(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, o_ptr, c_ptr, tl.program_id(0), tl.program_id(1),
                          M, N, K, K_PER, stride_xm, stride_wn, stride_ym, HAS_BIAS, WIDE, SPLIT, BM, BN, BK, SHIFT,
                          FUSE)
        else:  # persistent: PROGRAMS programs take the (tile, part) pairs in turn, loads pipelined across them
            for item in tl.range(tl.program_id(0), tl.cdiv(N, BN) * SPLIT, PROGRAMS, flatten=True):
                fp8_rows_tile(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, o_ptr, c_ptr, item // SPLIT, item % SPLIT,
                              M, N, K, K_PER, stride_xm, stride_wn, stride_ym, HAS_BIAS, WIDE, SPLIT, BM, BN, BK,
                              SHIFT, FUSE)

    @triton.jit
    def fp8_rows_reduce(p_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_ym,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        SHIFT: tl.constexpr):
        pid = tl.program_id(0)
        rows = tl.arange(0, BM)
        cols = pid * BN + tl.arange(0, BN)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for part in tl.static_range(SPLIT):
            acc += tl.load(p_ptr + part * M * N + rows[:, None] * N + cols[None, :], mask=inside, other=0.0)
        finish(acc, s_ptr, b_ptr, y_ptr, rows, cols, M, N, stride_ym, HAS_BIAS, SHIFT)

    return fp8_rows_kernel, fp8_rows_reduce


#: Tile and pipeline: ``BN`` output rows per program (enough programs to fill the card for the narrowest
#: layer, 3584 rows: 112 of 32), ``BK`` columns per step, loads ``stages`` deep.  The fastest of 18 in the
#: H100 sweep (benchmarks/results/h100-s5-fp8-gemv-probe.json): 142.8 us for a 7B layer's four projections
#: at one row, against 150.5 for (32, 256, 4 stages) and 200-220 for 16-row tiles.  A ``config`` given to
#: ``launch`` may also name ``SPLIT``, the parts of K each output tile is cut into (split-K, then one small
#: kernel adds the parts up; 0 chooses by the card's SMs, ``split_for``); without it the engine's
#: ``engine.fp8_rows_split`` applies (``configure``), 0 by default: the narrow layers (o, q/k/v, down:
#: 112-144 programs for 132 SMs) read their weight at ~0.9-1.4 TB/s against gate/up's 2.1 at one part
#: (session 6, call L4), and the automatic split took batch 1 from 1.285 to 1.153 s on an H100 (session 8).
CONFIG = {"BN": 32, "BK": 512, "num_warps": 4, "num_stages": 3}
#: The wider row tiles' defaults, by ``block_m``, until the probe (benchmarks/fp8_gemv_probe.py) sweeps them on an H100:
#: a 64-row tile of activations at BK 512 would take 64 KiB of shared memory a stage, so BK halves there,
#: and again at 128 rows.
CONFIGS = {16: CONFIG, 32: {"BN": 32, "BK": 512, "num_warps": 4, "num_stages": 3},
           64: {"BN": 32, "BK": 256, "num_warps": 4, "num_stages": 3},
           128: {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 3}}
# ``SHIFT`` in a ``launch`` config: how the weight is widened (``e4m3``): 0 converted, 1 or 2 its bits moved
# (Triton's operations, PTX), 2^120 then going into the row scale.  Without it, the engine's
# (``engine.fp8_widen``, ``e4m3.configure``).

#: Programs per SM that split-K aims at (gate/up, 1,184 programs, ~9 an SM, reads at 2.1 TB/s).
PROGRAMS_PER_SM = 4
# ``FUSE`` in a ``launch`` config: 1 drops split-K's second kernel; the part that finishes a tile last adds
# the parts up (``fp8_rows_tile``), saving a launch a split projection (three a layer; ~2-3 us each inside a
# CUDA graph at one row).  0 (the engine's) until a GPU shows it the same bits and faster.
# ``PERSIST`` in a ``launch`` config: 0 (the engine's, until measured) starts a program for each output tile
# and part; N > 0 starts N programs an SM that take the tiles in turn, keeping their loads in flight from one
# tile into the next (Triton's ``tl.range(..., flatten=True)``, as its persistent-matmul tutorial does).  Tried
# because gate/up's 1,184 programs each read only 7 steps of 16 KiB, and the last of their waves runs part of
# the card; session 12 then traced the kernel's ~2.1 TB/s to the widening (``e4m3``).
# ``benchmarks/fp8_layer_graph.py`` times both.


def split_for(n: int, k: int, bn: int, bk: int, sms: int) -> int:
    """Parts of K for an ``n`` x ``k`` weight so that about PROGRAMS_PER_SM programs run on each of ``sms``
    SMs (1 where the output tiles alone reach that), at most one part per ``bk`` step and at most 8."""
    tiles, steps = -(-n // bn), -(-k // bk)
    want = max(1, min(8, steps, round(PROGRAMS_PER_SM * sms / tiles)))
    per = -(-steps // want)
    return -(-steps // per)  # no empty part


@functools.lru_cache(maxsize=8)
def _sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           config: dict[str, int] | None = None) -> torch.Tensor:
    """``x`` [M <= 128, K] bf16 times FP8 ``weight`` [N, K] with row scales [N] (+ bias) -> [M, N] bf16."""
    m, k = x.shape
    n = weight.shape[0]
    bm = block_m(m)
    c = CONFIGS[bm] | {"SPLIT": _split} | (config or {})
    bn, bk = c["BN"], c["BK"]
    split = c["SPLIT"] or (split_for(n, k, bn, bk, _sms(x.device.index or 0)) if x.is_cuda else 1)
    x = x.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    scale = scale.reshape(-1).float()
    b = bias if bias is not None else scale
    tiles = -(-n // bn)
    k_per = -(-(-(-k // bk)) // split) * bk  # whole BK steps per part
    main, reduce = _kernels()
    out = y if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    persist = c.get("PERSIST", 0)
    # (Triton's CPU interpreter counts as two SMs, so that the tests see a program take several tiles.)
    programs = min(tiles * split, persist * (_sms(x.device.index or 0) if x.is_cuda else 2)) if persist else 0
    grid = (programs,) if programs else (tiles, split)
    shift = e4m3.shift(c.get("SHIFT"))
    w = weight.view(torch.uint8) if shift else weight
    fuse = split > 1 and bool(c.get("FUSE", 0))
    counts = _counters(x.device, tiles) if fuse else scale  # (not read without FUSE)
    main[grid](x, w, scale, b, out, y, counts, m, n, k, k_per, x.stride(0), weight.stride(0), y.stride(0),
               HAS_BIAS=bias is not None, WIDE=e4m3.interpreted(), SPLIT=split, BM=bm, BN=bn, BK=bk, PROGRAMS=programs,
               SHIFT=shift, FUSE=fuse, num_warps=c["num_warps"], num_stages=c["num_stages"])
    if split > 1 and not fuse:
        reduce[(tiles,)](out, scale, b, y, m, n, y.stride(0), HAS_BIAS=bias is not None, SPLIT=split,
                         BM=bm, BN=bn, SHIFT=shift, num_warps=4)
    return y


#: Output tiles a ``FUSE`` launch may count (7B gate/up at BN 16: 2,368).
MAX_TILES = 8192


@functools.lru_cache(maxsize=8)
def _counter_buffer(device: torch.device) -> torch.Tensor:
    return torch.zeros(MAX_TILES, device=device, dtype=torch.int32)


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The per-tile counters of ``FUSE``, zero between launches (each launch's last parts zero theirs).

    One buffer a device, made at the first ``FUSE`` launch, which must come before any CUDA graph capture
    (the probes' eager calls do): launches on one stream run one after another, so they can share it.
    """
    if tiles > MAX_TILES:
        raise ValueError(f"fp8_gemv FUSE counts at most {MAX_TILES} output tiles, asked for {tiles}")
    return _counter_buffer(device)


@torch.library.custom_op("vlwatch::fp8_rows", mutates_args=())
def fp8_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel as an opaque op: torch.compile keeps it whole, CUDA graphs capture its launch."""
    return launch(x, weight, scale, bias)


@fp8_rows.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
