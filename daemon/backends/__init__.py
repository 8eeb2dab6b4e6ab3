"""Model backends: images and a prompt in, text out, batches allowed.

A backend is a ``base.BaseBackend`` (declared ``Capabilities``, typed
defaults for everything optional) and is found by the name in
``model.backend``.  Everything before the model call (decoding, sizing,
prompts) and after it (parsing, sidecars) is shared, so a backend only turns
``Request``s into ``Answer``s.

- ``transformers``: Qwen2.5-VL in this process, on the GPU (or the CPU).
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` server.

A backend that runs its own admission loop (the transformers backend's slot
engine) also has ``serve(feed)``: it takes ``Item``s from a live ``Feed`` as
its slots free up and hands each answer back as soon as it is done
(``Feed.deliver``); the daemon's engine (``daemon.engine.loop``) feeds it
interactive requests first, then the durable queue's jobs.  Other backends
get batches through ``generate``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Protocol, Sequence

from daemon.config import Config, EngineOptions, ModelConfig
from daemon.errors import VlwatchError
from daemon.backends.base import BaseBackend, Capabilities, PluginBackend, as_backend  # noqa: F401  (the interface)

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
    #: stopped early because the model kept repeating itself (and a retry with
    #: light sampling repeated too): ``text`` is what came before the stop
    looped: bool = False


class DeviceLostError(RuntimeError):
    """The accelerator is in a state this process cannot recover from (a sticky CUDA error).

    "an illegal memory access", "device-side assert triggered", "unspecified
    launch failure": after one of these every later CUDA call fails too.  The
    daemon puts the jobs in hand back (the crash counts as an attempt, so a
    poison file cannot loop forever) and exits non-zero for systemd to restart
    it.  Deliberately not a ``BackendError``: nothing may retry it in-process.
    """


#: Messages of CUDA errors that poison the CUDA context for good.
STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "cudaErrorLaunchFailure",
                      "unspecified launch failure", "illegal instruction", "misaligned address",
                      "cudaErrorIllegalAddress", "cudaErrorAssert")


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a CUDA error the process cannot recover from."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DeviceLostError):
            return True
        text = str(exc)
        if any(marker in text for marker in STICKY_CUDA_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def as_device_lost(exc: BaseException) -> DeviceLostError | None:
    """Whether any backend's exception means the device is lost, as the typed error (issue 22.5).

    The one classification the daemon applies to what a backend raises
    (``Worker`` around ``generate``, ``WorkerLoop`` around ``serve``): the
    transformers backend raises ``DeviceLostError`` itself, but a plugin may
    let torch's ``RuntimeError("CUDA error: an illegal memory access was
    encountered")`` through as it is, and after one every later job on that
    card would fail.
    """
    if isinstance(exc, DeviceLostError):
        return exc
    if not is_sticky_cuda_error(exc):
        return None
    lost = DeviceLostError(f"the GPU is in an unrecoverable state: {type(exc).__name__}: {exc}")
    lost.__cause__ = exc
    return lost


def reraise_if_fatal(exc: BaseException) -> None:
    """Out of memory and sticky CUDA errors are not one request's fault: let the caller handle them."""
    from daemon.backends.transformers.oom import is_out_of_memory

    if is_out_of_memory(exc) or is_sticky_cuda_error(exc):
        raise exc


@dataclass(frozen=True)
class Item:
    """One request a ``Feed`` hands to a backend's admission loop.

    ``key`` is the feed's own handle (given back with the answer); ``urgent``
    marks an interactive request, admitted before any queued work.
    """

    key: Hashable
    request: Request
    urgent: bool = False


@dataclass(frozen=True)
class Expected:
    """One kind of request a feed will bring (a rule's): what the engine sizes its cache for ahead.

    The slot engine's cache rows are fixed for a run; a prompt longer than
    its row waits for a run sized for it, and re-sizing drops every captured
    decode graph (seconds, while a person's answer waits: issue 22's first
    ask under a backlog).  Declared by the feed, so the first run already
    fits every rule's prompts.
    """

    prompt: str  # the prompt text, variables filled with a typical file name
    image_tokens: int  # its images' tokens at most (the rule's max_pixels / 28², reference images included)
    max_new_tokens: int


#: The file name a rule's prompt is rendered for when only its length matters (``expected_requests``).
TYPICAL_FILE = "/srv/scans/inbox/scan_2026-01-01_000001.pdf"


def expected_requests(config: Config) -> tuple[Expected, ...]:
    """Each rule's requests as the engine sizes for them ahead (the daemon's ``Sizing``; ``vlwatch plan``).

    The prompt is rendered for a typical file name (``$filename`` and the
    like are a few tokens); the images are the page at the rule's largest
    size plus one per reference image.
    """
    from pathlib import Path

    from daemon.intake.rules import render_prompt
    from daemon.plan import image_tokens_for

    model = config.model
    return tuple(Expected(prompt=render_prompt(rule, Path(TYPICAL_FILE)),
                          image_tokens=(1 + len(rule.reference)) * image_tokens_for(rule.max_pixels or model.max_pixels),
                          max_new_tokens=rule.max_new_tokens or model.max_new_tokens)
                 for rule in config.rules)


@dataclass(frozen=True)
class Sizing:
    """What a ``Feed`` tells the engine to size for before its requests arrive."""

    #: a fixed list (``generate``, the bench): sized for exactly these; empty for a live feed
    requests: tuple[Request, ...] = ()
    #: a live feed's kinds of request (the daemon's rules); interactive ones are sized as they come
    expected: tuple[Expected, ...] = ()


