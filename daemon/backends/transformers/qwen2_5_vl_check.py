"""The check at load of :mod:`qwen2_5_vl`'s touchpoints: each fast path against the stock one, on a tiny input.

``loading`` calls these once, after the model and the slot engine are built.
Each compares a fast path (the engine's decoder layer functions, the fused
vision attention, the precomputed vision layout, ``get_rope_index``) with
what stock transformers computes on a few tokens or a 112x168 image; one
that raises or disagrees is reported as a :class:`Finding` and its fast
path is turned off, so a transformers or torch upgrade costs speed, never
answers.  Kept apart from the touchpoints themselves because it runs the
engine's layer functions, which are built on them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from daemon.backends.transformers import qwen2_5_vl
from daemon.backends.transformers.decode_step import Where, layer_step, weight_of
from daemon.backends.transformers.fp8 import Fp8Linear
from daemon.backends.transformers.prefill_step import prefill_layer
from daemon.backends.transformers.qwen2_5_vl import rope_index, text_model, vision_layout_helpers, vision_tower

log = logging.getLogger(__name__)

#: Largest relative difference from the stock path a checked fast path may
#: show on the tiny input: float32 agrees to rounding; half precision rounds
#: each kernel's output (one decoder layer: ~0.3% measured on the CPU).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.03, torch.float16: 0.03}
#: The vision tower is compared whole (32 blocks in the 7B, the fused blocks
#: rounding differently from stock's): more room in half precision.
VISION_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.05}


@dataclass(frozen=True)
class Finding:
    """A touchpoint that failed its check, and what runs instead."""

    touchpoint: str
    problem: str
    fallback: str

    def message(self) -> str:
        return (f"Qwen2.5-VL touchpoint {self.touchpoint!r} failed its check at load ({self.problem}); "
                f"{self.fallback}. Answers stay correct; this transformers/torch may be newer than vlwatch knows.")


@dataclass(frozen=True)
class Checked:
    """What :func:`check` found: the touchpoints that failed (none, normally)."""

    findings: tuple[Finding, ...] = ()
    #: (what, relative difference from stock) of each comparison made
    measured: tuple[tuple[str, float], ...] = ()

    def ok(self, touchpoint: str) -> bool:
        return all(f.touchpoint != touchpoint for f in self.findings)

    def __add__(self, other: "Checked") -> "Checked":
        return Checked(self.findings + other.findings, self.measured + other.measured)

    def summary(self) -> str:
        """One line for the log: what was compared and the largest difference, or what failed."""
        if self.findings:
            return "failed: " + ", ".join(f.touchpoint for f in self.findings)
        worst = max(self.measured, key=lambda m: m[1], default=None)
        return (f"{len(self.measured)} comparisons with the stock path agree"
                + (f" (largest difference {worst[1]:.2g}: {worst[0]})" if worst else ""))


def _failed(touchpoint: str, problem: str, fallback: str) -> Checked:
    finding = Finding(touchpoint, problem, fallback)
    log.warning("%s", finding.message())
    return Checked((finding,))


def _problem(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))


def _within(touchpoint: str, what: str, got: torch.Tensor, want: torch.Tensor, fallback: str,
            tolerance: dict[torch.dtype, float] = TOLERANCE) -> Checked:
    if got.shape != want.shape:
        return _failed(touchpoint, f"{what}: shape {tuple(got.shape)}, stock {tuple(want.shape)}", fallback)
    error, limit = _rel(got, want), tolerance.get(want.dtype, 0.03)
    if not error <= limit:  # NaN fails too
        return _failed(touchpoint, f"{what}: {error:.3g} from stock (at most {limit:g})", fallback)
    return Checked(measured=((f"{touchpoint} {what}", error),))


def check_rope_index(model: Any) -> Checked:
    """``get_rope_index`` on a prompt with one 2x2-token image: the positions Qwen2.5-VL defines."""
    fallback = "the slot engine is off: stock model.generate runs"
    cfg = model.config
    text, image = [11, 12, 13], [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    ids = torch.tensor([text + image + [14, 15]])
    inputs = {"input_ids": ids, "image_grid_thw": torch.tensor([[1, 4, 4]]),  # 4x4 patches, 2x2 merged
              "mm_token_type_ids": (ids == cfg.image_token_id).to(torch.int32),
              "attention_mask": torch.ones_like(ids)}
    try:
        positions, deltas = rope_index(model, inputs)
    except Exception as exc:  # noqa: BLE001 - a changed signature or a changed helper, whatever it raises
        return _failed("rope_index", _problem(exc), fallback)
    # Text counts up; the image's 2x2 tokens sit at (t, h, w) = start + (0, row, col); text after it
    # resumes at start + 2 (one past the largest image position).
    start = len(text) + 1
    t = list(range(start)) + [start] * 4 + [start + 2, start + 3, start + 4]
    h = list(range(start)) + [start, start, start + 1, start + 1] + [start + 2, start + 3, start + 4]
    w = list(range(start)) + [start, start + 1, start, start + 1] + [start + 2, start + 3, start + 4]
    want = torch.tensor([[t], [h], [w]])
    if positions.shape != want.shape or not torch.equal(positions.cpu().long(), want):
        return _failed("rope_index", f"positions {positions.reshape(3, -1).tolist()} for a 2x2-token image, "
                       f"expected {want.reshape(3, -1).tolist()}", fallback)
    if int(deltas.reshape(-1)[0]) != int(want.max()) + 1 - ids.shape[1]:
        return _failed("rope_index", f"decode offset {int(deltas.reshape(-1)[0])}", fallback)
    return Checked()


@contextmanager
def _stock_sdpa(text: Any) -> Iterator[None]:
    """The stock decoder layer through SDPA (causal when no mask is given), whatever the model loaded with."""
    config = text.config
    before = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = before


@contextmanager
def _dequantized_fp8(layer: Any) -> Iterator[None]:
    """FP8 linears of ``layer`` through their dequantizing path: no step function between the two sides."""
    mods = [m for m in layer.modules() if isinstance(m, Fp8Linear)]
    saved = [(m.fast, m.emulate) for m in mods]
    for m in mods:
        m.fast, m.emulate = False, False
    try:
        yield
    finally:
        for m, (fast, emulate) in zip(mods, saved):
            m.fast, m.emulate = fast, emulate


def _continuous(weight: Any) -> Any:
    # decode_step.Weight: a plain tensor, or FP8 (weight, scales, fast): the check takes the dequantizing path.
    return (weight[0], weight[1], False) if isinstance(weight, tuple) else weight


def check_text_layers(engine: Any, *, kinds: tuple[str, ...] = ("one", "sdpa"), prefill_kind: str = "sdpa",
                      touchpoint: str = "text_layers",
                      fallback: str = "the slot engine is off: stock model.generate runs") -> Checked:
    """The first decoder layer, stock against the engine's layer functions, on seven tokens.

    ``engine`` is a ``slots.SlotEngine`` (its fused weights and sizes).  The
    stock layer runs all seven tokens causally (SDPA); ``prefill_step.
    prefill_layer`` prefills six of them into a scratch cache with
    ``prefill_kind``, and ``decode_step.layer_step`` decodes the seventh from
    it with each of ``kinds`` (one, sdpa, flash).  Hidden states must agree
    within ``TOLERANCE``.  FP8 linears take their dequantizing path on both
    sides (FP8's rounding of activations is a step function; the kernel has
    its own check, ``benchmarks/fp8_check.py``).
    """
    model, n = engine.model, 6
    try:
        text = text_model(model)
        layer = engine.layers[0]
        attn = layer.self_attn
        qkv_w, qkv_b, gate_up = engine.fused[id(layer)]
        weights = (_continuous(qkv_w), qkv_b, _continuous(gate_up), layer.input_layernorm.weight,
                   layer.post_attention_layernorm.weight, _continuous(weight_of(attn.o_proj)),
                   _continuous(weight_of(layer.mlp.down_proj)), engine.eps, attn.scaling, engine.n_kv,
                   engine.n_heads // engine.n_kv)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(1000, engine.embed.weight.shape[0]), (n + 1,), generator=gen).to(engine.device)
        with torch.inference_mode(), _stock_sdpa(text), _dequantized_fp8(layer):
            x = text.embed_tokens(ids)
            positions = torch.arange(n + 1, device=engine.device).view(1, 1, -1).expand(3, 1, -1)
            cos, sin = text.rotary_emb(x[None], positions)
            stock = layer(x[None], attention_mask=None, position_ids=positions[0], position_embeddings=(cos, sin))
            stock = (stock[0] if isinstance(stock, tuple) else stock)[0]
            cos, sin = cos[0, :, None, :], sin[0, :, None, :]
            scratch = _Scratch(engine, x.dtype)
            got = prefill_layer(x[:n], cos[:n], sin[:n], scratch.k, scratch.v, *scratch.prefill_layout(n),
                                ((0, n),) if prefill_kind == "sdpa" else (), *weights, prefill_kind)
            found = _within(touchpoint, f"prefill ({prefill_kind})", got, stock[:n], fallback)
            for kind in kinds:
                got = layer_step(x[n:], cos[n:], sin[n:], scratch.k, scratch.v, *scratch.decode_where(n, kind),
                                 *weights, kind)
                found += _within(touchpoint, f"decode ({kind})", got, stock[n:], fallback)
            return Checked(found.findings[:1], found.measured)
    except Exception as exc:  # noqa: BLE001 - a changed layout or signature, whatever it raises
        return _failed(touchpoint, _problem(exc), fallback)


class _Scratch:
    """A one-slot cache of 16 columns for the check, and the layouts the layer functions take."""

    length = 16

    def __init__(self, engine: Any, dtype: torch.dtype) -> None:
        self.device = engine.device
        shape = (1, self.length, engine.n_kv, engine.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.dtype = dtype

    def prefill_layout(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        return (torch.zeros(n, dtype=torch.long, device=dev), torch.arange(n, device=dev),
                torch.tensor([0, n], dtype=torch.int32, device=dev))

    def decode_where(self, n: int, kind: str) -> Any:
        dev = self.device
        rows, wpos = torch.zeros(1, dtype=torch.long, device=dev), torch.tensor([n], device=dev)
        if kind == "flash":
            bias, used = None, (wpos + 1).to(torch.int32)
        else:
            visible = torch.arange(self.length, device=dev)[None, :] <= wpos[:, None]
            bias = torch.zeros(visible.shape, dtype=self.dtype, device=dev).masked_fill(~visible, float("-inf"))
            bias, used = bias[:, None, None, :], None
        cu = torch.arange(2, dtype=torch.int32, device=dev)
        return Where(rows, wpos, bias, used, cu, cu * self.length)


def check_vision(model: Any, patch: Any) -> Checked:
    """The vision tower on a 112x168 image: with ``patch`` (``patches.VisionAttentionPatch``) and without it.

    12x8 patches, 6x4 tokens: two attention windows of different lengths.

    Two checks: the patched attention against the stock one, and the layout
    precomputed by ``vision_utils``' helpers against the tower's own.
    """
    visual = vision_tower(model)
    try:
        grid = torch.tensor([[1, 12, 8]])
        channels = visual.patch_embed.in_channels * visual.patch_embed.temporal_patch_size
        pixels = torch.randn(96, channels * visual.patch_embed.patch_size ** 2,
                             generator=torch.Generator().manual_seed(0)).to(model.device, visual.dtype)
        grid_d = grid.to(model.device)
        with torch.inference_mode():
            if patch is not None:
                patch.enabled = False
            stock = visual(pixels, grid_thw=grid_d).pooler_output
    except Exception as exc:  # noqa: BLE001
        # The stock tower itself failed on a tiny image: nothing of ours to turn off.
        log.warning("Qwen2.5-VL vision tower check could not run (%s)", _problem(exc))
        return Checked()
    found = Checked()
    if patch is not None:
        fallback = "the stock vision attention runs"
        try:
            with torch.inference_mode():
                patch.enabled = True
                got = visual(pixels, grid_thw=grid_d).pooler_output
            found += _within("vision_attention", "tower output", got, stock, fallback, VISION_TOLERANCE)
        except Exception as exc:  # noqa: BLE001
            found += _failed("vision_attention", _problem(exc), fallback)
        patch.enabled = found.ok("vision_attention")
    found += _check_vision_layout(model, visual, pixels, grid, stock, patch)
    return found


def _check_vision_layout(model: Any, visual: Any, pixels: torch.Tensor, grid: torch.Tensor, stock: torch.Tensor,
                         patch: Any) -> Checked:
    if vision_layout_helpers() is None:
        return Checked()  # an older transformers: nothing precomputed, nothing to check
    fallback = "the tower works its layout out itself (a host sync per prefill round)"
    enabled = patch.enabled if patch is not None else None
    try:
        layout = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                  for k, v in qwen2_5_vl.vision_layout(model, grid).items()}
        with torch.inference_mode():
            if patch is not None:
                patch.enabled = False  # the stock tower, given the layout
            got = visual(pixels, grid_thw=grid.to(model.device), **layout).pooler_output
        return _within("vision_layout", "tower output", got, stock, fallback, VISION_TOLERANCE)
    except Exception as exc:  # noqa: BLE001
        return _failed("vision_layout", _problem(exc), fallback)
    finally:
        if patch is not None:
            patch.enabled = bool(enabled)
