"""Tests for tests/tiny_model.py: the tiny checkpoint loads and generates like the real one.

Everything runs on the CPU in fp32 and takes a few seconds (most of it is
importing torch/transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from tests.tiny_model import QWEN_SPECIAL_TOKENS, build_tiny_model

MAX_NEW_TOKENS = 8
PROMPTS = ("Describe this image.", "What is in the picture? Answer in JSON.")
# Different sizes on purpose: they give different numbers of image tokens
# (12x18 patches -> 54 tokens vs 6x4 patches -> 6 tokens), so the batch really
# is left-padded, and the larger one spans several 112 px attention windows.
IMAGE_SIZES = ((200, 300), (90, 60))  # (height, width)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model: Path) -> Path:
    # `tiny_model` (conftest.py) builds the checkpoint once per session into a
    # pytest temp dir; alias it so these tests read as "the checkpoint dir".
    return tiny_model


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    return AutoProcessor.from_pretrained(tiny_dir, local_files_only=True)


def _load_model(path: Path, attn: str) -> Qwen2_5_VLForConditionalGeneration:
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=torch.float32, attn_implementation=attn
    )
    return model.eval()


def _images() -> list[Image.Image]:
    # Random noise rather than flat colour: a flat image makes all patches
    # identical, which would hide patch-ordering / windowing bugs.
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
        for h, w in IMAGE_SIZES
    ]


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def _generate(model, processor, prompts: list[str], images: list[Image.Image]) -> list[list[int]]:
    """Greedy-generate for a batch; return each row's NEW token ids, pad-trimmed."""
    texts = [
        processor.apply_chat_template(_messages(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
    # A row that hit EOS early is right-filled with pad by generate(); drop
    # that fill so rows compare equal to an unpadded single-prompt run.
    pad_id = processor.tokenizer.pad_token_id
    trimmed: list[list[int]] = []
    for row in new_tokens:
        while row and row[-1] == pad_id:
            row = row[:-1]
        trimmed.append(row)
    return trimmed


def test_checkpoint_files_and_ids(tiny_dir: Path, processor) -> None:
    # safetensors weights, like the real checkpoint (no pickle).
    assert (tiny_dir / "model.safetensors").is_file()
    assert (tiny_dir / "generation_config.json").is_file()

    tok = processor.tokenizer
    config = json.loads((tiny_dir / "config.json").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    # Each special token is one id, and ids are consecutive in Qwen order.
    assert list(ids.values()) == list(range(ids["<|endoftext|>"], ids["<|endoftext|>"] + len(ids)))
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["vision_end_token_id"] == ids["<|vision_end|>"]
    assert config["text_config"]["vocab_size"] >= len(tok)

    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"

    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen["pad_token_id"] == ids["<|endoftext|>"]
    assert gen.get("do_sample", False) is False


def test_tokenizer_round_trip(processor) -> None:
    tok = processor.tokenizer
    for text in ("The quick brown fox.", '{"path": "/tmp/a b.png", "n": 3}', "<p>Héllo</p>\n## Title"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # merges were learned, not raw bytes
    # Special tokens are never split and are dropped by skip_special_tokens.
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_matches_qwen(processor) -> None:
    text = processor.apply_chat_template(
        _messages("Describe this image."), tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The tokenizer carries the same template (the daemon may use either).
    assert processor.tokenizer.apply_chat_template(
        _messages("Describe this image."), tokenize=False, add_generation_prompt=True
    ) == text


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_dir / name).read_bytes(), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_generate_equals_single(tiny_dir: Path, processor, attn: str) -> None:
    model = _load_model(tiny_dir, attn)
    images = _images()

    texts = [
        processor.apply_chat_template(_messages(p), tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert "mm_token_type_ids" in inputs
    # Different image sizes must have produced a genuinely left-padded batch.
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()

    batched = _generate(model, processor, list(PROMPTS), images)
    single = [_generate(model, processor, [p], [img])[0] for p, img in zip(PROMPTS, images)]
    assert all(len(row) > 0 for row in batched)
    # Exact token equality: fp32 greedy decoding of the same prompt must not
    # depend on what else is in the batch (position ids, padding masks, image
    # token splicing and window attention are all per-sample).
    assert batched == single

    decoded = processor.batch_decode(batched, skip_special_tokens=True)
    assert all(isinstance(s, str) for s in decoded)
    assert decoded == [processor.batch_decode([row], skip_special_tokens=True)[0] for row in single]
