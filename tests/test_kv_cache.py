"""The slot engine with an FP8 KV cache (``model.kv_cache_dtype: fp8``) on the tiny checkpoint, CPU.

The kernel itself is ``tests/test_kv_fp8.py``'s; here: what the engine writes into the cache, that its decode
step reads it through the kernel as through the widening path, that the plan counts what it allocates, and
that the setting is checked, refused where it cannot run and recorded where it changes an answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import plan
from daemon.backends import Request
from daemon.backends.transformers import kv_fp8, loading
from daemon.backends.transformers.backend import TransformersBackend
from daemon.backends.transformers.events import Prefill
from daemon.backends.transformers.prompts import ListSource, Prompt
from daemon.config import ModelConfig
from daemon.errors import BackendError
from tests.conftest import run_vlwatch, write_config

pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

SIZES = ((56, 56), (112, 84))


def image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def backends(tiny_model: Path):
    """The tiny checkpoint twice: its cache in the model's dtype (fp32 here) and in FP8."""
    made = {kv: TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", batch_size=2, max_new_tokens=8,
                                                max_pixels=50000, kv_cache_dtype=kv)) for kv in ("auto", "fp8")}
    for b in made.values():
        b.load()
    yield made
    for b in made.values():
        b.unload()


def run(backend: TransformersBackend, budget: int, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, Any], dict]:
    """Two prompts of different lengths through the slot engine: (results by prompt, each slot's cached columns)."""
    engine = backend.slot_engine
    prompts = [Prompt(i, backend.prompt_inputs(Request((image(i, w, h),), f"Describe {i}.", budget)), budget)
               for i, (w, h) in enumerate(SIZES)]
    prefills: list[Prefill] = []
    monkeypatch.setattr(engine, "trace", lambda event: prefills.append(event) if isinstance(event, Prefill) else None)
    monkeypatch.setattr(engine, "ignore_eos", True)
    source = ListSource(prompts)
    engine.release()  # a fresh cache: nothing of an earlier test's
    with torch.inference_mode():
        engine.run(source, slots=4, cache_length=256, max_new=budget)
    cached = {p.index: engine.cached(slot, p.length + budget - 1)
              for event in prefills for p, slot in zip(event.prompts, event.slots)}
    return source.results, cached


def test_an_fp8_cache_holds_the_prompts_keys_and_values_rounded_to_e4m3(backends, monkeypatch) -> None:
    # Prefill computes the prompt's keys and values as the model does (its own attention reads them unrounded),
    # so the FP8 cache must hold exactly the model-dtype cache's values, each token and KV head quantized once.
    _, plain = run(backends["auto"], 1, monkeypatch)
    _, rounded = run(backends["fp8"], 1, monkeypatch)
    assert sorted(plain) == sorted(rounded) == [0, 1]
    for index, layers in plain.items():
        for (k, v), (k8, v8) in zip(layers, rounded[index]):
            for want, got in ((k, k8), (v, v8)):
                assert want.abs().sum() > 0
                q, s = kv_fp8.quantize(want)
                torch.testing.assert_close(got, kv_fp8.dequantize(q, s, want.dtype), rtol=0, atol=0)
                assert not torch.equal(got, want)  # rounded: the test would pass on an unrounded cache otherwise


def test_decoding_through_the_kernel_reads_the_cache_as_the_widening_path(backends, monkeypatch) -> None:
    # On a CPU the engine widens the FP8 cache and runs SDPA; on CUDA the kernel reads it.  Here the kernel runs
    # in Triton's interpreter inside the real decode step (rows, used columns, cache views, scales): the same
    # tokens and the same keys and values written for them.
    engine = backends["fp8"].slot_engine
    assert engine.attention == "sdpa"
    widened, widened_cache = run(backends["fp8"], 6, monkeypatch)
    monkeypatch.setattr(engine, "attention", "fp8_kv")
    kernel, kernel_cache = run(backends["fp8"], 6, monkeypatch)
    assert {i: r.tokens for i, r in kernel.items()} == {i: r.tokens for i, r in widened.items()}
    assert all(len(r.tokens) == 6 for r in kernel.values())
    for index, layers in widened_cache.items():
        for (k, v), (k2, v2) in zip(layers, kernel_cache[index]):
            torch.testing.assert_close(k2, k, rtol=0.07, atol=1e-3)  # one e4m3 step apart at most
            torch.testing.assert_close(v2, v, rtol=0.07, atol=1e-3)


