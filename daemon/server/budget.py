"""How many tokens a chat request's prompt takes, counted before the engine sees it (issue 27).

One 50 MB string under the body cap was once tokenised whole (52 million
tokens, 24 GB) and the kernel killed the daemon, folder watching included.
So the API counts a prompt here, in the request's own thread, and refuses
with a 400 (``context_length_exceeded``, OpenAI's code) a prompt that
cannot fit: prompt tokens + ``max_tokens`` over the request context, which
is ``api.max_context`` or the model's own context, whichever is smaller.

The work is bounded whatever arrives:

1. before any image is decoded, the text's length alone refuses what no
   tokenisation could bring under the limit (more characters than the
   limit times the longest token of the vocabulary);
2. the text is then counted in pieces of ``PIECE`` characters and the
   count stops as soon as it passes the limit, so memory stays at one
   batch of pieces and time at what the limit allows;
3. only a prompt that fits is rendered through the model's own chat
   template and tokenised whole, which gives ``usage.prompt_tokens``.

The tokenizer is the served checkpoint's own, loaded once per model from
the local files (the engine may live in another process, and the engine
is not the place to refuse a request).  Where no local tokenizer exists
(``backend: openai`` naming a remote model, test stubs), the count is an
estimate: ``CHARS_PER_TOKEN`` characters a token, which is what Qwen's
tokenizer averages on English and more than it gives CJK text, so the
estimate errs towards refusing less; the remote server checks its own
context anyway.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from daemon.backends import Message
from daemon.config import Config, local_model_path
from daemon.server.context import ApiError

log = logging.getLogger(__name__)

#: Characters a token is taken to cover when no tokenizer is at hand.
CHARS_PER_TOKEN = 3
#: Characters tokenised per piece while counting (far under any model_max_length).
PIECE = 8192
#: Pieces tokenised in one call of the tokenizer.
BATCH = 32
#: Tokens the template adds around each turn (``<|im_start|>role\n ... <|im_end|>\n``) and once
#: (the default system prompt, the generation prompt), for the estimate only.
TURN_OVERHEAD = 5
FIXED_OVERHEAD = 24
#: One vision token per 28x28 pixels of an already sized image (Qwen2.5-VL: 14-pixel
#: patches merged 2x2).  The same formula as the engine's ``image_tokens``; kept
#: here so the API does not import the engine (and torch) to count.
PIXELS_PER_TOKEN = 28


@dataclass(frozen=True)
class Budget:
    """The tokens one request may use in all, and where that number comes from."""

    context: int
    source: str  # "api.max_context" or "the model's context"


@dataclass(frozen=True)
class Counter:
    """The served model's tokenizer (None: estimate) and its context length (None: unknown)."""

    tokenizer: Any | None
    context: int | None
    longest_token: int  # characters of the vocabulary's longest token

    def text_tokens(self, text: str, limit: int) -> int:
        """Tokens of ``text``, counted in pieces; stops early with a number over ``limit``."""
        if self.tokenizer is None:
            return math.ceil(len(text) / CHARS_PER_TOKEN)
        total = 0
        pieces = _pieces(text)
        for start in range(0, len(pieces), BATCH):
            batch = pieces[start:start + BATCH]
            ids = self.tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            total += sum(len(i) for i in ids)
            # Each cut may add a token the whole text would not have: allow one per piece.
            if total > limit + start + len(batch):
                return total
        return total

    def prompt_tokens(self, turns: Sequence[Message]) -> int:
        """Tokens of the whole prompt as the engine renders it (template, text, image placeholders)."""
        images = [p for t in turns for p in t.parts if isinstance(p, Image.Image)]
        vision = sum(image_tokens(i.width, i.height) for i in images)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            text = sum(self.text_tokens(p, 1 << 62) for t in turns for p in t.parts if isinstance(p, str))
            return text + vision + TURN_OVERHEAD * len(turns) + FIXED_OVERHEAD
        messages = [{"role": t.role, "content": [{"type": "text", "text": p} if isinstance(p, str)
                                                 else {"type": "image"} for p in t.parts]} for t in turns]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(rendered, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return len(ids) - len(images) + vision  # one <|image_pad|> per image, expanded by the processor


def image_tokens(width: int, height: int) -> int:
    """Tokens an already sized image takes (see ``PIXELS_PER_TOKEN``)."""
    return max(1, (width // PIXELS_PER_TOKEN) * (height // PIXELS_PER_TOKEN))


def _pieces(text: str) -> list[str]:
    """``text`` in pieces of at most ``PIECE`` characters, cut after whitespace where there is some."""
    out: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + PIECE, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + PIECE // 2, end), text.rfind("\n", start + PIECE // 2, end))
            if cut > start:
                end = cut + 1
        out.append(text[start:end])
        start = end
    return out


def budget(config: Config, counter: Counter) -> Budget:
    """The tokens a request may use: ``api.max_context``, or less when the model's context is smaller."""
    limit = config.api.max_context
    if counter.context is not None and counter.context < limit:
        return Budget(counter.context, "the model's context")
    return Budget(limit, "api.max_context")


def counter_for(config: Config) -> Counter:
    """The counter of the served model (its tokenizer loaded once per model name)."""
    return _counter(config.model.name)


_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _counter_cached(name: str) -> Counter:
    folder = local_model_path(name)
    if folder is None or not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return Counter(None, None, CHARS_PER_TOKEN)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a broken or partial checkpoint: the engine reports it; estimate here
        log.warning("api: cannot load the tokenizer of %s (%s); prompt lengths are estimated", name, exc)
        return Counter(None, _context_of(folder), CHARS_PER_TOKEN)
    longest = max((len(tokenizer.convert_tokens_to_string([t])) for t in tokenizer.get_vocab()), default=1)
    return Counter(tokenizer, _context_of(folder), max(1, longest))


def _counter(name: str) -> Counter:
    with _lock:  # one load per model, even when the first requests come together
        return _counter_cached(name)


def _context_of(folder: Any) -> int | None:
    """``max_position_embeddings`` of the checkpoint's text model, when its config.json says."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for holder in (data.get("text_config") or {}, data):
        value = holder.get("max_position_embeddings") if isinstance(holder, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def refuse_long_text(chars: int, max_new: int, config: Config, counter: Counter) -> None:
    """400 when ``chars`` characters cannot fit even at the longest token each (nothing tokenised yet)."""
    room = budget(config, counter)
    if chars > (room.context - max_new) * counter.longest_token:
        raise _too_long(f"{chars} characters of text", max_new, room)


def check_prompt(turns: Sequence[Message], max_new: int, config: Config, counter: Counter) -> int:
    """The prompt's tokens; 400 when they and ``max_new`` do not fit the budget.

    Raises:
        ApiError: 400 ``context_length_exceeded``, naming the numbers.
    """
    room = budget(config, counter)
    limit = room.context - max_new
    images = [p for t in turns for p in t.parts if isinstance(p, Image.Image)]
    vision = sum(image_tokens(i.width, i.height) for i in images)
    text = "".join(p for t in turns for p in t.parts if isinstance(p, str))
    if vision > limit:
        raise _too_long(f"{len(images)} images take {vision} tokens", max_new, room)
    counted = counter.text_tokens(text, limit - vision)
    if counted + vision > limit:
        raise _too_long(f"the prompt takes over {counted + vision} tokens", max_new, room)
    total = counter.prompt_tokens(turns)
    if total > limit:
        raise _too_long(f"the prompt takes {total} tokens", max_new, room)
    return total


def _too_long(what: str, max_new: int, room: Budget) -> ApiError:
    return ApiError(400, f"{what}; with max_tokens {max_new} that is over the {room.context} tokens a request "
                         f"may use ({room.source}); send less, or lower max_tokens",
                    param="messages", code="context_length_exceeded")
