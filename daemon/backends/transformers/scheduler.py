"""The slot engine's scheduler: which sequences run next, and which prompts may be prefilled.

The slot engine (``slots.SlotEngine``) alternates two kinds of GPU work:
prefill rounds (new prompts' images and text into free slots) and decode
stretches (one token for every busy slot, a few steps between two host
syncs).  Both kinds stop every other sequence while they run, so *what runs
next* decides how a person asking a question while a scanner backlog drains
sees the answer arrive.  This module makes that decision, in one place, from
plain numbers (it imports no torch and is tested on its own):

- **Interactive before queued.**  The lowest ``interactive_slots`` slots
  are the interactive requests' (the API, ``vlwatch ask``): queued (folder)
  prompts take the slots above them first and these last, and an
  interactive prompt that finds no slot free takes one of them back from
  the queued sequence admitted there last (``victim``): that sequence is
  dropped and prefilled again later (vLLM's preemption by recomputation).
  Kept empty instead, they cost every backlog their share of the batch and
  left the last prompts of a burst to a second wave of their own (issue
  22.6: the daemon end to end made 80-84% of the engine alone).  An
  interactive prompt takes the lowest free slot, and a round of queued
  prefills stops for it.
- **Decode first, prefill under a budget.**  While an interactive sequence
  is being decoded, queued prompts are admitted at most ``step_tokens``
  prompt tokens per turn (at least one prompt), so no round of folder
  prefills stalls the stream longer than one prompt's prefill; without
  interactive work, rounds are unbounded (what throughput wants).
- **Interactive sequences decode alone part of the time.**  Because
  interactive sequences sit in the lowest slots, a decode stretch can run
  over just that prefix: on an H100 a step of 4 slots takes ~6 ms against
  ~22 ms for 256.  Turns alternate so that the backlog keeps
  ``backlog_share`` of the engine's time (its full-width decode stretches
  and its prefills) while interactive sequences run: they advance in those
  turns too.

KV memory is reserved before admission by construction: every slot owns a
full row of the static cache (``prompt + max_new_tokens`` must fit it, or the
prompt is deferred to a run whose cache is sized for it).

What it deliberately does not do: split one prompt's prefill into chunks
that ride along decode steps (vLLM's chunked prefill).  Here a prompt is
prefilled whole; the longest stall a stream sees is one prompt's prefill
plus one decode stretch (measured in ``benchmarks/NOTES.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

#: Prompt tokens a turn of queued prefills may take while an interactive
#: sequence is being decoded: one 1036x1036 image (~1,400 tokens) or one
#: document page at 1288 px (~1,700 tokens) with its prompt.
STEP_TOKENS = 2048
#: Share of the engine's time the queued backlog keeps while interactive
#: sequences run (the rest goes to decode stretches over the interactive slots).
BACKLOG_SHARE = 0.5
#: Slots kept for interactive requests (the lowest ones), once the engine has
#: at least four times as many.
INTERACTIVE_SLOTS = 4


@dataclass(frozen=True)
class SchedulerOptions:
    """The scheduler's knobs (``engine:`` in the config; see ``daemon.config.EngineOptions``)."""

    step_tokens: int = STEP_TOKENS
    backlog_share: float = BACKLOG_SHARE
    interactive_slots: int = INTERACTIVE_SLOTS


@dataclass(frozen=True)
class Admission:
    """What the next prefill turn may admit."""

    queued_room: int  # queued (folder) prompts that may be admitted now
    urgent_room: int  # interactive prompts that may be admitted now
    tokens: int | None  # prompt tokens the turn may take in all (None: no bound); at least one prompt goes


