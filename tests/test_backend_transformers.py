"""The transformers backend against a hand-written reference of the same pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from daemon.backends import Request
from daemon.backends.transformers.backend import TransformersBackend
from daemon.backends.transformers.loading import attention_candidates
from daemon.config import ModelConfig
from daemon.errors import BackendError, ModelMissingError
from daemon.images import size_page


def _images() -> list[Image.Image]:
    a = Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 50).convert("RGB")
    b = Image.linear_gradient("L").resize((180, 260)).convert("RGB")
    return [size_page(a, min_pixels=3136, max_pixels=40000).image, size_page(b, min_pixels=3136, max_pixels=40000).image]


def _reference(model_dir: Path, image: Image.Image, prompt: str, n: int) -> list[int]:
    """What the Qwen2.5-VL model card does, by hand, for one image."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_matches_the_reference_pipeline(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = TransformersBackend(ModelConfig(name=str(tiny_model)))
    images = _images()
    with caplog.at_level(logging.INFO, logger="daemon.backends.transformers"):
        answers = backend.generate([Request((img,), "Read the text.", 10) for img in images])
    # auto on a CPU: flash-attn skipped with its reason, sdpa chosen, and both logged
    assert backend.attention == "sdpa"
    assert "flash_attention_2 not used (no CUDA device)" in caplog.text
    assert "attention=sdpa" in caplog.text
    tok = backend.processor.tokenizer
    for image, answer in zip(images, answers):
        ref = _reference(tiny_model, image, "Read the text.", 10)
        eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
        ref_until_eos = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
        assert answer.text == tok.decode(ref_until_eos, skip_special_tokens=True)
        assert answer.new_tokens == len(ref_until_eos)
    backend.unload()
    assert not backend.loaded


def test_explicit_attention_that_fails_is_an_error(tiny_model: Path) -> None:
    backend = TransformersBackend(ModelConfig(name=str(tiny_model), attention="flash_attention_2"))
    with pytest.raises(BackendError, match="flash_attention_2"):
        backend.generate([Request((_images()[0],), "hi", 2)])


def test_attention_order() -> None:
    assert attention_candidates("auto", torch.device("cpu")) == ["sdpa", "eager"]
    assert attention_candidates("eager", torch.device("cpu")) == ["eager"]


def test_eager_attention_loads(tiny_model: Path) -> None:
    backend = TransformersBackend(ModelConfig(name=str(tiny_model), attention="eager"))
    (answer,) = backend.generate([Request((_images()[1],), "hi", 3)])
    assert backend.attention == "eager" and answer.new_tokens <= 3


def test_missing_model(tmp_path: Path) -> None:
    backend = TransformersBackend(ModelConfig(name=str(tmp_path / "nothing-here")))
    with pytest.raises(ModelMissingError, match="vlwatch pull"):
        backend.generate([Request((_images()[0],), "hi", 2)])
