"""Issue 22.4: Qwen2.5-VL's private touchpoints are checked at load; one that changed turns its fast path off.

Each test changes what a transformers upgrade could change (a signature,
the stock layer's arithmetic, the vision attention, the tower's layout
helpers), loads the tiny checkpoint, and holds the backend's answers to
stock ``model.generate`` under that same change: the fast path that relies
on the touchpoint is off, a warning names it, and nothing else is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from daemon.backends import Request
from daemon.backends.transformers import patches, qwen2_5_vl
from daemon.backends.transformers.backend import TransformersBackend
from daemon.config import ModelConfig
from daemon.images import size_page


def _requests() -> list[Request]:
    a = Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 50).convert("RGB")
    b = Image.linear_gradient("L").resize((180, 260)).convert("RGB")
    images = [size_page(i, min_pixels=3136, max_pixels=40000).image for i in (a, b)]
    return [Request((img,), "Read the text.", 12) for img in images]


def _answers(backend: TransformersBackend, engine: str) -> list[str]:
    backend.set_engine(engine)
    try:
        return [a.text for a in backend.generate(_requests())]
    finally:
        backend.set_engine("auto")


def _loaded(tiny_model: Path) -> TransformersBackend:
    backend = TransformersBackend(ModelConfig(name=str(tiny_model), max_new_tokens=12))
    backend.load()
    return backend


def test_every_touchpoint_agrees_with_stock_on_the_tiny_checkpoint(tiny_model: Path) -> None:
    backend = _loaded(tiny_model)
    summary = backend.describe()["touchpoints"]
    assert "agree" in summary and "failed" not in summary
    assert backend.describe()["engine"].startswith("slot engine")
    assert _answers(backend, "auto") == _answers(backend, "hf")


def test_a_changed_get_rope_index_signature_falls_back_to_stock_generate(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    stock = Qwen2_5_VLModel.get_rope_index

    def keyword_only(self: Any, input_ids: torch.Tensor, *, mm_token_type_ids: torch.Tensor, **kwargs: Any) -> Any:
        return stock(self, input_ids, mm_token_type_ids, **kwargs)  # how stock calls it still works

    monkeypatch.setattr(Qwen2_5_VLModel, "get_rope_index", keyword_only)
    with caplog.at_level(logging.WARNING):
        backend = _loaded(tiny_model)
    assert "touchpoint 'rope_index' failed" in caplog.text and "stock model.generate runs" in caplog.text
    assert "failed: rope_index" in backend.describe()["touchpoints"]
    assert "engine" not in backend.describe()  # no slot engine
    assert _answers(backend, "auto") == _answers(backend, "hf")


def test_a_changed_decoder_layer_turns_the_slot_engine_off(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # As if transformers changed the text MLP's arithmetic: stock is the truth, the engine's fused
    # layer functions no longer compute it.
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    stock = qwen.Qwen2MLP.forward
    monkeypatch.setattr(qwen.Qwen2MLP, "forward", lambda self, x: 1.5 * stock(self, x))
    with caplog.at_level(logging.WARNING):
        backend = _loaded(tiny_model)
    assert "touchpoint 'text_layers' failed" in caplog.text and "from stock" in caplog.text
    assert "failed: text_layers" in backend.describe()["touchpoints"]
    assert _answers(backend, "auto") == _answers(backend, "hf")


def test_a_vision_attention_that_disagrees_is_left_off(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = patches.VisionAttentionPatch.attention
    monkeypatch.setattr(patches.VisionAttentionPatch, "attention",
                        lambda self, *args: -4 * real(self, *args).flip(0))
    with caplog.at_level(logging.WARNING):
        backend = _loaded(tiny_model)
    assert "touchpoint 'vision_attention' failed" in caplog.text
    info = backend.describe()
    assert "failed: vision_attention" in info["touchpoints"] and "vision_attention" not in info
    assert info["engine"].startswith("slot engine")  # the text side keeps its engine
    assert _answers(backend, "auto") == _answers(backend, "hf")


def test_a_wrong_precomputed_vision_layout_is_not_used(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = qwen2_5_vl.vision_layout

    def wrong_layout(model: Any, grids: torch.Tensor) -> dict[str, Any]:
        layout = real(model, grids)
        layout["window_index"] = layout["window_index"].flip(0)
        layout["position_ids"] = layout["position_ids"] * 7
        return layout

    monkeypatch.setattr(qwen2_5_vl, "vision_layout", wrong_layout)
    with caplog.at_level(logging.WARNING):
        backend = _loaded(tiny_model)
    assert "touchpoint 'vision_layout' failed" in caplog.text
    assert "failed: vision_layout" in backend.describe()["touchpoints"]
    # The tiny tower barely feels its layout (0.24% of its output): the answers show only that
    # nothing else was turned off; the check (1e-4 in float32) is what caught it.
    assert _answers(backend, "auto") == _answers(backend, "hf")
