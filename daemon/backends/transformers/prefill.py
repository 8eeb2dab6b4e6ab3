"""Prefill for the slot engine: a round's prompts from pixels to their first tokens, in their slots.

``PrefillRounds`` is the half of ``slots.SlotEngine`` that brings prompts
in (the engine mixes it in; it works on the engine's model, fused weights,
static cache and per-slot state):

- ``_image_features``: the vision tower on a round's images in one call, its
  window layout worked out on the CPU (``_vision_layout``) so that nothing
  waits for the GPU;
- ``_prefill``: the text layers once over the round's prompts laid end to
  end (``prefill_step``), keys straight into the slots, the first tokens
  chosen on the GPU (``_first_tokens``); ``engine.packed_prefill: false`` runs
  the stock text model per prompt instead (``_prefill_stock``);
- ``Staging``: page-locked buffers the inputs go through; ``_Shipped``: a
  round's first tokens on their way to the host, read when the next round
  is queued (``SlotEngine._admit``);
- ``rope_positions``: Qwen's 3D rotary positions, on the processor thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from daemon.backends import reraise_if_fatal
from daemon.backends.transformers.decode_step import at_eos, choose, penalize, store, weight_of
from daemon.backends.transformers.patches import rows_vary
from daemon.backends.transformers.prefill_step import pack, prefill_layer
from daemon.backends.transformers import qwen2_5_vl
from daemon.backends.transformers.prompts import Prompt, Source

# The prefill's bounds live with the memory arithmetic that reserves room for
# them (daemon.plan: one place, so the plan and the engine cannot drift).
from daemon.plan import PACKED, Packing  # noqa: E402


FAILED = object()  # _features_each: this prompt was finished with its error


class PrefillRounds:
    """Prefill methods of ``slots.SlotEngine`` (see the module's docstring); not used on its own.

    What they work on, set up by ``SlotEngine.__init__`` and ``_ensure``:
    """

    model: Any
    layers: list[Any]
    fused: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # decode_step.fuse_projections
    embed: Any
    norm: Any
    lm_head: Any
    device: torch.device
    prefill_kind: str  # "flash" (FlashAttention-2's varlen entry) or "sdpa" (per prompt)
    n_heads: int
    n_kv: int
    eps: float
    penalty: float | None
    packed: bool  # engine.packed_prefill
    vision: Any  # patches.VisionAttentionPatch, told the window bounds ahead
    vision_layout: bool  # the tower's layout precomputed on the CPU (qwen2_5_vl's check passed it)
    _prefill_fn: Any  # prefill_layer, compiled (CUDA)
    _staging: "Staging"
    _true: torch.Tensor
    eos: torch.Tensor  # end-of-sequence ids (a -1 when there are none)
    _state: dict[str, torch.Tensor]
    _kv: list[tuple[torch.Tensor, torch.Tensor]]
    _scales: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # an FP8 cache's scales per layer (static_cache)

    def _image_features(self, prompts: list[Prompt]) -> list[torch.Tensor | None]:
        """The vision tower's output for each prompt's images, all images in one call.

        The tower's cost per call is mostly fixed CPU work (a few thousand
        small launches), so several images per call cost little more than one.
        """
        with_images = [p for p in prompts if "pixel_values" in p.inputs]
        if not with_images:
            return [None] * len(prompts)
        visual = qwen2_5_vl.vision_tower(self.model)
        self._staging.reset()  # a new round
        put = self._staging.to_device
        pixels = torch.cat([put(p.inputs["pixel_values"]) for p in with_images]).to(visual.dtype)
        grids = torch.cat([p.inputs["image_grid_thw"] for p in with_images])
        merged = visual(pixels, grid_thw=put(grids), **self._vision_layout(grids)).pooler_output
        per_prompt = [int(p.inputs["image_grid_thw"].prod(-1).sum()) // visual.spatial_merge_size**2 for p in with_images]
        parts = iter(torch.split(merged, per_prompt))
        return [next(parts) if "pixel_values" in p.inputs else None for p in prompts]

    def _vision_layout(self, grids: torch.Tensor) -> dict[str, Any]:
        """The vision tower's rotary positions, windows and spans, worked out on the CPU from ``grids``.

        Left to itself the tower reads the image grid from the GPU, a host
        sync that waits for all the work queued there: the next round could
        not be launched while this one runs.  These are transformers' own
        helpers (``vision_utils``), given to the tower as the precomputed
        values it accepts, and sent through the staging buffer.
        """
        if not self.vision_layout:
            return {}
        put = self._staging.to_device
        host = qwen2_5_vl.vision_layout(self.model, grids)
        layout: dict[str, Any] = {k: put(v) if isinstance(v, torch.Tensor) else v for k, v in host.items()}
        if self.vision is not None:  # told the spans ahead: the patched attention reads nothing back
            for name in ("cu_seqlens", "cu_window_seqlens"):
                if name in layout:
                    self.vision.plan_for(layout[name], host[name].tolist(), put)
        return layout

    def _prefill(self, items: list[tuple[Prompt, torch.Tensor | None]], slots: list[int]) -> torch.Tensor:
        """Prefill prompts (with their image features) into ``slots``; per prompt ``[first token, not finite, going on]``.

        Returns without waiting for the GPU: a round's first tokens are read
        together (``_settle``), once the next round is queued.  A sync per
        prompt left the GPU idle while the host prepared the next prompt
        (~11 ms of a 70 ms prefill on an H100, benchmarks/NOTES.md call P1).
        """
        for prompt, features in items:
            self._check(prompt, features)
        if self.packed:
            return self._prefill_packed(items, slots)
        return torch.stack([self._prefill_stock(p, slot, f) for (p, f), slot in zip(items, slots)])

    def _check(self, prompt: Prompt, image_features: torch.Tensor | None) -> None:
        if "position_ids" not in prompt.inputs:
            prompt.inputs.update(rope_positions(self.model, prompt.inputs))
        placeholders = int(prompt.inputs["input_ids"].eq(self.model.config.image_token_id).sum())
        features = 0 if image_features is None else int(image_features.shape[0])
        if placeholders != features:
            # What stock transformers checks too (get_placeholder_mask): text
            # that turned into image tokens must not shift the image features.
            raise ValueError(f"the prompt has {placeholders} image placeholder tokens for {features} image "
                             "features (text that tokenized as an image token?); request refused")

    def _prefill_packed(self, items: list[tuple[Prompt, torch.Tensor | None]], slots: list[int]) -> torch.Tensor:
        """The text layers once over the prompts laid end to end (``prefill_step``), keys straight into slots.

        The image features go into the image-token positions and the 3D
        rotary positions come from get_rope_index, as Qwen2_5_VLModel.forward
        does; it is spelled out so that the vision tower runs for several
        prompts at once, before.
        """
        prompts = [p for p, _ in items]
        lengths = [p.length for p in prompts]
        layout = pack(lengths, slots)
        put = self._staging.to_device
        host_ids = torch.cat([p.inputs["input_ids"][0] for p in prompts])
        ids = put(host_ids)
        positions = put(torch.cat([p.inputs["position_ids"] for p in prompts], dim=-1))
        slot_of, col_of, cu, last = put(layout.slot_of), put(layout.col_of), put(layout.cu), put(layout.last)
        rows = put(torch.tensor(slots))
        per_row = put(torch.tensor([[n, n + int(p.inputs["rope_deltas"].reshape(-1)[0]), p.max_new_tokens]
                                    for n, p in zip(lengths, prompts)]))
        temps = put(torch.tensor([p.temperature for p in prompts], dtype=torch.float32))
        x = self.embed(ids)
        features = [f for _, f in items if f is not None]
        if features:
            # The image-token rows, found on the CPU: masked_scatter's own search would cost a sync.
            image_rows = (host_ids == self.model.config.image_token_id).nonzero()[:, 0]
            x = x.index_copy(0, put(image_rows), torch.cat(features).to(x.dtype))
        cos, sin = qwen2_5_vl.text_rotary(self.model, x, positions)  # (tokens, 1, head dim): every head alike
        kind = self.prefill_kind
        layer_fn = self._prefill_fn if kind == "flash" and self._prefill_fn is not None else prefill_layer
        if layer_fn is self._prefill_fn:
            rows_vary(x, cos, sin, slot_of, col_of, cu)
        group = self.n_heads // self.n_kv
        for layer, (k_cache, v_cache), (k_scale, v_scale) in zip(self.layers, self._kv, self._scales):
            attn = layer.self_attn
            x = layer_fn(x, cos, sin, k_cache, v_cache, slot_of, col_of, cu, layout.spans if kind == "sdpa" else (),
                         *self.fused[id(layer)], layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                         weight_of(attn.o_proj), weight_of(layer.mlp.down_proj), self.eps, attn.scaling, self.n_kv,
                         group, kind, k_scale, v_scale)
        logits = self.lm_head(self.norm(x[last])).float()
        return self._first_tokens(logits, rows, ids, slot_of, per_row, temps, any(p.temperature > 0 for p in prompts))

    def _first_tokens(self, logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, slot_of: torch.Tensor,
                      per_row: torch.Tensor, temps: torch.Tensor, sample: bool) -> torch.Tensor:
        """Choose each prompt's first token and set up its slot for decoding (no host sync)."""
        # Index assignments take device tensors or go through index_fill_: a
        # Python number as the value is a copy from the host, which waits for
        # the GPU (and this must not: _admit overlaps the rounds).
        s, true = self._state, self._true
        if "seen" in s:
            s["seen"].index_fill_(0, rows, False)
            s["seen"].index_put_((slot_of, ids), true)
            logits = penalize(logits, s["seen"][rows], self.penalty)
        s["temp"][rows] = temps
        first, bad = choose(logits, temps if sample else None)
        s["bad"][rows] = bad
        s["tok"][rows] = first
        s["wpos"][rows] = per_row[:, 0]
        s["pos"][rows] = per_row[:, 1]
        s["budget"][rows] = per_row[:, 2]
        s["out"][rows, 0] = first
        s["n_gen"].index_fill_(0, rows, 1)
        # Which rows go on decoding, decided here rather than by the host when
        # it reads the first tokens (_settle): an assignment there was a copy
        # from pageable memory, a sync that waited for the round queued behind
        # (8 ms of GPU idle per page on an H100, benchmarks/NOTES.md call P3).
        # _settle reads the decision with the first token instead of deciding again.
        going_on = ~bad & (per_row[:, 2] > 1) & ~at_eos(first, self.eos, s["ignore_eos"])
        s["active"][rows] = going_on
        if "seen" in s:
            s["seen"].index_put_((rows, first), true)
        return torch.stack((first, bad.long(), going_on.long()), dim=1)

    def _prefill_stock(self, prompt: Prompt, slot: int, image_features: torch.Tensor | None) -> torch.Tensor:
        """One prompt through the stock text model, its cache then copied into ``slot`` (``engine.packed_prefill: false``)."""
        model = self.model
        inputs = {k: self._staging.to_device(v) for k, v in prompt.inputs.items() if k != "pixel_values"}
        ids, positions = inputs["input_ids"], inputs["position_ids"]
        length = ids.shape[1]
        embeds = self.embed(ids)
        if image_features is not None:
            slots_for_image = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(slots_for_image, image_features.to(embeds.dtype))
        # One unpadded sequence: no attention mask, so the text model takes the plain causal path.
        out = qwen2_5_vl.text_model(model)(input_ids=None, inputs_embeds=embeds, position_ids=positions, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        put_row = torch.full((length,), slot, device=self.device)
        cols = torch.arange(length, device=self.device)
        for layer, (k_cache, v_cache), (k_scale, v_scale) in zip(cache.layers, self._kv, self._scales):
            store(k_cache, k_scale, put_row, cols, layer.keys[0].transpose(0, 1))
            store(v_cache, v_scale, put_row, cols, layer.values[0].transpose(0, 1))
        logits = self.lm_head(out.last_hidden_state[:, -1]).float()
        put = self._staging.to_device
        rows = put(torch.tensor([slot]))
        delta = int(prompt.inputs["rope_deltas"].reshape(-1)[0])
        per_row = put(torch.tensor([[length, length + delta, prompt.max_new_tokens]]))
        temps = put(torch.tensor([prompt.temperature], dtype=torch.float32))
        return self._first_tokens(logits, rows, ids[0], rows.expand(length), per_row, temps, prompt.temperature > 0)[0]

    def _features_each(self, group: list[Prompt], source: Source) -> list[Any]:
        """Vision features per prompt; a prompt whose images fail is finished with the error."""
        try:
            return self._image_features(group)
        except Exception as exc:
            reraise_if_fatal(exc)
            if len(group) == 1:
                source.finished(group[0], exc)
                return [FAILED]
        out: list[Any] = []
        for prompt in group:  # one at a time, to find the culprit
            out.extend(self._features_each([prompt], source))
        return out


class Staging:
    """Page-locked host memory through which prefill's inputs go to the GPU without waiting for it.

    A copy from ordinary (pageable) memory first waits for all the work
    queued on the GPU, so each prompt's inputs drained the queue.  Pinning
    each tensor instead (``pin_memory()``) cost more than it saved on an
    H100: page-locking ~25 MB of pixels per image, with the interpreter lock
    held, took ~8 ms per image (benchmarks/NOTES.md, call D3).  So two
    buffers are pinned once (grown when a round needs more) and filled front
    to back, a round each in turn: ``reset`` starts the next round on the
    other buffer, once the copies out of it (two rounds back) are done, so
    the host can prepare a round while the one before still runs.
    """

    ALIGN = 512

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sides = [_Buffer(), _Buffer()]
        self._side = self._sides[0]

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or tensor.device.type != "cpu":
            return tensor.to(self.device)
        side = self._side
        size = tensor.numel() * tensor.element_size()
        if side.buffer is None or side.used + size > side.buffer.numel():
            if side.buffer is not None:
                side.retired.append(side.buffer)
            side.buffer = torch.empty(max(2 * size, 64 << 20), dtype=torch.uint8, pin_memory=True)
            side.used = 0
        staged = side.buffer[side.used:side.used + size].view(tensor.dtype).view(tensor.shape)
        staged.copy_(tensor)
        side.used += -(-size // self.ALIGN) * self.ALIGN
        out = staged.to(self.device, non_blocking=True)
        side.done = torch.cuda.Event()
        side.done.record(torch.cuda.current_stream(self.device))
        return out

    def reset(self) -> None:
        self._side = side = self._sides[1] if self._side is self._sides[0] else self._sides[0]
        if side.done is not None:
            side.done.synchronize()  # its round's copies: normally long done
        side.used = 0
        side.retired.clear()


@dataclass
class _Shipped:
    """A round's first tokens on their way to the host: copied as soon as the round is queued, read later."""

    launched: list[tuple[Prompt, int, torch.Tensor]]
    heads: torch.Tensor | None  # (prompts, 3): first token, not finite, going on; on the host once ``done`` has passed
    done: Any = None  # CUDA event after the copy

    @classmethod
    def start(cls, launched: list[tuple[Prompt, int, torch.Tensor]]) -> "_Shipped":
        if not launched:
            return cls(launched, None)
        heads = torch.stack([head for _, _, head in launched])
        if heads.device.type != "cuda":
            return cls(launched, heads)
        host = torch.empty(heads.shape, dtype=heads.dtype, pin_memory=True)
        host.copy_(heads, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(heads.device))
        return cls(launched, host, done)

    def slots(self) -> set[int]:
        return {slot for _, slot, _ in self.launched}

    def read(self) -> list[list[int]]:
        if self.heads is None:
            return []
        if self.done is not None:
            self.done.synchronize()  # this round's work only, not what was queued after it
        return self.heads.tolist()


@dataclass
class _Buffer:
    buffer: torch.Tensor | None = None
    used: int = 0
    done: Any = None  # CUDA event after the last copy out of the buffer
    retired: list[torch.Tensor] = field(default_factory=list)  # outgrown buffers, until their copies are done


def rope_positions(model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """3D (M-RoPE) positions of one prompt and its decode offset, on the inputs' device.

    Qwen's get_rope_index walks the tokens in Python; run on the CPU tensors
    (the processor thread calls this) it costs the GPU nothing and no syncs.
    """
    ids = inputs["input_ids"]
    if "image_grid_thw" not in inputs:  # text only: the plain positions
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device).view(1, 1, -1).expand(3, 1, -1).contiguous()
        return {"position_ids": positions, "rope_deltas": torch.zeros(1, 1, dtype=torch.long, device=ids.device)}
    positions, deltas = qwen2_5_vl.rope_index(model, inputs)
    return {"position_ids": positions, "rope_deltas": deltas.reshape(1, 1).to(torch.long)}


def take_pack(group: list[tuple[Prompt, Any]], packing: Packing = PACKED) -> list[tuple[Prompt, Any]]:
    """Pop the prompts of the next packed prefill off ``group``: up to ``packing.tokens`` tokens, at least one."""
    pack = [group.pop(0)]
    tokens = pack[0][0].length
    while group and tokens + group[0][0].length <= packing.tokens:
        tokens += group[0][0].length
        pack.append(group.pop(0))
    return pack


