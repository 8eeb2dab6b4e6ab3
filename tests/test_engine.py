"""The engine (issue 12) on the tiny checkpoint, CPU: continuous admission, priority, isolation, streaming.

The daemon's ``WorkerLoop`` runs in-process here, on a real SQLite queue and
real image files, with the real transformers backend and its slot engine
(``fastgen``); faults that cannot happen on a CPU (out of memory, a lost GPU,
non-finite logits) are injected at the one call where they would arise.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.backends import (
    Answer,
    DeviceLostError,
    Message,
    Request,
    is_sticky_cuda_error,
    register,
)
from daemon import plan
from daemon.backends import Expected, ListFeed, Sizing
from daemon.backends.transformers import decode_step
from daemon.backends.transformers import prefill as prefill_rounds
from daemon.backends.transformers import slots as fastgen
from daemon.backends.transformers.events import Decode, Event, Prefill, Settled
from daemon.backends.transformers.prompts import Generated, ListSource, NonFiniteLogitsError, Prompt
from daemon.backends.transformers.scheduler import Scheduler, SchedulerOptions
from daemon.backends.transformers.backend import TransformersBackend
from daemon import plan
from daemon.config import EngineOptions, ModelConfig
from daemon.config_reader import parse_config
from daemon.engine.loop import WorkerLoop
from daemon.engine.outcomes import Processor
from daemon.errors import BackendError, ConfigError
from daemon.engine.worker import Worker
from daemon.store.keys import content_hash
from daemon.store.queue import Candidate, Queue
from tests.conftest import wait_until

DEADLINE = 120.0  # joins and answers; waits use conftest.wait_until (90 s)



def png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


RULES = """\
rules:
  - name: describe
    match: ["*.png"]
    task: describe
    output: md
"""


def config_for(tmp_path: Path, model: Path | str, *, backend: str = "transformers", batch_size: int = 2,
               max_new_tokens: int = 8, engine: str = "{}", rules: str = RULES):
    text = f"""\
model:
  backend: {backend}
  name: {model}
  device: cpu
  max_new_tokens: {max_new_tokens}
  max_pixels: 50000
  batch_size: {batch_size}
state: ./state.db
watch:
  - path: ./inbox
{rules}jobs: {{batch_wait: 0s, backoff: 1s, attempts: 3}}
engine: {engine}
"""
    return parse_config(text, tmp_path / "config.yaml")


def queue_files(tmp_path: Path, queue: Queue, names: Sequence[str], *, together: bool = False,
                rule: Callable[[str], str] = lambda name: "describe") -> list[Path]:
    """Write and queue ``names`` (under ``rule(name)``): one by one, or (``together``) in one transaction."""
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    paths, candidates = [], []
    for i, name in enumerate(names):
        path = inbox / name
        path.write_bytes(png(i))
        st = path.stat()
        candidates.append(Candidate(path.absolute(), rule(name), content_hash(path), st.st_size, st.st_mtime_ns))
        if not together:
            queue.enqueue(candidates[-1:])
        paths.append(path)
    if together:
        queue.enqueue(candidates)
    return paths


class Running:
    """A WorkerLoop thread over a real queue; stopped and joined on exit."""

    def __init__(self, tmp_path: Path, config, backend) -> None:
        self.queue = Queue(tmp_path / "state.db")
        self.worker = Worker(config, backend)
        self.loop = WorkerLoop(self.queue, self.worker, Processor(self.queue, lambda path: None))

    def __enter__(self) -> Running:
        return self

    def start(self) -> None:
        self.loop.start()

    def states(self) -> dict[str, str]:
        return {j.path.name: j.state for j in self.queue.history()}

    def __exit__(self, *exc: object) -> None:
        self.loop.stop()
        if self.loop.ident is not None:
            self.loop.join(60)
        self.worker.close()
        self.queue.close()


@pytest.fixture(scope="module")
def backend(tiny_model: Path):
    b = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", batch_size=2, max_new_tokens=8,
                                        max_pixels=50000))
    b.load()
    yield b
    b.unload()


@pytest.fixture(scope="module")
def backend_cuda(tiny_model: Path):
    """The tiny checkpoint in bf16 on a GPU (the fast paths: flash attention, compiles, staging)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    b = TransformersBackend(ModelConfig(name=str(tiny_model), device="cuda", dtype="bfloat16", batch_size=4,
                                        max_new_tokens=8, max_pixels=50000))
    b.load()
    yield b
    b.unload()


@pytest.fixture
def fresh_backend(tiny_model: Path):
    """A backend of its own, for a test that leaves marks on one: a slot limit learnt from an out-of-memory
    error, decode step times already measured, a device error."""
    b = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", batch_size=4, max_new_tokens=8,
                                        max_pixels=50000))
    b.load()
    yield b
    b.unload()


