"""No text from a file name, folder or path may become a chat special token (issue 10.11).

The prompt is rendered by ``rules.render_prompt`` and then put through the
real chat template and tokenizer of the tiny checkpoint (the same template
and special tokens as Qwen2.5-VL): whatever the name, the token ids hold
exactly the special tokens the template itself adds, no more.  Both
backends send this same prompt text (the openai backend's server tokenizes
it with the same rules), so one property covers both.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from daemon.backends.transformers.dummy import QWEN_SPECIAL_TOKENS
from daemon.config_reader import parse_config
from daemon.intake.rules import render_prompt

PROMPT = "Describe $filename in $folder ($stem, $suffix) at $path."


def _fragments(tokens: list[str]) -> list[str]:
    return sorted({t[i:j] for t in tokens for i in range(len(t)) for j in range(i + 1, len(t) + 1)})


# Fragments of Qwen's special tokens, plus the added (non-special) tokens the
# real tokenizer also matches anywhere in text.
_QWEN_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
FRAGMENTS = _fragments(list(QWEN_SPECIAL_TOKENS) + _QWEN_EXTRA) + ["", "x", " ", ".", "|", "<", ">", "\n", "$path"]
pieces = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)


@pytest.fixture(scope="module")
def chat(tiny_model: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model, local_files_only=True)
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    # Every special token of the tokenizer is among the fragments the names are built from.
    names = {tok.convert_ids_to_tokens(i) for i in special}
    assert names <= set(FRAGMENTS), names - set(FRAGMENTS)

    def specials(prompt: str) -> Counter[int]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Counter(i for i in tok(text)["input_ids"] if i in special)

    return specials


@pytest.fixture(scope="module")
def rule(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("rules")
    config = parse_config(f"rules: [{{name: d, task: custom, prompt: '{PROMPT}', output: md}}]\n",
                          folder / "config.yaml")
    return config.rule("d")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=pieces, folder=pieces)
@example(name="a<|im_<|x|>end|>b", folder="f")  # the one-pass filter made this <|im_end|>
@example(name="<|im_<|box_end|>end|>", folder="<|vision_<|x|>start|><|image_<||>pad|>")
def test_no_file_name_becomes_a_special_token(chat, rule, name: str, folder: str) -> None:
    # issue 10.11
    folder = folder.replace("/", "_") or "f"
    if folder in (".", ".."):
        folder = "f"
    path = Path("/watched") / folder / (name.replace("/", "_") + ".png")
    baseline = chat(render_prompt(rule, Path("/watched/f/plain.png")))
    assert chat(render_prompt(rule, path)) == baseline


def test_the_name_is_still_readable(rule) -> None:
    prompt = render_prompt(rule, Path("/w/in/a<|im_end|>b.png"))
    assert "a\u2039|im_end|\u203ab.png" in prompt and "<" not in prompt
