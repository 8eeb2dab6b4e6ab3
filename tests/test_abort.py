"""A client that hangs up frees its slot (issue 22.2), on the real daemon and the tiny checkpoint.

With ``batch_size: 1`` the engine has one slot, so a short request sent after a client hung up on a long
answer can only run once the engine dropped that answer.  The long answer asks for far more tokens than
the CPU could decode within the test's deadline (before the fix the engine went on for nobody until
``max_tokens``: a 4-token request waited the whole abandoned answer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import tiny_daemon_config
from tests.test_api import _answers, free_port
from tests.test_daemon import Daemon, wait_until

LONG = 30000  # tokens: minutes of decoding on a CPU, were it not dropped
QUICK_DEADLINE = 30.0
#: What the engine logs when it drops a request whose client went away (the API logs its own line).
ENGINE_DROPPED = "an interactive request's client went away"


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Daemon, str]]:
    workdir = tmp_path_factory.mktemp("abort")
    (workdir / "inbox").mkdir()
    port = free_port()
    config = tiny_daemon_config(workdir, tiny_model, port=port, batch_size=1, max_new_tokens=LONG)
    d = Daemon(workdir, config).start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(base), "the API", log=d.log)
    try:
        yield d, base
    finally:
        d.stop()
        d.close()


def _chat(max_tokens: int, stream: bool = False) -> dict:
    # Sampled at temperature 1: random weights decoded greedily soon repeat themselves, and the engine stops
    # (and retries) a sequence stuck repeating, which would end the long answer early on its own.
    return {"model": "tiny", "max_tokens": max_tokens, "stream": stream, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Count on and on."}]}


def _content(line: str) -> str:
    if not line.startswith("data: {"):
        return ""
    return "".join((c.get("delta") or {}).get("content") or "" for c in json.loads(line[6:]).get("choices", ()))


def _quick_answer(base: str) -> float:
    started = time.monotonic()
    reply = httpx.post(base + "/v1/chat/completions", json=_chat(4), timeout=QUICK_DEADLINE * 4)
    assert reply.status_code == 200, reply.text
    return time.monotonic() - started


def _hang_up_on_a_stream(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=_chat(LONG, stream=True)) as response:
            assert response.status_code == 200
            assert any(_content(line) for line in response.iter_lines())  # tokens flow; then it hangs up


def _hang_up_on_a_plain_request(base: str) -> None:
    try:
        httpx.post(base + "/v1/chat/completions", json=_chat(LONG), timeout=httpx.Timeout(60, read=0.5))
    except httpx.ReadTimeout:
        pass  # what is meant: the client gives up and closes the connection


@pytest.mark.parametrize("hang_up", [_hang_up_on_a_stream, _hang_up_on_a_plain_request], ids=["stream", "plain"])
def test_a_client_that_hangs_up_frees_its_slot(one_slot: tuple[Daemon, str], hang_up) -> None:
    daemon, base = one_slot
    _quick_answer(base)  # the model is loaded and warm
    # A sampled answer of random weights can end by itself (an end-of-sequence token comes up now and then):
    # then the client did not hang up mid-answer, and it tries again.
    for _ in range(10):
        gone = daemon.log_count(ENGINE_DROPPED)
        hang_up(base)
        assert _quick_answer(base) < QUICK_DEADLINE  # the one slot was free again
        if daemon.log_count(ENGINE_DROPPED) > gone:
            return
    raise AssertionError("the engine never dropped an answer whose client hung up\n" + daemon.log()[-3000:])
