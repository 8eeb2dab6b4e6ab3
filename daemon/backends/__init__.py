"""Model backends: images and a prompt in, text out, batches allowed.

A backend meets the small ``Backend`` protocol and is found by the name in
``model.backend``.  Everything before the model call (decoding, sizing,
prompts) and after it (parsing, sidecars) is shared, so a backend only turns
``Request``s into ``Answer``s.

- ``transformers``: Qwen2.5-VL in this process, on the GPU (or the CPU).
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from daemon.config import ModelConfig
from daemon.errors import VlwatchError

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: text and images (already sized), in order."""

    role: str  # "system" | "user" | "assistant"
    parts: tuple["str | Image.Image", ...]


@dataclass(frozen=True)
class Request:
    """One model call: images already sized by ``daemon.images``, and the user prompt.

    A folder job is one user turn: ``images`` then ``prompt``.  A chat (the
    API, ``vlwatch ask``) sets ``messages`` instead: the whole conversation,
    images inside the turns where they were given; ``images`` then lists the
    same images in order of appearance (what sizing and batching look at) and
    ``prompt`` is unused.

    ``stream``, when set, is called with pieces of the answer's text as they
    are produced (a backend that cannot stream calls it never; the engine then
    sends the whole text once).  The pieces joined equal ``Answer.text``.
    """

    images: tuple["Image.Image", ...]
    prompt: str
    max_new_tokens: int
    messages: tuple[Message, ...] = ()
    temperature: float = 0.0  # 0 = greedy (what folder jobs use)
    stream: "Callable[[str], None] | None" = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int = 0
    finished: bool = True  # False when generation stopped at max_new_tokens


class Backend(Protocol):
    #: what produced the answers, recorded in sidecars, e.g. "transformers"
    name: str
    #: the model id or path, recorded in sidecars
    model: str

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        """Answer each request, in order.  May batch; raises ``BackendError``."""
        ...

    @property
    def loaded(self) -> bool:
        """Whether model memory is held right now (for status and idle unload)."""
        ...

    def unload(self) -> None:
        """Free the model's memory; the next ``generate`` loads it again."""
        ...


Factory = Callable[[ModelConfig], Backend]
_REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    """Make a backend available under ``model.backend: name`` (tests register fakes here too)."""
    _REGISTRY[name] = factory


def create_backend(model: ModelConfig) -> Backend:
    if model.backend not in _REGISTRY:
        _register_builtin(model.backend)
    try:
        factory = _REGISTRY[model.backend]
    except KeyError:
        raise VlwatchError(f"unknown model backend {model.backend!r}") from None
    return factory(model)


def _register_builtin(name: str) -> None:
    # Imported lazily: the openai client is not needed to run the local model,
    # and torch is not needed to talk to a server.
    if name == "transformers":
        from daemon.backends.transformers import TransformersBackend

        register("transformers", TransformersBackend)
    elif name == "openai":
        from daemon.backends.openai import OpenAIBackend

        register("openai", OpenAIBackend)
