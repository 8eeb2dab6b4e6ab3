"""The model source for ``vlwatch bench --load-format dummy``: the real architecture, no weights.

``dummy_source(name)`` returns a local folder that ``AutoConfig`` and
``AutoProcessor`` can read offline.  When the configured model is on this
machine (a directory, or a snapshot in the Hugging Face cache) that folder is
used as is: its config gives the architecture and its processor the exact
tokenization; only the weights are random (``from_config``).  Otherwise a
built-in copy of Qwen/Qwen2.5-VL-7B-Instruct's ``config.json`` (or the
3B's, for that model: issue 23) is written,
with a stand-in tokenizer: a small byte-level BPE whose special tokens sit at
the real ids (so the model finds its image placeholders) and whose vocabulary
is padded to the real size.  Random weights make the text meaningless; what
matters for a benchmark is the same compute: the same layers, image token
counts and (near enough) text token counts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from daemon.config import local_model_path

log = logging.getLogger(__name__)

#: Bump when the written files change, so a stale cached copy is rebuilt.
_LAYOUT_VERSION = "2"  # 2: config.json names the transformers version it was written for

#: Qwen/Qwen2.5-VL-7B-Instruct config.json, as published (legacy flat layout:
#: every transformers 5.x reads it into text_config / vision_config).
QWEN2_5_VL_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    # As published.  Without it transformers 5.0-5.17 takes the folder for a
    # Mistral tokenizer saved before 5.0 and warns of an "incorrect regex
    # pattern" at every load (tokenization_utils_tokenizers: a config.json
    # without transformers_version is not proof of a non-Mistral model).
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

#: Qwen/Qwen2.5-VL-3B-Instruct config.json, as published: where it differs from the 7B's
#: (a narrower, deeper text model with 2 KV heads and tied embeddings; the same vision tower).
QWEN2_5_VL_3B_CONFIG: dict[str, Any] = {
    **QWEN2_5_VL_7B_CONFIG,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "vision_config": {**QWEN2_5_VL_7B_CONFIG["vision_config"], "out_hidden_size": 2048},
}
#: The built-in configs by the model's last name part, lower case.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b-instruct": QWEN2_5_VL_7B_CONFIG,
    "qwen2.5-vl-3b-instruct": QWEN2_5_VL_3B_CONFIG,
}

#: generation_config.json of the same model, as published: greedy decoding in
#: vlwatch ignores the sampling keys, but the repetition penalty and the two
#: end-of-sequence ids are applied as on the real weights (``dummy_model``).
QWEN2_5_VL_7B_GENERATION: dict[str, Any] = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}

#: Qwen's special tokens at their real ids, in order from 151643.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
FIRST_SPECIAL_ID = 151643

#: The chat template Qwen2.5-VL-Instruct ships (chat_template.json).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (transformers' qwen2 PRETOKENIZE_REGEX).
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Enough English for common words to become single tokens, as they are in
# the real 151k vocabulary, so prompts tokenize to about the real length.
_CORPUS = (
    "You are a helpful assistant. Describe this image in detail. Extract all text of the "
    "image as Markdown, keep tables as Markdown tables. Read the text. What is shown in the "
    "picture? Write the HTML code of this screenshot. Detect all distinct objects and return "
    "their bounding boxes as JSON. system user assistant the a of and to in is that with for "
    "on as it this be are from at by or an page document table code screenshot photo scan"
)


def dummy_source(name: str) -> Path:
    """A local folder with ``name``'s config and processor files (see the module doc)."""
    local = local_model_path(name)
    if local is not None and (Path(local) / "config.json").is_file():
        log.info("dummy weights: architecture and processor of %s", local)
        return Path(local)
    key = _builtin_key(name)
    if key is None:
        log.warning("dummy weights: %s is not on this machine; using the built-in Qwen2.5-VL-7B-Instruct config", name)
        key = "qwen2.5-vl-7b-instruct"
    return builtin_model(key)


#: Seed of the random weights: the bench and a daemon it starts (``--end-to-end``)
#: build the same model, so with end-of-sequence honoured they stop alike.
DUMMY_SEED = 0


