"""e4m3 bytes widened to bf16 inside vlwatch's Triton kernels: converted, or moved into place.

Both FP8 kernels (``fp8_gemv``'s weights, ``kv_fp8``'s keys and values)
read e4m3 from memory and widen it in registers before their ``tl.dot``.
Triton's ``x.to(tl.bfloat16)`` compiles, for sm_90, to one F2FP (two e4m3 to
two f16) and one F2F per element (f16 to bf16): 1.5 instructions an element
on the conversion unit, which gives 16 results a clock an SM on Hopper (CUDA
C++ guide, arithmetic instruction throughput, "all other type conversions").
For the few-row kernel that is ~50 us of a 7B gate/up at one row, which HBM
reads in ~48 us: the widening, not the memory, held both of session 11's
kernels at ~2.1 TB/s (benchmarks/NOTES.md, session 12; read off the kernel
compiled for sm_90 on a CPU, with ptxas and cuobjdump from the Triton wheel).

An e4m3 byte is exactly a bf16 2^120 too small once its sign is moved to
bit 15 and its other seven bits to bits 4-10: bf16 has float32's exponent
bias (127 against e4m3's 7) and range, so e4m3's subnormals land on bf16
subnormals of the same significand.  The kernels put ``UNBIAS`` (2^120, a
power of two: exact) back through a float32 scale they multiply by anyway.
``SHIFT`` 1 writes the move as Triton operations (which Triton compiles
element by element: three byte permutes each), 2 as eight PTX integer
instructions for four elements (``E4M3_TO_BF16_X4``, the way Triton writes its
own fp8 conversions).  The CPU interpreter cannot run PTX, so 2 runs as 1
there, and ``tests/test_e4m3.py`` runs the PTX text by hand.

``engine.fp8_widen`` (``convert`` or ``bits``) picks the engine's way for both
kernels (``configure``); ``convert`` until an H100 times ``bits``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from daemon.config import FP8_WIDENS

#: 2^120: the factor the moved bits are short of (float32 exponent bias 127 against e4m3's 7).
UNBIAS = 2.0**120
#: Four e4m3 bytes of one register ($2, element i in byte i) into two registers of two bf16 each ($0:
#: elements 0 and 1, $1: 2 and 3).  Each byte goes to the top of a 16-bit half (prmt), the half without its
#: sign moves down four bits, the sign goes back.
E4M3_TO_BF16_X4 = """{
.reg .b32 a<2>, b<2>;
prmt.b32 a0, 0, $2, 0x5140;
prmt.b32 a1, 0, $2, 0x7362;
lop3.b32 b0, a0, 0x7fff7fff, 0, 0xc0;
lop3.b32 b1, a1, 0x7fff7fff, 0, 0xc0;
shr.b32 b0, b0, 4;
shr.b32 b1, b1, 4;
lop3.b32 $0, b0, 0x80008000, a0, 0xf8;
lop3.b32 $1, b1, 0x80008000, a1, 0xf8;
}"""
assert UNBIAS == 1.329227995784916e36  # the literal the kernels multiply by (Triton wants literals there)
#: E4M3_TO_BF16_X4 as Triton's constexpr (``load`` sets it: Triton is imported late)
PTX_E4M3_TO_BF16_X4: Any = None
#: ``tile(w, SHIFT)``, the Triton function the kernels call as ``e4m3.tile`` (``load`` makes it: Triton is
#: imported late): an e4m3 tile as it is (SHIFT 0), or its bits moved into bf16 (1, 2); with SHIFT the tile
#: must have been loaded as bytes (a ``uint8`` view of the tensor).
tile: Any = None
#: How the engine's launches widen (``configure``): 0 converts, 2 moves bits in PTX.
_shift = 0


def configure(widen: str) -> None:
    """``engine.fp8_widen``: ``convert`` or ``bits``, for both FP8 kernels' launches from now on."""
    global _shift
    if widen not in FP8_WIDENS:
        raise ValueError(f"e4m3 widens by {' or '.join(FP8_WIDENS)}, asked for {widen!r}")
    _shift = 2 if widen == "bits" else 0


def widen() -> str:
    """The engine's way (``configure``): convert or bits."""
    return "bits" if _shift else "convert"


def shift(asked: int | None = None) -> int:
    """The ``SHIFT`` a launch compiles with: ``asked``, else the engine's; 2 becomes 1 in the interpreter."""
    value = _shift if asked is None else asked
    return 1 if value == 2 and interpreted() else value


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``: the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def load() -> None:
    """Make ``tile`` (a kernel module calls this before its kernels are compiled)."""
    # tl a global too: Triton's CPU interpreter looks for triton.language among the function's module globals
    global tile, PTX_E4M3_TO_BF16_X4, tl
    import triton
    import triton.language as tl

    # Triton takes a global into a jitted function only as a constexpr.
    PTX_E4M3_TO_BF16_X4 = tl.constexpr(E4M3_TO_BF16_X4)

    @triton.jit
    def widened(w, SHIFT: tl.constexpr):
        if SHIFT == 1:
            b = w.to(tl.uint16)
            w = (((b & 0x80) << 8) | ((b & 0x7F) << 4)).to(tl.bfloat16, bitcast=True)
        elif SHIFT == 2:
            w = tl.inline_asm_elementwise(asm=PTX_E4M3_TO_BF16_X4, constraints="=r,=r,r", args=[w],
                                          dtype=tl.bfloat16, is_pure=True, pack=4)
        return w

    tile = widened
