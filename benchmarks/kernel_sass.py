"""What a GPU would run, read on a machine without one: vlwatch's Triton kernels compiled for an NVIDIA target.

    python benchmarks/kernel_sass.py [--kernel fp8_rows|fp8_kv] [--shift 0|1|2] [--target 90] [--sass FILE]

``triton.compile`` builds for a target that is not present (``GPUTarget``);
ptxas and cuobjdump ship in the Triton wheel.  The arguments get the
alignment hints the JIT gives them at run time (``tt.divisibility`` 16 on
pointers, strides and sizes): without them the build has neither cp.async
nor 16-byte loads, and is another kernel.  Prints the instruction count,
registers, shared memory and the instructions that tell where the time goes
(F2F and F2FP run on the conversion unit: 16 results a clock an SM on
Hopper).  Session 12 found the FP8 kernels conversion-bound this way
(benchmarks/NOTES.md, "Why the FP8 kernel stops at 2.1 TB/s").  No timing:
that takes a GPU (``fp8_layer_graph.py``, ``kv_fp8_probe.py``).

``--tree DIR --sass FILE`` builds another checkout's kernels (say a ``git
worktree`` of an older commit) and writes their SASS with the parameter
offsets blanked: two such files that ``diff`` finds the same are the same
machine code (session 12 showed its refactors left the default kernels so).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else None
sys.path.insert(0, str(TREE or Path(__file__).resolve().parent.parent))

#: instructions worth counting: conversions, the integer moves that replace them, byte permutes, MMAs, async copies
SHOWN = ("F2F", "F2FP", "I2F", "PRMT", "LOP3", "SHF", "HMMA", "LDGSTS", "LDS", "FFMA", "MUFU", "ATOM", "ATOMG", "RED",
         "MEMBAR", "BAR")


def build(kernel: str, shift: int, target: int, warps: int, stages: int, split: int = 1, fuse: bool = False) -> Any:
    """The kernel compiled for ``sm_<target>`` with the engine's tile (fp8_rows: one row, 16-row tile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from daemon.backends.transformers import fp8_gemv, kv_fp8

    if kernel == "fp8_rows":
        fn = fp8_gemv._kernels()[0]
        c = fp8_gemv.CONFIG
        types = {"x_ptr": "*bf16", "w_ptr": "*u8" if shift else "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*fp32",
                 "y_ptr": "*fp32" if split > 1 else "*bf16", "o_ptr": "*bf16", "c_ptr": "*i32"}
        consts = {"HAS_BIAS": False, "WIDE": False, "SPLIT": split, "BM": 16, "BN": c["BN"], "BK": c["BK"],
                  "PROGRAMS": 0, "SHIFT": shift, "FUSE": fuse}
        unhinted = {"M"}  # the row count: 1 to 16, no alignment to promise
    else:
        fn = kv_fp8._kernels()[0]
        c = kv_fp8.CONFIG
        byte = "*u8" if shift else "*fp8e4nv"
        types = {"q_ptr": "*bf16", "k_ptr": byte, "ks_ptr": "*fp32", "v_ptr": byte, "vs_ptr": "*fp32",
                 "used_ptr": "*i32", "o_ptr": "*bf16", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                 "qk_scale": "fp32"}
        consts = {"DIRECT": True, "WIDE": False, "IEEE": False, "BLOCK_H": 16, "BLOCK_N": c["BLOCK_N"], "DIM": 128,
                  "SHIFT": shift}
        unhinted = {"group", "heads", "splits", "per_split", "qk_scale"}  # do_not_specialize, and a float
    names = fn.arg_names
    consts = {k: v for k, v in consts.items() if k in names}  # an older tree's kernel may take fewer
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n] != "constexpr" and n not in unhinted}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", target, 32), options={"num_warps": warps, "num_stages": stages})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=("fp8_rows", "fp8_kv"), default="fp8_rows")
    p.add_argument("--shift", type=int, choices=(0, 1, 2), default=0,
                   help="e4m3's widening (backends.transformers.e4m3)")
    p.add_argument("--target", type=int, default=90, help="compute capability x 10 (90: H100, 89: RTX 40xx)")
    p.add_argument("--split", type=int, default=1, help="fp8_rows: parts of K (split-K)")
    p.add_argument("--fuse", action="store_true", help="fp8_rows: the last part adds the parts up (FUSE)")
    p.add_argument("--sass", type=Path, help="write the disassembly here (parameter offsets blanked)")
    p.add_argument("--tree", type=Path, help="build this checkout's kernels instead (e.g. a git worktree)")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: this compiles, it does not interpret")
    import triton

    from daemon.backends.transformers import fp8_gemv, kv_fp8

    config = fp8_gemv.CONFIG if args.kernel == "fp8_rows" else kv_fp8.CONFIG
    k = build(args.kernel, args.shift, args.target, config["num_warps"], config["num_stages"], args.split, args.fuse)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(k.asm["cubin"])
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    regs = re.search(r"REG:(\d+)", usage)
    split = f" split {args.split}{' fused' if args.fuse else ''}" if args.kernel == "fp8_rows" else ""
    print(f"{args.kernel} SHIFT={args.shift}{split} sm_{args.target}: {sum(ops.values())} instructions, "
          f"{regs.group(1) if regs else '?'} registers, {k.metadata.shared} B shared; "
          + ", ".join(f"{op} {ops[op]}" for op in SHOWN if ops[op]))
    if args.sass:
        lines = [re.sub(r"/\*[0-9a-f]{4}\*/|/\* 0x[0-9a-f]+ \*/", "", line).strip() for line in sass.splitlines()
                 if "/*" in line and ";" in line]
        args.sass.write_text("\n".join(re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[param]", line) for line in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