def dummy_model(source: Path | str, *, dtype: Any, attention: str, device: Any) -> Any:
    """``source``'s architecture with random weights and its generation config, built on ``device``.

    ``from_config`` gives the model a generation config derived from
    config.json alone (one end-of-sequence id, no repetition penalty); the
    real weights come with generation_config.json, which the engine reads
    for its stop ids and penalty.  So it is read here too, or the bench
    would run a lighter decode than users get.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    config._attn_implementation = attention  # honoured by from_config below
    # Build on the target device: initialising 8B random weights on the CPU
    # and copying them over takes minutes, on a GPU seconds.
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []), torch.device(device):
        torch.manual_seed(DUMMY_SEED)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attention)
    if (Path(source) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source, local_files_only=True)
    return model


def _builtin_key(name: str) -> str | None:
    from daemon.plan import canonical_name

    last = canonical_name(name).rstrip("/").split("/")[-1].lower()
    return last if last in BUILTIN_CONFIGS else None


def builtin_qwen2_5_vl_7b(folder: Path | None = None) -> Path:
    """Write (once) the built-in Qwen2.5-VL-7B-Instruct config and stand-in processor."""
    return builtin_model("qwen2.5-vl-7b-instruct", folder)


def builtin_model(key: str, folder: Path | None = None) -> Path:
    """Write (once) a built-in model's published config and the stand-in processor (``BUILTIN_CONFIGS``)."""
    config = BUILTIN_CONFIGS[key]
    title = {"qwen2.5-vl-7b-instruct": "Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-3b-instruct": "Qwen2.5-VL-3B-Instruct"}[key]
    folder = folder or _cache_dir() / "dummy" / title
    stamp = folder / ".vlwatch-dummy"
    if stamp.is_file() and stamp.read_text() == _LAYOUT_VERSION:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(QWEN2_5_VL_7B_GENERATION, indent=2))
    _processor().save_pretrained(folder)
    stamp.write_text(_LAYOUT_VERSION)
    log.info("dummy weights: wrote the built-in %s config to %s", title, folder)
    return folder


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlwatch"


def _processor() -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    # The real preprocessor_config.json: 14 px patches, 2x2 merge, CLIP mean/std.
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    image = Qwen2VLImageProcessor(size=pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
                                  image_mean=mean, image_std=std)
    video = Qwen2VLVideoProcessor(size=pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
                                  image_mean=mean, image_std=std)
    return Qwen2_5_VLProcessor(image_processor=image, video_processor=video, tokenizer=_tokenizer(),
                               chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def _tokenizer() -> Any:
    """A byte-level BPE with Qwen's specials at their real ids (151643...)."""
    # Pad to the first special id: the embedding table has 152064 rows and the
    # config names the vision tokens by number.
    return stand_in_tokenizer([_CORPUS] * 4, vocab_size=1024, first_special_id=FIRST_SPECIAL_ID,
                              model_max_length=131072)


def stand_in_tokenizer(corpus: Sequence[str], *, vocab_size: int, first_special_id: int | None = None,
                       model_max_length: int) -> Any:
    """A Qwen2Tokenizer trained here on ``corpus``, with Qwen's special tokens and chat template.

    Shared by the bench's stand-in (specials at their real ids) and the tests'
    tiny checkpoint (specials right after the BPE vocab, ``first_special_id=None``).

    Args:
        corpus: training text.
        vocab_size: BPE target size (a small corpus may stop short of it).
        first_special_id: id of ``<|endoftext|>``; the vocab is padded with
            unused tokens up to it.  None: right after the BPE vocab.
        model_max_length: as in the real tokenizer_config.json.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(corpus, vocab_size=vocab_size)
    first = len(vocab) if first_special_id is None else first_special_id
    for i in range(len(vocab), first):
        vocab[f"<|vlwatch_unused_{i}|>"] = i
    # Fixed ids in Qwen order: letting the tokenizer append them would order
    # them by role (eos before pad, ...), not as the real vocabulary does.
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = first + i
    tokenizer = Qwen2Tokenizer(
        # Real Qwen2.5-VL tokenizer_config.json: no bos, no unk, eos <|im_end|>, pad <|endoftext|>.
        vocab=vocab, merges=merges, bos_token=None, unk_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"],
        errors="replace", model_max_length=model_max_length, split_special_tokens=False,
        # Left padding: batched generation of a decoder-only model needs it.
        clean_up_tokenization_spaces=False, padding_side="left", chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    # The model config hard-codes the vision token ids: fail loudly if the
    # tokenizer renumbered a special token.
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != first + i:
            raise RuntimeError(f"stand-in tokenizer: {token!r} did not get id {first + i}")
    return tokenizer


def train_bpe(corpus: Sequence[str], *, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE the way Qwen2Tokenizer pre-tokenizes; return (vocab, merges).

    The pipeline (NFC, Qwen's split regex, byte-level without prefix space)
    mirrors what Qwen2Tokenizer builds around a vocab/merges pair, so the
    learned merges apply when that class re-creates it.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # All 256 byte symbols are in the vocab so any text round-trips, as with the real vocab.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    # Read back through the serialized model: not every tokenizers release has a merges getter.
    model = json.loads(bpe.to_str())["model"]
    # Merges are "a b" strings in older tokenizers releases, [a, b] lists in newer;
    # Qwen2Tokenizer wants (a, b) tuples.
    merges = [(m[0], m[1]) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]
