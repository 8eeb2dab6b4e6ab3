"""The openai backend bounds each request in time and size (issue 10.13).

Against ``tests/fault_server.py`` on loopback: a server that drips its answer
one byte at a time (no single read ever times out), one that sends an
answer of tens of megabytes, and one that sends ``content: null``.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from daemon.backends import Request
from daemon.backends.openai import OpenAIBackend
from daemon.backends.openai_wire import CHARS_PER_TOKEN
from daemon.config import ModelConfig
from daemon.errors import BackendError
from tests.fault_server import FaultServer, Reply


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def backend(fault: FaultServer) -> Iterator[OpenAIBackend]:
    config = ModelConfig(backend="openai", name="test-model", base_url=(fault.url,), max_concurrency=2, timeout=1.5)
    b = OpenAIBackend(config, backoff_base=0.05, cooldown_base=0.2)
    yield b
    b.unload()


def request(n: int = 8) -> Request:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 56, 3), dtype=np.uint8)
    return Request(images=(Image.fromarray(pixels, mode="RGB"),), prompt="Describe.", max_new_tokens=n)


def test_timeout_bounds_the_whole_request_not_each_read(fault: FaultServer, backend: OpenAIBackend) -> None:
    # issue 10.13: one byte every 0.1 s never trips a 1.5 s read timeout; the
    # answer (~120 bytes) would take 12 s: the request must end at 1.5 s.
    fault.script(Reply.drip(0.1), Reply.drip(0.1))
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"no answer within 1\.5s"):
        backend.generate([request()])
    elapsed = time.monotonic() - started
    assert elapsed < 2 * 1.5 + 2.0, elapsed  # two tries of 1.5 s, a probe and a backoff


def test_a_huge_answer_is_cut_and_marked_truncated(fault: FaultServer, backend: OpenAIBackend) -> None:
    # issue 10.13: 50 MB of answer to a request of max_new_tokens 8.
    fault.script(Reply.huge(50_000_000))
    tracemalloc.start()
    try:
        [answer] = backend.generate([request(8)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.text == "x" * (8 * CHARS_PER_TOKEN) and not answer.finished
    assert peak < 16 * 1024 * 1024, peak  # the 50 MB never sat in memory


def test_an_answer_longer_than_max_new_tokens_implies_is_cut(fault: FaultServer, backend: OpenAIBackend) -> None:
    fault.script(Reply.ok("y" * 1000))
    [answer] = backend.generate([request(4)])
    assert answer.text == "y" * (4 * CHARS_PER_TOKEN) and not answer.finished
    fault.script(Reply.ok("short"))
    [answer] = backend.generate([request(4)])
    assert answer.text == "short" and answer.finished


@pytest.mark.parametrize("reply", [Reply.null(), Reply.ok("")], ids=["null", "empty"])
def test_no_content_is_an_error_not_an_empty_sidecar(fault: FaultServer, backend: OpenAIBackend, reply: Reply) -> None:
    # issue 10.13: content null must not become an empty answer that counts as done.
    fault.script(reply)
    with pytest.raises(BackendError, match="no answer text"):
        backend.generate([request()])
