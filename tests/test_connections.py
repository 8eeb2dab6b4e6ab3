"""The API server's connection bounds (``daemon.server.connections``, issue 27) on a real uvicorn server.

A tiny ASGI app served with a short header timeout: a half-sent header is
closed, a long streamed answer is not, and connections over the cap are told
503 and closed.  The accept() error handler logs once per interval.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Iterator

import pytest
import uvicorn

from daemon.server.connections import protocol_class, quiet_accept_errors
from tests.conftest import wait_until

TIMEOUT = 0.5


async def app(scope, receive, send) -> None:  # streams "tick" for 2 s: longer than the header timeout
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for _ in range(8):
        await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
        await asyncio.sleep(0.25)
    await send({"type": "http.response.body", "body": b"end\n"})


@pytest.fixture
def server() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", http=protocol_class(4, TIMEOUT))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve(sockets=[sock])), name="vlwatch-test-uvicorn")
    thread.start()
    wait_until(lambda: srv.started, "uvicorn to start")
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_half_sent_header_closed_long_stream_kept(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as slow, socket.create_connection(("127.0.0.1", server)) as ok:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        slow.settimeout(5)
        started = time.monotonic()
        assert _read_all(slow) == b""  # closed, unanswered
        assert time.monotonic() - started < 3
        ok.settimeout(10)
        body = _read_all(ok)
        assert body.startswith(b"HTTP/1.1 200") and b"end\n" in body and body.endswith(b"0\r\n\r\n"), body  # 2 s


def test_connections_over_the_cap_get_503(server: int) -> None:
    held = [socket.create_connection(("127.0.0.1", server)) for _ in range(4)]
    try:
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a header still coming: the connection stays
        with socket.create_connection(("127.0.0.1", server)) as extra:
            extra.settimeout(5)
            answer = _read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections" in answer
    finally:
        for s in held:
            s.close()


def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    handler = quiet_accept_errors()
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="daemon.server.connections"):
            for _ in range(10_000):
                handler(loop, {"message": "socket.accept() out of system resource",
                               "exception": OSError(24, "Too many open files")})
    finally:
        loop.close()
    assert len(caplog.records) == 1 and "Too many open files" in caplog.text
    assert "Traceback" not in caplog.text
