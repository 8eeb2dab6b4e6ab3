"""The stock-module patches prefill uses (daemon.backends.transformers.patches), on the tiny checkpoint, CPU.

On a GPU they are on by default (torch.compile, CUDA only); here they are
applied by hand, so that the patched forwards are checked against stock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.backends import Request
from daemon.backends.transformers.patches import Compiled, TextPrefillPatch
from daemon.backends.transformers.backend import TransformersBackend
from daemon.bench.setups import synthetic_images
from daemon.config import ModelConfig


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    backend = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", dtype="float32", max_pixels=50000))
    backend.load()
    yield backend
    backend.unload()


def _text_out(backend: TransformersBackend, inputs: dict) -> torch.Tensor:
    model = backend.slot_engine.model
    embeds = model.model.language_model.embed_tokens(inputs["input_ids"])
    with torch.inference_mode():
        return model.model.language_model(inputs_embeds=embeds).last_hidden_state


def test_compiled_text_prefill_computes_what_stock_does(loaded: TransformersBackend,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12.1 (prefill speed): the fused norms and MLPs are the same function; switched off, stock runs.
    inputs = loaded.prompt_inputs(Request(tuple(synthetic_images(1, 112, 112)), "Describe this.", 8))
    model = loaded.slot_engine.model
    layers = list(model.model.language_model.layers)
    saved = {id(m): m.__dict__.get("forward") for layer in layers
             for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp)}
    stock = _text_out(loaded, inputs)
    calls: list[int] = []
    compiled_call = Compiled.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return compiled_call(self, *args, **kwargs)

    monkeypatch.setattr(Compiled, "__call__", counting)
    patch = TextPrefillPatch(model)
    try:
        patched = _text_out(loaded, inputs)
        assert len(calls) == 3 * len(layers)  # two norms and the MLP of each layer went through the compiled path
        torch.testing.assert_close(patched, stock, rtol=1e-4, atol=1e-4)
        patch.enabled = False
        calls.clear()
        off = _text_out(loaded, inputs)
        assert not calls
        torch.testing.assert_close(off, stock)
    finally:
        for layer in layers:
            for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
                if saved[id(m)] is None:
                    m.__dict__.pop("forward", None)


def test_the_vision_plans_told_ahead_outlive_later_rounds(loaded: TransformersBackend,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine tells the vision patch each round's spans on the host (plan_for), so the tower never reads
    # them from the GPU. A full plan cache used to be cleared whole: the round's first plan, told a moment
    # before its second, was gone, and the tower read its spans back (a sync that drained the GPU's queue).
    patch = loaded.slot_engine.vision
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("a told plan was worked out again"))
    for r in range(12):  # rounds of two plans each (cu_seqlens, cu_window_seqlens), more than the cache holds
        told = []
        for bounds in ([0, 16 * (r + 1)], [0, 4, 8 * (r + 1)]):
            cu = torch.tensor(bounds, dtype=torch.int32)
            told.append((cu, patch.plan_for(cu, bounds, lambda t: t)))
        for cu, plan in told:  # the tower's blocks then look both up
            assert patch.plan(cu) is plan, f"round {r}"
