"""What a backend is, in one typed place: ``BaseBackend``, its ``Capabilities``, and ``as_backend``.

The engine used to ask a backend what it could do by probing attributes
(``getattr(backend, "serve", None)``, ``"auto_batch_size"``, ``"loaded"``,
...), in a dozen places.  Now every backend the daemon holds is a
``BaseBackend``: what it can do is declared (``capabilities``), and every
optional part has a typed default here, so the engine calls it plainly.

The built-in backends subclass it.  A plugin written against the minimal
protocol of earlier releases (``name``, ``model``, ``generate``, perhaps
``loaded``/``unload``) still works: ``as_backend`` wraps it once, when it
is created, and this is the only place that looks at what such an object
has (``PluginBackend``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from daemon.errors import BackendUnavailableError

if TYPE_CHECKING:
    from daemon.backends import Answer, Feed, Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capabilities:
    """What a backend does beyond answering a batch (``generate``)."""

    #: runs its own admission loop, ``serve(feed)``: continuous batching, interactive requests first,
    #: streamed text, a request dropped when its client leaves (the transformers backend's slot engine)
    serve: bool = False


class BaseBackend:
    """A model backend: requests in, answers out.  Subclasses set ``name`` and ``model`` and
    implement ``generate``; everything else has a default that does nothing or says "none"."""

    #: what produced the answers, recorded in sidecars, e.g. "transformers"
    name: str = ""
    #: the model id or path, recorded in sidecars
    model: str = ""
    capabilities: Capabilities = Capabilities()
    #: told when the model's state changes (loading, loaded, unloaded): the daemon records it for ``status``
    on_state_change: Callable[[], None] | None = None

    def generate(self, requests: Sequence["Request"]) -> list["Answer"]:
        """Answer each request, in order.  May batch; raises ``BackendError``."""
        raise NotImplementedError

    def generate_each(self, requests: Sequence["Request"]) -> list["Answer | BaseException"]:
        """An answer or the error for each request: a failing request does not fail the others.

        By default ``generate`` on the whole batch, and where that raises,
        one request at a time (a batch's failure names no culprit).  An
        outage (``BackendUnavailableError``) and a lost device are not one
        request's fault: they propagate.
        """
        from daemon.backends import DeviceLostError, as_device_lost

        try:
            answers = list(self.generate(requests))
            if len(answers) != len(requests):
                raise ValueError(f"{len(answers)} answers for {len(requests)} requests")
            return answers
        except (BackendUnavailableError, DeviceLostError):
            raise
        except Exception as exc:  # noqa: BLE001 - any exception: find the culprit, keep the rest
            lost = as_device_lost(exc)
            if lost is not None:
                raise lost from exc
            if len(requests) == 1:
                return [exc]
            log.warning("a batch of %d failed (%s); retrying one at a time", len(requests), exc)
            return [a for r in requests for a in self.generate_each([r])]

    def serve(self, feed: "Feed") -> None:
        """Run what ``feed`` gives until it has nothing more (``capabilities.serve`` backends only)."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} backend has no admission loop")

    def auto_batch_size(self) -> int:
        """Requests per call when ``model.batch_size`` is auto (a local engine sizes it from free memory)."""
        return 4

    @property
    def continuous_batching(self) -> bool:
        """Whether a slot is refilled as soon as its sequence ends (the worker then sends whole chunks)."""
        return False

    @property
    def loaded(self) -> bool:
        """Whether model memory is held in this process right now (``status``, idle unload)."""
        return False

    def load(self) -> None:
        """Load the model now (a child engine does at start); nothing to do for a remote backend."""

    def unload(self) -> None:
        """Free the model's memory; the next ``generate`` loads it again."""

    #: "fp8" where the weights are FP8 (sidecars say so: it changes the text), else ""
    precision: str = ""

    @property
    def provenance(self) -> str:
        """The engine's choices that can change an answer's text, for sidecars ("" for none)."""
        return ""

    @property
    def device_in_use(self) -> str | None:
        """The device the model runs on (``status``), once loaded; None for a remote backend."""
        return None

    @property
    def plan_summary(self) -> str | None:
        """The memory plan ("7B fp8 on 23.6 GiB: 96 slots of 1664 tokens", ``status``), where there is one."""
        return None

    @property
    def touchpoints_summary(self) -> str | None:
        """What the load-time check of the model's private touchpoints found (``status``), where there is one."""
        return None


class PluginBackend(BaseBackend):
    """A plugin backend written against the minimal protocol: its own parts where it has them, the
    defaults of ``BaseBackend`` for the rest (the one place that looks at what it has, once)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = str(getattr(inner, "name", "") or type(inner).__name__)
        self.model = str(getattr(inner, "model", "") or "")
        self.capabilities = Capabilities(serve=callable(getattr(inner, "serve", None)))
        self.precision = str(getattr(inner, "precision", "") or "")
        self._own = {n for n in ("generate_each", "serve", "auto_batch_size", "load", "unload")
                     if callable(getattr(inner, n, None))}

    def generate(self, requests: Sequence["Request"]) -> list["Answer"]:
        return self.inner.generate(requests)

    def generate_each(self, requests: Sequence["Request"]) -> list["Answer | BaseException"]:
        if "generate_each" in self._own:
            return self.inner.generate_each(requests)
        return super().generate_each(requests)

    def serve(self, feed: "Feed") -> None:
        if "serve" not in self._own:
            super().serve(feed)
        self.inner.serve(feed)

    def auto_batch_size(self) -> int:
        return self.inner.auto_batch_size() if "auto_batch_size" in self._own else super().auto_batch_size()

    @property
    def continuous_batching(self) -> bool:
        return bool(getattr(self.inner, "continuous_batching", False))

    @property
    def loaded(self) -> bool:
        return bool(getattr(self.inner, "loaded", False))

    def load(self) -> None:
        if "load" in self._own:
            self.inner.load()

    def unload(self) -> None:
        if "unload" in self._own:
            self.inner.unload()

    @property
    def provenance(self) -> str:
        return str(getattr(self.inner, "provenance", "") or "")

    @property  # type: ignore[override]
    def on_state_change(self) -> Callable[[], None] | None:
        return getattr(self.inner, "on_state_change", None)

    @on_state_change.setter
    def on_state_change(self, callback: Callable[[], None] | None) -> None:
        # A plugin that tells of loading itself keeps the callback; one that does not has nothing to tell.
        if hasattr(self.inner, "on_state_change"):
            self.inner.on_state_change = callback

    def __getattr__(self, name: str) -> Any:
        # Whatever else the plugin has (its own counters, a test's hooks) reads through.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def as_backend(obj: Any) -> BaseBackend:
    """``obj`` as a ``BaseBackend``: itself when it is one, else wrapped (``PluginBackend``)."""
    return obj if isinstance(obj, BaseBackend) else PluginBackend(obj)
