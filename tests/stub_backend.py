"""A fault-injecting backend for the daemon tests, loaded with ``VLWATCH_PLUGINS=tests.stub_backend``.

It registers itself like any backend (``daemon.backends.register``) and
answers instantly, except:

- a file whose name contains ``bad`` makes it raise ``BackendError`` (the
  model rejects that request: the job fails and is retried);
- while the file named by ``$VLWATCH_STUB_DOWN`` exists it raises
  ``BackendUnavailableError`` (the server is down: the queue pauses).

Only for injecting faults; arrivals, restarts and kills are tested on the
tiny real checkpoint.
"""

from __future__ import annotations

import os
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
        if any("bad" in r.prompt for r in requests):
            raise BackendError("the model rejected the request (stub)")
        self._loaded = True
        return [Answer(text=f"stub answer for: {r.prompt[:40]}", new_tokens=4) for r in requests]


register("stub", StubBackend)
