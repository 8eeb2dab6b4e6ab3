"""The API's prompt count (``daemon.server.budget``, issue 27) against the real processor of the tiny checkpoint.

What the engine tokenises (the chat template with the images' placeholder
tokens expanded) is what ``usage.prompt_tokens`` reports, and a text too long
for the context is refused after tokenising a bounded part of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from daemon.backends import Message
from daemon.config_reader import parse_config
from daemon.server import budget
from daemon.server.context import ApiError


@pytest.fixture(scope="module")
def setup(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("budget")
    config = parse_config(f"model: {{name: {tiny_model}}}\ninclude: [describe]\napi: {{max_context: 4096}}\n", folder / "config.yaml")
    return config, budget.counter_for(config)


def test_the_count_is_the_processors(setup, tiny_model: Path) -> None:
    from transformers import AutoProcessor

    config, counter = setup
    assert counter.tokenizer is not None and counter.context == 32768
    image = Image.new("RGB", (56 * 4, 28 * 3))
    turns = (Message("system", ("Be brief.",)), Message("user", (image, "What is this? " * 20)),
             Message("assistant", ("A box.",)), Message("user", ("And the colour?",)))
    processor = AutoProcessor.from_pretrained(tiny_model, local_files_only=True)
    messages = [{"role": t.role, "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                                             for p in t.parts]} for t in turns]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[text], images=[image], return_tensors="pt", do_resize=False)["input_ids"].shape[1]
    assert budget.check_prompt(turns, 64, config, counter) == expected


def test_a_long_text_is_refused_after_a_bounded_count(setup) -> None:
    config, counter = setup
    started = time.monotonic()
    with pytest.raises(ApiError) as info:
        budget.check_prompt((Message("user", ("ab " * 5_000_000,)),), 64, config, counter)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert "4096 tokens" in info.value.message
    assert time.monotonic() - started < 5  # 15 MB of text: counting stopped early


def test_the_model_context_caps_api_max_context(setup, tiny_model: Path, tmp_path: Path) -> None:
    _, counter = setup
    config = parse_config(f"model: {{name: {tiny_model}}}\ninclude: [describe]\napi: {{max_context: 1000000}}\n", tmp_path / "c.yaml")
    assert budget.budget(config, counter) == budget.Budget(32768, "the model's context")
