"""Faster forwards for stock transformers modules, used by prefill (and the compile helpers).

The slot engine (``slots``) replaces the generation loop; this module
speeds up the stock modules that prefill still runs, in place, switchable
back to stock (``enabled``: the bench's baseline and ``bench --verify``):

- ``VisionAttentionPatch``: the vision tower's windowed attention in a few
  calls instead of one per window, its norms and MLPs compiled;
- ``TextPrefillPatch``: the text layers' RMSNorms and MLPs compiled for
  prefill (one prompt of ~1400 tokens: the element-wise work between the
  GEMMs, 8% of a prefill on an H100, benchmarks/NOTES.md);
- ``pad_vision_mlp``: the vision MLP width padded for the Hopper GEMM kernels;
- ``Compiled``, ``compile_enabled``: torch.compile with a fallback to eager,
  where the config's ``engine.compile`` wants it.
"""

from __future__ import annotations

import logging
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F

from daemon.backends import reraise_if_fatal
from daemon.backends.transformers.qwen2_5_vl import allow_shared_compiles, flash_varlen, stock_vision_rotary
from daemon.backends.transformers.prefill_step import vision_block

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- vision tower


class VisionAttentionPatch:
    """Replace the vision blocks' attention forward: equal-length windows in one call.

    The stock forward (without flash-attn) splits the sequence at every window
    boundary and calls attention once per window: about 100 calls per
    1036x1036 image in each of 28 windowed layers.  Windows come in a few
    lengths only (full 8x8-patch windows, and the clipped ones at the right and
    bottom edges), so grouping by length makes it 2-4 calls per layer with no
    padding and no mask, which the fused SDPA kernels take.  Where
    ``torch.nn.attention.varlen.varlen_attn`` exists and works (CUDA, half
    precision), one varlen call per layer is used instead.

    With ``compile`` (CUDA), the blocks' RMSNorms and MLPs and the rotary
    embedding also run through ``torch.compile`` (dynamic shapes: one compile
    serves every image size), which fuses their element-wise work (fp32
    upcasts, silu, bias adds): the tower's GPU time per 1036x1036 image went
    from 38 to about 21 ms.  Its fixed cost per call is why prefill runs the
    tower on several images at once (``VISION_BATCH_PATCHES``).

    ``enabled`` switches back to the stock forwards (the bench's baseline).
    """

    def __init__(self, model: Any, *, varlen: bool = False, compile: bool = False, fused_blocks: bool = True) -> None:
        self._stock_rotary: Callable[..., Any] = stock_vision_rotary()
        self._rotary = self._stock_rotary
        self.enabled = True
        self.use_compiled = compile
        self.last_path = ""  # what the last call used: "varlen_attn" or "grouped sdpa"
        # varlen is opt-in (engine.vision_varlen): on the H100 it was 4% faster
        # than grouped SDPA but not bit-equal to the stock tower (benchmarks/NOTES.md).
        self.varlen = _varlen_attn() if varlen else None
        self._plans: dict[int, tuple[torch.Tensor, Any]] = {}
        blocks = list(model.model.visual.blocks)
        self.modules = [blk.attn for blk in blocks]
        for module in self.modules:
            stock = module.forward
            module.forward = types.MethodType(self._forward_for(stock), module)
        self._block: Compiled | None = None
        if compile and fused_blocks and _fused_blocks(model):
            # Each block as one compiled call (prefill_step.vision_block): the
            # tower's ~30 launches per block were its host cost, larger than
            # its GPU time on an H100 (benchmarks/NOTES.md, call D12).
            allow_shared_compiles()
            self._block = Compiled(vision_block, dynamic=None)  # the patches' count only: see rows_vary
            for blk in blocks:
                blk.forward = types.MethodType(self._block_forward(blk.forward), blk)
        if compile:
            allow_shared_compiles()
            self._rotary = Compiled(self._stock_rotary, dynamic=True)
            norm = Compiled(type(blocks[0].norm1).forward, dynamic=True)
            mlp = Compiled(type(blocks[0].mlp).forward, dynamic=True)
            for blk in blocks:
                for module, fn in ((blk.norm1, norm), (blk.norm2, norm), (blk.mlp, mlp)):
                    module.forward = types.MethodType(self._switch(fn, module.forward), module)

    def _switch(self, compiled: Callable[..., Any], stock: Callable[..., Any]) -> Callable[..., Any]:
        return _switched(compiled, stock, lambda args: self.enabled and self.use_compiled)

    def without_flash(self) -> None:
        """The blocks' stock forwards instead of ``vision_block`` (FlashAttention's check at load failed)."""
        self._block = None

    def _forward_for(self, stock: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        patch = self

        def forward(module: Any, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                    max_seqlen: int | None = None, **kwargs: Any) -> torch.Tensor:
            if not patch.enabled or position_embeddings is None:
                return stock(hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                             max_seqlen=max_seqlen, **kwargs)
            return patch.attention(module, hidden_states, cu_seqlens, position_embeddings)

        return forward

    def _block_forward(self, stock: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        patch = self

        def forward(blk: Any, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                    **kwargs: Any) -> torch.Tensor:
            # FlashAttention's varlen kernel takes half precision only: a model moved to float32 after
            # loading (benchmarks/fp8_check.py's reference) runs the stock block.
            if (patch._block is None or not patch.enabled or not patch.use_compiled or position_embeddings is None
                    or not hidden_states.is_cuda or hidden_states.dtype not in (torch.float16, torch.bfloat16)):
                return stock(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
            plan = patch.plan(cu_seqlens)
            attn, mlp = blk.attn, blk.mlp
            cos, sin = position_embeddings
            rows_vary(hidden_states, cos, sin, plan["cu32"])
            patch.last_path = "fused blocks, varlen flash"
            return patch._block(hidden_states, cos, sin, plan["cu32"], plan["longest"], blk.norm1.weight,
                                blk.norm2.weight, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                                mlp.gate_proj.weight, mlp.gate_proj.bias, mlp.up_proj.weight, mlp.up_proj.bias,
                                mlp.down_proj.weight, mlp.down_proj.bias, attn.num_heads, attn.scaling,
                                blk.norm1.variance_epsilon)

        return forward

    def attention(self, module: Any, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seq = hidden.shape[0]
        q, k, v = module.qkv(hidden).reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = (self._rotary if self.use_compiled else self._stock_rotary)(q, k, cos, sin)
        out = self._packed(q, k, v, cu_seqlens, module.scaling)
        return module.proj(out.reshape(seq, -1))

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                scale: float) -> torch.Tensor:
        """Attention within each [cu[i], cu[i+1]) span of (seq, heads, dim) tensors."""
        plan = self.plan(cu)
        if self.varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            try:
                cu32, longest = plan["cu32"], plan["longest"]
                self.last_path = "varlen_attn"
                return self.varlen(q, k.contiguous(), v.contiguous(), cu32, cu32, longest, longest, scale=scale)
            except Exception as exc:  # an older or partial varlen build: keep the portable path
                log.warning("varlen attention failed (%s); using grouped SDPA", exc)
                self.varlen = None
        self.last_path = "grouped sdpa"
        out = torch.empty_like(q)
        for index in plan["groups"]:  # index: (windows, length) token positions
            m, n = index.shape
            take = index.reshape(-1)
            qg, kg, vg = (t.index_select(0, take).view(m, n, t.shape[1], t.shape[2]).transpose(1, 2)
                          for t in (q, k, v))
            og = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
            out.index_copy_(0, take, og.transpose(1, 2).reshape(m * n, q.shape[1], q.shape[2]))
        return out

    def plan(self, cu: torch.Tensor) -> dict[str, Any]:
        """The grouping of ``cu``'s spans: the one told ahead (``plan_for``), else worked out (a host read)."""
        # The same cu_seqlens tensor is passed to every block of one forward:
        # work out its grouping once (one device sync) rather than per block,
        # or not at all where the caller gave the bounds with it (plan_for).
        hit = self._plans.get(id(cu))
        if hit is not None and hit[0] is cu:
            return hit[1]
        return self.plan_for(cu, cu.tolist(), lambda t: t.to(cu.device))

    def plan_for(self, cu: torch.Tensor, bounds: list[int],
                 to_device: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Group the spans of ``cu`` (on the GPU), whose values ``bounds`` the caller has on the host.

        The index tensors are built on the CPU and sent with ``to_device``
        (the engine's page-locked staging): neither reading ``cu`` nor a
        copy from pageable memory waits for the work queued on the GPU.
        """
        by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                by_length.setdefault(end - start, []).append(start)
        groups = [to_device(torch.tensor(starts)[:, None] + torch.arange(length)[None, :])
                  for length, starts in by_length.items()]
        plan = {"groups": groups, "cu32": cu if cu.dtype == torch.int32 else cu.to(torch.int32),
                "longest": max(by_length, default=0)}
        # The oldest goes (dicts keep insertion order): clearing them all when
        # full once dropped the plan of the round's other cu_seqlens, told a
        # moment before, and the tower then read it from the GPU, a sync
        # (benchmarks/NOTES.md, call D15).
        while len(self._plans) >= 8:
            del self._plans[next(iter(self._plans))]
        self._plans[id(cu)] = (cu, plan)
        return plan


def pad_vision_mlp(model: Any, multiple: int = 64) -> bool:
    """Zero-pad the vision MLPs' hidden width (3420 in the 7B) to a multiple of ``multiple``.

    A width of 3420 bf16 values is 6840 bytes, not a multiple of 16: cuBLAS
    then cannot use the Hopper (TMA) GEMM kernels and runs these three GEMMs
    per block on an sm80 kernel at about 210 TFLOP/s, 40% of the tower's GPU
    time (probe, H100).  The padded units are exactly zero (zero weights and
    bias: silu(0) * 0 = 0, and their down-projection columns are zero), so the
    output is the same function.  Returns whether anything was padded.
    """
    padded = False
    for blk in model.model.visual.blocks:
        mlp = blk.mlp
        width = mlp.gate_proj.out_features
        extra = -width % multiple
        if extra == 0:
            continue
        with torch.no_grad():
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight = torch.nn.Parameter(F.pad(proj.weight, (0, 0, 0, extra)), requires_grad=False)
                if proj.bias is not None:
                    proj.bias = torch.nn.Parameter(F.pad(proj.bias, (0, extra)), requires_grad=False)
                proj.out_features = width + extra
            down = mlp.down_proj
            down.weight = torch.nn.Parameter(F.pad(down.weight, (0, extra)), requires_grad=False)
            down.in_features = width + extra
        padded = True
    return padded


class TextPrefillPatch:
    """The text decoder layers' RMSNorms and MLPs through torch.compile (dynamic shapes), for prefill.

    A prefill runs the stock decoder layers on one prompt; between its GEMMs
    each RMSNorm is ~8 element-wise kernels in fp32 and each MLP a separate
    silu and multiply.  Compiled, each fuses into one or two kernels
    (measured on an H100: 69.0 -> 63.7 ms per 1036x1036 image, vision
    included).  The decode step has its own compiled layer and does not
    use these, and a CUDA graph capture always takes the stock forward.
    """

    def __init__(self, model: Any) -> None:
        allow_shared_compiles()
        self.enabled = True
        layers = list(model.model.language_model.layers)
        norm = Compiled(type(layers[0].input_layernorm).forward, dynamic=True)
        mlp = Compiled(type(layers[0].mlp).forward, dynamic=True)
        for layer in layers:
            for module, fn in ((layer.input_layernorm, norm), (layer.post_attention_layernorm, norm),
                               (layer.mlp, mlp)):
                module.forward = types.MethodType(self._switch(fn, module.forward), module)

    def _switch(self, compiled: Callable[..., Any], stock: Callable[..., Any]) -> Callable[..., Any]:
        return _switched(compiled, stock,
                         lambda args: self.enabled and not (args[0].is_cuda and torch.cuda.is_current_stream_capturing()))


def _switched(compiled: Callable[..., Any], stock: Callable[..., Any],
              use_compiled: Callable[[tuple[Any, ...]], bool]) -> Callable[..., Any]:
    """A module forward that runs ``compiled`` while ``use_compiled(args)`` holds, else the stock bound forward."""

    def forward(module: Any, *args: Any) -> Any:
        if use_compiled(args):
            return compiled(module, *args)
        return stock(*args)

    return forward


class Compiled:
    """``torch.compile(fn)``, falling back to ``fn`` for good if compiling or running it fails."""

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        self.eager = fn
        self.compiled: Callable[..., Any] | None = torch.compile(fn, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - inductor/Triton problems of any kind
                reraise_if_fatal(exc)  # out of memory: fewer slots, not eager for good
                log.warning("torch.compile failed for %s (%s); running it uncompiled",
                            getattr(self.eager, "__qualname__", self.eager), str(exc).splitlines()[0][:200])
                self.compiled = None
        return self.eager(*args, **kwargs)


def rows_vary(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that these tensors' first dimension (tokens, patches, spans) changes from call to call.

    The prefill and vision functions were compiled with every dimension
    symbolic (``dynamic=True``): then the hidden widths (3584, 18944, 1280)
    are runtime values too, and each fused element-wise kernel works out its
    indices with runtime divisions; the SiLU of the text MLP ran at half the
    card's bandwidth (benchmarks/NOTES.md, call D17).  Only the row count
    varies, so only it is left symbolic.
    """
    import torch._dynamo

    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


def compile_enabled(device: torch.device, wanted: bool = True) -> bool:
    """torch.compile a hot path on CUDA (CPUs gain little, and CI stays simple) when ``wanted``.

    ``wanted`` is the config's say for that part (``engine.compile``: true,
    false, or the parts: decode, vision, prefill).
    """
    return wanted and device.type == "cuda"


def _fused_blocks(model: Any) -> bool:
    """The vision blocks can run as ``vision_block``: flash varlen here, the stock layout, SiLU."""
    if not flash_varlen(model.device, model.dtype):
        return False
    cfg = model.model.visual.config
    blk = model.model.visual.blocks[0]
    return (getattr(cfg, "hidden_act", "") == "silu" and hasattr(blk.attn, "qkv") and blk.attn.qkv.bias is not None
            and blk.mlp.gate_proj.bias is not None and hasattr(blk.norm1, "variance_epsilon"))


def _varlen_attn() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn
