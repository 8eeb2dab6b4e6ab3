"""``vlwatch ask``: a question about images, through the running daemon's API or in-process.

The daemon is found from the config's ``api.listen`` and recognised by its
state file (``daemon_client``), so images never go to some other program on
the port; with no daemon the model is loaded here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from daemon.backends import create_backend
from daemon.config import Config
from daemon.controls import for_terminal, json_text
from daemon.engine.loop import check_model
from daemon.errors import ExitCode, VlwatchError
from daemon.store.keys import safe_text
from daemon.store.state import StateLock

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: Largest API request body: a conversation with a dozen full-size photos as data: URLs
#: (daemon/server/app.py enforces it; ``ask`` checks it before sending).
MAX_BODY = 64 * 1024 * 1024


def daemon_client(config: Config, timeout: float = 10.0) -> "httpx.Client | None":
    """An HTTP client for the running daemon's API (``api.listen``), or None when none answers there.

    The daemon is recognised by its state file: whatever answers at the
    address must report the same ``state`` as this config, so a command never
    sends images to some other program (or another user's daemon) that
    happens to listen on the port.  The token, when ``api.token_env`` names
    one, goes in the ``Authorization`` header.

    Raises:
        VlwatchError: the daemon answers but refuses the token (or wants one).
    """
    import httpx

    listen = config.api.listen
    if listen is None or StateLock(config.state).holder() is None:
        return None  # no daemon works this state file
    headers = {}
    if config.api.token_env and (token := os.environ.get(config.api.token_env, "").strip()):
        headers["Authorization"] = f"Bearer {token}"
    if (sock := config.api.unix_socket) is not None:
        if not sock.exists():
            return None
        transport = httpx.HTTPTransport(uds=str(sock))
        base = "http://localhost"
    else:
        transport = httpx.HTTPTransport()
        host_port = config.api.host_port()
        assert host_port is not None
        host, port = host_port
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host in ("::", "[::]"):
            host = "::1"
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    client = httpx.Client(base_url=base, headers=headers, transport=transport,
                          timeout=httpx.Timeout(timeout, connect=2.0))
    try:
        response = client.get("/api/v1/status")
    except httpx.HTTPError:
        client.close()
        return None
    if response.status_code == 401:
        client.close()
        hint = f"set ${config.api.token_env}" if config.api.token_env else "set api.token_env in the config"
        raise VlwatchError(f"the daemon at {listen} wants a bearer token: {hint}")
    try:
        same = response.status_code == 200 and response.json().get("state") == str(config.state)
    except ValueError:
        same = False
    if not same:
        client.close()
        log.info("something answers at %s, but not the vlwatch daemon of %s; not using it", listen, config.state)
        return None
    return client


def _api_error(response: "httpx.Response") -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


# ------------------------------------------------------------------- ask


def ask(config: Config, question: str, images: Sequence[Path], *, max_tokens: int | None = None,
        as_json: bool = False) -> int:
    """``vlwatch ask``: one question about one or more images, answered on stdout.

    Through the running daemon's API when one answers (its model, no second
    copy in memory); otherwise the model is loaded here.  The answer is
    printed as it is produced; ``as_json`` prints one JSON object at the end.
    """
    for path in images:
        if not path.is_file():
            raise VlwatchError(f"{safe_text(str(path))}: no such file", ExitCode.FAILED)
    client = daemon_client(config, timeout=600.0)
    if client is not None:
        try:
            return _ask_daemon(client, config, question, images, max_tokens, as_json)
        finally:
            client.close()
    pid = StateLock(config.state).holder()
    if pid is not None:
        log.warning("a daemon runs (pid %s) but its API does not answer at %s; loading the model here too",
                    pid, config.api.listen)
    return _ask_here(config, question, images, max_tokens, as_json)


def _ask_daemon(client: "httpx.Client", config: Config, question: str, images: Sequence[Path],
                max_tokens: int | None, as_json: bool) -> int:
    import base64


    content: list[dict[str, object]] = []
    total = 0
    for path in images:
        data = path.read_bytes()
        total += len(data) * 4 // 3
        if total > MAX_BODY - 65536:
            raise VlwatchError(f"{safe_text(str(path))}: the images are too large to send to the daemon "
                               f"(over {MAX_BODY // 2**20} MiB together)", ExitCode.FAILED)
        url = "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": question})
    body: dict[str, object] = {"model": config.model.name, "messages": [{"role": "user", "content": content}],
                               "stream": not as_json}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if as_json:
        response = client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise VlwatchError(f"the daemon refused: {_api_error(response)}", ExitCode.FAILED)
        doc = response.json()
        choice = doc["choices"][0]
        print(json_text({"answer": choice["message"]["content"], "model": doc.get("model"),
                         "finish_reason": choice.get("finish_reason"),
                         "new_tokens": (doc.get("usage") or {}).get("completion_tokens"),
                         "images": [str(p) for p in images], "via": "daemon"}, indent=2))
        return ExitCode.OK
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise VlwatchError(f"the daemon refused: {_api_error(response)}", ExitCode.FAILED)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                print(file=sys.stdout, flush=True)
                raise VlwatchError(f"the model failed: {chunk['error'].get('message')}", ExitCode.FAILED)
            for choice in chunk.get("choices", ()):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    sys.stdout.write(for_terminal(piece))  # model text is hostile (issue 27)
                    sys.stdout.flush()
    print()
    return ExitCode.OK


def _ask_here(config: Config, question: str, images: Sequence[Path], max_tokens: int | None, as_json: bool) -> int:
    from daemon.backends import Message, Request
    from daemon.errors import InputError
    from daemon.images import load_pages

    pictures = []
    for path in images:
        try:
            pages = load_pages(path, min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels,
                               pages=((1, 8),))
        except InputError as exc:
            raise VlwatchError(str(exc), ExitCode.FAILED) from exc
        pictures.extend(p.image for p in pages)
    printed: list[str] = []

    def stream(piece: str) -> None:
        printed.append(piece)
        sys.stdout.write(for_terminal(piece))  # model text is hostile (issue 27)
        sys.stdout.flush()

    max_new = min(max_tokens or config.model.max_new_tokens, config.model.max_new_tokens)
    request = Request(images=tuple(pictures), prompt=question, max_new_tokens=max_new,
                      messages=(Message("user", (*pictures, question)),), stream=None if as_json else stream)
    check_model(config)
    backend = create_backend(config.model, config.engine)
    try:
        [answer] = backend.generate([request])
    finally:
        backend.unload()
    if as_json:
        print(json_text({"answer": answer.text, "model": backend.model,
                         "finish_reason": "stop" if answer.finished else "length", "new_tokens": answer.new_tokens,
                         "images": [str(p) for p in images], "via": "local"}, indent=2))
        return ExitCode.OK
    rest = answer.text[len("".join(printed)):]  # a backend that does not stream sends it all here
    sys.stdout.write(for_terminal(rest) + "\n")
    sys.stdout.flush()
    return ExitCode.OK
