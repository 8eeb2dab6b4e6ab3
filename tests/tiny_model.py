"""Build a tiny random-weight Qwen2.5-VL checkpoint for tests.

Usage:
    python tests/tiny_model.py DIR          # command line
    build_tiny_model(Path(DIR)) -> Path     # from pytest fixtures

The checkpoint is laid out like Qwen/Qwen2.5-VL-7B-Instruct (config.json,
generation_config.json, model.safetensors, tokenizer files, image/video
processor config, chat_template.jinja) so that the daemon loads it through the
exact same code path as the real model:

    AutoProcessor.from_pretrained(DIR, local_files_only=True)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(
        DIR, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa")

WHY a generated checkpoint instead of a downloaded one: the Hugging Face hub is
unreachable here and the real model is 16 GB; tests need something that runs
the real processor, the real vision tower (window + full attention, patch
merger), the real M-RoPE text decoder and real `generate()` in well under a
second on a CPU.  The weights are random, so the generated text is gibberish;
only shapes, plumbing and determinism are meaningful.

Everything is deterministic: the BPE trainer is deterministic for a fixed
corpus and the weights come from `torch.manual_seed(0)`.

Works with transformers 5.17 .. 5.24 (only APIs present in both are used).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# The real chat template, Qwen's special tokens and the way a stand-in BPE
# tokenizer is trained live in the package (the bench builds the same kind of
# tokenizer for the full-size architecture); the tiny checkpoint reuses them.
from daemon.backends.transformers.dummy import QWEN2_5_VL_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, stand_in_tokenizer

if TYPE_CHECKING:  # torch/transformers load only when a model is built, not on import
    from transformers import Qwen2Tokenizer

# Small built-in training corpus covering what the daemon feeds the model:
# English prose, HTML, JSON and Markdown, plus file paths.  A few KB is enough
# for a few hundred merges; it only has to make typical text tokenize into
# multi-byte tokens rather than single bytes.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. The dog was not amused.",
    "Describe this image. What is shown in the picture? Answer in one sentence.",
    "You are a helpful assistant. Summarize the document and list the key points.",
    "A photo of a cat sitting on a wooden table next to a cup of coffee.",
    "The screenshot shows a terminal window with a Python traceback and an error message.",
    "This is a scanned receipt from a grocery store with the total amount at the bottom.",
    "The diagram illustrates the architecture of the system: a watcher, a queue and a worker.",
    "Please extract the title, the author and the date from the following text.",
    "There are three people standing in front of a building on a sunny day.",
    "The chart compares monthly revenue for the years 2023 and 2024.",
    "It is a picture of a mountain landscape with snow, trees and a lake in the foreground.",
    "The file was created, modified and then moved to another directory by the user.",
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n  <meta charset=\"utf-8\">\n"
    "  <title>Image description</title>\n</head>\n<body>\n"
    "  <h1>Results</h1>\n  <p class=\"caption\">A red car parked on the street.</p>\n"
    "  <ul>\n    <li><a href=\"/images/car.png\">car.png</a></li>\n"
    "    <li><a href=\"/images/dog.jpg\">dog.jpg</a></li>\n  </ul>\n"
    "  <div id=\"main\"><span>Hello, world!</span></div>\n</body>\n</html>\n",
    '{"path": "/home/user/Pictures/photo.jpg", "size": 123456, "mime": "image/jpeg",\n'
    ' "caption": "A dog playing in the park", "tags": ["dog", "park", "grass"],\n'
    ' "width": 1920, "height": 1080, "created": "2024-05-01T12:34:56Z", "ok": true,\n'
    ' "error": null, "score": 0.87, "objects": [{"label": "dog", "box": [10, 20, 300, 400]}]}\n',
    '{"event": "created", "file": "/var/spool/inbox/scan_0001.png", "status": "queued"}\n'
    '{"event": "processed", "file": "/var/spool/inbox/scan_0001.png", "status": "done"}\n',
    "# Image report\n\n## Summary\n\nThe image contains **two** cats and a *small* dog.\n\n"
    "- First item\n- Second item\n- Third item\n\n1. Open the file\n2. Read the text\n"
    "3. Write the answer\n\n> Note: the colors may be inaccurate.\n\n"
    "```python\nimport json\nprint(json.dumps({\"a\": 1}))\n```\n\n"
    "| Name | Value |\n| ---- | ----- |\n| width | 640 |\n| height | 480 |\n\n"
    "[link](https://example.com/docs/index.html) and `inline code`.\n",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 3.14 -1 +2 50% $20 #1 @user & | ~ ^",
    "Hello! How are you? I'm fine, thanks. It's a nice day, isn't it? We'll see; they've gone.",
)
# Repeat so pair counts clear the trainer's min_frequency and merges are
# learned for the common words; the exact count is arbitrary.
_CORPUS_REPEATS: int = 8
_BPE_VOCAB_SIZE: int = 800  # target; the small corpus may stop short of it

# Image size bounds.  Same semantics as the real preprocessor_config.json
# (min_pixels 3136 = 56*56) but a small max_pixels so images become at most 64
# merged vision tokens (64 * 28 * 28 pixels) and tests stay fast.
MIN_PIXELS: int = 56 * 56
MAX_PIXELS: int = 64 * 28 * 28

# Tiny model shape.  head_dim = 64 / 4 = 16, so M-RoPE's mrope_section must sum
# to head_dim / 2 = 8 (the rotary frequencies are split into temporal/height/
# width chunks); [2, 3, 3] keeps the real model's 16:24:24 proportions.
TEXT_HIDDEN_SIZE: int = 64
TEXT_NUM_HEADS: int = 4
TEXT_NUM_KV_HEADS: int = 2
MROPE_SECTION: list[int] = [2, 3, 3]
SEED: int = 0


def _build_tokenizer() -> Qwen2Tokenizer:
    """Qwen2Tokenizer trained on the built-in corpus, Qwen specials right after the BPE vocab."""
    return stand_in_tokenizer(list(_CORPUS) * _CORPUS_REPEATS, vocab_size=_BPE_VOCAB_SIZE, model_max_length=32768)


def build_tiny_model(path: Path) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint into `path` and return it."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    # The embedding table must cover every token id; round up to a multiple of
    # 64 like the real model does (152064 rows for 151665 tokens).
    vocab_size = -(-len(tokenizer) // 64) * 64

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": TEXT_NUM_HEADS,
            "num_key_value_heads": TEXT_NUM_KV_HEADS,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "max_window_layers": 2,
            # Legacy (pre-v5) key on purpose: it is what real Qwen2.5-VL
            # config.json files carry and every transformers 5.x converts it
            # to rope_parameters; "mrope" is mapped to the default rope type.
            "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION},
            "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # 112 px windows = 4x4 merged tokens, as in the real model, so
            # images larger than one window exercise windowed attention.
            "window_size": 112,
            # Block 0 windowed, block 1 full attention (real: [7, 15, 23, 31]).
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "out_hidden_size": TEXT_HIDDEN_SIZE,  # merger projects into the text width
        },
        # These must equal the tokenizer's ids: the model finds image
        # placeholders in input_ids by these numbers, the processor by text.
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )

    # Seed right before construction so the weights only depend on the config.
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        # Stop on end-of-turn, and on end-of-text as the real model does.
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(path)  # safetensors is the default (and only) format in 5.x

    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    # Also writes the tokenizer files and chat_template.jinja.
    processor.save_pretrained(path)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIR", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = build_tiny_model(Path(argv[1]))
    print(f"tiny Qwen2.5-VL checkpoint written to {out} in {time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
