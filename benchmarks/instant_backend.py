"""An instant backend for the benchmarks: ``VLWATCH_PLUGINS=benchmarks.instant_backend``.

It registers as ``instant`` the way a real backend registers, and answers
every request at once, so a benchmark measures watching, readiness and
queueing rather than the model. Never used for the arrival, restart or
kill tests, which run the real model code on the tiny checkpoint.
"""

from __future__ import annotations

from typing import Sequence

from daemon.backends import Answer, Request, register
from daemon.config import ModelConfig


class InstantBackend:
    name = "instant"

    def __init__(self, config: ModelConfig) -> None:
        self.model = config.name
        self.loaded = False

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self.loaded = True
        return [Answer(text="instant", new_tokens=1) for _ in requests]

    def unload(self) -> None:
        self.loaded = False


register("instant", InstantBackend)
