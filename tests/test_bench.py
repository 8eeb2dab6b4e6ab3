"""`vlwatch bench` on the tiny checkpoint (CPU): the same table and JSON the H100 run gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import backends
from daemon.backends import Answer
from daemon.bench import parse_bytes, parse_size, plan, run_bench
from daemon.cli import build_parser
from tests.conftest import run_vlwatch

COLUMNS = ("setup", "batch", "images", "images/min", "s/image", "TTFT s", "decode tok/s", "peak GPU GiB")
SMALL = ("--images", "3", "--size", "84x56", "--new-tokens", "4", "--baseline-images", "1", "--latency-images", "2")


def test_bench_json_on_the_tiny_checkpoint(tiny_model: Path) -> None:
    done = run_vlwatch("bench", "--model", tiny_model, *SMALL, "--batch-sizes", "auto,2", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["header"]["image_tokens"] == 6 and report["header"]["new_tokens"] == 4
    assert report["header"]["device"] and report["header"]["engine"] == "fastgen"
    setups = [(r["setup"], r["batch"], r["images"]) for r in report["results"]]
    assert setups == [
        ("one at a time (baseline): stock model.generate", "1", 1),
        ("batch 1 (latency, warm)", "1", 2),
        ("batched worker", "auto (4)", 3),
        ("batched worker", "2", 3),
    ]
    for r in report["results"]:
        assert r["images_per_min"] > 0 and r["s_per_image"] > 0 and r["seconds"] > 0
        assert r["new_tokens"] == 4 * r["images"]  # the budget is forced: random weights stop anywhere
        assert r["ttft_s"] is not None and r["ttft_s"] > 0
        assert r["peak_gpu_gib"] is None  # no GPU here
    assert report["command"].startswith("vlwatch bench")


def test_bench_table_and_save(tiny_model: Path, tmp_path: Path) -> None:
    done = run_vlwatch("bench", "--model", tiny_model, *SMALL, "--load-format", "dummy", "--save", tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("vlwatch bench: model ") and "weights random (dummy)" in lines[0]
    header = next(line for line in lines if line.startswith("| setup"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| setup")]
    assert len(rows) == 3  # baseline, batch 1, batched auto
    saved = sorted(p.suffix for p in tmp_path.iterdir())
    assert saved == [".json", ".md"]
    md = next(tmp_path.glob("*.md")).read_text()
    assert md.startswith("    vlwatch bench") and "| setup" in md


def test_bench_through_a_server_backend(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Any backend works: the bench only calls generate() (here a stand-in for the OpenAI one)."""
    calls: list[int] = []

    class Server:
        name, model, loaded = "openai", "remote", True

        def __init__(self, config) -> None:
            self.config = config

        def generate(self, requests):
            calls.append(len(requests))
            return [Answer(text="x", new_tokens=r.max_new_tokens) for r in requests]

        def unload(self) -> None:
            pass

    monkeypatch.setitem(backends._REGISTRY, "openai", Server)
    args = build_parser().parse_args(["bench", "--backend", "openai", *SMALL, "--json"])
    assert run_bench(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["images"] for r in report["results"]] == [1, 2, 3]
    assert all(r["peak_gpu_gib"] is None and r["images_per_min"] > 0 for r in report["results"])
    assert sum(calls) >= 1 + 2 + 3


def test_bench_usage_errors(tiny_model: Path) -> None:
    done = run_vlwatch("bench", "--model", tiny_model, "--size", "big")
    assert done.returncode == 2 and "WIDTHxHEIGHT" in done.stderr
    done = run_vlwatch("bench", "--model", tiny_model, "--batch-sizes", "auto,lots")
    assert done.returncode == 2 and "lots" in done.stderr


def test_the_baseline_and_latency_setups_can_be_skipped() -> None:
    # On a GPU the stock one-at-a-time baseline of a 768-token page takes a minute; an A/B of the batched
    # setup does not need it.
    from daemon.config import ModelConfig

    args = build_parser().parse_args(["bench", "--baseline-images", "0", "--latency-images", "0"])
    assert [s.name for s in plan(args, ModelConfig())] == ["batched worker"]
    args = build_parser().parse_args(["bench", "--latency-images", "0"])
    assert [s.name for s in plan(args, ModelConfig())] == ["one at a time (baseline): stock model.generate",
                                                          "batched worker"]
    done = run_vlwatch("bench", "--model", "unused", "--baseline-images", "0", "--latency-images", "0",
                       "--batch-sizes", "")
    assert done.returncode == 2 and "every setup was skipped" in done.stderr
    done = run_vlwatch("bench", "--model", "unused", "--baseline-images", "-1")
    assert done.returncode == 2 and "--baseline-images" in done.stderr


def test_sizes() -> None:
    assert parse_size("1036x1036") == (1036, 1036)
    assert parse_size("1000X500") == (1008, 504)  # rounded to multiples of 28
    assert parse_bytes("22GiB") == 22 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000


def test_builtin_dummy_config_is_qwen2_5_vl_7b(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    from daemon.bench_model import builtin_qwen2_5_vl_7b, dummy_source

    folder = builtin_qwen2_5_vl_7b(tmp_path / "dummy")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.window_size) == (32, 1280, 3584, 112)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id == 151655
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    # A model that is on this machine brings its own config and processor.
    assert dummy_source(str(folder)) == folder


# ------------------------------------------------------------------ --verify (issue 12.6)

VERIFY = ("--verify-sizes", "56x56,112x84,84x140,168x168,56x112", "--verify-slots", "2", "--new-tokens", "14")


def test_bench_verify_engine_equals_stock_generate(tiny_model: Path, tmp_path: Path) -> None:
    done = run_vlwatch("bench", "--verify", "--model", tiny_model, *VERIFY, "--save", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 of 5 requests gave the same tokens" in done.stdout
    assert "dtype float32" in done.stdout and "slots 2" in done.stdout
    md = next(tmp_path.glob("verify-*.md")).read_text()
    assert md.startswith("    vlwatch bench --verify")


def test_bench_verify_exits_1_on_a_mismatch(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.backends.transformers import TransformersBackend

    stock = TransformersBackend.token_ids

    def one_token_off(self, requests, *, engine):
        got = stock(self, requests, engine=engine)
        if engine == "auto":
            longest = max(range(len(got)), key=lambda i: len(got[i]))
            assert len(got[longest]) > 5
            got[longest] = got[longest][:5] + [(got[longest][5] + 1) % 100] + got[longest][6:]
        return got

    monkeypatch.setattr(TransformersBackend, "token_ids", one_token_off)
    args = build_parser().parse_args(["bench", "--verify", "--model", str(tiny_model), *VERIFY])
    assert run_bench(args) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT from token 5" in out and "4 of 5 requests gave the same tokens: MISMATCH" in out


def test_bench_one_engine_per_device(tiny_model: Path) -> None:
    # issue 12.5: the images split between engines running at once (two CPU "devices" here),
    # engine 1 in a process of its own as in the daemon (its log lines are tagged by that process).
    done = run_vlwatch("-v", "bench", "--model", tiny_model, *SMALL, "--devices", "cpu,cpu", "--json")
    assert done.returncode == 0, done.stderr
    assert "[engine 1]: bench: engine 1 on cpu, 1 images: warming up" in done.stderr, done.stderr
    report = json.loads(done.stdout)
    last = report["results"][-1]
    assert last["setup"] == "batched worker, 2 engines (cpu, cpu)" and last["batch"] == "auto (4, 4)"
    assert last["images"] == 3 and last["images_per_min"] > 0
