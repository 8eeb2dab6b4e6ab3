"""The slot engine's live ``Source`` over a backend ``Feed``: requests made into prompts ahead of the GPU.

``LiveSource`` is what ``TransformersBackend`` hands ``slots.SlotEngine.run``:
it turns the feed's requests into prompts on two processor threads, a few
ahead of the engine, puts interactive requests first, streams text
(``TextStream``), retries a request that got stuck repeating itself once
with light sampling, and keeps every prompt handed out until its answer is
delivered, so that after an out-of-memory error they run again and on a stop
they go back to the feed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from daemon.backends import Answer, Feed, Item
from daemon.errors import AbandonedError, BackendError

log = logging.getLogger(__name__)

#: Temperature of the one retry of a request that got stuck repeating itself.
LOOP_RETRY_TEMPERATURE = 0.4


class TextStream:
    """Incremental detokenisation: each call sends the text decoded since the last one.

    The whole sequence is decoded each time (a few per second; merges at token
    boundaries stay right), and a trailing U+FFFD, an incomplete UTF-8
    character still waiting for its next byte-token, is held back.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.sent = ""

    def update(self, tokens: list[int], *, final: bool = False) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        shown = text if final else text.rstrip("\ufffd")
        if shown.startswith(self.sent):
            if len(shown) > len(self.sent):
                self.emit(shown[len(self.sent):])
                self.sent = shown
        elif final:
            log.warning("streamed text and final text differ; the stream keeps what it sent")
        return text


@dataclass
class _Flight:
    item: Item
    prompt: Any  # prompts.Prompt
    stream: TextStream | None