class Watch:
    """The slot engine's events (``SlotEngine.trace``) in order, and where the engine is at mid-run.

    ``phase`` is "prefill" from a ``Prefill`` event on, "decode" from a ``Decode`` event on, when ``rows``
    maps each slot the stretch steps to its prompt: what a fault put into the model's own modules (a forward
    hook: where a real one arises) needs to hit one request in one phase.  ``then`` sees each event too.
    """

    def __init__(self, then: Callable[[Event], None] | None = None) -> None:
        self.events: list[Event] = []
        self.phase = ""
        self.rows: dict[int, Prompt] = {}
        self.then = then

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Prefill):
            self.phase = "prefill"
        elif isinstance(event, Decode):
            self.phase, self.rows = "decode", dict(zip(event.slots, event.prompts))
        if self.then is not None:
            self.then(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def watch(monkeypatch: pytest.MonkeyPatch, engine: fastgen.SlotEngine,
          then: Callable[[Event], None] | None = None) -> Watch:
    """Observe ``engine`` for the rest of the test."""
    watching = Watch(then)
    monkeypatch.setattr(engine, "trace", watching)
    return watching


@contextlib.contextmanager
def hooked(module: torch.nn.Module, hook: Callable[..., Any], *, pre: bool = False, **kwargs: Any):
    """``hook`` on one of the model's modules (after its forward, or with ``pre`` before it) while inside."""
    handle = module.register_forward_pre_hook(hook, **kwargs) if pre else module.register_forward_hook(hook, **kwargs)
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------ admission


def _ask_during_a_backlog(tmp_path: Path, config, backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch,
                          ask_after: int) -> tuple[Answer, list[int]]:
    """Eight files queued, then, once ``ask_after`` prompts were prefilled, a question (3 tokens) through the
    daemon's loop: its answer, and the ``max_new_tokens`` of every prefill in order (3 = the question).  Every
    file must end done with its sidecar."""
    admitted: list[int] = []
    with Running(tmp_path, config, backend) as r:
        queue_files(tmp_path, r.queue, [f"{i:02d}.png" for i in range(8)])
        ask: list = []

        def on_prefill(event: Event) -> None:
            if isinstance(event, Prefill):
                admitted.extend(prompt.max_new_tokens for prompt in event.prompts)
                if len(admitted) >= ask_after and not ask:  # the backlog is running: now the API asks something
                    ask.append(r.loop.submit(Request((image(99, 56, 56),), "What is this?", 3)))

        monkeypatch.setattr(backend.slot_engine, "trace", on_prefill)
        r.start()
        wait_until(lambda: ask and ask[0].done(), "the interactive answer")
        answer = ask[0].result(timeout=1)
        wait_until(lambda: set(r.states().values()) == {"done"} and len(r.states()) == 8, "the backlog done")
    for i in range(8):
        assert (tmp_path / "inbox" / f"{i:02d}.png.describe.md").exists()
    return answer, admitted


def test_interactive_request_is_admitted_before_the_rest_of_the_backlog(tmp_path: Path, tiny_model: Path,
                                                                         backend: TransformersBackend,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12.2: a request arriving while a backlog runs starts at the next free slot, ahead of queued jobs.
    config = config_for(tmp_path, tiny_model)
    backend.reconfigure(config.model)
    answer, admitted = _ask_during_a_backlog(tmp_path, config, backend, monkeypatch, ask_after=2)
    assert isinstance(answer, Answer)
    assert admitted.count(3) == 1 and len(admitted) == 9
    # The next prefill after the request arrived is the request, with six queued jobs still to come.
    assert admitted.index(3) == 2, admitted


def test_a_question_asked_while_the_backlog_holds_every_slot_takes_one_back(tmp_path: Path, tiny_model: Path,
                                                                            backend: TransformersBackend,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 22.6: the backlog fills the interactive slot too; the daemon's question, arriving with every slot
    # busy, is prefilled next all the same: the file admitted last gives its slot up, starts again later, and
    # still gets its sidecar.
    config = config_for(tmp_path, tiny_model, batch_size=4, max_new_tokens=40)
    backend.reconfigure(config.model)
    for runs_to_its_budget in (backend, backend.slot_engine):
        monkeypatch.setattr(runs_to_its_budget, "ignore_eos", True)
    answer, admitted = _ask_during_a_backlog(tmp_path, config, backend, monkeypatch, ask_after=4)  # every slot busy
    assert isinstance(answer, Answer) and answer.new_tokens == 3
    assert admitted.index(3) == 4, admitted  # the next prefill after the question came is the question
    assert len(admitted) == 10 and backend.last_stats["preempted"] == 1, (admitted, backend.last_stats)


def test_each_sidecar_is_written_when_its_request_finishes(tmp_path: Path, tiny_model: Path,
                                                           backend: TransformersBackend,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12.2: no chunk boundary: a short answer's sidecar exists while a long one is still decoding.
    rules = """\
rules:
  - {name: long, match: ["long.png"], task: describe, output: md, max_new_tokens: 40}
  - {name: short, match: ["short.png"], task: describe, output: md, max_new_tokens: 2}
"""
    config = config_for(tmp_path, tiny_model, max_new_tokens=40, rules=rules)
    backend.reconfigure(config.model)
    seen_while_decoding: list[bool] = []
    short_sidecar = tmp_path / "inbox" / "short.png.short.md"

    def while_long_decodes(event: Event) -> None:
        # A stretch of the long answer alone: the short one ended, and its sidecar is written meanwhile.
        if isinstance(event, Decode) and [p.max_new_tokens for p in event.prompts] == [40]:
            deadline = time.monotonic() + 10
            while not short_sidecar.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_while_decoding.append(short_sidecar.exists())

    monkeypatch.setattr(backend.slot_engine, "trace", while_long_decodes)
    for runs_to_its_budget in (backend, backend.slot_engine):  # the long answer runs to its 40 tokens
        monkeypatch.setattr(runs_to_its_budget, "ignore_eos", True)
    with Running(tmp_path, config, backend) as r:
        queue_files(tmp_path, r.queue, ["long.png", "short.png"], rule=lambda name: name.removesuffix(".png"))
        r.start()
        wait_until(lambda: list(r.states().values()) == ["done", "done"], "both done")
    assert seen_while_decoding and seen_while_decoding[-1], seen_while_decoding


class UrgentSource(ListSource):
    """A ListSource whose interactive prompts appear when ``arrive`` is called (by a patched engine step)."""

    def __init__(self, prompts, urgent) -> None:
        super().__init__(prompts)
        self.pending: list = []
        self.later = list(urgent)
        self.partials: dict[int, list[list[int]]] = {}
        self.events: list[tuple[str, int]] = []  # ("prefill"|"finished"|"partial", index) in order

    def arrive(self) -> None:
        self.pending.extend(self.later)
        self.later = []

    def take(self):
        if self.pending:
            return self.pending.pop(0)
        return super().take()

    def urgent(self) -> bool:
        return bool(self.pending)

    def finished(self, prompt, result) -> None:
        self.events.append(("finished", prompt.index))
        super().finished(prompt, result)

    def partial(self, prompt, tokens) -> bool:
        self.events.append(("partial", prompt.index))
        self.partials.setdefault(prompt.index, []).append(list(tokens))
        return True


def _prompts(backend: TransformersBackend, n: int, budget: int, first: int = 0, **kw) -> list[Prompt]:
    return [Prompt(first + i, backend.prompt_inputs(Request((image(first + i, 56, 56),), "Describe.", budget)),
                   budget, **kw) for i in range(n)]


def test_an_interactive_request_takes_a_slot_back_from_the_queued_sequence_admitted_last(
        backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 13 (time to first token under load): a backlog admitted at once must not hold every slot until its
    # sequences end together.  Issue 22.6: nor may it leave slots empty for questions that may never come (the
    # daemon's burst then ran its last prompts in a second wave of their own).  Queued work takes the interactive
    # slots last; a question that finds none free takes back the one a queued sequence took last, which is
    # generated again afterwards, to the same tokens.
    engine = backend.slot_engine
    folder = _prompts(backend, 12, 24)
    asked = _prompts(backend, 1, 4, first=100, urgent=True)
    source = UrgentSource(folder, asked)
    slot_at_prefill: dict[int, list[int]] = {}
    preempted: list[int] = []
    source_give_back = source.give_back

    def record(event: Event) -> None:
        if isinstance(event, Prefill):
            for prompt, slot in zip(event.prompts, event.slots):
                slot_at_prefill.setdefault(prompt.index, []).append(slot)
                source.events.append(("prefill", prompt.index))
        elif isinstance(event, Decode):
            source.arrive()  # the request arrives while the first decode stretch runs

    def note_preempted(prompt: Prompt) -> None:
        preempted.append(prompt.index)
        source_give_back(prompt)

    monkeypatch.setattr(engine, "trace", record)
    monkeypatch.setattr(engine, "ignore_eos", True)
    monkeypatch.setattr(source, "give_back", note_preempted)
    with torch.inference_mode():
        engine.run(source, slots=8, cache_length=256, max_new=24, shrink=True, reserve=True)
    reserved = Scheduler(8, reserve=True).reserved
    assert reserved == 2
    # Queued work filled every slot, the interactive ones last, from the top down ...
    assert [slot_at_prefill[i][0] for i in range(8)] == [2, 3, 4, 5, 6, 7, 1, 0]
    # ... the request took slot 0 back right after the first decode run, before any queued sequence ended ...
    events = source.events
    assert events.index(("prefill", 100)) < events.index(next(e for e in events if e[0] == "finished" and e[1] < 100))
    assert slot_at_prefill[100] == [0] and preempted == [7] and engine.stats.preempted == 1
    # ... and the sequence that gave it up was generated again, to the tokens an undisturbed run gives.
    assert len(slot_at_prefill[7]) == 2
    assert all(isinstance(source.results[i], Generated) for i in [*range(12), 100])
    undisturbed = ListSource(_prompts(backend, 12, 24))
    with torch.inference_mode():
        engine.run(undisturbed, slots=8, cache_length=256, max_new=24, shrink=True, reserve=True)
    assert {i: source.results[i].tokens for i in range(12)} == {i: r.tokens for i, r in undisturbed.results.items()}
    assert engine.stats.requests == 12 and engine.stats.preempted == 0


def test_questions_one_after_another_never_wait_for_a_wave_of_queued_sequences_to_end(
        backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # Call Q2 (session 11): a wave of queued prompts admitted together ends together; each question took an
    # interactive slot back, the sequence it displaced was admitted again into the same slot when the question
    # ended, and a sequence gives its slot up once at most, so after two questions (two interactive slots here)
    # the third waited for the wave's end (1.5 s on the H100). It must take a slot back higher up instead.
    engine = backend.slot_engine
    folder = _prompts(backend, 8, 160)
    asks = _prompts(backend, 3, 2, first=100, urgent=True)
    source = UrgentSource(folder, [])
    waiting = list(asks)

    def record(event: Event) -> None:
        if isinstance(event, Prefill):
            source.events.extend(("prefill", p.index) for p in event.prompts)
        elif isinstance(event, Decode) and waiting and not source.pending:
            asked = len(asks) - len(waiting)
            if asked == 0 or ("finished", asks[asked - 1].index) in source.events:
                source.pending.append(waiting.pop(0))  # the next question comes once the last one is answered

    monkeypatch.setattr(engine, "trace", record)
    monkeypatch.setattr(engine, "ignore_eos", True)
    with torch.inference_mode():
        engine.run(source, slots=8, cache_length=256, max_new=160, shrink=True, reserve=True)
    events = source.events
    first_end = events.index(next(e for e in events if e[0] == "finished" and e[1] < 100))
    assert [events.index(("prefill", a.index)) < first_end for a in asks] == [True, True, True], str([
        e for e in events if e[0] != "partial"])
    assert all(isinstance(source.results[i], Generated) for i in [*range(8), 100, 101, 102])


def test_a_fixed_list_uses_every_slot(backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bench and `process --local` bring no interactive requests: no slot is held back for them (a held-back
    # slot left 2 of 512 bench images to decode alone after the rest, at the full batch's step cost: -35% decode).
    engine = backend.slot_engine
    watching = watch(monkeypatch, engine)
    slots = 8
    with torch.inference_mode():
        engine.run(ListSource(_prompts(backend, slots, 3)), slots=slots, cache_length=256, max_new=3)
    busy = [slot for event in watching.of(Prefill) for slot in event.slots]
    assert max(busy) == slots - 1  # the last prompt went into the last free slot, in the same round
    assert len(watching.of(Settled)) == 1  # (one round)


class TrickleSource(ListSource):
    """A feed that lags: one more prompt becomes ready every other turn (counted in ``busy`` calls)."""

    def __init__(self, prompts: list[Prompt]) -> None:
        super().__init__(prompts)
        self.left, self.ready, self.turns = len(prompts), 0, 0

    def take(self) -> Prompt | None:
        if not self.ready:
            return None
        self.ready -= 1
        self.left -= 1
        return super().take()

    def busy(self) -> bool:
        self.turns += 1
        if self.turns % 2 == 0 and self.ready < self.left:
            self.ready += 1
        return self.left > 0


def test_decoding_while_the_source_lags_is_counted_as_starved(backend: TransformersBackend) -> None:
    # issue 22.6: the daemon end to end made 80-84% of the engine alone; the engine's own account says how much
    # of its decode ran with free slots because the feed had nothing ready (the "engine: ..." log line).
    engine = backend.slot_engine
    with torch.inference_mode():
        engine.run(ListSource(_prompts(backend, 4, 6)), slots=4, cache_length=256, max_new=6)
        assert engine.stats.starved_s == 0.0 and engine.stats.decode_s > 0  # everything ready at once
        lagging = TrickleSource(_prompts(backend, 4, 6))
        engine.run(lagging, slots=4, cache_length=256, max_new=6)
    assert len(lagging.results) == 4
    assert 0 < engine.stats.starved_s <= engine.stats.decode_s


def test_a_round_of_prefills_is_read_with_one_host_sync(backend: TransformersBackend,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12 (throughput): a round's first tokens are read together, once its prefills are all queued; a host
    # sync per prompt left an H100 idle ~11 of each 70 ms prefill.  (That nothing else in admission waits for the
    # GPU is watched on CUDA: test_admission_never_waits_for_the_gpu_but_for_a_rounds_first_tokens.)
    engine = backend.slot_engine
    watching = watch(monkeypatch, engine)
    source = ListSource(_prompts(backend, 4, 3))
    with torch.inference_mode():
        engine.run(source, slots=4, cache_length=256, max_new=3)
    first_read = next(i for i, e in enumerate(watching.events) if isinstance(e, Settled))
    prefilled = [p.index for e in watching.events[:first_read] if isinstance(e, Prefill) for p in e.prompts]
    assert prefilled == [0, 1, 2, 3], watching.events  # four small images: one vision group ...
    assert [p.index for p in watching.events[first_read].prompts] == [0, 1, 2, 3]  # ... one read
    assert all(isinstance(source.results[i], Generated) for i in range(4))


def test_a_packed_prefill_fills_the_slots_as_the_stock_text_model_does(backend: TransformersBackend,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12 (throughput): a round's prompts go through the text layers as one packed sequence, keys written
    # straight into their slots; what lands in the cache and the tokens must be the stock model's, for prompts of
    # different lengths (different image sizes) in slots out of order.
    engine = backend.slot_engine
    sizes = ((56, 56), (112, 84), (168, 112))
    budget = 5

    def run(packed: bool) -> tuple[list[Prefill], dict[int, Any], dict[int, list]]:
        # The middle prompt is interactive: with slots kept for such (reserve) it takes slot 0 and the queued
        # prompt packed with it slot 2, so a pack's prompts are out of slot order.
        prompts = [Prompt(i, backend.prompt_inputs(Request((image(i, w, h),), f"Describe {i}.", budget)), budget,
                          urgent=i == 1) for i, (w, h) in enumerate(sizes)]
        monkeypatch.setattr(engine, "packed", packed)
        watching = watch(monkeypatch, engine)
        source = ListSource(prompts)
        engine.release()  # a new, zeroed cache
        with torch.inference_mode():
            engine.run(source, slots=8, cache_length=256, max_new=8, reserve=True)
        # Each slot's columns: the prompt's keys, then those of the tokens fed back while decoding.
        caches = {slot: engine.cached(slot, prompt.length + budget - 1)
                  for event in watching.of(Prefill) for prompt, slot in zip(event.prompts, event.slots)}
        return watching.of(Prefill), source.results, caches

    monkeypatch.setattr(engine, "ignore_eos", True)
    packed_prefills, packed_results, packed_cache = run(True)
    stock_prefills, stock_results, stock_cache = run(False)
    lengths = [p.length for event in packed_prefills for p in event.prompts]
    assert len(set(lengths)) == 3
    assert [e.slots for e in packed_prefills] == [(2, 0), (3,)], packed_prefills
    assert [e.slots for e in stock_prefills] == [(2, 0), (3,)], stock_prefills
    tokens = {i: r.tokens for i, r in packed_results.items()}
    assert tokens == {i: r.tokens for i, r in stock_results.items()}
    assert sorted(tokens) == [0, 1, 2] and all(len(t) == budget for t in tokens.values())
    for slot, layers in packed_cache.items():
        for (k, v), (k0, v0) in zip(layers, stock_cache[slot]):
            assert k.abs().sum() > 0
            torch.testing.assert_close(k, k0, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v0, rtol=1e-5, atol=1e-5)


def test_rounds_overlap_a_rounds_first_tokens_are_read_after_the_next_is_queued(
        backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12 (throughput): the host prepares round k+1 (its vision tower launches take longer than its GPU
    # work) while round k still runs on the GPU: round k's first tokens are read only once k+1 is queued.
    # A round with an interactive prompt is read at once (its first token should not wait for another round).
    engine = backend.slot_engine
    monkeypatch.setattr(engine, "packing", plan.LEAN)  # a round per prompt
    watching = watch(monkeypatch, engine)
    prompts = _prompts(backend, 3, 3)
    prompts[2].urgent = True
    source = ListSource(prompts + _prompts(backend, 1, 3, first=3))
    with torch.inference_mode():
        engine.run(source, slots=4, cache_length=256, max_new=3)
    events = [("prefill" if isinstance(e, Prefill) else "settle", [p.index for p in e.prompts])
              for e in watching.events if isinstance(e, (Prefill, Settled))]
    assert events[:6] == [("prefill", [0]), ("prefill", [1]), ("settle", [0]),
                          ("prefill", [2]), ("settle", [1]), ("settle", [2])], events
    assert events[6:] == [("prefill", [3]), ("settle", [3])], events  # the last round: read before decoding
    assert all(isinstance(source.results[i], Generated) for i in range(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_admission_never_waits_for_the_gpu_but_for_a_rounds_first_tokens(backend_cuda: TransformersBackend,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12 (throughput): rounds are queued without a host sync (the vision grid, the window spans and the
    # image-token rows are worked out on the CPU; the slots are switched on by the GPU), so that they overlap.
    # Admission is watched from a turn's first prefill to its decode stretch: the vision tower of every later
    # round, the launches, and reading the first tokens (an event's wait, which torch's sync check does not
    # count); an assignment of a Python value there (`active[slot] = True`) was a copy that waited for the
    # round queued behind (call P3).  Decode stretches sync on purpose (they read which sequences ended).
    engine = backend_cuda.slot_engine
    monkeypatch.setattr(engine, "packing", plan.LEAN)  # a round per prompt: they overlap

    def syncs_fail_while_admitting(event: Event) -> None:
        torch.cuda.set_sync_debug_mode("default" if isinstance(event, Decode) else "error")

    monkeypatch.setattr(engine, "penalty", 1.05)  # Qwen's generation config has one: the seen-token mask too
    monkeypatch.setattr(engine, "ignore_eos", True)
    try:
        with torch.inference_mode():
            for watched in (False, True):  # the first run warms up (compiling syncs), the second is watched
                engine.release()
                if watched:
                    monkeypatch.setattr(engine, "trace", syncs_fail_while_admitting)
                source = ListSource(_prompts(backend_cuda, 6, 3))
                try:
                    engine.run(source, slots=4, cache_length=256, max_new=3)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                failed = ["".join(traceback.format_exception(r)[-8:]) for i, r in source.results.items()
                          if isinstance(r, BaseException)]
                assert not failed, f"watched={watched}: {failed}"
                assert [len(source.results[i].tokens) for i in range(6)] == [3] * 6, source.results
    finally:
        engine.release()


def test_the_gpu_decodes_exactly_the_slots_the_host_hands_out(backend: TransformersBackend,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU switches a slot on when it chooses the first token (no host copy), on the conditions the host
    # applies when it reads that token: a prompt ending at its first token (EOS, or a budget of one) must
    # leave its slot off, one going on must have it on.
    engine = backend.slot_engine
    monkeypatch.setattr(engine, "ignore_eos", False)  # (the bench's switch, left as the last generate set it)
    with torch.inference_mode():
        lone = ListSource(_prompts(backend, 1, 4))
        engine.run(lone, slots=4, cache_length=256, max_new=4)
    first, later = lone.results[0].tokens[0], lone.results[0].tokens[-1]
    assert first != later  # (the tiny model's first token is the same for every prompt: the end is told by EOS)
    rounds = []

    def compare(event: Event) -> None:  # once a round is read: the device's flags against the host's
        if isinstance(event, Settled):
            on = engine.device_active()
            rounds.extend((slot, slot in on, decoding) for slot, decoding in zip(event.slots, event.decoding))

    monkeypatch.setattr(engine, "trace", compare)
    for eos, budgets, going_on in ((first, (4, 1), 0), (later, (4, 1, 4), 2)):
        monkeypatch.setattr(engine, "eos", torch.tensor([eos]))
        rounds.clear()
        source = ListSource([_prompts(backend, 1, budget, first=i)[0] for i, budget in enumerate(budgets)])
        with torch.inference_mode():
            engine.run(source, slots=4, cache_length=256, max_new=4)
        assert len(rounds) == len(budgets)
        assert all(active == owned for _, active, owned in rounds), rounds
        assert sum(owned for _, _, owned in rounds) == going_on, rounds
        assert [len(source.results[i].tokens) < budget for i, budget in enumerate(budgets)].count(True) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused vision blocks are for CUDA in half precision")
def test_the_fused_vision_blocks_compute_what_the_stock_tower_does(backend_cuda: TransformersBackend) -> None:
    # issue 12 (throughput): each vision block as one compiled call with one varlen attention (the tower's
    # launches were its host cost); in bf16 the features must match the stock tower's within rounding.
    engine = backend_cuda.slot_engine
    patch = engine.vision
    features: list[torch.Tensor] = []

    def keep(module, args, out) -> None:
        features.append(out.pooler_output.float().clone())

    def run() -> None:
        prompts = [Prompt(i, backend_cuda.prompt_inputs(Request((image(i, w, h),), "Describe.", 1)), 1)
                   for i, (w, h) in enumerate(((224, 168), (56, 112), (140, 140)))]
        with torch.inference_mode():
            engine.run(ListSource(prompts), slots=4, cache_length=256, max_new=1)

    with hooked(engine.model.model.visual, keep):
        run()
        assert patch.last_path.startswith("fused blocks")
        patch.enabled = False
        try:
            run()
        finally:
            patch.enabled = True
    fused, stock = features  # three images, one vision call a run
    assert ((fused - stock).norm() / stock.norm()).item() < 2e-2


def test_a_pack_takes_whole_prompts_up_to_its_token_bound(backend: TransformersBackend,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = _prompts(backend, 5, 3)
    n = prompts[0].length
    group = [(p, None) for p in prompts]
    sizes = []
    while group:
        sizes.append(len(prefill_rounds.take_pack(group, plan.Packing(tokens=2 * n + 1))))
    assert sizes == [2, 2, 1]
    # a prompt longer than the bound goes alone, and so does each prompt when lean
    assert len(prefill_rounds.take_pack([(p, None) for p in prompts], plan.Packing(tokens=1))) == 1
    assert len(prefill_rounds.take_pack([(p, None) for p in prompts], plan.LEAN)) == 1


def test_the_lone_row_attention_equals_the_masked_sdpa() -> None:
    # issue 12 (batch-1 latency): one row decodes through two small matmuls instead of SDPA with a mask (the
    # fused kernel used 4 thread blocks for it on an H100); the result must be the same attention.
    torch.manual_seed(0)
    slots, length, n_kv, group, dim = 3, 40, 2, 3, 16
    q = torch.randn(1, n_kv * group, dim)
    k_cache, v_cache = torch.randn(slots, length, n_kv, dim), torch.randn(slots, length, n_kv, dim)
    wpos = torch.tensor([17])
    bias = torch.zeros(1, length).masked_fill(torch.arange(length)[None, :] > wpos[:, None], float("-inf"))
    where = decode_step.Where(torch.tensor([0]), wpos, bias[:, None, None, :], None, torch.arange(2), torch.arange(2))
    one = decode_step.attend(q, k_cache, v_cache, where, 0.25, group, "one")
    sdpa = decode_step.attend(q, k_cache[:1], v_cache[:1], where, 0.25, group, "sdpa")
    assert one.shape == sdpa.shape == (1, n_kv * group * dim)
    torch.testing.assert_close(one, sdpa)
    # Columns past the row's own are never read: changing them changes nothing.
    k_cache[0, 18:] = 1e4
    torch.testing.assert_close(decode_step.attend(q, k_cache, v_cache, where, 0.25, group, "one"), one)
    assert decode_step.attention_kind(torch.device("cpu"), torch.bfloat16) == "sdpa"  # flash: CUDA half precision only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's kernel runs on CUDA only")
def test_the_flash_decode_attention_equals_the_masked_sdpa_on_cuda() -> None:
    # issue 12 (throughput): on CUDA in half precision decode attention goes through FlashAttention-2's varlen
    # entry, each row reading only its filled columns (run on the GPU machine with the rest of the engine checks).
    torch.manual_seed(0)
    slots, length, n_kv, group, dim = 5, 192, 4, 7, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    assert decode_step.attention_kind(dev, dt) == "flash"
    assert decode_step.attention_kind(dev, dt, flash=False) == "sdpa"  # engine: {decode_attention: sdpa}
    q = torch.randn(slots, n_kv * group, dim, device=dev, dtype=dt)
    k_cache = torch.randn(slots, length, n_kv, dim, device=dev, dtype=dt)
    v_cache = torch.randn(slots, length, n_kv, dim, device=dev, dtype=dt)
    wpos = torch.tensor([0, 5, 63, 64, 191], device=dev)
    cols = torch.arange(length, device=dev)
    bias = torch.zeros(slots, length, device=dev, dtype=dt).masked_fill(cols[None, :] > wpos[:, None], float("-inf"))
    cu_q = torch.arange(slots + 1, device=dev, dtype=torch.int32)
    where = decode_step.Where(torch.arange(slots, device=dev), wpos, bias[:, None, None, :], (wpos + 1).int(), cu_q,
                           cu_q * length)
    flash = decode_step.attend(q, k_cache, v_cache, where, 0.088, group, "flash")
    sdpa = decode_step.attend(q, k_cache, v_cache, where, 0.088, group, "sdpa")
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked staging is for CUDA copies")
def test_the_staging_buffer_copies_exactly_across_growth_and_rounds() -> None:
    # issue 12 (throughput): prefill's inputs reach the GPU through two page-locked buffers, a round each in turn,
    # filled front to back; what arrives must be what was sent, whatever the sizes, dtypes and growth, even while
    # the GPU is still busy with earlier rounds (no host sync between rounds: the host runs a round ahead).
    staging = prefill_rounds.Staging(torch.device("cuda"))
    busy = torch.randn(4096, 4096, device="cuda")
    rounds = []
    for round_ in range(4):
        staging.reset()
        for _ in range(8):  # the GPU is behind (~20 ms of matrix products): the copies below wait in its queue
            busy = torch.nn.functional.normalize(busy @ busy)
        sent = [torch.randn(1000 * (i + 1), 7).to(dt) for i, dt in enumerate((torch.bfloat16, torch.float32))]
        sent += [torch.arange(5)[None, :] + round_, torch.zeros(0, 3), torch.randn(4200, 4200).t()]  # grows
        got = [staging.to_device(t) for t in sent]
        rounds.append(([t.clone() for t in sent], got))
        for t in sent:
            t.zero_()  # the host side may change once the copy is queued
    for sent, got in rounds:
        for a, b in zip(sent, got):
            assert b.device.type == "cuda" and b.dtype == a.dtype
            torch.testing.assert_close(b.cpu(), a)


def test_an_interactive_request_cuts_into_a_round_of_queued_prefills(backend: TransformersBackend,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 13: a request arriving while a vision group of queued prompts is being prefilled goes next; the rest
    # of the group keeps its image features (the vision tower does not run for them again).  It waits for the
    # pack being prefilled: packs of one prompt here, so that the group is several packs.
    engine = backend.slot_engine
    monkeypatch.setattr(engine, "packing", plan.Packing(tokens=1))  # one vision group, packs of one prompt
    folder = _prompts(backend, 4, 3)
    asked = _prompts(backend, 1, 3, first=100, urgent=True)
    source = UrgentSource(folder, asked)
    vision_calls: list[int] = []  # images per call of the vision tower

    def record(event: Event) -> None:
        if isinstance(event, Prefill):
            source.events.extend(("prefill", prompt.index) for prompt in event.prompts)
            source.arrive()  # the request arrives during the first prefill of the round

    def count_images(module, args, kwargs) -> None:
        vision_calls.append(int(kwargs["grid_thw"].shape[0]))

    monkeypatch.setattr(engine, "trace", record)
    with hooked(engine.model.model.visual, count_images, pre=True, with_kwargs=True), torch.inference_mode():
        engine.run(source, slots=4, cache_length=256, max_new=3)
    order = [i for kind, i in source.events if kind == "prefill"]
    assert order[:2] == [0, 100], order
    assert vision_calls == [4, 1], vision_calls  # prompts 1-3 were not sent through the tower again
    assert sorted(order) == [0, 1, 2, 3, 100]
    assert all(isinstance(source.results[i], Generated) for i in (0, 1, 2, 3, 100))


def test_a_streamed_request_gets_its_first_token_before_any_decode_step(backend: TransformersBackend,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 13: the first token comes out of the prefill; it is sent then, not after the next run of decode steps.
    engine = backend.slot_engine
    asked = _prompts(backend, 1, 6, first=100, urgent=True, stream=True)
    source = UrgentSource([], asked)
    source.arrive()
    steps_at_first_partial: list[int] = []
    partial = source.partial

    def watching_partial(prompt, tokens):
        if not steps_at_first_partial:
            steps_at_first_partial.append(engine.stats.decode_steps)
        return partial(prompt, tokens)

    monkeypatch.setattr(source, "partial", watching_partial)
    monkeypatch.setattr(engine, "ignore_eos", True)
    with torch.inference_mode():
        engine.run(source, slots=2, cache_length=256, max_new=6)
    assert steps_at_first_partial == [0]
    assert len(source.partials[100][0]) == 1
    assert source.results[100].tokens[:1] == source.partials[100][0]


def test_decode_runs_are_bounded_in_time(fresh_backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 13: between two host syncs the engine runs only as many decode steps as fit SYNC_SECONDS (measured
    # step time), so a request arriving meanwhile waits for a short run, not 16 steps of a full batch.
    engine = fresh_backend.slot_engine  # an engine of its own: no decode step measured yet
    at_start: list[int] = []  # decode steps done when each stretch started

    def record(event: Event) -> None:
        if isinstance(event, Decode):
            at_start.append(engine.stats.decode_steps)

    monkeypatch.setattr(engine, "trace", record)
    monkeypatch.setattr(fastgen, "SYNC_SECONDS", 0.0)  # any measured step is too long: one step per run
    monkeypatch.setattr(engine, "ignore_eos", True)
    with torch.inference_mode():
        engine.run(ListSource(_prompts(fresh_backend, 1, 24)), slots=1, cache_length=256, max_new=24)
    runs = [b - a for a, b in zip(at_start, at_start[1:] + [engine.stats.decode_steps])]
    assert sum(runs) == 23, runs  # (the first token comes out of the prefill)
    assert runs[0] > 1  # nothing measured yet: up to SYNC_EVERY
    assert set(runs[1:]) == {1}, runs


@pytest.mark.parametrize("urgent", [False, True])
def test_an_interactive_answer_is_synced_more_often(fresh_backend: TransformersBackend,
                                                    monkeypatch: pytest.MonkeyPatch, urgent: bool) -> None:
    # issue 22: a stream's tokens go out at each host sync, so while an interactive answer decodes the stretches
    # between syncs are bounded by SYNC_SECONDS_STREAMING instead of SYNC_SECONDS (the longest pause it sees).
    engine = fresh_backend.slot_engine
    at_start: list[int] = []
    monkeypatch.setattr(engine, "trace", lambda e: at_start.append(engine.stats.decode_steps)
                        if isinstance(e, Decode) else None)
    monkeypatch.setattr(fastgen, "SYNC_SECONDS", 60.0)  # folder work: up to SYNC_EVERY steps a stretch
    monkeypatch.setattr(fastgen, "SYNC_SECONDS_STREAMING", 0.0)  # an interactive answer: one step a stretch
    monkeypatch.setattr(engine, "ignore_eos", True)
    prompts = [replace(p, urgent=urgent) for p in _prompts(fresh_backend, 1, 24)]
    with torch.inference_mode():
        engine.run(ListSource(prompts), slots=1, cache_length=256, max_new=24)
    runs = [b - a for a, b in zip(at_start, at_start[1:] + [engine.stats.decode_steps])]
    assert sum(runs) == 23, runs
    assert set(runs[1:]) == ({1} if urgent else {runs[1]}) and (urgent or runs[1] > 1), runs


class RaisingBackend:
    """A plugin backend that raises RuntimeError (not a BackendError) on one file's request."""

    name = "raising"

    def __init__(self, config: ModelConfig) -> None:
        self.model, self.loaded = config.name, True
        self.calls: list[int] = []

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self.calls.append(len(requests))
        if any("bad" in r.prompt for r in requests):
            raise RuntimeError("shape mismatch (injected)")
        return [Answer(text="fine") for _ in requests]

    def unload(self) -> None:
        pass


def test_a_raising_request_fails_alone_in_a_plugin_backend(tmp_path: Path) -> None:
    # issue 12.3 repro: RuntimeError for 1 of 16 files in batches of 8 left 4 good files without sidecars.
    register("raising", RaisingBackend)
    config = config_for(tmp_path, "any", backend="raising", batch_size=8)
    config = replace(config, rules=tuple(replace(rule, prompt="Describe $filename.") for rule in config.rules))
    backend = RaisingBackend(config.model)
    with Running(tmp_path, config, backend) as r:
        names = [f"{i:02d}.png" for i in range(16)]
        names[5] = "05-bad.png"
        queue_files(tmp_path, r.queue, names)
        r.start()
        wait_until(lambda: sum(s == "done" for s in r.states().values()) == 15, "the 15 good files done")
        bad = r.queue.latest((tmp_path / "inbox" / "05-bad.png").absolute(), "describe")
        assert bad is not None and "shape mismatch (injected)" in (bad.error or "")
        assert "RuntimeError" in bad.error
    for name in names:
        assert (tmp_path / "inbox" / f"{name}.describe.md").exists() == ("bad" not in name)


def test_a_failing_prefill_fails_that_request_alone(backend: TransformersBackend) -> None:
    backend.reconfigure(replace(backend.config, batch_size=2))
    requests = [Request((image(i, 56, 56),), f"Describe {i}.", 4) for i in range(5)]
    tokenizer = backend.processor.tokenizer

    def failing(module, args) -> None:  # a prefill with request 2 in it fails as a whole; it alone may fail
        if "Describe 2." in tokenizer.decode(args[0].reshape(-1).tolist()):
            raise ValueError("cache planner says no (injected)")

    with hooked(backend.slot_engine.embed, failing, pre=True):
        got = backend.generate_each(requests)
    assert isinstance(got[2], ValueError)
    assert all(isinstance(a, Answer) for i, a in enumerate(got) if i != 2)


def test_image_placeholders_must_match_the_image_features(backend: TransformersBackend) -> None:
    # issue 10.11: text that became an image token must not shift the image features; that request fails alone.
    requests = [Request((image(i, 56, 56),), "Describe.", 3) for i in range(3)]
    prompts = [Prompt(i, backend.prompt_inputs(r), 3) for i, r in enumerate(requests)]
    engine = backend.slot_engine
    forged = prompts[1].inputs["input_ids"].clone()
    forged[0, -3] = engine.model.config.image_token_id  # a text token turned into <|image_pad|>
    prompts[1].inputs["input_ids"] = forged
    source = ListSource(prompts)
    with torch.inference_mode():
        engine.run(source, slots=2, cache_length=128, max_new=3)
    assert isinstance(source.results[1], ValueError)
    assert "image placeholder tokens" in str(source.results[1])
    assert isinstance(source.results[0], Generated) and isinstance(source.results[2], Generated)


def test_non_finite_logits_fail_the_request_clearly(backend: TransformersBackend,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12.3: NaN/inf logits stop that sequence with an error instead of emitting token 0.
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 1.0, 0.0], [0.0, float("inf"), 1.0],
                           [-float("inf")] * 3])
    tokens, bad = decode_step.choose(logits, None)
    assert tokens[0] == 2 and bad.tolist() == [False, True, True, True]
    engine = backend.slot_engine
    watching = watch(monkeypatch, engine)

    def poisoned(module, args, logits):  # the request with budget 13 gets non-finite logits on its decode steps
        if watching.phase != "decode":
            return None
        logits = logits.clone()
        for slot, prompt in watching.rows.items():
            if prompt.max_new_tokens == 13:
                logits[slot] = float("nan")
        return logits

    requests = [Request((image(i, 56, 56),), "Describe.", n) for i, n in enumerate((6, 13, 7))]
    with hooked(engine.lm_head, poisoned):
        got = backend.generate_each(requests)
    assert isinstance(got[1], NonFiniteLogitsError) and "non-finite logits" in str(got[1])
    assert isinstance(got[0], Answer) and isinstance(got[2], Answer)
    assert any(p.max_new_tokens == 13 for event in watching.of(Decode) for p in event.prompts)  # hit decoding


def test_fp16_is_refused_unless_insisted(tiny_model: Path, tmp_path: Path) -> None:
    def load(**options: Any) -> TransformersBackend:
        b = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", dtype="float16"),
                                options=EngineOptions(**options))
        try:
            b.load()
        finally:
            b.unload()
        return b

    with pytest.raises(BackendError, match="engine.allow_fp16: true"):
        load()
    assert load(allow_fp16=True).dtype == "float16"
    # issue 22.3: float16 is a model.dtype choice the config checks, with engine.allow_fp16 to insist
    text = f"model: {{name: {tiny_model}, dtype: float16}}\ninclude: [describe]\n"
    with pytest.raises(ConfigError, match=r"config.yaml:1: model.dtype: float16 .*engine.allow_fp16: true"):
        parse_config(text, tmp_path / "config.yaml")
    assert parse_config(text + "engine: {allow_fp16: true}\n", tmp_path / "config.yaml").engine.allow_fp16


def test_sticky_cuda_error_puts_the_jobs_back_and_ends_the_loop(tmp_path: Path, tiny_model: Path,
                                                                fresh_backend: TransformersBackend) -> None:
    # issue 12.3: an illegal memory access cannot be recovered in-process: jobs back (attempt spent), loop ends.
    assert is_sticky_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_sticky_cuda_error(RuntimeError("CUDA out of memory"))
    config = config_for(tmp_path, tiny_model)
    backend = fresh_backend
    backend.reconfigure(config.model)

    def crash(module, args) -> None:  # in the first prefill: prompts are in slots when it happens
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with hooked(backend.slot_engine.embed, crash, pre=True), Running(tmp_path, config, backend) as r:
        queue_files(tmp_path, r.queue, ["a.png", "b.png", "c.png"])
        r.start()
        r.loop.join(DEADLINE)
        assert not r.loop.is_alive()  # the daemon's health check sees it and exits non-zero
        assert isinstance(r.loop.fatal, DeviceLostError)
        jobs = r.queue.history()
    in_hand = [j for j in jobs if j.attempts == 1]
    assert in_hand and all(j.state == "queued" and "GPU failed" in (j.error or "") for j in in_hand)
    assert all(j.state == "queued" for j in jobs)


def test_out_of_memory_while_capturing_shrinks_the_slots(fresh_backend: TransformersBackend,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12.3: OOM while capturing the CUDA graph halves the slots; the graphs stay on: the capture is tried
    # again at each smaller size.  On a CPU the capture fails at its first CUDA call, made to raise here: out of
    # memory while the run has more than one slot, and at one slot an error saying the step cannot be captured
    # (the engine then decodes without graphs, as on any card where capturing fails).
    backend = fresh_backend
    backend.reconfigure(replace(backend.config, batch_size=4))
    requests = [Request((image(i, 56 + 28 * (i % 3), 56),), "Describe.", 6) for i in range(6)]
    expected = backend.generate(requests)
    engine = backend.slot_engine
    captured: list[int] = []  # the run's slots at each capture

    def capture_stream(*args: Any, **kwargs: Any) -> None:
        captured.append(engine.stats.slots)
        if engine.stats.slots > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        raise RuntimeError("operation not supported while capturing (injected)")

    monkeypatch.setattr(torch.cuda, "Stream", capture_stream)
    monkeypatch.setattr(engine, "use_cuda_graphs", True)
    assert backend.generate(requests) == expected
    assert captured == [4, 2, 1], captured  # not switched off by an out-of-memory error
    assert backend.oom_slot_limit == 1


def test_out_of_memory_mid_run_runs_the_requests_in_hand_again(fresh_backend: TransformersBackend,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    backend = fresh_backend
    backend.reconfigure(replace(backend.config, batch_size=4))
    requests = [Request((image(i, 56, 84),), "Describe.", 9) for i in range(6)]
    expected = backend.generate(requests)
    engine = backend.slot_engine
    watching = watch(monkeypatch, engine)
    failed: list[Prefill] = []

    def oom_once(module, args) -> None:  # in the second prefill: slots busy, a refill under way
        prefills = watching.of(Prefill)
        if watching.phase == "prefill" and len(prefills) == 2 and not failed:
            failed.append(prefills[-1])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with hooked(engine.embed, oom_once, pre=True), caplog.at_level("WARNING"):
        assert backend.generate(requests) == expected
    assert failed and backend.oom_slot_limit == 2
    # the warning says where it ran out and what torch said (how much was asked for, how much held)
    warning = next(r.getMessage() for r in caplog.records if "out of GPU memory with" in r.getMessage())
    assert re.search(r"with 4 slots, in prefill\w*\.py:\d+ \(\w+\); going on with 2", warning), warning
    assert "CUDA out of memory (injected)" in warning


def test_stream_pieces_join_to_the_answer(backend: TransformersBackend) -> None:
    backend.reconfigure(replace(backend.config, batch_size=2))
    pieces: list[str] = []
    plain = [Request((image(i, 56, 56),), "Describe.", 40) for i in range(3)]
    backend.ignore_eos = True
    try:
        expected = backend.generate(plain)
        streamed = backend.generate([replace(plain[0], stream=pieces.append)] + plain[1:])
    finally:
        backend.ignore_eos = False
    assert streamed == expected
    assert "".join(pieces) == streamed[0].text
    assert len(pieces) >= 2  # sent as decoded (every host sync), not once at the end


def test_stream_holds_back_an_incomplete_utf8_character(backend: TransformersBackend) -> None:
    from daemon.backends.transformers.live import TextStream

    tok = backend.processor.tokenizer
    ids = tok("é€ ok", add_special_tokens=False)["input_ids"]
    sent: list[str] = []
    stream = TextStream(tok, sent.append)
    for n in range(1, len(ids) + 1):
        stream.update(ids[:n])
        assert "\ufffd" not in "".join(sent)
    stream.update(ids, final=True)
    assert "".join(sent) == "é€ ok"


def test_chat_messages_with_two_images(backend: TransformersBackend) -> None:
    a, b = image(1, 56, 84), image(2, 84, 56)
    request = Request(images=(a, b), prompt="", max_new_tokens=10, messages=(
        Message("system", ("You compare pictures.",)),
        Message("user", ("First:", a, "second:", b, "Which is wider?")),
    ))
    # The prompt the engine gets, each image's placeholder run shown as one
    prompt = backend.processor.tokenizer.decode(backend.prompt_inputs(request)["input_ids"][0])
    text = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", prompt)
    assert text.index("You compare pictures.") < text.index("First:") < text.index("<|vision_start|>")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.index("second:") < text.rindex("<|vision_start|>") < text.index("Which is wider?")
    engine = backend.generate([request])
    backend.set_engine("hf")
    try:
        stock = backend.generate([request])
    finally:
        backend.set_engine("auto")
    assert engine == stock


def test_sampling_leaves_greedy_neighbours_alone(backend: TransformersBackend) -> None:
    backend.reconfigure(replace(backend.config, batch_size=4))
    requests = [Request((image(i, 56, 56),), "Describe.", 12) for i in range(4)]
    backend.ignore_eos = True
    try:
        greedy = backend.generate(requests)
        torch.manual_seed(0)
        mixed = backend.generate([requests[0], replace(requests[1], temperature=5.0)] + requests[2:])
    finally:
        backend.ignore_eos = False
    assert mixed[0] == greedy[0] and mixed[2:] == greedy[2:]
    assert mixed[1] != greedy[1]  # at temperature 5 over a random model's vocabulary: a different draw


# ------------------------------------------------------------------ model state (issue 11.6)


def test_model_state_is_recorded_when_it_loads(tmp_path: Path, tiny_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.errors import BackendUnavailableError

    config = config_for(tmp_path, tiny_model)
    backend = TransformersBackend(config.model)
    with Running(tmp_path, config, backend) as r:
        assert not r.queue.meta().get("model", {}).get("loaded")
        backend.load()  # no batch has run: status must already say loaded
        assert r.queue.meta()["model"]["loaded"] is True
        # The backend cannot be reached (a server backend's connection refused): its model is not usable,
        # whatever the client holds.

        def unreachable(feed) -> None:
            raise BackendUnavailableError("connection refused")

        monkeypatch.setattr(backend, "serve", unreachable)
        queue_files(tmp_path, r.queue, ["a.png"])
        r.start()
        wait_until(lambda: r.queue.meta()["model"].get("unavailable"), "the outage recorded")
        model = r.queue.meta()["model"]
        assert model["loaded"] is False and model["unavailable"] is True
        backend.unload()


@contextlib.contextmanager
def forced_tokens(backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch, *, greedy_loops: bool,
                  sampled_loops: bool):
    """Make greedy and/or sampled rows emit a 7-token cycle (a stuck sequence) or ever-new tokens, while inside:
    each decode step's logits, out of the model's lm_head, put all the weight on that row's next token."""
    engine = backend.slot_engine
    made: dict[int, int] = {}  # slot -> tokens forced since its prompt came in

    def new_prompts(event: Event) -> None:
        if isinstance(event, Prefill):
            made.update(dict.fromkeys(event.slots, 0))

    watching = watch(monkeypatch, engine, new_prompts)

    def forced(module, args, logits):
        if watching.phase != "decode":
            return None
        out = torch.full_like(logits, -3e4)
        for slot, prompt in watching.rows.items():
            k = made[slot]
            made[slot] = k + 1
            looping = sampled_loops if prompt.temperature > 0 else greedy_loops
            out[slot, 100 + (k % 7 if looping else k % 300)] = 3e4  # 300: no period within the loop window
        return out

    with hooked(engine.lm_head, forced):
        yield


def test_a_loop_is_stopped_and_retried_with_sampling(backend: TransformersBackend,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    backend.reconfigure(replace(backend.config, batch_size=2))
    requests = [Request((image(i, 56, 56),), "Transcribe the table.", 400) for i in range(2)]
    with forced_tokens(backend, monkeypatch, greedy_loops=True, sampled_loops=False):
        got = backend.generate(requests)
    stats = backend.last_stats
    assert stats["loops"] == 2  # each first attempt stopped early...
    assert all(not a.looped and a.new_tokens == 400 for a in got)  # ...and its retry ran to the end


def test_engine_options_from_the_config_reach_the_engine_and_the_sidecar(tmp_path: Path, tiny_model: Path,
                                                                        backend: TransformersBackend,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 22.3: engine switches were environment variables read deep in backends/, shown nowhere. Now the
    # config's engine: section reaches the slot engine (its scheduler's knobs, packed prefill), and the sidecar
    # records the choices in effect that can change its text.
    from daemon.backends import create_backend
    from daemon.backends.transformers.slots import SlotEngine
    from daemon.intake.rules import match_file

    config = config_for(tmp_path, tiny_model, engine="{packed_prefill: false, step_tokens: 333, backlog_share: 0.25, "
                                                     "interactive_slots: 1}")
    seen: list[SchedulerOptions] = []
    run = SlotEngine.run

    def spy(self, source, **kw):
        seen.append(kw.get("options", SchedulerOptions()))
        return run(self, source, **kw)

    monkeypatch.setattr(SlotEngine, "run", spy)
    ours = create_backend(config.model, config.engine)
    source = tmp_path / "inbox" / "a.png"
    source.parent.mkdir()
    source.write_bytes(png(4))
    worker = Worker(config, ours)
    try:
        [outcome] = worker.process(match_file(config, source))
    finally:
        worker.close()
        ours.unload()
    assert outcome.ok, outcome.error
    assert seen and all(o == SchedulerOptions(step_tokens=333, backlog_share=0.25, interactive_slots=1) for o in seen)
    assert ours.describe()["prefill"].startswith("stock text model")
    assert backend.describe()["prefill"].startswith("packed")  # the default, on the same CPU
    md = (tmp_path / "inbox" / "a.png.describe.md").read_text()
    provenance = md.strip().splitlines()[-1]
    assert "; engine float32, decode sdpa, prefill stock, compiled nothing" in provenance, provenance
    assert "prefill packed" in backend.provenance


def test_a_retry_that_loops_too_marks_the_sidecar(tmp_path: Path, tiny_model: Path, backend: TransformersBackend,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.intake.rules import match_file

    config = config_for(tmp_path, tiny_model, max_new_tokens=400)
    backend.reconfigure(config.model)
    source = tmp_path / "inbox" / "table.png"
    source.parent.mkdir()
    source.write_bytes(png(3))
    worker = Worker(config, backend)
    with forced_tokens(backend, monkeypatch, greedy_loops=True, sampled_loops=True):
        try:
            [outcome] = worker.process(match_file(config, source))
        finally:
            worker.close()
        assert outcome.ok, outcome.error
        assert backend.last_stats["loops"] == 2  # the first attempt and the retry
        md = (tmp_path / "inbox" / "table.png.describe.md").read_text()
        assert "kept repeating itself" in md
        [answer] = backend.generate([Request((image(3, 56, 56),), "Transcribe.", 400)])
    assert answer.looped and answer.new_tokens < 400 - 100  # stopped early, not at the budget


def test_one_engine_per_device_fed_from_one_queue(tmp_path: Path, tiny_model: Path) -> None:
    # issue 12.5: engine 0 here, engine 1 in a process of its own, one queue; both claim, status shows both.
    import sqlite3

    from daemon.backends import engine_devices
    from daemon.engine.processes import EngineGroup, start_engines

    config = config_for(tmp_path, tiny_model)
    config = replace(config, model=replace(config.model, devices=("cpu", "cpu")))
    assert engine_devices(config.model) == ["cpu", "cpu"]
    assert engine_devices(replace(config.model, devices=())) == [None]
    made: list[TransformersBackend] = []

    def make(model: ModelConfig, engine: EngineOptions) -> TransformersBackend:
        made.append(TransformersBackend(model, options=engine))
        return made[-1]

    queue = Queue(tmp_path / "state.db")
    group = start_engines(queue, config, Processor(queue, lambda path: None), make_backend=make)
    pids: list[int] = []
    try:
        assert isinstance(group, EngineGroup)
        assert len(made) == 1 and made[0].config.device == "cpu"  # engine 1 makes its own, in its process
        group.start()
        wait_until(lambda: queue.meta().get("engine.1", {}).get("running"), "engine 1 running in its process")
        # Which engine takes what is a race; made deterministic: engine 0 held (its batch lock),
        # then engine 1 held (SIGSTOP), so each must do one half.
        with group.first.batch_lock:
            paths = queue_files(tmp_path, queue, [f"a{i}.png" for i in range(6)], together=True)
            group.wake()
            wait_until(lambda: queue.counts()["done"] == 6, "engine 1 to do the first 6")
        child = group.pids()[0]
        os.kill(child, signal.SIGSTOP)
        try:
            paths += queue_files(tmp_path, queue, [f"b{i}.png" for i in range(6)], together=True)
            group.wake()
            wait_until(lambda: queue.counts()["done"] == 12, "engine 0 to do the other 6")
        finally:
            os.kill(child, signal.SIGCONT)
        pids = group.pids()
        assert len(pids) == 1 and pids[0] != os.getpid()
        with sqlite3.connect(tmp_path / "state.db") as db:
            claimers = {r[0] for r in db.execute("SELECT claimed_by FROM jobs")}
        assert claimers == {f"engine 0 pid {os.getpid()}", f"engine 1 pid {pids[0]}"}, claimers
        assert group.first.done == 6
        wait_until(lambda: {"engine.0", "engine.1"} <= set(queue.meta()) and queue.meta()["engine.1"]["done"] > 0,
                   "per-engine status")
        engines = [queue.meta()[f"engine.{i}"] for i in range(2)]
        assert [e["device"] for e in engines] == ["cpu", "cpu"] and all(e["loaded"] for e in engines)
        assert [e["pid"] for e in engines] == [os.getpid(), pids[0]]
        assert engines[1]["done"] == 6
        from daemon.commands import format_status, status_info
        from daemon.store.state import StateLock

        lock = StateLock(config.state)
        assert lock.acquire()  # `status` shows engines of a running daemon only
        try:
            shown = format_status(status_info(config))
        finally:
            lock.release()
        assert f"engine 0 on cpu (pid {os.getpid()}): loaded" in shown, shown
        assert f"engine 1 on cpu (pid {pids[0]}): loaded" in shown, shown
        for p in paths:
            assert p.with_name(p.name + ".describe.md").exists()
    finally:
        group.stop()
        group.join(60)
        group.worker.close()
        for b in made:
            b.unload()
        queue.close()
    assert not group.pids() and all(not _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("backend_name", ["devicelost", "devicelost-message", "devicelost-message-serve"])
def test_the_daemon_exits_non_zero_on_a_lost_gpu_and_the_attempt_counts(tmp_path: Path, backend_name: str) -> None:
    # issue 12.3, end to end: `vlwatch run` exits non-zero (systemd restarts it); the file's attempt is spent.
    # issue 22.5: the same when a plugin lets torch's RuntimeError("CUDA error: an illegal memory access was
    # encountered") through untyped, from generate or from its own serve loop; before, the batch path failed
    # the file and went on (every later job on that card would fail), and serve's failed the jobs as a bug.
    from tests.test_daemon import Daemon, put

    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{backend: {backend_name}, name: any}}\nstate: ./state/state.db\n"
                      "watch: [{path: ./inbox, settle: 0.3s}]\n"
                      "rules: [{name: describe, match: ['*.png'], task: describe, output: md}]\n"
                      "jobs: {attempts: 2}\n")
    (tmp_path / "inbox").mkdir()
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.device_lost_backend")
    try:
        d.start(watchdog=False)
        image = put(tmp_path / "inbox" / "poison.png", png(7))
        wait_until(lambda: d.proc.poll() is not None, "the daemon to exit")
        assert d.proc.returncode != 0, d.log()
        assert "unrecoverable state" in d.log()
        with Queue(tmp_path / "state" / "state.db") as q:
            job = q.latest(image.absolute(), "describe")
        assert job is not None and job.state == "queued" and job.attempts == 1, job
        assert "GPU failed" in (job.error or "")
        d.start(watchdog=False)  # the restart takes it again: the second attempt is the last
        wait_until(lambda: d.proc.poll() is not None, "the daemon to exit again")
        with Queue(tmp_path / "state" / "state.db") as q:
            job = q.latest(image.absolute(), "describe")
        assert job.state == "failed" and job.attempts == 2, job  # a poison file cannot loop forever
    finally:
        d.close()


def test_a_running_daemon_shows_its_engine_options_and_records_them_in_sidecars(tmp_path: Path,
                                                                              tiny_model: Path) -> None:
    # issue 22.3, end to end: the engine: section of a running daemon's config reaches its engine, `status`
    # (and --json, and so /api/v1/status) shows the options and, once loaded, the choices in effect, and the
    # sidecar's provenance line names them.
    import json

    from tests.conftest import run_vlwatch
    from tests.test_daemon import Daemon, config_text, put

    config = tmp_path / "config.yaml"
    config.write_text(config_text(tiny_model, settle="0.3s") + "engine: {packed_prefill: false, step_tokens: 700}\n")
    (tmp_path / "inbox").mkdir()
    d = Daemon(tmp_path, config)
    try:
        d.start()
        image = put(tmp_path / "inbox" / "a.png", png(5))
        d.wait_done(image)
        info = json.loads(run_vlwatch("status", "--json", "--config", config, env=d.env).stdout)
        assert info["daemon"]["running"], info
        assert info["engine_options"]["packed_prefill"] is False and info["engine_options"]["step_tokens"] == 700
        assert info["model"]["loaded"] and "prefill stock" in info["model"]["in_effect"], info["model"]
        text = run_vlwatch("status", "--config", config, env=d.env).stdout
        assert "engine float32, decode sdpa, prefill stock" in text and "step_tokens=700" in text, text
    finally:
        d.close()
    last = (tmp_path / "inbox" / "a.png.describe.md").read_text().strip().splitlines()[-1]
    assert "; engine float32, decode sdpa, prefill stock, compiled nothing" in last, last


def test_scan_without_a_daemon_puts_the_file_back_on_a_plugins_sticky_error(tmp_path: Path) -> None:
    # issue 22.5, the other job loop: `vlwatch scan` (no daemon) with a plugin that lets torch's sticky error
    # through untyped stops with one line and exit 1, the job queued again with its attempt spent.
    from tests.conftest import run_vlwatch

    (tmp_path / "inbox").mkdir()
    image = tmp_path / "inbox" / "poison.png"
    image.write_bytes(png(7))
    config = tmp_path / "config.yaml"
    config.write_text("model: {backend: devicelost-message, name: any}\nstate: ./state/state.db\n"
                      "watch: [{path: ./inbox, settle: 0s}]\n"
                      "rules: [{name: describe, match: ['*.png'], task: describe, output: md}]\n")
    done = run_vlwatch("scan", "--config", config, env={"VLWATCH_PLUGINS": "tests.device_lost_backend"})
    assert done.returncode == 1, done.stderr
    assert "unrecoverable state" in done.stderr and "Traceback" not in done.stderr, done.stderr
    with Queue(tmp_path / "state" / "state.db") as q:
        job = q.latest(image.absolute(), "describe")
    assert job is not None and job.state == "queued" and job.attempts == 1, job
    assert "GPU failed" in (job.error or "")


def _run_with_an_answer_streaming(backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch,
                                  options: SchedulerOptions) -> list[tuple[str, int]]:
    """24 queued prompts and, after the first decode stretch, one streamed interactive request (index 100);
    the events of the run: prefills, decode stretches (with the slots they stepped) and finishes."""
    engine = backend.slot_engine
    source = UrgentSource(_prompts(backend, 24, 6), _prompts(backend, 1, 40, first=100, urgent=True, stream=True))

    def record(event: Event) -> None:
        if isinstance(event, Prefill):
            source.events.extend(("prefill", prompt.index) for prompt in event.prompts)
        elif isinstance(event, Decode):
            source.events.append(("decode", event.width))
            source.arrive()  # the request arrives while the first decode stretch runs

    monkeypatch.setattr(engine, "trace", record)
    monkeypatch.setattr(engine, "ignore_eos", True)
    with torch.inference_mode():
        engine.run(source, slots=16, cache_length=256, max_new=40, shrink=True, reserve=True, options=options)
    assert all(isinstance(source.results[i], Generated) for i in [*range(24), 100])
    events = source.events
    return events[events.index(("prefill", 100)):events.index(("finished", 100))]


def _queued_prefills_per_turn(live: list[tuple[str, int]]) -> list[int]:
    counts = [0]
    for kind, index in live:
        if kind == "decode":
            counts.append(0)
        elif kind == "prefill" and index < 100:
            counts[-1] += 1
    return counts


def test_while_an_answer_streams_queued_prefills_stay_within_the_step_budget(
        backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 22.1: each round of folder prefills stopped every decoding slot, so a 32-token answer came in bursts
    # over 3-10 s under a backlog. With a budget of one prompt's tokens, no stretch of the stream's decoding is
    # separated from the next by more than one queued prefill.
    length = _prompts(backend, 1, 6)[0].length
    live = _run_with_an_answer_streaming(backend, monkeypatch, SchedulerOptions(step_tokens=length, backlog_share=0.5))
    counts = _queued_prefills_per_turn(live)
    assert max(counts) == 1, counts  # the backlog moved, one prompt at a time
    # Part of the time the interactive sequence (slot 0) decoded alone, part of it with the backlog.
    widths = {n for kind, n in live if kind == "decode"}
    assert 1 in widths and max(widths) > 1, widths


def test_a_turns_queued_prefills_never_go_past_the_step_budget(backend: TransformersBackend,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 22.1 says "at most step_tokens prompt tokens per turn": a turn went on taking prompts while it held
    # fewer, so it could end nearly a prompt over (two 1,369-token images in a 2,048-token turn: on an H100 the
    # stream's longest pause was 0.297 s against the 0.25 s asked).  A prompt that would go over waits for the
    # next turn.  Every turn is the backlog's here (backlog_share 1): with 0.5, which turn is whose follows the
    # measured time, and on a loaded CI machine one slow backlog turn left the 40-token answer only interactive
    # turns after it (counts [0, 1, 0, 0, 0]), which says nothing about the budget.
    length = _prompts(backend, 1, 6)[0].length
    live = _run_with_an_answer_streaming(backend, monkeypatch,
                                         SchedulerOptions(step_tokens=length * 3 // 2, backlog_share=1.0))
    counts = _queued_prefills_per_turn(live)
    assert max(counts) == 1 and sum(counts) > 1, counts


def test_without_interactive_work_a_turn_prefills_every_free_slot(
        backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound applies only while a person waits: with a budget larger than the backlog, the same run admits
    # several queued prompts in one turn (what throughput wants), so the test above can fail.
    live = _run_with_an_answer_streaming(backend, monkeypatch, SchedulerOptions(step_tokens=10**6, backlog_share=1.0))
    assert max(_queued_prefills_per_turn(live)) > 1


class _EngineFeed(ListFeed):
    """A ListFeed that stands in for the daemon's ``JobFeed`` (not a fixed list: the engine sizes for the daemon),
    declaring whether interactive requests may come through it."""

    def __init__(self, requests, interactive: bool, expected: tuple[Expected, ...] = ()) -> None:
        super().__init__(requests)
        self.takes_interactive = interactive
        self.count = len(self.requests)
        self.expected = expected

    def sizing(self) -> Sizing:
        return Sizing(expected=self.expected)  # no fixed list to size the cache for: the daemon's sizing

    def interactive(self) -> bool:
        return self.takes_interactive

    def answers(self):
        return [self.results.get(i) for i in range(self.count)]


@pytest.mark.parametrize("interactive", [True, False], ids=["engine 0", "child engine"])
def test_only_an_engine_that_takes_interactive_requests_keeps_slots_for_them(tiny_model: Path, interactive: bool,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The child engines of further GPUs (model.devices) run queued jobs only: keeping the lowest slots for asks
    # that never come there left them idle.
    b = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", batch_size=16, max_new_tokens=4,
                                        max_pixels=50000))
    b.load()
    try:
        slots: list[int] = []
        monkeypatch.setattr(b.slot_engine, "trace",
                            lambda event: slots.extend(event.slots) if isinstance(event, Prefill) else None)
        feed = _EngineFeed([Request((image(i, 56, 56),), "Describe.", 4) for i in range(3)], interactive)
        b.serve(feed)
        assert all(isinstance(a, Answer) for a in feed.answers())
        assert (min(slots) > 0) == interactive, slots
    finally:
        b.unload()


@pytest.mark.parametrize("declared", [True, False], ids=["rules declared", "rules not declared"])
def test_a_live_feed_that_declares_its_rules_prompts_gets_a_cache_that_fits_them_from_the_start(
        tiny_model: Path, declared: bool) -> None:
    # Call S1 (issue 22): the first ask under a backlog waited 2.9 s.  The daemon sized its cache for an image and
    # 128 text tokens, the folder rule's prompt was longer, so the backlog's first prompt waited for a second run
    # whose cache fitted it, and every decode graph was captured again while the ask waited.  The feed declares its
    # rules (Sizing.expected): one allocation.  Undeclared, the same requests need two (what the test guards).
    b = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", batch_size=2, max_new_tokens=4,
                                        max_pixels=50000))
    b.load()
    try:
        rule_prompt = "Transcribe every word on this page in reading order, keeping headings and tables. " * 8
        requests = [Request((image(0, 56, 56),), "What is this?", 4)]
        requests += [Request((image(i, 56, 56),), rule_prompt, 4) for i in range(1, 4)]
        expected = (Expected(rule_prompt, image_tokens=plan.image_tokens_for(50000), max_new_tokens=4),)
        feed = _EngineFeed(requests, interactive=True, expected=expected if declared else ())
        b.serve(feed)
        assert all(isinstance(a, Answer) for a in feed.answers())
        assert b.last_stats["cache_allocations"] == (1 if declared else 2)
    finally:
        b.unload()
