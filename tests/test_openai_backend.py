"""The openai backend against a scripted server (tests/fault_server.py) and `vlwatch process`.

Every fault the backend must survive is played by the fault server on
loopback: 503 with Retry-After, 429, a hang past the timeout, a dropped
connection, a 400 with the server's message, a server that is stopped and
started again, and a second server to fail over to.  The retry policy is
shortened (backoff and cool-down in tenths of a second) so the whole file
runs in seconds.  The real servers (`transformers serve`) are in
tests/test_openai_serve.py.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from daemon.backends import Request, create_backend
from daemon.backends.openai import OpenAIBackend, chat_body
from daemon.config import ModelConfig
from daemon.errors import BackendError, BackendUnavailableError, ExitCode, VlwatchError
from daemon.images import load_pages
from tests.conftest import run_vlwatch, write_config
from tests.fault_server import FaultServer, Received, Reply

KEY = "sk-vlwatch-test-7f3c9a1e5b2d4f60"  # distinctive, so any leak is found by a plain search


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def make_backend() -> Iterator:
    """Build backends with a fast retry policy; unload each at the end (no threads or sockets left)."""
    made: list[OpenAIBackend] = []

    def make(*servers: FaultServer | str, **model: object) -> OpenAIBackend:
        urls = tuple(s.url if isinstance(s, FaultServer) else s for s in servers)
        config = ModelConfig(**{"backend": "openai", "name": "test-model", "base_url": urls,
                                "max_concurrency": 4, "timeout": 5.0, **model})
        backend = OpenAIBackend(config, backoff_base=0.05, cooldown_base=0.2)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.unload()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    # Noise, not a flat colour: any resampling on the way would change pixels.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def request(width: int = 56, height: int = 28, seed: int = 0, prompt: str = "Describe.", n: int = 8) -> Request:
    return Request(images=(noise(width, height, seed),), prompt=prompt, max_new_tokens=n)


def sizes(text: str) -> list[list[int]]:
    return json.loads(text)["sizes"]


# ------------------------------------------------------------------ the request


def test_each_image_arrives_exactly_as_sized_with_greedy_settings(fault: FaultServer, make_backend) -> None:
    backend = make_backend(fault)
    requests = [request(56, 28, 1, "first"), request(84, 112, 2, "second", n=5), request(28, 280, 3, "third")]
    answers = backend.generate(requests)

    assert [sizes(a.text) for a in answers] == [[[56, 28]], [[84, 112]], [[28, 280]]]  # in order
    assert all(a.finished and a.new_tokens > 0 for a in answers)
    got = sorted(fault.chat_requests(), key=lambda r: r.prompt)
    for req, received in zip(sorted(requests, key=lambda r: r.prompt), got, strict=True):
        sent = req.images[0]
        assert received.images[0].format == "PNG"
        # the very pixels the client chose: lossless, never resized
        assert received.images[0].convert("RGB").tobytes() == sent.tobytes()
        body = received.body
        assert body["model"] == "test-model" and body["temperature"] == 0 and body["stream"] is False
        assert body["max_tokens"] == req.max_new_tokens
        area = sent.width * sent.height
        assert body["mm_processor_kwargs"] == {"min_pixels": area, "max_pixels": area}
        assert body["chat_template_kwargs"] == {"processor_kwargs": {"do_resize": False}}
        content = body["messages"][0]["content"]
        assert [p["type"] for p in content] == ["image_url", "text"]  # image first, as the local backend
        assert received.prompt == req.prompt


def test_an_answer_cut_at_max_tokens_is_not_finished(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.ok("partial", finish_reason="length"))
    [answer] = make_backend(fault).generate([request()])
    assert answer.text == "partial" and answer.finished is False


def test_generate_of_nothing_sends_nothing(fault: FaultServer, make_backend) -> None:
    assert make_backend(fault).generate([]) == []
    assert fault.received == []


# ------------------------------------------------------------------ faults


def test_503_waits_out_retry_after(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.status(503, "warming up", retry_after=1))
    started = time.monotonic()
    [answer] = make_backend(fault).generate([request()])
    assert sizes(answer.text) == [[56, 28]]
    assert time.monotonic() - started >= 0.95  # honoured, not the 0.05 s backoff
    assert len(fault.chat_requests()) == 2


def test_429_is_retried_with_backoff(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.status(429, "slow down"), Reply.status(429, "slow down"))
    [answer] = make_backend(fault).generate([request()])
    assert sizes(answer.text) == [[56, 28]]
    assert len(fault.chat_requests()) == 3


def test_a_hang_past_the_timeout_is_retried(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.hang(10))
    backend = make_backend(fault, timeout=1.0)  # not less: a loaded CI machine must not time out good answers
    started = time.monotonic()
    [answer] = backend.generate([request()])
    assert sizes(answer.text) == [[56, 28]]
    assert 1.0 <= time.monotonic() - started < 8
    assert len(fault.chat_requests()) == 2
    assert fault.probes >= 1  # it checked the server was alive before blaming the request
    assert backend.outage() is None


def test_a_request_that_always_times_out_fails_alone(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.hang(10), Reply.hang(10))
    backend = make_backend(fault, timeout=1.0)
    with pytest.raises(BackendError) as caught:
        backend.generate([request()])
    assert not isinstance(caught.value, BackendUnavailableError)  # the server answers probes: the job's fault
    assert "no answer within 1s" in str(caught.value) and "raise model.timeout" in str(caught.value)
    assert len(fault.chat_requests()) == 2


def test_a_dropped_connection_is_retried(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.drop())
    [answer] = make_backend(fault).generate([request()])
    assert sizes(answer.text) == [[56, 28]]
    assert len(fault.chat_requests()) == 2


def test_a_400_fails_with_the_servers_message_and_is_not_retried(fault: FaultServer, make_backend) -> None:
    message = "This model's maximum context length is 8192 tokens. However, you requested 9001 tokens"
    fault.script(Reply.status(400, message))
    with pytest.raises(BackendError) as caught:
        make_backend(fault).generate([request()])
    assert not isinstance(caught.value, BackendUnavailableError)
    assert message in str(caught.value) and "HTTP 400" in str(caught.value)
    assert len(fault.chat_requests()) == 1


@pytest.mark.parametrize("body, expected", [
    ({"detail": "Server is pinned to 'x'; requested 'y'."}, "Server is pinned to 'x'"),  # transformers serve
    ({"object": "error", "message": "The model `nope` does not exist.", "code": 404}, "does not exist"),  # vLLM
    ({"error": "model 'nope' not found"}, "model 'nope' not found"),  # Ollama's native shape
])
def test_error_messages_in_each_servers_shape(fault: FaultServer, make_backend, body: dict, expected: str) -> None:
    fault.script(Reply.status(404, body=body))
    with pytest.raises(BackendError, match=re.escape(expected)):
        make_backend(fault).generate([request()])


def test_a_persistent_500_gives_up_after_the_attempts(fault: FaultServer, make_backend) -> None:
    fault.default = Reply.status(500, "CUDA error: an illegal memory access")
    with pytest.raises(BackendError) as caught:
        make_backend(fault).generate([request()])
    assert not isinstance(caught.value, BackendUnavailableError)
    assert "illegal memory access" in str(caught.value) and "gave up after 5 tries" in str(caught.value)
    assert len(fault.chat_requests()) == 5


@pytest.mark.parametrize("code", [429, 502, 503])
def test_a_server_always_busy_pauses_rather_than_failing(fault: FaultServer, make_backend, code: int) -> None:
    fault.default = Reply.status(code, "queue full")
    with pytest.raises(BackendUnavailableError, match="queue full"):
        make_backend(fault).generate([request()])
    assert len(fault.chat_requests()) == 5


def test_a_long_retry_after_sends_the_work_elsewhere(make_backend) -> None:
    with FaultServer() as a, FaultServer() as b:
        a.script(Reply.status(503, "maintenance", retry_after=600))
        backend = make_backend(a, b, max_concurrency=1)  # one at a time: the order is known
        started = time.monotonic()
        answers = backend.generate([request(seed=i) for i in range(4)])
        assert len(answers) == 4 and time.monotonic() - started < 5  # nobody waited 600 s
        assert len(a.chat_requests()) == 1 and len(b.chat_requests()) == 4


def test_one_server_with_a_long_retry_after_is_unavailable_at_once(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.status(503, "maintenance", retry_after=600))
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="maintenance"):
        make_backend(fault).generate([request()])
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------ outages and several servers


def test_every_server_down_is_unavailable_and_work_resumes_when_back(fault: FaultServer, make_backend) -> None:
    backend = make_backend(fault)
    backend.generate([request()])
    fault.stop()
    before = time.time()
    with pytest.raises(BackendUnavailableError, match="connection refused") as caught:
        backend.generate([request(seed=i) for i in range(6)])
    assert fault.url in str(caught.value)
    outage = backend.outage()
    assert outage is not None and outage.since >= before - 1 and "connection refused" in outage.error
    assert [h.up for h in backend.health()] == [False]
    assert backend.available() is False

    fault.start()  # same port
    deadline = time.monotonic() + 10
    while not backend.available():  # probes once the cool-down is over
        assert time.monotonic() < deadline, "the backend never saw the server come back"
        time.sleep(0.05)
    assert backend.outage() is None
    assert [sizes(a.text) for a in backend.generate([request(), request(84, 28)])] == [[[56, 28]], [[84, 28]]]


def test_a_dead_server_is_skipped_until_it_answers_again(make_backend) -> None:
    with FaultServer() as a, FaultServer() as b:
        backend = make_backend(a, b)
        a.stop()
        answers = backend.generate([request(seed=i) for i in range(8)])
        assert len(answers) == 8 and len(b.chat_requests()) == 8  # all of it went to the live one
        assert backend.outage() is None
        assert [h.up for h in backend.health()] == [False, True]

        a.start()
        # Once past the cool-down a probe lets it back in: poll, no fixed sleep.
        deadline = time.monotonic() + 10
        while not a.chat_requests():
            assert time.monotonic() < deadline, "the revived server never got work again"
            backend.generate([request(seed=i) for i in range(8)])
            time.sleep(0.05)
        assert [h.up for h in backend.health()] == [True, True]


def test_requests_are_spread_round_robin(make_backend) -> None:
    with FaultServer() as a, FaultServer() as b:
        make_backend(a, b, max_concurrency=1).generate([request(seed=i) for i in range(8)])
        assert len(a.chat_requests()) == 4 and len(b.chat_requests()) == 4


def test_up_to_max_concurrency_requests_are_in_flight(fault: FaultServer, make_backend) -> None:
    fault.default = Reply.ok("done", delay=0.3)
    backend = make_backend(fault, max_concurrency=4)
    assert backend.auto_batch_size() == 16  # batches larger than in-flight keep the server fed
    started = time.monotonic()
    backend.generate([request(seed=i) for i in range(8)])
    elapsed = time.monotonic() - started
    assert fault.max_in_flight == 4
    assert elapsed < 8 * 0.3 * 0.75  # concurrent, not one after the other


def test_many_requests_as_the_bench_sends_them(fault: FaultServer, make_backend) -> None:
    backend = make_backend(fault, max_concurrency=8)
    requests = [request(28 * (1 + i % 5), 28 * (1 + i % 3), seed=i) for i in range(40)]
    answers = backend.generate(requests)
    assert [sizes(a.text)[0] for a in answers] == [[r.images[0].width, r.images[0].height] for r in requests]
    assert fault.max_in_flight <= 8


def test_a_failed_batch_is_not_sent_twice_when_retried_one_by_one(fault: FaultServer, make_backend) -> None:
    """The worker retries a failed batch one request at a time; answers already got are reused."""
    def reply(received: Received) -> str:
        return json.dumps({"sizes": [list(i.size) for i in received.images]})

    fault.default = Reply.ok(reply)
    fault.script()  # nothing scripted: the bad one is found by its prompt below
    requests = [request(seed=1, prompt="a"), request(seed=2, prompt="bad"), request(seed=3, prompt="c")]
    backend = make_backend(fault, max_concurrency=1)
    fault.script(Reply.ok(reply), Reply.status(400, "bad image"), Reply.ok(reply))
    with pytest.raises(BackendError, match="bad image"):
        backend.generate(requests)
    assert len(fault.chat_requests()) == 3
    assert sizes(backend.generate([requests[0]])[0].text) == [[56, 28]]
    with pytest.raises(BackendError, match="bad image"):
        backend.generate([requests[1]])
    assert sizes(backend.generate([requests[2]])[0].text) == [[56, 28]]
    assert len(fault.chat_requests()) == 3  # nothing sent again
    backend.generate([requests[0]])  # a later, unrelated call does go to the server
    assert len(fault.chat_requests()) == 4


def test_a_server_that_refuses_mm_processor_kwargs_is_asked_without(fault: FaultServer, make_backend) -> None:
    # What `transformers serve` answers to a field it does not know.
    fault.script(Reply.status(422, body={"detail": "Unexpected fields in the request: {'mm_processor_kwargs'}"}))
    backend = make_backend(fault)
    backend.generate([request()])
    backend.generate([request()])
    bodies = [r.body for r in fault.chat_requests()]
    assert "mm_processor_kwargs" in bodies[0]
    assert all("mm_processor_kwargs" not in b for b in bodies[1:]) and len(bodies) == 3
    assert all(b["chat_template_kwargs"] == {"processor_kwargs": {"do_resize": False}} for b in bodies)


def test_unload_closes_connections_and_the_next_call_reconnects(fault: FaultServer, make_backend) -> None:
    backend = make_backend(fault)
    backend.generate([request()])
    assert backend.loaded  # connections are open
    backend.unload()
    assert not backend.loaded  # so the daemon's idle unload happens once, not at every check
    assert sizes(backend.generate([request()])[0].text) == [[56, 28]]
    assert backend.loaded


def test_registered_under_openai() -> None:
    backend = create_backend(ModelConfig(backend="openai", name="m", base_url=("http://127.0.0.1:9/v1",)))
    assert isinstance(backend, OpenAIBackend) and backend.name == "openai" and backend.model == "m"


def test_multi_image_requests_get_bounds_covering_every_image() -> None:
    req = Request(images=(noise(56, 28), noise(84, 56)), prompt="p", max_new_tokens=3)
    body = chat_body("m", req, ["data:a", "data:b"])
    assert body["mm_processor_kwargs"] == {"min_pixels": 56 * 28, "max_pixels": 84 * 56}
    assert "ignore_eos" not in body


def test_the_bench_can_ask_for_every_token_and_read_the_count(fault: FaultServer, make_backend) -> None:
    fault.script(Reply.status(422, body={"detail": "Unexpected fields in the request: {'ignore_eos'}"}))
    backend = make_backend(fault)
    backend.ignore_eos = True  # what `vlwatch bench` sets
    answers = backend.generate([request(), request(seed=2)])
    bodies = [r.body for r in fault.chat_requests()]
    assert bodies[0]["ignore_eos"] is True and len(bodies) == 3  # refused once, then asked without
    assert backend.last_stats == {"new_tokens": sum(a.new_tokens for a in answers)}


# ------------------------------------------------------------------ the key


def test_the_key_reaches_the_server_and_no_log(fault: FaultServer, make_backend, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("VLWATCH_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)  # the root: our logs, httpx's and httpcore's, all of them
    backend = make_backend(fault, api_key_env="VLWATCH_TEST_KEY", timeout=1.0)
    fault.script(Reply.status(503, "busy", retry_after=0), Reply.drop(), Reply.hang(5))
    backend.generate([request(), request(seed=2)])
    # A server that echoes the key back in an error must not get it into ours.
    fault.script(Reply.status(401, f"invalid key 'Bearer {KEY}'"))
    with pytest.raises(BackendError) as caught:
        backend.generate([request()])
    assert KEY not in str(caught.value) and "***" in str(caught.value)
    fault.stop()
    with pytest.raises(BackendUnavailableError) as down:
        backend.generate([request()])
    assert KEY not in str(down.value) and KEY not in str(backend.outage())

    assert fault.received and all(r.authorization == f"Bearer {KEY}" for r in fault.received)
    assert fault.probes >= 1  # probes carry it too (a server behind auth answers them)
    assert len(caplog.records) > 10  # the capture did see the traffic
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in repr(record.args)
    assert KEY not in repr(backend) and KEY not in repr(vars(backend).get("config"))


def test_no_key_configured_sends_no_authorization_and_ignores_openai_env(
        fault: FaultServer, make_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    # A user's real OpenAI credentials must never go to a self-hosted server.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", f"Authorization: Bearer {KEY}")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secret")
    make_backend(fault).generate([request()])
    [received] = fault.chat_requests()
    assert received.authorization is None
    assert not any(KEY in v or "org-secret" in v for v in received.headers.values())


def test_a_key_variable_that_is_not_set_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLWATCH_NO_SUCH_KEY", raising=False)
    with pytest.raises(VlwatchError, match="VLWATCH_NO_SUCH_KEY") as caught:
        OpenAIBackend(ModelConfig(backend="openai", api_key_env="VLWATCH_NO_SUCH_KEY"))
    assert caught.value.code == ExitCode.USAGE


# ------------------------------------------------------------------ end to end: `vlwatch process`


def box_in_sent_pixels(received: Received) -> str:
    """A grounding answer as Qwen writes it, in the pixels of the image the server got."""
    w, h = received.images[0].size
    return "```json\n" + json.dumps([{"bbox_2d": [w // 4, h // 4, w // 2, h // 2], "label": "thing"}]) + "\n```"


def test_process_maps_a_servers_box_back_to_original_pixels(fault: FaultServer, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    original = noise(1000, 600, seed=7)
    original.save(inbox / "photo.png")
    config = write_config(tmp_path, f"""
        model:
          backend: openai
          name: test-model
          base_url: {fault.url}
          api_key_env: VLWATCH_TEST_KEY
          max_concurrency: 2
          timeout: 30s
          max_pixels: 200000
          max_new_tokens: 64
        include: [ground]
        watch: [{{path: ./inbox}}]
    """)
    fault.default = Reply.ok(box_in_sent_pixels)
    done = run_vlwatch("-vv", "process", "--config", config, "--rule", "ground", inbox / "photo.png",
                       env={"VLWATCH_TEST_KEY": KEY})
    assert done.returncode == 0, done.stderr

    [received] = fault.chat_requests()
    assert received.authorization == f"Bearer {KEY}"
    # The image sent is exactly the page daemon.images made: the size the client chose, and its pixels.
    [page] = load_pages(inbox / "photo.png", min_pixels=ModelConfig().min_pixels, max_pixels=200000)
    sent = received.images[0]
    assert sent.size == page.image.size and sent.size != original.size
    assert sent.convert("RGB").tobytes() == page.image.tobytes()
    assert sent.width % 28 == 0 and sent.height % 28 == 0 and sent.width * sent.height <= 200000

    sidecar = json.loads((inbox / "photo.png.ground.json").read_text())
    assert sidecar["backend"] == "openai" and sidecar["model"] == "test-model"
    assert sidecar["shown_size"] == list(sent.size) and sidecar["size"] == [1000, 600]
    sw, sh = sent.size

    def back(v: int, scale: float) -> int:  # half up, as a pixel count is rounded
        return int(v * scale + 0.5)

    expected = [back(sw // 4, 1000 / sw), back(sh // 4, 600 / sh), back(sw // 2, 1000 / sw), back(sh // 2, 600 / sh)]
    assert sidecar["boxes"] == [{"label": "thing", "bbox": expected}]
    assert abs(expected[0] - 250) <= 2 and abs(expected[3] - 300) <= 2  # and that is where the box really is
    with Image.open(inbox / "photo.png.ground.overlay.png") as overlay:
        assert overlay.size == (1000, 600)

    # The key: in the header, nowhere else (-vv logs everything at DEBUG).
    assert KEY not in done.stderr and KEY not in done.stdout
    for f in inbox.iterdir():
        assert KEY.encode() not in f.read_bytes(), f


def test_process_with_every_server_down_fails_with_the_reason(tmp_path: Path) -> None:
    with FaultServer() as gone:
        url = gone.url
    (tmp_path / "a.png").write_bytes(b"")
    noise(100, 80).save(tmp_path / "a.png")
    config = write_config(tmp_path, f"""
        model: {{backend: openai, name: m, base_url: {url}, timeout: 5s}}
        include: [describe]
    """)
    done = run_vlwatch("process", "--config", config, tmp_path / "a.png")
    assert done.returncode == ExitCode.FAILED
    assert "connection refused" in done.stderr and url in done.stderr
    assert not (tmp_path / "a.png.describe.md").exists()
