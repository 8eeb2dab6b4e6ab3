"""Batched generation on the tiny checkpoint (CPU): same greedy tokens as one at a time, OOM splits.

The transformers backend decodes with ``daemon.backends.transformers.slots`` (slots
refilled as sequences end); these tests hold it to stock ``model.generate``
one request at a time, with images of different sizes in one batch, so the
prompts differ in length and in their rotary positions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.backends import Answer, Request
from daemon.backends.transformers.backend import TransformersBackend
from daemon.backends.transformers.prompts import ListSource, Prompt
from daemon.backends.transformers.slots import bucket
from daemon.config import Config, ModelConfig, Rule
from daemon.engine.worker import Prepared, Worker
from daemon.errors import BackendError
from daemon.intake.rules import Match

# (width, height), multiples of 28 as daemon.images makes them: 6 to 40
# image tokens, one image wider than a 112 px attention window.
SIZES = ((224, 168), (56, 56), (112, 280), (168, 168), (84, 56), (56, 112))
BUDGETS = (12, 5, 20, 9, 16, 7)


def _requests() -> list[Request]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    return [Request((img,), "Describe this image.", n) for img, n in zip(images, BUDGETS)]


@pytest.fixture(scope="module")
def backend(tiny_model: Path):
    b = TransformersBackend(ModelConfig(name=str(tiny_model), batch_size=4))
    b.load()
    yield b
    b.unload()


@pytest.fixture
def fresh_backend(tiny_model: Path):
    """A backend of its own, for a test that leaves a slot limit learnt from an out-of-memory error on it."""
    b = TransformersBackend(ModelConfig(name=str(tiny_model), batch_size=4))
    b.load()
    yield b
    b.unload()


@pytest.fixture(scope="module")
def one_at_a_time(backend: TransformersBackend) -> list[Answer]:
    """The reference: stock model.generate, one request per call."""
    backend.set_engine("hf")
    try:
        return [backend.generate([r])[0] for r in _requests()]
    finally:
        backend.set_engine("auto")


def test_batched_equals_one_at_a_time(backend: TransformersBackend, one_at_a_time: list[Answer]) -> None:
    requests = _requests()
    assert backend.continuous_batching
    batched = backend.generate(requests)  # 6 requests through 4 slots: two are refills
    assert backend.last_stats is not None and backend.last_stats["slots"] == 4
    assert batched == one_at_a_time
    assert [backend.generate([r])[0] for r in requests] == one_at_a_time  # the engine, one at a time


def test_without_fused_weights_the_models_own_modules_decode_like_generate(
        backend: TransformersBackend, one_at_a_time: list[Answer], monkeypatch: pytest.MonkeyPatch) -> None:
    # A layout decode_step.fuse_projections does not know leaves no fused weights: decode then runs the model's
    # own modules and prefill the stock text model, and the tokens are still stock generate's.
    monkeypatch.setattr(backend.slot_engine, "fused", {})
    monkeypatch.setattr(backend.slot_engine, "packed", False)
    assert backend.generate(_requests()) == one_at_a_time


def test_batched_equals_stock_batched_generate(backend: TransformersBackend, one_at_a_time: list[Answer]) -> None:
    backend.set_engine("hf")
    try:
        stock_batched = backend.generate(_requests())  # left-padded model.generate
    finally:
        backend.set_engine("auto")
    assert stock_batched == one_at_a_time


def test_repetition_penalty_is_applied_like_generate(backend: TransformersBackend) -> None:
    fast = backend.slot_engine
    config = fast.model.generation_config
    requests = [replace(r, max_new_tokens=24) for r in _requests()[:3]]
    plain = backend.generate(requests)
    config.repetition_penalty, fast.penalty = 1.3, 1.3
    try:
        penalised = backend.generate(requests)
        backend.set_engine("hf")
        stock = [backend.generate([r])[0] for r in requests]
    finally:
        config.repetition_penalty, fast.penalty = 1.0, None
        backend.set_engine("auto")
    assert penalised == stock
    assert penalised != plain  # the penalty changed something, so the comparison means something


def test_ignore_eos_generates_the_whole_budget(backend: TransformersBackend) -> None:
    requests = _requests()[:3]
    backend.ignore_eos = True
    try:
        backend.generate(requests)
    finally:
        backend.ignore_eos = False
    assert backend.last_stats["new_tokens"] == sum(r.max_new_tokens for r in requests)


def test_out_of_memory_shrinks_the_slots(fresh_backend: TransformersBackend, one_at_a_time: list[Answer],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA OOM (simulated on the CPU) halves the slots and later runs keep the lower count."""
    backend = fresh_backend
    fast = backend.slot_engine
    run = fast.run
    calls: list[int] = []

    def run_or_oom(source, *, slots, **kwargs):
        calls.append(slots)
        if slots > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return run(source, slots=slots, **kwargs)

    monkeypatch.setattr(fast, "run", run_or_oom)
    assert backend.generate(_requests()) == one_at_a_time
    assert calls == [4, 2]  # the run that did not fit, then every request with fewer slots
    assert backend.oom_slot_limit == 2
    assert backend.generate(_requests()[:3]) == one_at_a_time[:3] and calls[2:] == [2]  # and it stays so


def test_out_of_memory_on_one_image_is_a_backend_error(fresh_backend: TransformersBackend) -> None:
    def oom(module, args):  # the prefill's first layer: the text model's embedding
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = fresh_backend.slot_engine.embed.register_forward_pre_hook(oom)
    try:
        with pytest.raises(BackendError, match="out of GPU memory on a single image"):
            fresh_backend.generate(_requests()[:1])
    finally:
        handle.remove()


