"""What the slot engine tells an observer: which prompts went into which slots, and when it decoded.

``slots.SlotEngine.trace`` (None by default) is called with one of these,
in order, on the engine's thread:

- ``Prefill``: a pack of prompts goes into its slots (before the pack's
  prefill is queued on the device);
- ``Settled``: a round's first tokens were read (the one host wait a round
  makes), and which of its prompts went on to decode;
- ``Decode``: a stretch of decode steps (up to the next host sync) starts,
  over the first ``width`` slots.

For tests, the bench and a curious operator: the order of these events is
the scheduling the engine did (``scheduler.Scheduler`` decides it; this
shows what came of it with real prompts).  With no observer the engine
builds no event (one ``is None`` check per pack, per round and per decode
stretch, none per step).  An observer runs on the engine's thread between
two pieces of GPU work: a slow one slows the engine, and an exception it
raises propagates out of ``SlotEngine.run``.

What it deliberately does not carry: tokens (the engine's ``Source`` gets
those), per-step detail (a stretch is one event; ``SlotEngine.stats``
counts the steps), or timings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from daemon.backends.transformers.prompts import Prompt


@dataclass(frozen=True)
class Prefill:
    """A pack of prompts goes into ``slots`` (``prompts[i]`` into ``slots[i]``), one prefill pass.

    A pack whose prefill fails is tried again a prompt at a time: each
    try is an event of its own.
    """

    prompts: tuple[Prompt, ...]
    slots: tuple[int, ...]

    @property
    def tokens(self) -> int:
        """Prompt tokens in the pack (``engine.step_tokens`` bounds a turn's while an interactive request runs)."""
        return sum(p.length for p in self.prompts)


@dataclass(frozen=True)
class Settled:
    """A round's first tokens were read; ``decoding[i]``: ``prompts[i]`` holds ``slots[i]`` and decodes on.

    False where the prompt ended at its first token (end of sequence, a
    budget of one), had non-finite logits, or its client went away.
    """

    prompts: tuple[Prompt, ...]
    slots: tuple[int, ...]
    decoding: tuple[bool, ...]


@dataclass(frozen=True)
class Decode:
    """Decode steps over the first ``width`` slots start; ``slots`` (ascending) are busy with ``prompts``.

    The steps run until the next host sync (how many: ``SlotEngine.stats``
    counts them); busy slots at or above ``width`` wait this stretch out.
    """

    width: int
    slots: tuple[int, ...]
    prompts: tuple[Prompt, ...]


Event = Union[Prefill, Settled, Decode]
#: ``SlotEngine.trace``: called with each event, on the engine's thread.
Trace = Callable[[Event], None]
