"""Backends whose GPU "dies" on the first request (issue 12.3), loaded with
``VLWATCH_PLUGINS=tests.device_lost_backend``.

``devicelost`` admits requests like the slot engine (``serve``) and raises
``DeviceLostError`` as the transformers backend does on a sticky CUDA error
("an illegal memory access was encountered"); no GPU needed.  Issue 22.5:
``devicelost-message`` (``generate`` only, as most plugins are) and
``devicelost-message-serve`` raise what torch raises, a plain
``RuntimeError`` that only says so in its message.
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


#: What torch raises after a kernel fault: no type to tell it by, only the message.
TORCH_MESSAGE = "CUDA error: an illegal memory access was encountered"


class MessageOnlyBackend(DeviceLostBackend):
    """A plugin with ``generate`` only that lets torch's sticky error through untyped."""

    name = "devicelost-message"
    serve = None  # type: ignore[assignment]  # no admission loop: the daemon hands it batches

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self.loaded = True
        raise RuntimeError(TORCH_MESSAGE)


class MessageOnlyServeBackend(DeviceLostBackend):
    """A plugin with its own admission loop (``serve``) that lets torch's sticky error through untyped."""

    name = "devicelost-message-serve"

    def serve(self, feed: Feed) -> None:
        self.loaded = True
        while feed.next() is None:
            if not feed.more():
                return
            feed.wait(0.05)
        raise RuntimeError(TORCH_MESSAGE)


register("devicelost", DeviceLostBackend)
register("devicelost-message", MessageOnlyBackend)
register("devicelost-message-serve", MessageOnlyServeBackend)
