"""The openai backend against a REAL OpenAI-compatible server: `transformers serve` on the tiny checkpoint.

The server is started once for this module, on loopback, on the CPU:

    python -m transformers.cli.transformers serve DIR --host 127.0.0.1 --port N --device cpu

It needs the ``transformers[serving]`` extra (fastapi, uvicorn), which the
``[test]`` extra installs; only where those are missing is the module
skipped, with that reason.  A server that has what it needs and still does
not come up is a failure, with its log in the message.

What is proven here: ``vlwatch process`` runs end to end through the server;
the answers through it are the local backend's answers token for token (the
same pixels, prompt and greedy decoding reach the same weights); and the size
hint really stops the server's processor from resizing (its prompt token
count is that of the image as sent, not of the image shrunk to the tiny
checkpoint's 50176-pixel limit).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from daemon.backends import Request
from daemon.backends.openai import OpenAIBackend, chat_body, image_data_url
from daemon.backends.transformers.backend import TransformersBackend
from daemon.config import ModelConfig
from tests.conftest import run_vlwatch, write_config
from tests.tiny_model import MAX_PIXELS as TINY_SERVER_MAX_PIXELS

STARTUP_LIMIT = 180.0  # seconds; it takes about 15 s on two CPU cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a running `transformers serve` with the tiny checkpoint."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"transformers serve cannot start here: {', '.join(missing)} not installed "
                    "(the [test] extra brings transformers[serving])")
    port = _free_port()
    home = tmp_path_factory.mktemp("serve-home")
    log_path = home / "serve.log"
    env = {**os.environ, "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_model),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                if httpx.get(f"{base}/health", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer /health in {STARTUP_LIMIT:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def test_process_end_to_end_through_transformers_serve(serve: str, tiny_model: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    noise(336, 280, seed=3).save(inbox / "scan.png")
    noise(120, 90, seed=4).save(inbox / "small.png")
    config = write_config(tmp_path, f"""
        model:
          backend: openai
          name: {tiny_model}
          base_url: {serve}
          max_concurrency: 2
          timeout: 120s
          max_pixels: 100000
          max_new_tokens: 8
        include: [describe, ground]
        rules:
          - {{name: both, task: describe, match: ["*.png"], also: true}}
        watch: [{{path: ./inbox}}]
    """)
    done = run_vlwatch("process", "--config", config, inbox / "scan.png", inbox / "small.png")
    assert done.returncode == 0, done.stderr
    for name in ("scan.png", "small.png"):
        assert (inbox / f"{name}.both.md").is_file()
        assert (inbox / f"{name}.describe.md").is_file()

    done = run_vlwatch("process", "--config", config, "--rule", "ground", inbox / "scan.png")
    assert done.returncode == 0, done.stderr
    ground = json.loads((inbox / "scan.png.ground.json").read_text())
    assert ground["backend"] == "openai" and ground["model"] == str(tiny_model)
    # larger than the server's own processor would allow: it was sent, and seen, as is
    assert ground["shown_size"] == [336, 280] and 336 * 280 > TINY_SERVER_MAX_PIXELS
    assert isinstance(ground["boxes"], list) and "raw_answer" in ground


def test_answers_through_the_server_equal_the_local_backends(serve: str, tiny_model: Path) -> None:
    requests = [
        Request((noise(336, 280, 1),), "Describe this image.", 12),  # above the server's 50176-pixel default
        Request((noise(56, 84, 2),), "Read the text.", 12),
        Request((Image.effect_mandelbrot((224, 168), (-2, -1, 1, 1), 50).convert("RGB"),), "Locate it.", 12),
    ]
    remote = OpenAIBackend(ModelConfig(backend="openai", name=str(tiny_model), base_url=(serve,),
                                       max_concurrency=2, timeout=120))
    local = TransformersBackend(ModelConfig(name=str(tiny_model)))
    try:
        through_server = remote.generate(requests)
        in_process = local.generate(requests)
    finally:
        remote.unload()
        local.unload()
    for a, b in zip(through_server, in_process, strict=True):
        # transformers serve strips the text's ends (a random model emits \x1d and friends).
        assert a.text == b.text.strip()
        assert a.new_tokens == b.new_tokens and a.finished == b.finished


def test_the_size_hint_stops_the_server_resizing(serve: str, tiny_model: Path) -> None:
    """Prompt tokens count the image patches: with the hint they are those of the image as sent."""
    def prompt_tokens(image: Image.Image, hint: bool) -> int:
        body = chat_body(str(tiny_model), Request((image,), "Describe.", 1), [image_data_url(image)])
        del body["mm_processor_kwargs"]  # vLLM's; this server refuses it
        if not hint:
            del body["chat_template_kwargs"]
        response = httpx.post(f"{serve}/chat/completions", json=body, timeout=120, trust_env=False)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    big, small = noise(336, 280, 5), noise(56, 56, 6)  # 12x10 = 120 and 2x2 = 4 merged patches
    assert prompt_tokens(big, hint=True) - prompt_tokens(small, hint=True) == 120 - 4
    # and without it the server would have shrunk the big one to its own limit
    assert prompt_tokens(big, hint=False) - prompt_tokens(small, hint=False) < 120 - 4
