"""The API on the real model code path: ``vlwatch run`` on the tiny Qwen2.5-VL checkpoint, the openai SDK as client.

The answers of random weights mean nothing; what is checked is that each
kind of request goes through the real processor and generate path and comes
back in the OpenAI shape (issue 13.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import openai
import pytest

from tests.conftest import tiny_daemon_config
from tests.test_api import data_url, free_port, image_part, _answers
from tests.test_daemon import Daemon, png_bytes, put, wait_until


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[openai.OpenAI, Path]]:
    workdir = tmp_path_factory.mktemp("api-tiny")
    (workdir / "inbox").mkdir()
    port = free_port()
    config = tiny_daemon_config(workdir, tiny_model, port=port, settle="0.3s")
    d = Daemon(workdir, config).start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(base), "the API", log=d.log)
    try:
        with openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            yield client, workdir / "inbox"
    finally:
        d.stop()
        d.close()


def test_plain_and_streamed(tiny_served: tuple[openai.OpenAI, Path]) -> None:  # issue 13.1
    client, _ = tiny_served
    reply = client.chat.completions.create(model="tiny", max_tokens=4,
                                           messages=[{"role": "user", "content": "Say hi."}])
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 4
    # issue 27: counted with the checkpoint's tokenizer (the default system prompt, the template, 3 words)
    assert 10 < reply.usage.prompt_tokens < 60
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    text = ""
    for chunk in client.chat.completions.create(model="tiny", max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": "Say hi."}]):
        for choice in chunk.choices:
            text += choice.delta.content or ""
    assert isinstance(text, str)


def test_two_images_and_two_turns(tiny_served: tuple[openai.OpenAI, Path]) -> None:  # issue 13.1
    client, inbox = tiny_served
    a = put(inbox / "a.png", png_bytes(1, (64, 48)))
    reply = client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
        image_part(a.as_uri()), image_part(data_url(png_bytes(2, (90, 60)))),
        {"type": "text", "text": "Which differs?"}]}])
    assert reply.choices[0].message.content is not None
    reply = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "user", "content": [image_part(data_url(png_bytes(3))), {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": "Which colours?"}])
    assert reply.choices[0].message.content is not None
