"""What the slot engine (``slots.SlotEngine``) takes and gives: prompts in, generated tokens out.

- ``Prompt``: one request after the processor (tensors on the CPU);
- ``Source``: where ``SlotEngine.run`` takes prompts from and hands results
  to, polled between steps (the backend's live feed; ``ListSource`` for a
  fixed list);
- ``Generated``: one finished sequence; ``RunStats``: what a run measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass
class Prompt:
    """One request after the processor: what prefill needs (tensors on the CPU)."""

    index: int
    inputs: dict[str, torch.Tensor]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy; > 0: sampled at this temperature (Gumbel-max)
    stream: bool = False  # the source wants partial tokens at every host sync
    urgent: bool = False  # interactive: admitted before queued work, may use the reserved slots
    retried: bool = False  # already a retry after a repetition loop
    preempted: bool = False  # gave its slot up once to an interactive request (not again)

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def patches(self) -> int:
        pixels = self.inputs.get("pixel_values")
        return 0 if pixels is None else int(pixels.shape[0])


@dataclass
class Generated:
    tokens: list[int]  # up to, not including, the first end-of-sequence token
    finished: bool  # True: stopped at end-of-sequence; False: ran out of budget
    ttft: float  # seconds from a free slot to this request's first token (see SlotEngine.run)
    generated: int  # tokens produced, an end-of-sequence token included
    looped: bool = False  # stopped early: the tokens had started repeating (see LOOP_WINDOW)


class NonFiniteLogitsError(ValueError):
    """The model's logits for a request were NaN or infinite (fp16 overflow, broken weights)."""


class Source(Protocol):
    """Where ``SlotEngine.run`` takes prompts from and gives results to (polled between steps).

    ``take`` never blocks; ``busy`` says whether more may come, so the engine
    waits (``wait``) instead of returning while a prompt is still being made.
    """

    def take(self) -> Prompt | None: ...

    def busy(self) -> bool: ...

    def wait(self, timeout: float) -> None: ...

    def stopping(self) -> bool: ...

    def urgent(self) -> bool:
        """An interactive prompt is waiting (or being made): admission and decode runs stay short."""
        ...

    def defer(self, prompt: Prompt) -> None:
        """``prompt`` does not fit this run's cache: hold it for the next run (admission stops)."""
        ...

    def give_back(self, prompt: Prompt) -> None:
        """``prompt`` is handed back unfinished, to come out of ``take`` again first after the interactive
        ones: it did not fit the turn's prefill budget, or it gave its slot up to an interactive prompt
        (its generation starts over; nothing of it was delivered)."""
        ...

    def finished(self, prompt: Prompt, result: "Generated | BaseException") -> None: ...

    def partial(self, prompt: Prompt, tokens: list[int]) -> bool:
        """Tokens so far of a streaming prompt; False cancels it (the slot is freed, nothing more sent)."""
        ...

    def abandoned(self, prompt: Prompt) -> bool:
        """True once the client of an interactive prompt went away (the prompt is then finished with that
        error by the source); the engine frees its slot."""
        ...


class ListSource:
    """A ``Source`` over a list of prompts, results collected by index (tests, the bench's probe)."""

    def __init__(self, prompts: Iterable[Prompt]) -> None:
        self._prompts = iter(prompts)
        self.results: dict[int, Generated | BaseException] = {}
        self.deferred: list[Prompt] = []
        self.again: list[Prompt] = []  # given back, taken first

    def take(self) -> Prompt | None:
        if self.again:
            return self.again.pop(0)
        return next(self._prompts, None)

    def busy(self) -> bool:
        return False

    def wait(self, timeout: float) -> None:
        return None

    def stopping(self) -> bool:
        return False

    def urgent(self) -> bool:
        return False

    def defer(self, prompt: Prompt) -> None:
        self.deferred.append(prompt)

    def give_back(self, prompt: Prompt) -> None:
        self.again.insert(0, prompt)

    def finished(self, prompt: Prompt, result: "Generated | BaseException") -> None:
        self.results[prompt.index] = result

    def partial(self, prompt: Prompt, tokens: list[int]) -> bool:
        return True

    def abandoned(self, prompt: Prompt) -> bool:
        return False


@dataclass
class RunStats:
    requests: int = 0
    slots: int = 0
    cache_length: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    new_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    cuda_graphs: bool = False
    loops: int = 0  # sequences stopped for repeating themselves
    cache_allocations: int = 0  # runs that (re)allocated the static cache (each drops the captured graphs)
    #: decode seconds run with free slots while the source had nothing ready yet (more was coming): the
    #: feed not keeping up (issue 22.6: the daemon end to end against the engine alone)
    starved_s: float = 0.0
    #: queued sequences that gave their slot up to an interactive request (and were generated again)
    preempted: int = 0
