"""The decode attention alone, FlashAttention-2 (what the step runs) against FlexAttention's decoding kernel.

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/probe_decode_attention.py [--slots 256] [--cache 2560] [--out DIR]

One decode step's attention for one layer of Qwen2.5-VL-7B (28 query heads,
4 KV heads, head dim 128), every row one new token against its own cache
row, the rows filled to ~2074 tokens (a page's prompt plus half its 768
new tokens) or ragged (1690-2458).  FlashAttention-2's varlen entry (the
engine's ``decode_step.attend``) swaps the 7 query heads of a group into
rows but still computes on a 128-row tile; FlexAttention's decoding kernel
(``torch.compile``) splits the keys and packs a group's heads into a small
tile.  For each: the time per call (``profile_decode.cuda_ms``: CUDA events,
median of 3 x 40; call D17 ran 5 x 50), the
cache bandwidth it reaches, and its largest difference from the first.
The cache is token-major (slot, column, KV head, dim) as the engine keeps
it; flex also runs on a head-major copy, to see what the layout costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.profile_decode import cuda_ms  # noqa: E402
from daemon.backends.transformers.decode_step import Where, attend  # noqa: E402

HEADS, KV, DIM = 28, 4, 128
BLOCK = 128


def flex_block_mask(used: torch.Tensor, cache: int) -> Any:
    """Each row's filled columns as FlexAttention blocks: whole blocks below ``used``, then one partial."""
    from torch.nn.attention.flex_attention import BlockMask

    n = used.shape[0]
    blocks = cache // BLOCK
    full = (used // BLOCK).to(torch.int32)
    partial = (used % BLOCK > 0).to(torch.int32)
    order = torch.arange(blocks, device=used.device, dtype=torch.int32).expand(n, blocks)
    kv_indices = torch.where(order == 0, full[:, None], order).contiguous()  # the partial block first

    def below(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return kv < used[b]

    return BlockMask.from_kv_blocks(partial.view(n, 1, 1), kv_indices.view(n, 1, 1, blocks),
                                    full.view(n, 1, 1), order.contiguous().view(n, 1, 1, blocks),
                                    BLOCK_SIZE=BLOCK, mask_mod=below, seq_lengths=(1, cache),
                                    compute_q_blocks=False)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--cache", type=int, default=2560)
    p.add_argument("--out", type=Path, default=Path("/tmp/probe-decode-attention"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    dev, n, cache = torch.device("cuda"), args.slots, args.cache
    k_cache = torch.randn(n, cache, KV, DIM, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn(n, cache, KV, DIM, device=dev, dtype=torch.bfloat16)
    k_heads, v_heads = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    q = torch.randn(n, HEADS, DIM, device=dev, dtype=torch.bfloat16)
    scale = DIM ** -0.5
    compiled = torch.compile(flex_attention, dynamic=False)
    report: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "slots": n,
                              "cache": cache, "cases": {}}
    for case, used in (("uniform 2074", torch.full((n,), 2074, device=dev)),
                       ("ragged 1690-2458", torch.randint(1690, 2459, (n,), device=dev))):
        used32 = used.to(torch.int32)
        where = Where(torch.arange(n, device=dev), used - 1, None, used32,
                      torch.arange(n + 1, device=dev, dtype=torch.int32),
                      torch.arange(n + 1, device=dev, dtype=torch.int32) * cache)
        read_gb = float(used.sum()) * KV * DIM * 2 * 2 / 1e9

        def flash() -> torch.Tensor:
            return attend(q, k_cache, v_cache, where, scale, HEADS // KV, "flash")

        mask = flex_block_mask(used, cache)

        def flex_tokens() -> torch.Tensor:  # the engine's token-major cache, as strided views
            return compiled(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2), block_mask=mask,
                            scale=scale, enable_gqa=True)[:, :, 0].reshape(n, HEADS * DIM)

        def flex_heads() -> torch.Tensor:  # a head-major cache
            return compiled(q[:, :, None], k_heads, v_heads, block_mask=mask, scale=scale,
                            enable_gqa=True)[:, :, 0].reshape(n, HEADS * DIM)

        def mask_and_flex() -> torch.Tensor:  # with the block mask built as each step would
            return compiled(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                            block_mask=flex_block_mask(used, cache), scale=scale,
                            enable_gqa=True)[:, :, 0].reshape(n, HEADS * DIM)

        reference = flash().float()
        rows = {}
        for name, fn in (("flash (FA2 varlen, the engine)", flash), ("flex, token-major views", flex_tokens),
                         ("flex, head-major cache", flex_heads), ("flex + block mask per call", mask_and_flex)):
            try:
                ms = cuda_ms(fn)
                diff = (fn().float() - reference).abs().max().item()
                rows[name] = {"ms": round(ms, 4), "TB/s": round(read_gb / ms, 2), "max_abs_diff": diff}
            except Exception as exc:  # a kernel that does not take these shapes or strides
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(case, name, rows[name], flush=True)
        report["cases"][case] = {"cache_read_gb": round(read_gb, 3), **rows}
    (args.out / "probe_decode_attention.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
