"""An OpenAI chat-completions body turned into a ``Request`` for the engine.

What a body may hold, and what is refused (each refusal a 4xx ``ApiError``
naming the part, never a 500):

- ``messages``: turns of ``system`` (or ``developer``), ``user`` and
  ``assistant``, each with ``content`` as a string or a list of ``text`` and
  ``image_url`` parts, in order; images only in user turns.
- ``image_url.url``: a ``data:`` URL (base64, at most ``MAX_IMAGE_BYTES``
  decoded), or a ``file://`` URL or plain absolute path of a file inside a
  watched folder or an ``output_dir`` (also after resolving symlinks:
  checked on the file actually opened).  ``http(s)://`` and everything else
  is refused: nothing is ever fetched from the network.
- ``file`` parts (OpenAI's shape, what ``llm`` sends for a PDF attachment):
  ``{"type": "file", "file": {"file_data": "data:application/pdf;base64,...",
  "filename": ...}}``, taken as a ``data:`` image is; ``file_id`` is refused
  (there is no file store).
- limits, each a 400 naming it: the prompt's tokens plus ``max_tokens``
  within ``api.max_context`` or the model's context (``budget.py``; counted
  before the engine sees anything), a PDF of at most ``api.max_pdf_pages``
  pages (refused whole, never cut), ``api.max_request_pixels`` decoded
  pixels for all images of the request together, text that is valid
  Unicode (no lone surrogates: the tokenizer cannot take them).
- ``max_tokens`` / ``max_completion_tokens`` (capped at ``model.max_new_tokens``),
  ``temperature`` (0..2), ``stream``; ``n`` must be 1.  Other OpenAI fields
  are accepted and ignored, so ordinary clients work unchanged.

Images are decoded and sized by ``daemon.images.load_pages``, exactly as a
folder file is (same format allow-list, bomb limit, EXIF rotation, PDF
pages, ``model.min_pixels``/``max_pixels``), so grounding boxes the model
answers with map back to the original pixels as they do in sidecars.  A
``data:`` image is decoded from an anonymous in-memory file (``memfd``),
never written to disk.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from daemon.backends import Message, Request
from daemon.config import Config
from daemon.errors import InputError
from daemon.errors import printable
from daemon.images import load_pages, pdf_page_count
from daemon.memory import TRIM_AFTER_PIXELS, give_back
from daemon.server import budget
from daemon.server.context import ApiError

#: Largest decoded ``data:`` image.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Most images (PDF pages included) in one conversation, unless ``api.max_pdf_pages`` is more.
MAX_IMAGES = 16
#: A lone UTF-16 surrogate: JSON lets ``"\\ud800"`` through, no tokenizer takes it.
_SURROGATE = re.compile("[\ud800-\udfff]")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatCall:
    """A parsed chat-completions request."""

    request: Request
    stream: bool
    include_usage: bool
    model: str | None
    prompt_tokens: int = 0  # as the served model's tokenizer counts them (an estimate without one)


class _Images:
    """The images of one request so far, within its limits (count, decoded pixels)."""

    def __init__(self, config: Config) -> None:
        self.pages: list[Image.Image] = []
        self.pixels = 0
        self.most = max(MAX_IMAGES, config.api.max_pdf_pages)
        self.max_pixels = config.api.max_request_pixels

    def add(self, pages: list[tuple[Image.Image, tuple[int, int]]], where: str) -> None:
        for image, (w, h) in pages:
            if len(self.pages) >= self.most:
                raise ApiError(400, f"{where}: more than {self.most} images (PDF pages count) in one request",
                               param=where, code="too_many_images")
            self.pixels += w * h
            if self.pixels > self.max_pixels:
                raise ApiError(400, f"{where}: the images of this request decode to over {self.max_pixels:,} "
                                    "pixels together (api.max_request_pixels); send fewer or smaller images",
                               param=where, code="too_many_pixels")
            self.pages.append(image)


def parse_chat(body: Any, config: Config, counter: budget.Counter | None = None) -> ChatCall:
    """Validate ``body`` and build the engine request (decodes the images: call off the event loop).

    Args:
        counter: counts the prompt's tokens (``budget.counter_for(config)`` when None).

    Raises:
        ApiError: 400 for a malformed body or image or a prompt over the
            context, 403 for a path outside the watched folders, 404 for a
            missing file there.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list", param="messages", code="invalid_request")
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "n: only one choice per request is served", param="n", code="invalid_request")
    max_new = _max_tokens(body, config)
    temperature = _temperature(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: expected true or false", param="stream", code="invalid_request")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    counter = counter or budget.counter_for(config)
    # Before any image is decoded or any text tokenised: text no tokenisation could fit.
    budget.refuse_long_text(_text_length(messages), max_new, config, counter)
    turns: list[Message] = []
    images = _Images(config)
    try:
        for i, message in enumerate(messages):
            turns.append(_turn(message, f"messages[{i}]", config, images))
    finally:
        if images.pixels >= TRIM_AFTER_PIXELS:  # the decode buffers are freed: hand them back (issue 27)
            give_back()
    if not any(t.role == "user" for t in turns):
        raise ApiError(400, "messages: at least one user message is needed", param="messages", code="invalid_request")
    prompt_tokens = budget.check_prompt(turns, max_new, config, counter)
    prompt = next((p for t in reversed(turns) if t.role == "user" for p in reversed(t.parts) if isinstance(p, str)), "")
    model = body.get("model") if isinstance(body.get("model"), str) else None
    request = Request(images=tuple(images.pages), prompt=prompt, max_new_tokens=max_new, messages=tuple(turns),
                      temperature=temperature)
    return ChatCall(request=request, stream=stream, include_usage=include_usage, model=model,
                    prompt_tokens=prompt_tokens)


def _text_length(messages: list[Any]) -> int:
    """Characters of every text in ``messages``, whatever else is wrong with them (checked later)."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{where}: expected a string", param=where, code="invalid_request")
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise ApiError(400, f"{where}: holds a lone surrogate (\\u{ord(bad.group()):04x}, at character "
                            f"{bad.start()}), which is not valid Unicode text", param=where, code="invalid_text")
    return value


def _max_tokens(body: dict[str, Any], config: Config) -> int:
    limit = config.model.max_new_tokens
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"{key}: expected a positive whole number", param=key, code="invalid_request")
        return min(value, limit)  # the engine plans memory for model.max_new_tokens at most
    return limit


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise ApiError(400, "temperature: expected a number from 0 to 2", param="temperature", code="invalid_request")
    return float(value)


def _turn(message: Any, where: str, config: Config, images: _Images) -> Message:
    if not isinstance(message, dict):
        raise ApiError(400, f"{where}: expected an object with role and content", param=where, code="invalid_request")
    name = message.get("role")
    role = ROLES.get(name) if isinstance(name, str) else None  # a list or object is no role (and unhashable)
    if role is None:
        shown = repr(name)[:40] if isinstance(name, (str, type(None))) else f"a JSON {_json_type(name)}"
        raise ApiError(400, f"{where}.role: {shown} is not one of system, developer, user, assistant",
                       param=f"{where}.role", code="invalid_request")
    content = message.get("content")
    if isinstance(content, str):
        return Message(role, (_text(content, f"{where}.content"),))
    if content is None and role == "assistant":
        return Message(role, ("",))
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content: expected a string or a list of parts", param=f"{where}.content",
                       code="invalid_request")
    parts: list[str | Image.Image] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            parts.append(_text(part.get("text"), f"{at}.text"))
        elif kind in ("image_url", "input_image", "file"):
            if role != "user":
                raise ApiError(400, f"{at}: images and files are taken in user messages only", param=at,
                               code="invalid_request")
            url = _file_data(part, at) if kind == "file" else _image_url(part, at)
            before = len(images.pages)
            images.add(load_image(url, at, config), at)
            parts.extend(images.pages[before:])
        else:
            shown = repr(kind)[:40] if isinstance(kind, (str, type(None))) else f"a JSON {_json_type(kind)}"
            raise ApiError(400, f"{at}: part type {shown} is not text, image_url or file", param=at,
                           code="invalid_request")
    return Message(role, tuple(parts))


def _image_url(part: dict[str, Any], at: str) -> str:
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{at}.image_url.url: expected a string", param=at, code="invalid_request")
    return url


def _file_data(part: dict[str, Any], at: str) -> str:
    """A ``file`` part's ``file_data`` as a ``data:`` URL (OpenAI sends one; bare base64 is taken as PDF)."""
    file = part.get("file")
    if not isinstance(file, dict):
        raise ApiError(400, f"{at}.file: expected an object with file_data", param=at, code="invalid_request")
    if file.get("file_id") is not None and file.get("file_data") is None:
        raise ApiError(400, f"{at}.file.file_id: uploaded files are not kept here; send the file inline as "
                            "file_data (data:application/pdf;base64,...)", param=at, code="invalid_request")
    data = file.get("file_data")
    if not isinstance(data, str) or not data:
        raise ApiError(400, f"{at}.file.file_data: expected a data: URL (data:application/pdf;base64,...)",
                       param=at, code="invalid_request")
    return data if data[:5].lower() == "data:" else "data:application/pdf;base64," + data


def _json_type(value: Any) -> str:
    return {list: "array", dict: "object", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")


# ------------------------------------------------------------------ images

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


def load_image(url: str, where: str, config: Config) -> list[tuple[Image.Image, tuple[int, int]]]:
    """The pages of one ``image_url``, sized for the model, each with the size it was decoded at."""
    if url[:5].lower() == "data:":
        return _data_image(url, where, config)
    lowered = url[:8].lower()
    if lowered.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: http(s) URLs are not fetched (nothing leaves or enters this machine "
                            "that way); send the image as a data: URL or a file:// path inside a watched folder",
                       param=where, code="url_not_allowed")
    if lowered.startswith("file://"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{where}: file:// URL of another host", param=where, code="url_not_allowed")
        path = Path(urllib.parse.unquote(parsed.path))
    elif url.startswith("/"):
        path = Path(url)
    else:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise ApiError(400, f"{where}: {shown!r} is not a data: URL, file:// URL or absolute path",
                       param=where, code="url_not_allowed")
    return _file_image(path, where, config)


def _sizes(config: Config) -> dict[str, int]:
    return {"min_pixels": config.model.min_pixels, "max_pixels": config.model.max_pixels}


def _data_image(url: str, where: str, config: Config) -> list[tuple[Image.Image, tuple[int, int]]]:
    m = _DATA_URL.match(url[:256])
    if m is None or not m.group("b64"):
        raise ApiError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", param=where,
                       code="invalid_image")
    payload = url[m.end():]
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise ApiError(413, f"{where}: image over {MAX_IMAGE_BYTES // (1024 * 1024)} MiB", param=where,
                       code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URL is not valid base64", param=where, code="invalid_image") from None
    with in_memory(data) as path:
        return _pages(path, where, config, shown=where, allowed_roots=None)


def _file_image(path: Path, where: str, config: Config) -> list[tuple[Image.Image, tuple[int, int]]]:
    roots = served_roots(config)
    path = Path(os.path.normpath(path))
    if not any(path == r or r in path.parents for r in roots):
        raise ApiError(403, f"{where}: {printable(path)} is not inside a watched folder or output_dir",
                       param=where, code="path_not_allowed")
    if resolves_outside(path, roots):  # before the existence check: the same answer for a missing file
        raise ApiError(403, f"{where}: {printable(path)}: resolves to a file outside every watched folder",
                       param=where, code="path_not_allowed")
    if not path.exists():
        raise ApiError(404, f"{where}: {printable(path)}: no such file", param=where, code="file_not_found")
    real_roots = tuple(Path(os.path.realpath(r)) for r in roots)
    return _pages(path, where, config, shown=printable(path), allowed_roots=real_roots)


def resolves_outside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether ``path`` (existing or not) resolves, symlinks followed, outside every one of ``roots``.

    A first answer, given the same for a file that exists and one that does
    not; the file actually opened is checked again (``daemon.images``).
    """
    real = Path(os.path.realpath(path))
    return not any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))


def served_roots(config: Config) -> tuple[Path, ...]:
    """The folders the API may read from: every watched folder and output_dir (lexical, absolute)."""
    out: list[Path] = []
    for w in config.watch:
        out.append(Path(os.path.normpath(w.path.absolute())))
        if w.output_dir is not None:
            out.append(Path(os.path.normpath(w.output_dir.absolute())))
    return tuple(out)


def _pages(path: Path, where: str, config: Config, *, shown: str,
           allowed_roots: tuple[Path, ...] | None) -> list[tuple[Image.Image, tuple[int, int]]]:
    most = config.api.max_pdf_pages
    try:
        count = pdf_page_count(path, allowed_roots)
        if count is not None and count > most:
            raise ApiError(400, f"{where}: the PDF has {count} pages, more than the {most} a chat request takes "
                                "(api.max_pdf_pages); send the pages you mean, or raise api.max_pdf_pages",
                           param=where, code="too_many_pages")
        pages = load_pages(path, pages=((1, most),), allowed_roots=allowed_roots, **_sizes(config))
    except InputError as exc:
        message = str(exc)
        prefix = printable(path)
        if message.startswith(prefix):
            message = shown + message[len(prefix):]
        elif allowed_roots is None:
            message = message.replace(prefix, shown)
        status, code = (403, "path_not_allowed") if "outside every watched folder" in message else (400, "invalid_image")
        if status == 403:
            message = f"{shown}: resolves to a file outside every watched folder"
        raise ApiError(status, message, param=where, code=code) from None
    return [(p.image, p.original) for p in pages]


@contextmanager
def in_memory(data: bytes) -> Iterator[Path]:
    """``data`` as a readable path: an anonymous memfd (Linux), else a private temp file."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("vlwatch-api-image", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="vlwatch-api-") as f:
        f.write(data)
        f.flush()
        yield Path(f.name)
