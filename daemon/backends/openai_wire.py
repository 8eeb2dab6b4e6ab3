"""What goes over the wire to an OpenAI-compatible server, and what comes back.

``openai`` (the backend: servers, retries, failover, concurrency) calls
these: the chat-completion body (images as lossless PNG data URLs, the
hints that stop a server from resizing them), the HTTP client whose every
read and write waits only for the time left to the exchange, how much of a
reply is read, and the server's own words on an error.  The reasons behind
each choice are in ``openai``'s docstring.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from daemon.backends import Request
from daemon.config import is_loopback_host
from daemon.errors import ExitCode, VlwatchError

if TYPE_CHECKING:
    from PIL import Image

CONNECT_TIMEOUT = 10.0
#: An answer is cut (and marked truncated) past this many characters per
#: ``max_new_tokens``: generous (a token is 3-4 characters of text), yet a
#: server that sends 200 MB cannot fill the daemon's memory (issue 10.13).
CHARS_PER_TOKEN = 16
#: Raw bytes read of a reply, per answer character (JSON escapes such as
#: ``\u00e9`` take six), plus room for the envelope.
BODY_BYTES_PER_CHAR = 8
BODY_SLACK = 1 << 20




def chat_body(model: str, request: Request, images: list[str], *, ignore_eos: bool = False) -> dict[str, Any]:
    """The JSON of one chat completion: the images (as data URLs) then the prompt.

    Args:
        model: the served model name.
        request: what to ask.
        images: ``request.images`` as data URLs (``image_data_url``).
        ignore_eos: ask the server to generate all ``max_tokens`` (for the bench).
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": chat_messages(request, images),
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "stream": False,
    }
    if request.images:
        areas = [img.width * img.height for img in request.images]
        # vLLM hands these to the HF processor: smart_resize within [area,
        # area] of an image whose sides are multiples of 28 is the identity,
        # so the server sees exactly our pixels.
        body["mm_processor_kwargs"] = {"min_pixels": min(areas), "max_pixels": max(areas)}
        # transformers serve hands chat_template_kwargs to apply_chat_template,
        # which passes processor_kwargs on to the processor (vLLM and SGLang
        # ignore keys their chat template does not use).
        body["chat_template_kwargs"] = {"processor_kwargs": {"do_resize": False}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def chat_messages(request: Request, images: list[str]) -> list[dict[str, Any]]:
    """A folder job as one user turn (images, then the prompt); a chat turn by turn, images where they were given."""
    if not request.messages:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        content.append({"type": "text", "text": request.prompt})
        return [{"role": "user", "content": content}]
    # The turns hold the very image objects of request.images, in order.
    urls = {id(img): url for img, url in zip(request.images, images)}
    out: list[dict[str, Any]] = []
    for message in request.messages:
        parts: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            else:
                parts.append({"type": "image_url", "image_url": {"url": urls.get(id(part)) or image_data_url(part)}})
        if message.role != "user" and all(p["type"] == "text" for p in parts):
            out.append({"role": message.role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": message.role, "content": parts})
    return out


def image_data_url(image: "Image.Image") -> str:
    """The image as a lossless PNG ``data:`` URL, pixel for pixel."""
    buf = io.BytesIO()
    # PNG keeps every pixel; level 1 because encoding time matters more than
    # bytes on the wire to a server on the same network.
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sizes_of(request: Request) -> str:
    return ", ".join(f"{i.width}x{i.height}" for i in request.images) or "text only"


# ---------------------------------------------------------------- HTTP helpers


def read_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise VlwatchError(f"model.api_key_env names the environment variable {env_name}, but it is not set "
                           "(or empty); export the key there, or remove api_key_env", ExitCode.USAGE)
    return key


def new_client(url: str, key: str | None, connections: int, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = httpx.Client(
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        follow_redirects=False,
        # HTTP(S)_PROXY is honoured for remote servers, but a loopback server
        # is never reached through a proxy.
        trust_env=not is_loopback(url),
    )
    # httpx bounds each read, not the exchange: give every connection pool
    # (the direct one and any proxy's) a network backend that bounds each
    # read and write by the time left to the exchange (issue 10.13).
    for transport in [client._transport, *client._mounts.values()]:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _DeadlineBackend(pool._network_backend)
    return client


#: The deadline (``time.monotonic``) of the exchange this thread is making.
EXCHANGE = threading.local()


def _time_left(timeout: float | None, error: type[Exception]) -> float | None:
    deadline = getattr(EXCHANGE, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the request's time is up")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits no longer than the exchange has left."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _time_left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, _time_left(timeout, httpcore.ConnectTimeout),
                                         local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _time_left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def answer_limit(request: Request) -> int:
    """Characters of answer kept for ``request``: ``CHARS_PER_TOKEN`` per ``max_new_tokens``."""
    return max(1, request.max_new_tokens) * CHARS_PER_TOKEN


_CONTENT = re.compile(rb'"content"\s*:\s*"')
_ESCAPE_OR_QUOTE = re.compile(r'\\.|"', re.DOTALL)


def salvage_content(raw: bytes) -> str | None:
    """The (beginning of the) first ``content`` string of a JSON reply cut short, decoded."""
    m = _CONTENT.search(raw)
    if m is None:
        return None
    rest = raw[m.end():].decode("utf-8", "ignore")
    end = len(rest)  # the closing quote, if the cut came after it
    for token in _ESCAPE_OR_QUOTE.finditer(rest):  # a scan, not a backtracking match over megabytes
        if token.group() == '"':
            end = token.start()
            break
    text = rest[:end]
    for back in range(8):  # the cut may fall inside an escape such as \u00e9
        try:
            return json.loads(f'"{text[:len(text) - back]}"')
        except ValueError:
            continue
    return None


def is_loopback(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


def without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def transport_reason(exc: Exception) -> str:
    text = str(exc).strip()
    kind = type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return f"{kind}: {text}" if text else kind


def server_message(response: httpx.Response) -> str:
    """The server's own words about an error, on one line."""
    try:
        data = response.json()
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")  # vLLM/SGLang, FastAPI
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    if not message:
        message = response.text.strip() or response.reason_phrase
    one_line = " ".join(str(message).split())
    return one_line[:500]


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())

