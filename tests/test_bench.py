"""`vlwatch bench` on the tiny checkpoint (CPU): the same table and JSON the H100 run gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from daemon import backends
from daemon.backends import Answer
from daemon.bench.run import run_bench
from daemon.bench.setups import parse_bytes, parse_size, plan
from daemon.cli import build_parser
from tests.conftest import run_vlwatch

COLUMNS = ("setup", "batch", "images", "tokens/image", "images/min", "s/image", "TTFT s", "decode tok/s", "peak GPU GiB")
SMALL = ("--images", "3", "--size", "84x56", "--new-tokens", "4", "--baseline-images", "1", "--latency-images", "2")


def test_bench_json_on_the_tiny_checkpoint(tiny_model: Path) -> None:
    done = run_vlwatch("bench", "--model", tiny_model, *SMALL, "--batch-sizes", "auto,2", "--ignore-eos", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["header"]["image_tokens"] == 6 and report["header"]["new_tokens"] == 4
    assert report["header"]["eos"] == "ignored (exactly 4 tokens per image)"
    assert report["header"]["device"] and report["header"]["engine"] == "slot engine"
    setups = [(r["setup"], r["batch"], r["images"]) for r in report["results"]]
    assert setups == [
        ("one at a time (baseline): stock model.generate", "1", 1),
        ("batch 1 (latency, warm)", "1", 2),
        ("batched worker", "auto (4)", 3),
        ("batched worker", "2", 3),
    ]
    for r in report["results"]:
        assert r["images_per_min"] > 0 and r["s_per_image"] > 0 and r["seconds"] > 0
        assert r["new_tokens"] == 4 * r["images"]  # --ignore-eos: random weights stop anywhere
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


def test_builtin_dummy_config_is_qwen2_5_vl_7b(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig, AutoProcessor

    from daemon.backends.transformers.dummy import builtin_qwen2_5_vl_7b, dummy_source

    folder = builtin_qwen2_5_vl_7b(tmp_path / "dummy")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.window_size) == (32, 1280, 3584, 112)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]
    # transformers 5.0-5.17 read a config.json without transformers_version as a Mistral tokenizer's and
    # warned of an "incorrect regex pattern" at every bench run (issue 22.6); the real file names 4.41.2.
    assert json.loads((folder / "config.json").read_text())["transformers_version"] == "4.41.2"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["repetition_penalty"] == 1.05
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert "incorrect regex" not in capfd.readouterr().err
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
    from daemon.backends.transformers.backend import TransformersBackend

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
    # Where they part, how far stock's own token was ahead of the engine's in stock's scores (session 11: a
    # near-tie and a wrong kernel read the same without it); the others, the same, say nothing of it.
    margins = re.findall(r"DIFFERENT from token 5 \(stock's token ahead by ([-0-9.e+]+) of ([-0-9.e+]+)\)", out)
    assert len(margins) == 1 and float(margins[0][0]) > 0, out
    assert out.count("ahead by") == 1


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


# ------------------------------------------------------------------ what users get (issue 22.6)


def _with_generation_config(tiny: Path, folder: Path, **changes: object) -> Path:
    """A copy of the tiny checkpoint (its files linked) whose generation_config.json has ``changes``."""
    folder.mkdir(exist_ok=True)
    for item in tiny.iterdir():
        if item.name != "generation_config.json" and not (folder / item.name).exists():
            (folder / item.name).symlink_to(item)
    generation = json.loads((tiny / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, **changes}))
    return folder


def test_the_bench_generates_as_the_daemon_does(tiny_model: Path, tmp_path: Path) -> None:
    """The model's generation config (stop ids, repetition penalty) applies in the bench, dummy weights included:
    the bench's tokens are the daemon backend's, not a forced budget."""
    from daemon.backends import Request
    from daemon.backends.transformers.backend import TransformersBackend
    from daemon.bench.setups import DEFAULT_PROMPT, synthetic_images
    from daemon.config import ModelConfig

    model = _with_generation_config(tiny_model, tmp_path / "tiny", repetition_penalty=1.05)
    requests = [Request((image,), DEFAULT_PROMPT, 4) for image in synthetic_images(3, 84, 56)]
    daemon = TransformersBackend(ModelConfig(name=str(model)))  # what the daemon builds from model.name
    stop = daemon.token_ids(requests, engine="auto")[0][1]  # the tiny model never stops by itself: make it
    daemon.unload()
    eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    _with_generation_config(tiny_model, model, repetition_penalty=1.05, eos_token_id=[*eos, stop])
    daemon = TransformersBackend(ModelConfig(name=str(model)))
    assert [a.finished for a in daemon.generate(requests)][0]  # stopped by the model, not the budget
    expected = daemon.last_stats["new_tokens"]  # the tokens generated, as the bench counts them
    assert expected < 4 * len(requests)
    info = daemon.describe()
    daemon.unload()
    assert info["repetition_penalty"] == 1.05 and stop in info["eos_ids"]

    one = ("--images", "3", "--size", "84x56", "--new-tokens", "4", "--baseline-images", "0", "--latency-images", "0")
    done = run_vlwatch("bench", "--model", model, *one, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["header"]["eos"] == "as the daemon (generation config, loop stop)"
    assert report["results"][0]["new_tokens"] == expected
    assert (report["header"]["eos_ids"], report["header"]["repetition_penalty"]) == (info["eos_ids"], 1.05)
    # Random weights of the same architecture carry the same generation config.
    done = run_vlwatch("bench", "--model", model, *one, "--load-format", "dummy", "--json")
    assert done.returncode == 0, done.stderr
    header = json.loads(done.stdout)["header"]
    assert (header["eos_ids"], header["repetition_penalty"]) == (info["eos_ids"], 1.05)


def test_bench_end_to_end_on_the_tiny_checkpoint(tiny_model: Path) -> None:
    """The real daemon, files in and sidecars out, on the dummy path the GPU run takes, beside the engine-only row."""
    done = run_vlwatch("bench", "--model", tiny_model, "--load-format", "dummy", "--ignore-eos", "--end-to-end",
                       "--images", "3", "--size", "84x56", "--new-tokens", "4", "--baseline-images", "0",
                       "--latency-images", "0", "--json", "--end-to-end-timeout", "120")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    engine, e2e = report["results"]
    assert engine["setup"] == "batched worker" and e2e["setup"] == "end to end (daemon: files in, sidecars out)"
    assert e2e["images"] == 3 and e2e["batch"] == "auto" and e2e["new_tokens"] == 12
    assert e2e["images_per_min"] > 0 and e2e["seconds"] > 0
    c = report["end_to_end"]
    assert c["engine_only_images_per_min"] == engine["images_per_min"] and c["images_per_min"] == e2e["images_per_min"]
    assert c["ratio"] == round(e2e["images_per_min"] / engine["images_per_min"], 3) and c["target"] == 0.9
    assert "incorrect regex" not in done.stderr
    # the daemon's own account of the timed run: where its engine's time went
    assert c["daemon_engine_log"] and all(re.fullmatch(
        r"engine: \d+ requests in [\d.]+s: prefill [\d.]+s, decode [\d.]+s in \d+ steps, of which [\d.]+s "
        r"with free slots and nothing ready; \d+ queued sequences gave their slot to a question", line)
        for line in c["daemon_engine_log"]), c["daemon_engine_log"]
    assert sum(int(line.split()[1]) for line in c["daemon_engine_log"]) >= 3


def test_end_to_end_usage_errors() -> None:
    done = run_vlwatch("bench", "--model", "unused", "--end-to-end", "--ignore-eos")
    assert done.returncode == 2 and "--load-format dummy" in done.stderr
    done = run_vlwatch("bench", "--model", "unused", "--end-to-end", "--batch-sizes", "")
    assert done.returncode == 2 and "--batch-sizes" in done.stderr


def test_the_comparison_line() -> None:
    from daemon.bench.results import SetupResult
    from daemon.bench.end_to_end import compare, format_comparison

    def row(name: str, per_min: float) -> SetupResult:
        return SetupResult(name, "auto (256)", 128, 10.0, per_min, 0.1, None, None, None, None)

    c = compare(row("end to end", 760.0), row("batched worker", 868.8))
    assert c["ratio"] == 0.875 and not c["met"]
    assert format_comparison(c) == ("end to end 760.0 images/min = 87.5% of engine-only 868.8 (batched worker, "
                                    "batch auto (256)); target >= 90%: BELOW TARGET")
