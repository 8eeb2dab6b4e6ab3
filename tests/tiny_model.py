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

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch/transformers load only when a model is built, not on import
    from transformers import Qwen2Tokenizer

# The Jinja chat template shipped by Qwen/Qwen2.5-VL-7B-Instruct in its
# chat_template.json (identical to the one in transformers' own Qwen2-VL
# processor tests).  Reproduced verbatim: the daemon's prompt formatting must
# be tested against the real template, including the default system prompt
# that is injected when the conversation does not start with one.
QWEN2_5_VL_CHAT_TEMPLATE: str = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen special tokens, in the order (and therefore relative id order) the real
# tokenizer assigns them: 151643 <|endoftext|> ... 151656 <|video_pad|>.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Same regex the real Qwen2 tokenizer pre-tokenizes with (copied from
# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).  Training
# with the same pre-tokenizer matters: merges learned across a different split
# would never fire (or fire differently) once Qwen2Tokenizer re-splits text.
QWEN_PRETOKENIZE_REGEX: str = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

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


def _train_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the built-in corpus; return (vocab, merges).

    The pipeline (NFC, Qwen split regex, byte-level without prefix space)
    mirrors what transformers' Qwen2Tokenizer builds around a vocab/merges
    pair, so the learned merges apply when that class re-creates it.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        # All 256 byte symbols are in the vocab so ANY text (or bytes the
        # random model emits) round-trips, like the real Qwen vocab.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # added afterwards at the END of the vocab, as in Qwen
        show_progress=False,
    )
    bpe.train_from_iterator(list(_CORPUS) * _CORPUS_REPEATS, trainer=trainer)

    # Read vocab/merges back through the serialized model: the Python BPE
    # object exposes no merges getter in every tokenizers release.
    model_json = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    raw_merges = model_json["merges"]
    # Older tokenizers releases serialize merges as "a b" strings, newer ones
    # as [a, b] lists; Qwen2Tokenizer hands merges straight to tokenizers' BPE,
    # which raises a TypeError for "a b" strings and wants (a, b) tuples.
    merges: list[tuple[str, str]] = [
        (m[0], m[1]) if isinstance(m, list) else tuple(m.split(" ", 1))  # type: ignore[misc]
        for m in raw_merges
    ]
    return vocab, merges


def _build_tokenizer() -> Qwen2Tokenizer:
    """Wrap the trained BPE as transformers' Qwen2Tokenizer with Qwen specials."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe_vocab()
    # Give the special tokens fixed ids right after the BPE vocab, in Qwen
    # order.  Letting the tokenizer append them would order them by special
    # token *role* (eos before pad, ...), not the real Qwen order.
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        # Real Qwen2.5-VL tokenizer_config.json: no bos, no unk,
        # eos <|im_end|> (ends an assistant turn), pad <|endoftext|>.
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"],
        errors="replace",
        model_max_length=32768,
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        # Decoder-only batched generation needs LEFT padding; transformers'
        # default is right, which would put pad tokens between the prompt
        # and the generated tokens.
        padding_side="left",
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    # Guard against the tokenizer silently re-numbering the specials (the
    # model config hard-codes the vision token ids below).
    for token in QWEN_SPECIAL_TOKENS:
        got = tokenizer.convert_tokens_to_ids(token)
        if got != vocab[token]:
            raise RuntimeError(f"special token {token!r} got id {got}, expected {vocab[token]}")
    return tokenizer


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