def test_the_plan_counts_what_an_fp8_cache_allocates(backends, tiny_model: Path) -> None:
    shape = plan.shape_from_config(plan.read_config(tiny_model))
    slots, length, max_new = 4, 150, 8
    held = {}
    for kv, backend in backends.items():
        engine = backend.slot_engine
        engine.release()
        engine.prepare(slots, length, max_new)
        cache = slots * plan.cache_length(length) * plan.kv_bytes_per_token(shape, itemsize=4, kv=kv)
        held[kv] = engine.held_bytes()
        assert cache <= held[kv] <= slots * plan.slot_bytes(shape, length, itemsize=4, kv=kv)
        engine.release()
    # head dim 16 here: 16 bytes and a 4-byte scale per head against 64 bytes in fp32
    assert plan.kv_bytes_per_token(shape, itemsize=4, kv="fp8") * 64 == plan.kv_bytes_per_token(shape, itemsize=4) * 20
    assert held["fp8"] < held["auto"] / 2


def test_an_fp8_cache_is_recorded_in_the_provenance(backends) -> None:
    assert "kv cache fp8" in backends["fp8"].provenance
    assert "kv cache" not in backends["auto"].provenance
    assert backends["fp8"].describe()["kv_cache"] == "fp8"
    answers = backends["fp8"].generate([Request((image(3, 56, 56),), "Describe.", 4)])
    assert answers[0].new_tokens >= 1


def test_the_setting_is_checked_with_its_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        model:
          name: Qwen/Qwen2.5-VL-7B-Instruct
          kv_cache_dtype: fp8_e5m2
        include: [ocr]
    """)
    done = run_vlwatch("check", "--config", path, timeout=60)
    assert done.returncode == 1
    assert f"{path}:3: model.kv_cache_dtype" in done.stdout and "auto, fp8" in done.stdout
    path.write_text(path.read_text().replace("fp8_e5m2", "fp8"))
    done = run_vlwatch("check", "--config", path, timeout=60)
    assert done.returncode == 0 and "kv cache fp8" in done.stdout, done.stdout


def test_a_card_before_compute_capability_8_9_is_refused_with_what_to_set(monkeypatch) -> None:
    # No GPU here: the card's answer is the one thing faked.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(BackendError, match=r"kv_cache_dtype: fp8 needs .*8\.9.*this one has 8\.6.*kv_cache_dtype: auto"):
        loading.resolve_kv_cache(ModelConfig(kv_cache_dtype="fp8"), torch.device("cuda"))
    assert loading.resolve_kv_cache(ModelConfig(), torch.device("cuda")) == "auto"


def test_the_plan_command_counts_an_fp8_cache_and_advises_it(tmp_path: Path) -> None:
    env = {"VLWATCH_CONFIG": str(tmp_path / "none.yaml"), "XDG_CONFIG_HOME": str(tmp_path)}
    args = ("plan", "--gpu-memory", "16GiB", "--quantization", "fp8", "--max-pixels", "1297296",
            "--max-new-tokens", "768", "--json")
    plain = json.loads(run_vlwatch(*args, env=env, timeout=60).stdout)
    fp8 = json.loads(run_vlwatch(*args, "--kv-cache-dtype", "fp8", env=env, timeout=60).stdout)
    assert plain["kv_cache_dtype"] == "auto" and fp8["kv_cache_dtype"] == "fp8"
    assert fp8["kv_per_slot_mib"] < plain["kv_per_slot_mib"] / 1.9
    assert fp8["slots"] >= 1.9 * plain["slots"] and "fp8 KV cache" in fp8["summary"]
    assert any(a.startswith(f"model.kv_cache_dtype: fp8 ({fp8['slots']} slots") for a in plain["advice"])


def test_bench_verify_holds_the_fp8_cache_to_stock_generate_rounding_the_same_way(tiny_model: Path) -> None:
    # Stock generate with a plain cache parts from the engine's FP8 cache within 40 tokens here (2 of 6
    # requests, from tokens 13 and 14); with ``stock.rounding_cache`` the two agree token for token.
    done = run_vlwatch("bench", "--verify", "--model", tiny_model, "--kv-cache-dtype", "fp8", "--verify-sizes",
                       "56x56,112x84,84x140,168x168,56x112,224x224", "--verify-slots", "2", "--new-tokens", "40",
                       timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kv_cache fp8" in done.stdout and "6 of 6 requests gave the same tokens" in done.stdout
    assert "FutureWarning" not in done.stderr
