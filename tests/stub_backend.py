"""A fault-injecting backend for the daemon tests, loaded with ``VLWATCH_PLUGINS=tests.stub_backend``.

It registers itself like any backend (``daemon.backends.register``) and
answers instantly, except:

- a file whose name contains ``bad`` makes it raise ``BackendError`` (the
  model rejects that request: the job fails and is retried);
- while the file named by ``$VLWATCH_STUB_DOWN`` exists it raises
  ``BackendUnavailableError`` (the server is down: the queue pauses);
- ``$VLWATCH_STUB_DELAY`` seconds (a float) are spent on every call, as a
  slow model would (the API's priority tests).

A chat (``Request.messages``) is answered with what it saw, so a test can
tell the turns and images arrived in order: ``chat: 2 turns, 3 images
(64x48, ...); last: <the last user text>``, streamed word by word when the
request asks for a stream.  Every call is counted in ``$VLWATCH_STUB_LOG``
(one line per request: ``chat`` or ``job``, its number of images and
the pid of the process that answered) when that is set.

Only for injecting faults; arrivals, restarts and kills are tested on the
tiny real checkpoint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from daemon.backends import Answer, Request, register
from daemon.config import ModelConfig
from daemon.errors import BackendError, BackendUnavailableError


class StubBackend:
    name = "stub"

    def __init__(self, config: ModelConfig) -> None:
        self.model = config.name
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def unload(self) -> None:
        self._loaded = False

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        down = os.environ.get("VLWATCH_STUB_DOWN")
        if down and Path(down).exists():
            raise BackendUnavailableError("connection refused (stub server down)")
        if any("bad" in r.prompt and not r.messages for r in requests):
            raise BackendError("the model rejected the request (stub)")
        delay = float(os.environ.get("VLWATCH_STUB_DELAY") or 0)
        if delay:
            time.sleep(delay)
        self._loaded = True
        if log := os.environ.get("VLWATCH_STUB_LOG"):
            with open(log, "a") as f:
                f.writelines(f"{'chat' if r.messages else 'job'} {len(r.images)} {os.getpid()}\n" for r in requests)
        return [self._chat(r) if r.messages else
                Answer(text=f"stub answer for: {r.prompt[:40]}", new_tokens=4) for r in requests]

    @staticmethod
    def _chat(request: Request) -> Answer:
        sizes = ", ".join(f"{i.width}x{i.height}" for i in request.images)
        last = next((p for m in reversed(request.messages) if m.role == "user"
                     for p in reversed(m.parts) if isinstance(p, str)), "")
        text = f"chat: {len(request.messages)} turns, {len(request.images)} images ({sizes}); last: {last}"
        if request.stream is not None:
            words = text.split(" ")
            for i, word in enumerate(words):
                request.stream(word + (" " if i < len(words) - 1 else ""))
        return Answer(text=text, new_tokens=len(text.split()))


register("stub", StubBackend)
