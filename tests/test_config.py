"""The config loader: every problem reported at once, each with file and line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import config_candidates, find_config

from daemon.config_reader import load_config, parse_config
from daemon.errors import ConfigError, ExitCode, VlwatchError
from tests.conftest import REPO, run_vlwatch, write_config

BAD = """\
model:
  backend: tranformers
  max_pixels: lots
  idle_unload: soon
  max_gpu_memory: 22 gigs
  api_key_env: sk-123456
watch:
  - path: ./inbox
    rules: [nosuch]
    settle: 2 seconds
    color: red
include: [ocr, nopack]
rules:
  - name: a
    match: ["[abc", "../x/*.png", "/abs/*.png"]
    task: ocr
    output: pdf
  - name: b
    task: summarise
    prompt: "hello $nam and $filename"
  - name: c
    task: custom
  - name: ocr
    task: ocr
  - name: d e
    task: ground
    output: md
"""

# (line, key path, words of the message) for each problem in BAD
EXPECTED = [
    (2, "model.backend", "'tranformers' is not one of transformers, openai"),
    (3, "model.max_pixels", "expected a whole number"),
    (4, "model.idle_unload", "expected a duration"),
    (5, "model.max_gpu_memory", "expected a size"),
    (6, "model.api_key_env", "NAME of an environment variable"),
    (9, "watch[0].rules", "rule 'nosuch' is not defined"),
    (10, "watch[0].settle", "expected a duration"),
    (11, "watch[0].color", "unknown key"),
    (12, "include[1]", "no rule pack named 'nopack'"),
    (15, "rules[0].match", "bad glob '[abc'"),
    (15, "rules[0].match", "bad glob '../x/*.png'"),
    (15, "rules[0].match", "bad glob '/abs/*.png'"),
    (17, "rules[0].output", "'pdf' is not one of md, html, json"),
    (19, "rules[1].task", "'summarise' is not one of ocr, describe, ground, code, custom"),
    (20, "rules[1].prompt", "unknown variable $nam"),
    (21, "rules[2]", "needs 'output'"),
    (21, "rules[2]", "needs a 'prompt'"),
    (23, "name", "rule 'ocr' is also defined at"),
    (25, "rules[4].name", "must be letters"),
    (27, "rules[4].output", "a ground rule writes json"),
]


def test_every_problem_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, BAD)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = [str(p) for p in info.value.problems]
    for line, where, words in EXPECTED:
        prefix = f"{path}:{line}: {where}: "
        assert any(t.startswith(prefix) and words in t for t in text), (prefix, words, text)
    # nothing reported that we did not expect
    assert len(text) == len(EXPECTED), text


def test_check_exits_1_and_lists_all_problems(tmp_path: Path) -> None:
    path = write_config(tmp_path, BAD)
    done = run_vlwatch("check", "--config", path)
    assert done.returncode == ExitCode.FAILED
    assert f"{len(EXPECTED)} problems found" in done.stdout
    assert f"{path}:17: rules[0].output: 'pdf' is not one of md, html, json" in done.stdout


def test_other_commands_exit_2_on_a_bad_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, BAD)
    done = run_vlwatch("explain", "--config", path, tmp_path / "x.png")
    assert done.returncode == ExitCode.USAGE
    assert f"{path}:2: model.backend" in done.stderr


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "model:\n  name: [unclosed\nstate: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value.problems[0]).startswith(f"{path}:3: invalid YAML")


def test_yaml_cannot_construct_python_objects(tmp_path: Path) -> None:
    path = write_config(tmp_path, "state: !!python/object/apply:os.system ['touch /tmp/pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_missing_model_and_folder_are_warnings_not_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        model: {name: Someone/not-downloaded}
        watch: [{path: ./not-yet}]
        include: [ocr]
    """)
    config = load_config(path)
    assert "not downloaded" in config.model_warning and "vlwatch pull Someone/not-downloaded" in config.model_warning
    assert any("does not exist (yet)" in w for w in config.warnings)
    done = run_vlwatch("check", "--config", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning:" in done.stdout and "OK" in done.stdout
    assert "vlwatch pull Someone/not-downloaded" in done.stdout


def test_values_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANS", str(tmp_path / "scans"))
    path = write_config(tmp_path, """
        model: {max_gpu_memory: 22GiB, idle_unload: 15m, timeout: 500ms, batch_size: auto, base_url: http://a:1/v1}
        state: ~/state.db
        watch: [{path: $SCANS, settle: 1.5s, rules: [ocr]}, {path: rel, recursive: false, polling: true}]
        include: [ocr, code]
    """)
    c = load_config(path)
    assert c.model.max_gpu_memory == 22 * 2**30
    assert c.model.idle_unload == 900 and c.model.timeout == 0.5 and c.model.batch_size is None
    assert c.model.base_url == ("http://a:1/v1",)
    assert c.state == Path.home() / "state.db"
    assert c.watch[0].path == tmp_path / "scans" and c.watch[0].settle == 1.5 and c.watch[0].rules == ("ocr",)
    assert c.watch[1].path == tmp_path / "rel" and c.watch[1].polling and not c.watch[1].recursive
    assert [r.name for r in c.rules] == ["ocr", "code"]


def test_rule_without_prompt_gets_the_bundled_one(tmp_path: Path) -> None:
    path = write_config(tmp_path, "rules: [{name: scans, task: ocr, match: '*.tif'}]\n")
    rule = load_config(path).rule("scans")
    assert rule is not None and "Markdown" in rule.prompt and rule.output == "md"


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    (xdg / "vlwatch").mkdir(parents=True)
    (xdg / "vlwatch" / "config.yaml").write_text("include: [ocr]\n")
    assert find_config(None) == xdg / "vlwatch" / "config.yaml"
    env = write_config(tmp_path, "include: [code]\n")
    monkeypatch.setenv("VLWATCH_CONFIG", str(env))
    assert find_config(None) == env
    assert config_candidates()[-1] == Path("/etc/vlwatch/config.yaml")


def test_no_config_anywhere_is_a_usage_error(tmp_path: Path) -> None:
    done = run_vlwatch("explain", "x.png")
    assert done.returncode == ExitCode.USAGE
    assert "no config file found" in done.stderr
    with pytest.raises(VlwatchError):
        find_config(tmp_path / "absent.yaml")


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "config.yaml"
    config = parse_config(example.read_text(), example)
    assert {"invoice-ocr", "ocr", "describe", "ground", "code"} <= {r.name for r in config.rules}


# ------------------------------------------------------------- engine: (issue 22.3)

ENGINE_BAD = """\
include: [ocr]
engine:
  compile: sometimes
  cuda_graph: false
  decode_attention: flashy
  packed_prefill: 0
  engine_lost_after: 30
  step_tokens: -5
  backlog_share: 1.5
"""


def test_engine_options_are_typed_config_read_with_their_defaults(tmp_path: Path) -> None:
    from daemon.config import EngineOptions

    assert parse_config("include: [ocr]\nengine: {}\n", tmp_path / "c.yaml").engine == EngineOptions()
    got = parse_config("include: [ocr]\nengine:\n  compile: [prefill, decode]\n  cuda_graphs: false\n"
                       "  decode_attention: sdpa\n  packed_prefill: false\n  overlap_rounds: false\n"
                       "  vision_blocks: false\n  vision_varlen: true\n  engine_lost_after: 2m\n"
                       "  step_tokens: 512\n  backlog_share: 0.25\n  interactive_slots: 2\n",
                       tmp_path / "c.yaml").engine
    assert got == EngineOptions(compile=("decode", "prefill"), cuda_graphs=False, decode_attention="sdpa",
                                packed_prefill=False, overlap_rounds=False, vision_blocks=False, vision_varlen=True,
                                engine_lost_after=120.0, step_tokens=512, backlog_share=0.25, interactive_slots=2)
    assert parse_config("include: [ocr]\nengine: {compile: false}\n", tmp_path / "c.yaml").engine.compile == ()


def test_every_engine_problem_is_reported_with_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(ENGINE_BAD, tmp_path / "config.yaml")
    text = str(err.value)
    for expected in ("config.yaml:3: engine.compile: expected true, false or a list of parts",
                     "config.yaml:4: engine.cuda_graph: unknown key (did you mean 'cuda_graphs'?)",
                     "config.yaml:5: engine.decode_attention: 'flashy' is not one of flash, sdpa",
                     "config.yaml:6: engine.packed_prefill: expected true or false, got 0",
                     "config.yaml:7: engine.engine_lost_after: 30 needs a unit",
                     "config.yaml:8: engine.step_tokens: must be at least 1",
                     "config.yaml:9: engine.backlog_share: expected a number above 0 and at most 1"):
        assert expected in text, text
    assert len(err.value.problems) == 7


def test_bench_engine_pairs_are_read_like_the_config(tmp_path: Path) -> None:
    from daemon.config import EngineOptions
    from daemon.config_reader import parse_engine_options

    base = EngineOptions(step_tokens=100)
    got = parse_engine_options(["packed_prefill=false", "compile=[decode]"], base=base)
    assert got == EngineOptions(compile=("decode",), packed_prefill=False, step_tokens=100)
    with pytest.raises(ConfigError) as err:
        parse_engine_options(["packed_prefill=maybe", "nonsense", "cuda_graph=false"])
    assert [str(p) for p in err.value.problems] == [
        "--engine:1: engine.packed_prefill: expected true or false, got 'maybe'",
        "--engine:2: 'nonsense' is not KEY=VALUE (like packed_prefill=false)",
        "--engine:3: engine.cuda_graph: unknown key (did you mean 'cuda_graphs'?); allowed: "
        + ", ".join(("compile", "cuda_graphs", "decode_attention", "packed_prefill", "overlap_rounds", "vision_blocks",
                     "vision_varlen", "fp8_rows_kernel", "fp8_rows_split", "fp8_rows_max", "fp8_widen", "allow_fp16",
                     "engine_lost_after", "step_tokens",
                     "backlog_share",
                     "interactive_slots"))]
    done = run_vlwatch("bench", "--engine", "decode_attention=fast", "--config", write_config(tmp_path, "include: [ocr]\n"))
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--engine:1: engine.decode_attention: 'fast' is not one of flash, sdpa" in done.stdout + done.stderr


def test_check_and_status_show_the_engine_options(tmp_path: Path) -> None:
    path = write_config(tmp_path, """\
        include: [ocr]
        state: ./state.db
        engine: {packed_prefill: false, step_tokens: 512, compile: [decode]}
        """)
    done = run_vlwatch("check", "--config", path)
    assert done.returncode == 0, done.stdout + done.stderr
    line = ("engine: compile=[decode] cuda_graphs=true decode_attention=flash packed_prefill=false overlap_rounds=true "
            "vision_blocks=true vision_varlen=false fp8_rows_kernel=true fp8_rows_split=0 fp8_rows_max=16 "
            "fp8_widen=convert "
            "allow_fp16=false "
            "engine_lost_after=120s "
            "step_tokens=512 "
            "backlog_share=0.5 interactive_slots=4")
    assert line in done.stdout, done.stdout
    shown = run_vlwatch("status", "--config", path)
    assert "engine   compile=[decode] " in shown.stdout and "packed_prefill=false" in shown.stdout, shown.stdout
    import json

    info = json.loads(run_vlwatch("status", "--json", "--config", path).stdout)
    assert info["engine_options"]["packed_prefill"] is False and info["engine_options"]["compile"] == ["decode"]
    assert info["engine_options"]["step_tokens"] == 512


def test_a_removed_engine_variable_gets_one_warning_naming_its_config_key(tmp_path: Path) -> None:
    # Users may have VLWATCH_PACKED_PREFILL=0 in a systemd unit from before engine: existed: it no longer
    # does anything, and says so once, with the key that replaces it.
    path = write_config(tmp_path, "include: [ocr]\nstate: ./state.db\n")
    done = run_vlwatch("check", "--config", path, env={"VLWATCH_PACKED_PREFILL": "0", "VLWATCH_ENGINE_LOST_AFTER": "4"})
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "moved into the config's engine: section" in line]
    assert len(warnings) == 1, done.stderr
    assert "VLWATCH_ENGINE_LOST_AFTER -> engine.engine_lost_after" in warnings[0]
    assert "VLWATCH_PACKED_PREFILL -> engine.packed_prefill" in warnings[0]
    quiet = run_vlwatch("check", "--config", path)
    assert "engine: section" not in quiet.stderr