class Feed(Protocol):
    """A live source of requests for ``serve``: polled, never blocking the GPU loop."""

    def sizing(self) -> Sizing:
        """What the engine should size its cache for ahead of the requests (``Sizing``)."""
        ...

    def next(self, urgent_only: bool = False) -> Item | None:
        """The next request to admit, interactive ones first; None when nothing is ready now.

        ``urgent_only``: only an interactive request (the caller's lookahead is full).
        """
        ...

    def more(self) -> bool:
        """Whether anything is still on its way (being read, or waiting to be taken)."""
        ...

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds until something may be ready."""
        ...

    def deliver(self, key: Hashable, result: "Answer | BaseException") -> None:
        """The answer (or the error) of one request, as soon as it is done."""
        ...

    def put_back(self, keys: Sequence[Hashable]) -> None:
        """Requests taken but not run (the loop is stopping, or the device is lost)."""
        ...

    def stopping(self) -> bool:
        """Whether the loop should stop admitting and return (daemon stop, config reload)."""
        ...

    def abandoned(self, key: Hashable) -> bool:
        """Whether the client of this (interactive) request went away: the engine drops it at its next step."""
        ...

    def interactive(self) -> bool:
        """Whether interactive requests may come through this feed: the engine keeps slots for them, and
        prepares its decode steps while idle so that a question does not wait for them."""
        ...


class ListFeed:
    """A ``Feed`` over a fixed list: what ``generate`` runs through ``serve``."""

    def __init__(self, requests: Sequence[Request]) -> None:
        self.requests = list(requests)
        self._pending = collections.deque(Item(i, r) for i, r in enumerate(self.requests))
        self.results: dict[int, Answer | BaseException] = {}

    def sizing(self) -> Sizing:
        return Sizing(requests=tuple(self.requests))

    def next(self, urgent_only: bool = False) -> Item | None:
        return self._pending.popleft() if self._pending and not urgent_only else None

    def more(self) -> bool:
        return bool(self._pending)

    def wait(self, timeout: float) -> None:
        return None

    def deliver(self, key: Hashable, result: "Answer | BaseException") -> None:
        self.results[key] = result  # type: ignore[index]

    def put_back(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            self.results.setdefault(key, VlwatchError("the request was not run (stopped)"))  # type: ignore[index]

    def stopping(self) -> bool:
        return False

    def abandoned(self, key: Hashable) -> bool:
        return False

    def interactive(self) -> bool:
        return False

    def answers(self) -> "list[Answer | BaseException]":
        return [self.results.get(i, VlwatchError("no answer")) for i in range(len(self.requests))]


def engine_devices(model: Any) -> list[str | None]:
    """Where to run one engine each (issue 12.5): ``[None]`` is one engine on ``model.device``.

    ``model.devices: auto`` is every visible CUDA device (one engine if there
    is none); a list is taken as given.  Data parallel, no NCCL: each engine
    holds a whole copy of the model (a 7B model fits one GPU many times over).
    """
    devices = tuple(getattr(model, "devices", ()) or ())
    if not devices or model.backend != "transformers":
        return [None]
    if devices == ("auto",):
        try:
            import torch
        except ImportError:
            return [None]
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or [None]
    return list(devices)


#: Every backend the daemon holds (``base.BaseBackend``: typed defaults, declared ``Capabilities``).
Backend = BaseBackend


Factory = Callable[[ModelConfig], Backend]
#: A factory of a backend that runs a local engine: it takes the ``engine:`` options too.
EngineFactory = Callable[[ModelConfig, EngineOptions], Backend]
_REGISTRY: dict[str, Factory] = {}
_ENGINE_REGISTRY: dict[str, EngineFactory] = {}


def register(name: str, factory: Factory) -> None:
    """Make a backend available under ``model.backend: name`` (tests register fakes here too)."""
    _REGISTRY[name] = factory
    _ENGINE_REGISTRY.pop(name, None)


def register_engine(name: str, factory: EngineFactory) -> None:
    """As ``register``, for a backend that runs a local engine: ``factory(model, engine_options)``."""
    _ENGINE_REGISTRY[name] = factory
    _REGISTRY[name] = lambda model: factory(model, EngineOptions())


def create_backend(model: ModelConfig, engine: EngineOptions | None = None) -> Backend:
    """The backend ``model.backend`` names; one that runs a local engine gets ``engine`` (the config's ``engine:``)."""
    if model.backend not in _REGISTRY:
        _register_builtin(model.backend)
    if model.backend in _ENGINE_REGISTRY:
        return as_backend(_ENGINE_REGISTRY[model.backend](model, engine or EngineOptions()))
    try:
        factory = _REGISTRY[model.backend]
    except KeyError:
        raise VlwatchError(f"unknown model backend {model.backend!r}") from None
    return as_backend(factory(model))


def _register_builtin(name: str) -> None:
    # Imported lazily: the openai client is not needed to run the local model,
    # and torch is not needed to talk to a server.
    if name == "transformers":
        from daemon.backends.transformers.backend import TransformersBackend

        register_engine("transformers", lambda model, engine: TransformersBackend(model, options=engine))
    elif name == "openai":
        from daemon.backends.openai import OpenAIBackend

        register("openai", OpenAIBackend)
