"""Issue 23: e4m3 bytes widened to bf16 inside the FP8 kernels (``e4m3``): the moved bits are the numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daemon.backends.transformers import e4m3


def _run_ptx(text: str, word: int) -> tuple[int, int]:
    """The few PTX instructions ``e4m3.E4M3_TO_BF16_X4`` uses, run by hand on one input register ($2)."""
    regs = {"$2": word, "0": 0}

    def val(arg: str) -> int:
        return regs[arg] if arg in regs else int(arg, 0)

    for line in text.strip().strip("{}").splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        if not op or op.startswith("."):
            continue
        d, *args = [a.strip() for a in rest.split(",")]
        if op == "prmt.b32":  # bytes 0-3 from the first source, 4-7 from the second, one selector nibble each
            pool = val(args[0]) | val(args[1]) << 32
            regs[d] = sum(((pool >> 8 * (val(args[2]) >> 4 * i & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "lop3.b32":  # each bit: the table's bit at (a, b, c)
            a, b, c, lut = (val(x) for x in args)
            regs[d] = sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))
        elif op == "shr.b32":
            regs[d] = val(args[0]) >> val(args[1])
        else:
            raise AssertionError(f"an instruction this test does not know: {op}")
    return regs["$0"], regs["$1"]


def test_the_ptx_widening_puts_each_e4m3_in_a_bf16_2_to_the_120_too_small() -> None:
    # SHIFT 2 runs only on a GPU; its eight instructions are run here by hand over every byte in every
    # position of the register, against the value torch gives each e4m3 byte.
    every = torch.arange(256, dtype=torch.uint8)
    want = every.view(torch.float8_e4m3fn).float() * 2.0**-120
    finite = ~want.isnan()  # 0x7f and 0xff are e4m3fn's NaN, which quantize_rows never writes
    for position in range(4):
        got = []
        for byte in range(256):
            lo, hi = _run_ptx(e4m3.E4M3_TO_BF16_X4, byte << 8 * position | 0x5A5A5A5A & ~(0xFF << 8 * position))
            half = (lo, lo >> 16, hi, hi >> 16)[position] & 0xFFFF
            got.append(half)
        as_bf16 = torch.tensor(got, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
        assert torch.equal(as_bf16[finite], want[finite]), f"byte position {position}"


def test_the_engine_way_is_checked_and_the_interpreter_runs_ptx_as_triton_operations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        assert (e4m3.widen(), e4m3.shift()) == ("convert", 0)
        e4m3.configure("bits")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert (e4m3.widen(), e4m3.shift(), e4m3.shift(0), e4m3.shift(1)) == ("bits", 2, 0, 1)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert e4m3.shift() == 1  # no PTX in the CPU interpreter: the same moves as Triton operations
        with pytest.raises(ValueError, match="convert or bits"):
            e4m3.configure("fast")
    finally:
        e4m3.configure("convert")


@pytest.mark.parametrize("kernel", ["fp8_rows", "fp8_kv"])
def test_moving_bits_leaves_no_conversion_instruction_in_either_kernel_built_for_an_h100(kernel: str) -> None:
    # benchmarks/kernel_sass.py compiles the kernel for sm_90 here (ptxas ships in the Triton wheel): the
    # PTX must assemble, and with bits no F2F (f16 to bf16, the conversion unit) may be left in the loop.
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no ptxas")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--kernel", kernel, "--shift", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{kernel} SHIFT=2") and "sm_90:" in line and "HMMA" in line, line
    assert "F2F " not in line, line
