"""A backend whose GPU "dies" on the first request (issue 12.3), loaded with
``VLWATCH_PLUGINS=tests.device_lost_backend``.

It admits requests like the slot engine (``serve``) and raises
``DeviceLostError`` as the transformers backend does on a sticky CUDA error
("an illegal memory access was encountered"); no GPU needed.
"""

from __future__ import annotations

from typing import Sequence

from daemon.backends import Answer, DeviceLostError, Feed, Request, register
from daemon.config import ModelConfig


class DeviceLostBackend:
    name = "devicelost"

    def __init__(self, config: ModelConfig) -> None:
        self.model = config.name
        self.loaded = False

    def unload(self) -> None:
        self.loaded = False

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        raise DeviceLostError("CUDA error: an illegal memory access was encountered (injected)")

    def serve(self, feed: Feed) -> None:
        self.loaded = True
        while feed.next() is None:  # a request is in a slot when it happens
            if not feed.more():
                return
            feed.wait(0.05)
        raise DeviceLostError("the GPU is in an unrecoverable state: CUDA error: an illegal memory access "
                              "was encountered (injected)")


register("devicelost", DeviceLostBackend)
