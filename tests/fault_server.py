"""A small OpenAI-compatible server on loopback that fails on cue, for the openai backend's tests.

Usage:
    with FaultServer() as server:                   # 127.0.0.1 on a free port
        server.script(Reply.status(503, retry_after=1), Reply.ok())
        config = ModelConfig(backend="openai", base_url=(server.url,), ...)
        ...
        server.received[0].authorization           # what the client sent
        server.received[0].images[0].size          # the image exactly as decoded

Each ``POST /v1/chat/completions`` takes the next scripted ``Reply``; with the
script empty it answers ``server.default`` (by default, the size of the image
it received, as JSON).  ``GET /v1/models`` lists ``server.model`` (the
backend's probe).  ``stop()`` closes the port, so clients get "connection
refused" as from a stopped server, and ``start()`` opens the same port again.

What a reply can do:

- ``Reply.ok(text)``: a good answer (``text`` may be a function of the
  ``Received`` request, e.g. a box in the pixels of the image it got);
- ``Reply.status(code, message, retry_after=...)``: an error in the JSON shape
  vLLM and OpenAI use;
- ``Reply.hang(seconds)``: say nothing for that long, then close (a hang past
  the client's timeout);
- ``Reply.drop()``: close the connection without any answer;
- ``Reply.drip(interval)``: a good answer, sent one byte every ``interval``
  seconds (headers at once), so no single read ever times out;
- ``Reply.huge(chars)``: a good answer of ``chars`` characters, streamed
  without building it in memory (a 200 MB answer costs the server nothing);
- ``Reply.null()``: a 200 whose ``content`` is ``null``.

Built on the standard library's ``http.server``: nothing to install, and a
failure is exactly what is scripted, not what a framework adds.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from PIL import Image


@dataclass
class Received:
    """One chat request as the server saw it."""

    path: str
    authorization: str | None
    headers: dict[str, str]
    body: dict[str, Any]
    images: list[Image.Image] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        parts = self.body["messages"][-1]["content"]
        return "".join(p.get("text", "") for p in parts if p.get("type") == "text")


@dataclass(frozen=True)
class Reply:
    kind: str  # ok | status | hang | drop | drip | huge | null
    text: str | Callable[[Received], str] | None = None
    finish_reason: str = "stop"
    code: int = 200
    retry_after: float | str | None = None
    seconds: float = 0.0  # hang: how long; ok: a delay before answering
    body: dict[str, Any] | None = None

    @staticmethod
    def ok(text: str | Callable[[Received], str] | None = None, *, finish_reason: str = "stop",
           delay: float = 0.0) -> "Reply":
        return Reply("ok", text=text, finish_reason=finish_reason, seconds=delay)

    @staticmethod
    def status(code: int, message: str = "", *, retry_after: float | str | None = None,
               body: dict[str, Any] | None = None) -> "Reply":
        return Reply("status", text=message or f"scripted {code}", code=code, retry_after=retry_after, body=body)

    @staticmethod
    def hang(seconds: float) -> "Reply":
        return Reply("hang", seconds=seconds)

    @staticmethod
    def drop() -> "Reply":
        return Reply("drop")

    @staticmethod
    def drip(interval: float = 1.0, text: str = "a slow answer") -> "Reply":
        return Reply("drip", text=text, seconds=interval)

    @staticmethod
    def huge(chars: int) -> "Reply":
        return Reply("huge", code=chars)

    @staticmethod
    def null() -> "Reply":
        return Reply("null")


def echo_size(received: Received) -> str:
    """The default answer: the size of each image received, as the client can check it."""
    sizes = [list(img.size) for img in received.images]
    return json.dumps({"sizes": sizes})


class FaultServer:
    """The scripted server; see the module docstring."""

    def __init__(self, model: str = "test-model", host: str = "127.0.0.1") -> None:
        self.model = model
        self.host = host
        self.port = 0
        self.default = Reply.ok(echo_size)
        self.models_reply: Reply | None = None  # None: list the model; else how /v1/models answers
        self.received: list[Received] = []
        self.probes = 0  # GET /v1/models seen
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ control

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def chat_requests(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path.endswith("/chat/completions")]

    def start(self) -> "FaultServer":
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.fault = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-server-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port and every open connection: clients now get "connection refused"."""
        self._stopping.set()
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ serving

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else self.default


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hanging handler must not keep the test process alive
    allow_reuse_address = True  # start() again on the same port right after stop()
    fault: FaultServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.fault._lock:
            self.server.fault._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fault._lock:
            self.server.fault._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # keep test output quiet

    # -- GET /v1/models: the backend's probe
    def do_GET(self) -> None:
        fault = self.server.fault
        with fault._lock:
            fault.probes += 1
            fault.received.append(Received(self.path, self.headers.get("Authorization"), dict(self.headers), {}))
        if not self.path.rstrip("/").endswith("/models"):
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        if fault.models_reply is not None:
            return self._act(fault.models_reply, None)
        self._json(200, {"object": "list", "data": [{"id": fault.model, "object": "model", "owned_by": "tests"}]})

    # -- POST /v1/chat/completions
    def do_POST(self) -> None:
        fault = self.server.fault
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            return self._json(400, {"error": {"message": "body is not JSON"}})
        received = Received(self.path, self.headers.get("Authorization"), dict(self.headers), body,
                            _images(body))
        with fault._lock:
            fault.received.append(received)
            fault.in_flight += 1
            fault.max_in_flight = max(fault.max_in_flight, fault.in_flight)
        try:
            self._act(fault._next_reply(), received)
        finally:
            with fault._lock:
                fault.in_flight -= 1

    def _act(self, reply: Reply, received: Received | None) -> None:
        fault = self.server.fault
        if reply.kind == "drop":
            return self._drop()
        if reply.kind == "hang":
            fault._stopping.wait(reply.seconds)
            return self._drop()
        if reply.kind == "status":
            body = reply.body or {"object": "error", "error": {"message": reply.text, "type": "scripted",
                                                             "code": reply.code}}
            headers = {"Retry-After": str(reply.retry_after)} if reply.retry_after is not None else {}
            return self._json(reply.code, body, headers)
        if reply.kind == "drip":
            return self._drip(reply)
        if reply.kind == "huge":
            return self._huge(reply.code)
        if reply.kind == "null":
            return self._json(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": None},
                                                 "finish_reason": "stop"}]})
        if reply.seconds:
            fault._stopping.wait(reply.seconds)
        text = reply.text(received) if callable(reply.text) else (reply.text or "")
        self._json(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": (received.body.get("model") if received else fault.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text.split())),
                      "total_tokens": 10 + max(1, len(text.split()))},
        })

    def _drip(self, reply: Reply) -> None:
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        try:
            for i in range(len(data)):
                if self.server.fault._stopping.wait(reply.seconds):
                    break
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
        except OSError:  # the client gave up: what the test wants
            pass
        self.close_connection = True

    def _huge(self, chars: int) -> None:
        head = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "'
        tail = b'"}, "finish_reason": "stop"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(head) + chars + len(tail)))
        self.end_headers()
        chunk = b"x" * 65536
        try:
            self.wfile.write(head)
            left = chars
            while left > 0 and not self.server.fault._stopping.is_set():
                self.wfile.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
            self.wfile.write(tail)
        except OSError:  # the client stopped reading: what the test wants
            pass
        self.close_connection = True

    def _json(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _images(body: dict[str, Any]) -> list[Image.Image]:
    """Decode every ``data:`` image of the last message, exactly as sent."""
    out = []
    for message in body.get("messages", []):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") != "image_url":
                continue
            url = part["image_url"]["url"]
            _, _, data = url.partition(";base64,")
            image = Image.open(io.BytesIO(base64.b64decode(data)))
            image.load()
            out.append(image)
    return out
