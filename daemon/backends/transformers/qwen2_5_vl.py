"""Qwen2.5-VL's private touchpoints: every transformers or torch internal the engine leans on, checked at load.

The slot engine and the prefill and vision speed-ups compute what stock
transformers computes, with their own code; to do it they read private
things that a transformers or torch upgrade may change without notice.
They are all here, each behind a small accessor, and ``qwen2_5_vl_check``
tries them once at load on a tiny input against the stock code path.  A
touchpoint that raises or disagrees turns its fast path off, with a warning
naming it, and the stock path runs instead: an upgrade may cost speed,
never correct answers.

=====================  ==============================================  ====================================
touchpoint             what it relies on                               when it fails
=====================  ==============================================  ====================================
``text_layers``        the decoder layer's layout (q/k/v/o, gate/up/   no slot engine: stock
                       down, two RMSNorms), its arithmetic as           ``model.generate``
                       ``decode_step.layer_step`` and
                       ``prefill_step.prefill_layer`` spell it out,
                       ``language_model.rotary_emb``
``rope_index``         ``Qwen2_5_VLModel.get_rope_index`` (its          no slot engine
                       signature; M-RoPE positions of an image)
``flash_attention``    ``torch.ops.aten._flash_attention_forward``      SDPA for decode, prefill and the
                       called by position, ``seqused_k`` for decode     vision blocks
``vision_attention``   the vision attention's ``forward`` signature,    the stock vision tower
                       ``apply_rotary_pos_emb_vision``, the blocks'
                       layout (``patches.VisionAttentionPatch``)
``vision_layout``      ``transformers.vision_utils``' window and        the tower works its layout out
                       position helpers, and the tower taking them      itself (a host sync per round)
                       precomputed
``dynamo``             ``torch._dynamo.config`` cache limits            (a warning only: more recompiles)
=====================  ==============================================  ====================================

The compiled layer functions (``decode_step``, ``prefill_step``) are the
engine's own code; what they call of torch's internals comes from here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ accessors


def text_model(model: Any) -> Any:
    """The decoder stack (``Qwen2_5_VLTextModel``): layers, norm, embed_tokens, rotary_emb."""
    return model.model.language_model


def vision_tower(model: Any) -> Any:
    return model.model.visual


def rope_index(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions (3, 1, tokens) and the decode offset of one tokenized prompt with images."""
    return model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs.get("attention_mask"))


def text_rotary(model: Any, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of ``positions`` (3, 1, tokens) for the packed tokens ``x``: (tokens, 1, head dim) each."""
    cos, sin = text_model(model).rotary_emb(x[None], positions)
    return cos[0, :, None, :], sin[0, :, None, :]


def stock_vision_rotary() -> Callable[..., Any]:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    return qwen.apply_rotary_pos_emb_vision


def vision_layout_helpers() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | None:
    """transformers' (cu_seqlens, position_ids, window_index) helpers for the tower, or None before they existed."""
    try:
        from transformers.vision_utils import (
            get_vision_cu_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )
    except ImportError:
        return None
    return get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index


def flash_varlen(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FlashAttention-2's varlen entry can run here (CUDA, half precision, a torch that has it)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and getattr(torch.ops.aten, "_flash_attention_forward", None) is not None)


def flash_takes_seqused_k() -> bool:
    """Whether the varlen entry reads per-row key lengths (what the decode step's ``flash`` kind needs)."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "seqused_k" in str(op.default._schema)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int, causal: bool, scale: float,
                    seqused_k: torch.Tensor | None = None) -> torch.Tensor:
    """FlashAttention-2 over packed sequences: ``(tokens, heads, dim)`` in, the same shape out.

    ``torch.ops.aten._flash_attention_forward`` is private and called by
    position: (q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
    is_causal, return_debug_mask), then keywords.
    """
    if seqused_k is None:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                       scale=scale)[0]
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                   scale=scale, seqused_k=seqused_k)[0]


def allow_shared_compiles() -> None:
    """Raise dynamo's per-code-object cache so one compiled function serves every layer.

    One compiled function serves every layer's module (their weights are
    inputs), but dynamo keeps a small cache per code object: raised so 64
    norms, 32 MLPs and a few slot counts never push it into eager.
    """
    import torch._dynamo

    config = torch._dynamo.config
    found = False
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
            found = True
    if not found:
        log.warning("torch._dynamo.config has no cache_size_limit or recompile_limit: compiled layers may "
                    "recompile more often")


def vision_layout(model: Any, grids: torch.Tensor) -> dict[str, Any]:
    """The tower's rotary positions, windows, spans and longest spans for ``grids``, on the CPU (values it
    accepts precomputed); {} before transformers had the helpers."""
    helpers = vision_layout_helpers()
    if helpers is None:
        return {}
    cu_seqlens, position_ids, window_index = helpers
    visual = vision_tower(model)
    cu = cu_seqlens(grids)
    index, cu_window = window_index(grids, spatial_merge_size=visual.spatial_merge_size,
                                    window_size=visual.window_size, patch_size=visual.patch_size)
    layout: dict[str, Any] = {"position_ids": position_ids(grids, visual.spatial_merge_size),
                              "window_index": index, "cu_seqlens": cu, "cu_window_seqlens": cu_window}
    for name, longest in (("cu_seqlens", "max_seqlen"), ("cu_window_seqlens", "max_window_seqlen")):
        bounds = layout[name].tolist()
        layout[longest] = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    return layout