class Scheduler:
    """Decides, between two host syncs, which prompts are admitted and which slots decode.

    Args:
        slots: the slot engine's slots.
        options: the knobs.
        reserve: the lowest slots are the interactive requests' (the daemon):
            queued prompts take them last and give them back (``victim``);
            False for a fixed list of prompts (the bench, ``process`` without a
            daemon), where nothing preempts.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, slots: int, options: SchedulerOptions = SchedulerOptions(), *, reserve: bool = False,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.slots = slots
        self.options = options
        self.reserved = min(options.interactive_slots, slots // 4) if reserve else 0
        self._clock = clock
        self._backlog_s = 0.0  # time spent on the backlog's turns while interactive work ran
        self._interactive_s = 0.0  # time spent on interactive-only decode stretches
        self._turn: str | None = None
        self._turn_started = 0.0

    # ------------------------------------------------------------ admission

    def admission(self, free: Iterable[int], *, urgent_waiting: bool, interactive_running: bool) -> Admission:
        """How much the next prefill turn may admit into the ``free`` slots."""
        free = list(free)
        queued = len(free)  # the interactive slots too, taken last (``place``) and taken back (``victim``)
        tokens = self.options.step_tokens if interactive_running else None
        if self._turn == "interactive":
            queued = 0  # the interactive sequences' own turn: no queued prefills in it
        return Admission(queued_room=queued, urgent_room=len(free) if urgent_waiting else 0, tokens=tokens)

    def place(self, urgent: list[bool], free: list[int]) -> list[int]:
        """Slots for a pack of prompts (``urgent`` flags, in order), taken out of ``free`` (ascending).

        Interactive prompts take the lowest free slot; queued prompts the
        lowest free slot above the interactive ones, or, with none free
        there, the highest free interactive slot: the interactive slots fill
        from the top down, so the one a queued sequence took last (the
        ``victim``) is the lowest, where an interactive sequence decodes in
        the narrowest stretch.
        """
        chosen: list[int] = []
        for is_urgent in urgent:
            pick = next((i for i in free if is_urgent or i >= self.reserved), free[-1])
            free.remove(pick)
            chosen.append(pick)
        return chosen

    def victim(self, queued: Mapping[int, int], interactive: int = 0) -> int | None:
        """The slot to take back for an interactive prompt that finds none free, or None.

        ``queued`` maps the slots that queued sequences hold (and that may be
        preempted: each gives its slot up once at most) to when each was
        admitted (any increasing count); ``interactive`` counts the
        interactive sequences running.  The victim is the one admitted last
        among the interactive slots: the least work lost, and the interactive
        sequence then sits low, where its own decode stretches stay narrow.
        Where every interactive slot holds a sequence that gave its slot up
        before (a wave of queued prompts admitted together refills them with
        the ones it gave back, and ends together), the one admitted last
        anywhere gives its slot up instead: the question would otherwise wait
        for the wave's end (call Q2: 1.5 s; a wave of pages takes ~15 s).
        At most ``reserved`` interactive requests displace queued work; more
        wait for a slot as queued prompts do.
        """
        if interactive >= self.reserved or not queued:
            return None
        low = [(began, slot) for slot, began in queued.items() if slot < self.reserved]
        return max(low or [(began, slot) for slot, began in queued.items()])[1]

    # ------------------------------------------------------------ decode

    def decode_width(self, busy: Iterable[int], interactive: Iterable[int], *, shrink: bool) -> int:
        """How many leading slots the next decode stretch runs over.

        Every slot (``shrink`` False: a fixed list), or the smallest power of
        two covering the busy slots; during an interactive-only turn, the
        power of two covering the interactive slots alone (the others wait).
        """
        busy = list(busy)
        interactive = list(interactive)
        if interactive and self._turn == "interactive":
            return min(self.slots, _cover(max(interactive)))
        if not shrink:
            return self.slots
        return min(self.slots, _cover(max(busy)))

    # ------------------------------------------------------------ turns

    def _backlog_next(self) -> bool:
        """While interactive work runs: is the next turn the backlog's (its prefills, full-width decoding)?"""
        if self.options.backlog_share >= 1:
            return True
        if self.options.backlog_share <= 0:
            return False
        spent = self._backlog_s + self._interactive_s
        return spent == 0 or self._backlog_s / spent < self.options.backlog_share

    def begin(self, *, interactive_running: bool) -> str | None:
        """A turn (a prefill round, then a decode stretch) starts now: whose it is.

        ``None`` without interactive work (everything runs), else
        ``"backlog"`` or ``"interactive"``, chosen so that the backlog's turns
        take ``backlog_share`` of the time.
        """
        self._turn = ("backlog" if self._backlog_next() else "interactive") if interactive_running else None
        self._turn_started = self._clock()
        if not interactive_running:
            self._backlog_s = self._interactive_s = 0.0  # shares count within one stretch of interactive work
        return self._turn

    def end(self) -> None:
        """The turn begun last ended: its time counts towards its side's share."""
        if self._turn is None:
            return
        spent = self._clock() - self._turn_started
        if self._turn == "backlog":
            self._backlog_s += spent
        else:
            self._interactive_s += spent
        self._turn = None


def decode_widths(slots: int) -> list[int]:
    """Every width ``Scheduler.decode_width`` can choose for a shrinking run of ``slots``, smallest first:
    the powers of two below ``slots``, and ``slots`` (each is a decode step of its own to capture)."""
    return sorted({min(slots, 1 << k) for k in range(max(1, slots).bit_length() + 1)})


def _cover(highest: int) -> int:
    """The smallest power of two of slots that holds slot index ``highest``."""
    return 1 << highest.bit_length()