class LiveSource:
    """The slot engine's ``Source`` over a ``Feed``: the processor runs ahead on CPU threads.

    Requests become prompts (chat template, pixels, rotary positions) on two
    threads, a few ahead of the GPU; an urgent (interactive) request is
    pulled past the lookahead limit and admitted before any other prompt.
    Tracks every prompt handed to the engine until it is delivered, so that
    after an out-of-memory error they run again, and on a stop they go back.
    """

    def __init__(self, feed: Feed, make: Callable[[int, Item], Any], tokenizer: Any, ahead: int = 4) -> None:
        """``make(index, item)``: the prompt for ``item`` (on a processor thread); ``tokenizer`` decodes answers."""
        self.feed, self.make, self.tokenizer, self.ahead = feed, make, tokenizer, ahead
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="vlwatch-processor")
        self.making: list[tuple[Item, int, Future[Any]]] = []
        self.front: collections.deque[_Flight] = collections.deque()  # deferred or to run again
        self.taken: dict[int, _Flight] = {}  # handed to the engine, not yet delivered
        self._seq = itertools.count()
        self.tokens: dict[Hashable, list[int]] = {}  # generated token ids by feed key (bench --verify)

    # -- the Source protocol
    def take(self) -> Any:
        flight = self._from_front()
        if flight is not None:
            self.taken[flight.prompt.index] = flight
            return flight.prompt
        self._pull()
        while True:
            chosen = self._ready()
            if chosen is None:
                return None
            item, index, future = chosen
            self.making.remove(chosen)
            if item.urgent and self.feed.abandoned(item.key):  # its client left while it waited
                future.cancel()
                self._drop(item, " before it started; it is dropped")
                continue
            try:
                prompt = future.result()
            except Exception as exc:  # this request's images or text: it fails alone
                self._deliver(item, exc)
                continue
            stream = None
            if item.request.stream is not None:
                stream = TextStream(self.tokenizer, item.request.stream)
            self.taken[index] = _Flight(item, prompt, stream)
            return prompt

    def busy(self) -> bool:
        return bool(self.front or self.making) or self.feed.more()

    def wait(self, timeout: float) -> None:
        futures = [f for _, _, f in self.making]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        else:
            self.feed.wait(timeout)

    def stopping(self) -> bool:
        return self.feed.stopping()

    def urgent(self) -> bool:
        """An interactive request is waiting: in front (deferred), being made, or just arrived.

        Pulls arrived interactive requests from the feed, so that they are made
        on the processor threads while the engine finishes what it is doing.
        """
        if any(f.prompt.urgent for f in self.front):
            return True
        while (item := self.feed.next(urgent_only=True)) is not None:
            self._make(item)
        return any(item.urgent for item, _, _ in self.making)

    def defer(self, prompt: Any) -> None:
        self.front.appendleft(self.taken.pop(prompt.index))

    def give_back(self, prompt: Any) -> None:
        self.front.appendleft(self.taken.pop(prompt.index))  # first after the interactive ones (_from_front)

    def finished(self, prompt: Any, result: Any) -> None:
        flight = self.taken.pop(prompt.index)
        if isinstance(result, BaseException):
            self._deliver(flight.item, result)
            return
        if result.looped and not flight.prompt.retried and flight.prompt.temperature == 0 and flight.stream is None:
            # Stuck repeating (issue 12.4): once more with light sampling,
            # which usually steps out of the loop (olmOCR's remedy).
            log.info("a request started repeating itself after %d tokens; retrying it at temperature %.1f",
                     len(result.tokens), LOOP_RETRY_TEMPERATURE)
            flight.prompt.retried = True
            flight.prompt.temperature = LOOP_RETRY_TEMPERATURE
            self.front.appendleft(flight)
            return
        self.tokens[flight.item.key] = list(result.tokens)
        try:
            if flight.stream is not None:
                text = flight.stream.update(result.tokens, final=True)
            else:
                text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        except Exception as exc:  # the client's stream callback failed: its request ends with that
            self._deliver(flight.item, exc)
            return
        if result.looped:
            log.warning("a request kept repeating itself%s; stopped after %d tokens",
                        " after a retry" if flight.prompt.retried else "", len(result.tokens))
        self._deliver(flight.item, Answer(text=text, new_tokens=len(result.tokens), finished=result.finished or
                                          result.looped, looped=result.looped))

    def abandoned(self, prompt: Any) -> bool:
        flight = self.taken[prompt.index]
        if not self.feed.abandoned(flight.item.key):
            return False
        del self.taken[prompt.index]
        self._drop(flight.item, "; its slot is free")
        return True

    def partial(self, prompt: Any, tokens: list[int]) -> bool:
        if self.abandoned(prompt):
            return False
        flight = self.taken[prompt.index]
        try:
            flight.stream.update(tokens)  # type: ignore[union-attr]
        except Exception as exc:  # the client went away: free its slot
            del self.taken[prompt.index]
            self._deliver(flight.item, exc)
            return False
        return True

    # -- for the backend
    def largest(self) -> tuple[int, int]:
        """Longest prompt and largest budget among the prompts waiting in front (deferred ones)."""
        flights = list(self.front)
        return (max((f.prompt.length for f in flights), default=0),
                max((f.prompt.max_new_tokens for f in flights), default=0))

    def requeue_taken(self) -> None:
        """After an out-of-memory error: what was in the engine runs again (first, in order)."""
        for index in sorted(self.taken, reverse=True):
            flight = self.taken.pop(index)
            if flight.stream is not None and flight.stream.sent and flight.prompt.temperature > 0:
                # A sampled stream cannot be replayed: its client has part of an answer.
                self._deliver(flight.item, BackendError("out of GPU memory while answering; please retry"))
                continue
            self.front.appendleft(flight)

    def fail_taken(self, exc: BaseException) -> None:
        for index in sorted(self.taken):
            self._deliver(self.taken.pop(index).item, exc)

    def close(self, put_back: bool = True) -> None:
        """Whatever was taken from the feed and not delivered goes back to it (unless the device is lost)."""
        for _, _, future in self.making:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        keys = [f.item.key for f in self.taken.values()] + [f.item.key for f in self.front]
        keys += [item.key for item, _, _ in self.making]
        self.taken.clear(), self.front.clear(), self.making.clear()
        if keys and put_back:
            self.feed.put_back(keys)

    # -- inside
    def _from_front(self) -> _Flight | None:
        """The prompt in front to hand out next: an interactive one first; a queued one only while no
        interactive prompt is being made (a queued prompt given back to make room for one waits for it)."""
        flight = next((f for f in self.front if f.prompt.urgent), None)
        if flight is None and self.front and not any(item.urgent for item, _, _ in self.making):
            flight = self.front[0]
        if flight is not None:
            self.front.remove(flight)
        return flight

    def _pull(self) -> None:
        while True:
            urgent_only = len(self.making) >= self.ahead
            item = self.feed.next(urgent_only=urgent_only)
            if item is None:
                return
            self._make(item)

    def _make(self, item: Item) -> None:
        """Start turning ``item`` into a prompt on a processor thread."""
        index = next(self._seq)
        self.making.append((item, index, self.pool.submit(self.make, index, item)))

    def _ready(self) -> tuple[Item, int, Future[Any]] | None:
        """The prompt to admit next: an urgent one first (waited for while it is being made), else the oldest."""
        urgent = [m for m in self.making if m[0].urgent]
        for candidates in (urgent, self.making):
            if candidates:
                first = next((m for m in candidates if m[2].done()), None)
                if first is not None or candidates is urgent:
                    return first
        return None

    def _drop(self, item: Item, when: str) -> None:
        """An interactive request whose client went away: it ends with that (the engine frees its slot)."""
        log.info("an interactive request's client went away%s", when)
        self._deliver(item, AbandonedError("the client went away"))

    def _deliver(self, item: Item, result: Answer | BaseException) -> None:
        self.feed.deliver(item.key, result)