def test_stock_path_splits_too(backend: TransformersBackend, one_at_a_time: list[Answer],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = backend.slot_engine.model
    stock = model.generate
    sizes: list[int] = []

    def generate_or_oom(**inputs):  # the model's own generate, as the stock path calls it
        sizes.append(len(inputs["input_ids"]))
        if sizes[-1] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return stock(**inputs)

    monkeypatch.setattr(model, "generate", generate_or_oom)
    backend.set_engine("hf")
    try:
        assert backend.generate(_requests()[:4]) == one_at_a_time[:4]
    finally:
        backend.set_engine("auto")
    assert sizes == [4, 2, 1, 1, 2, 1, 1]


def test_auto_batch_size_on_cpu(backend: TransformersBackend) -> None:
    assert backend.auto_batch_size() == 4


def test_slot_buckets() -> None:
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 9, 16, 17, 33, 64)] == [1, 2, 4, 8, 16, 16, 32, 48, 64]
    assert bucket(3, 3) == 3 and bucket(20, 24) == 24


def test_result_stops_at_end_of_sequence(backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = backend.slot_engine

    def run() -> Any:
        source = ListSource([Prompt(0, backend.prompt_inputs(_requests()[0]), 6)])
        with torch.inference_mode():
            engine.run(source, slots=1, cache_length=256, max_new=6)
        return source.results[0]

    monkeypatch.setattr(engine, "ignore_eos", False)  # (the bench's switch, left as the last generate set it)
    monkeypatch.setattr(engine, "eos", torch.tensor([-1]))  # no end-of-sequence token: the whole budget
    whole = run()
    assert (len(whole.tokens), whole.finished, whole.generated) == (6, False, 6)
    end = whole.tokens[3]
    monkeypatch.setattr(engine, "eos", torch.tensor([end]))  # the fourth token ends the sequence
    ended = run()
    at = whole.tokens.index(end)
    assert (ended.tokens, ended.finished, ended.generated) == (whole.tokens[:at], True, at + 1)  # counted, not kept


# ------------------------------------------------------------------ worker


class _Recorder:
    name, model, loaded = "fake", "fake", True

    def __init__(self, continuous: bool) -> None:
        self.continuous_batching = continuous
        self.calls: list[int] = []

    def generate(self, requests):
        self.calls.append(len(requests))
        return [Answer(text=r.prompt) for r in requests]

    def unload(self) -> None:
        pass


def _prepared(n: int) -> list[Prepared]:
    rule = Rule(name="r", match=("*",), task="describe", prompt="p", output="md")
    image = Image.new("RGB", (56, 56))
    return [Prepared(Match(Path(f"{i}.png"), rule, Path(".")), (), (Request((image,), f"p{i}", 8),)) for i in range(n)]


def _infer(backend: object, files: int) -> list:
    """``files`` one-page files through a Worker over ``backend`` (batches of 3)."""
    config = Config(model=ModelConfig(batch_size=3), state=Path("s.db"), include=(), watch=(), rules=())
    worker = Worker(config, backend)  # type: ignore[arg-type]
    try:
        return worker.infer(_prepared(files))
    finally:
        worker.close()


@pytest.mark.parametrize("continuous, expected", [(False, [3, 3, 1]), (True, [7])])
def test_worker_hands_a_continuous_backend_the_whole_chunk(continuous: bool, expected: list[int]) -> None:
    backend = _Recorder(continuous)
    answers = _infer(backend, 7)
    assert backend.calls == expected
    assert [a[0].text for a in answers] == [f"p{i}" for i in range(7)]  # back in the files' order


class _MinimalPlugin:
    """A plugin of the earliest protocol: name, model, generate; a prompt "bad" fails its whole call."""

    name, model = "minimal", "m"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def generate(self, requests):
        self.calls.append([r.prompt for r in requests])
        if any(r.prompt == "p1" for r in requests):
            raise RuntimeError("cannot read p1")
        return [Answer(text=r.prompt.upper()) for r in requests]


def test_a_minimal_plugin_gets_the_declared_defaults_and_its_failing_request_is_found() -> None:
    # ARCHITECTURE: capabilities declared, not probed.  Every backend the daemon holds is a BaseBackend; a
    # plugin of the minimal protocol is wrapped once, and the culprit of a failed batch is found by the base's
    # generate_each (the worker used to do it behind a getattr probe), the other requests kept.
    from daemon.backends import BaseBackend, as_backend

    plugin = _MinimalPlugin()
    backend = as_backend(plugin)
    assert isinstance(backend, BaseBackend) and as_backend(backend) is backend
    assert not backend.capabilities.serve and not backend.loaded and backend.auto_batch_size() == 4
    assert backend.precision == "" and backend.provenance == "" and backend.plan_summary is None
    backend.load()
    backend.unload()  # nothing to do, and no AttributeError
    got = _infer(plugin, 3)
    failed = "unexpected error: RuntimeError: cannot read p1"
    assert [g if isinstance(g, str) else g[0].text for g in got] == ["P0", failed, "P2"]
    assert plugin.calls[0] == ["p0", "p1", "p2"] and sorted(map(tuple, plugin.calls[1:])) == [("p0",), ("p1",), ("p2",)]


def test_the_transformers_backend_declares_its_admission_loop(tiny_model: Path) -> None:
    from daemon.backends import create_backend

    backend = create_backend(ModelConfig(name=str(tiny_model), device="cpu"))
    assert isinstance(backend, TransformersBackend) and backend.capabilities.serve