def test_no_engine_switch_is_read_from_the_environment() -> None:
    # issue 22.3: the environment variables vlwatch reads are daemon.env's, and only there.
    import re

    from daemon import env

    root = Path(__file__).resolve().parent.parent / "daemon"
    for source in root.rglob("*.py"):
        if source.name == "env.py":
            continue
        text = source.read_text(encoding="utf-8")
        for name in env.REMOVED:
            assert not re.search(rf"environ[^\n]*{name}\b", text), f"{source}: reads {name}"
        assert not re.search(r"environ\.get\(\s*\"VLWATCH_", text), f"{source}: reads a VLWATCH_ variable itself"


def test_the_cuda_allocator_grows_segments_unless_configured(tmp_path: Path) -> None:
    """vlwatch sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts; a user's value stays."""
    (tmp_path / "record_alloc_conf.py").write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(tmp_path / 'seen')!r}).write_text(os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '-'))\n")
    for preset, expected in ((None, "expandable_segments:True"),
                             ("garbage_collection_threshold:0.6", "garbage_collection_threshold:0.6")):
        extra = {"VLWATCH_PLUGINS": "record_alloc_conf", "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"} | extra
        if preset:
            env["PYTORCH_CUDA_ALLOC_CONF"] = preset
        config = write_config(tmp_path, "model: {name: /nonexistent}\nwatch: [{path: ./in}]\n")
        subprocess.run([sys.executable, "-m", "daemon", "check", "--config", str(config)], env=env,
                       capture_output=True, text=True, timeout=60)
        assert (tmp_path / "seen").read_text() == expected
