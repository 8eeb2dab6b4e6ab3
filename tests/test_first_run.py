"""Issue 11: what a new user trips over in the first ten minutes and in everyday use.

Each test names the item of issue 11 it pins.  The CLI is run for real
(``python -m daemon``), configs and images are real files in tmp_path, and
the model is the tiny checkpoint; only a GPU running out of memory is faked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.config_reader import parse_config
from daemon.errors import BackendError, ConfigError
from tests.conftest import REPO, run_vlwatch, write_config


def png(path: Path, seed: int = 0, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


# ----------------------------------------------------------------- 11.5


@pytest.mark.parametrize("error", ["torch", "runtime"])
def test_out_of_memory_while_loading_says_so_with_numbers(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                          error: str) -> None:
    # issue 11.5: was "no attention implementation could be loaded (tried sdpa, eager)"
    import torch

    from daemon.backends.transformers import loading
    from daemon.backends.transformers.backend import TransformersBackend
    from daemon.config import ModelConfig

    def no_room(*args: object, **kwargs: object) -> object:
        if error == "torch":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(loading, "instantiate", no_room)
    backend = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", max_pixels=50000))
    with pytest.raises(BackendError) as info:
        backend.load()
    text = str(info.value)
    assert text.startswith(f"out of memory loading the model {tiny_model} on cpu"), text
    assert "attention" not in text
    from daemon.backends.transformers.oom import parameter_count

    params = parameter_count(tiny_model)
    assert params and f"({params / 1e9:.2f} B parameters in float32)" in text  # needed: from the checkpoint
    assert re.search(r"had [\d.]+ GiB free of [\d.]+ GiB", text)  # and what there was
    assert "model.max_pixels" in text and "model.backend: openai" in text


# ----------------------------------------------------------------- 11.8


def test_verbose_works_after_the_subcommand_too(tmp_path: Path) -> None:
    # issue 11.8: `vlwatch run -v` was a usage error
    config = write_config(tmp_path, "include: [ocr]\nwatch: [{path: ./inbox}]\n")
    for args in (["-v", "status"], ["status", "-v"], ["status", "-vv"]):
        done = run_vlwatch(*args, "--config", config)
        assert done.returncode == 0, (args, done.stderr)
    from daemon.cli import build_parser

    args = build_parser().parse_args(["-v", "run", "-vv"])
    assert args.verbose + args.sub_verbose == 3


def _log_lines(tmp_path: Path, env: dict[str, str]) -> list[str]:
    config = write_config(tmp_path, "include: [ocr]\nwatch: [{path: ./not-there}]\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        st = os.fstat(f.fileno())
        env = {k: v.replace("DEV:INO", f"{st.st_dev}:{st.st_ino}") for k, v in env.items()}
        subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(config)], cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, **env}, timeout=120)
    return log.read_text().splitlines()


def test_log_lines_carry_a_time_in_a_file_but_not_in_the_journal(tmp_path: Path) -> None:
    # issue 11.8: a log file had no timestamps; journald stamps lines itself
    (line,) = _log_lines(tmp_path, {})
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING ", line), line
    (line,) = _log_lines(tmp_path, {"JOURNAL_STREAM": "DEV:INO"})
    assert line.startswith("<4>WARNING "), line


def test_config_warnings_once_and_missing_model_said_once(tmp_path: Path) -> None:
    # issue 11.8: every command repeated every config warning; the missing
    # model was reported twice (as a warning, then as the error)
    png(tmp_path / "a.png")
    config = write_config(tmp_path, """
        model: {name: Someone/not-downloaded}
        include: [ocr]
        watch: [{path: ./gone-1}, {path: ./gone-2}]
    """)
    status = run_vlwatch("status", "--config", config)
    assert status.returncode == 0
    assert status.stderr.count("\n") == 1 and "has 2 warnings (`vlwatch check` lists them)" in status.stderr
    done = run_vlwatch("process", "--config", config, tmp_path / "a.png")
    assert done.returncode == 1
    assert done.stderr.count("Someone/not-downloaded") == 2, done.stderr  # once: "model '...' ... `vlwatch pull ...`"
    assert done.stderr.count("vlwatch pull") == 1, done.stderr
    check = run_vlwatch("check", "--config", config)
    assert check.stdout.count("warning:") == 3 and "vlwatch pull Someone/not-downloaded" in check.stdout


def test_counts_have_proper_plurals(tmp_path: Path) -> None:
    # issue 11.8: "1 files", "(1 problems)"
    config = write_config(tmp_path, "include: [ocr]\nwatch: [{path: ./inbox}]\n")
    check = run_vlwatch("check", "--config", config)
    assert "(1 rule, 1 watched folder," in check.stdout, check.stdout
    bad = write_config(tmp_path, "include: [ocr]\nwatch: [{path: ./inbox, settle: soon}]\n")
    check = run_vlwatch("check", "--config", bad)
    assert check.stdout.splitlines()[-1] == "1 problem found"
    from daemon.errors import plural

    assert plural(1, "file") == "1 file" and plural(2, "file") == "2 files" and plural(0, "job") == "0 jobs"


# ----------------------------------------------------------------- 11.2


def test_a_config_without_rules_is_a_problem(tmp_path: Path) -> None:
    # issue 11.2: `check` said OK (0 rules) and `run` ignored every file
    config = write_config(tmp_path, "watch: [{path: ./inbox}]\n")
    check = run_vlwatch("check", "--config", config)
    assert check.returncode == 1
    assert "rules: no rules: nothing will be processed" in check.stdout and "include: [code, describe" in check.stdout
    run = run_vlwatch("run", "--config", config)
    assert run.returncode == 2 and "no rules" in run.stderr


def test_a_watch_naming_a_bundled_rule_says_to_include_it(tmp_path: Path) -> None:
    # issue 11.2: `watch.rules: [ocr]` without `include`
    config = write_config(tmp_path, """
        rules: [{name: mine, task: describe}]
        watch: [{path: ./inbox, rules: [ocr]}]
    """)
    with pytest.raises(ConfigError) as info:
        parse_config(config.read_text(), config)
    (problem,) = info.value.problems
    assert str(problem) == (f"{config}:2: watch[0].rules: rule 'ocr' is not defined; the bundled pack 'ocr' "
                            "defines it: add it to include (include: [ocr])")


# ----------------------------------------------------------------- 11.4


@pytest.mark.parametrize("body, message", [
    ("model: {device: gpu}", "model.device: 'gpu' is not a device: auto, cpu, cuda, cuda:N (N counts from 0) or mps "
                             "(did you mean 'cuda'?)"),
    ("model: {device: cuda}", "on this machine; use device: auto (the GPU when there is one, else the CPU) or cpu"),
    ("model: {device: 'cuda:1'}", "model.device: 'cuda:1' but this machine has 1 CUDA GPU (cuda:0..cuda:0)"),
    ("model: {max_gpu_memory: 22}", "model.max_gpu_memory: 22 needs a unit, like 22GiB or 22GB"),
    ("model: {max_gpu_memory: '22'}", "model.max_gpu_memory: '22' needs a unit, like 22GiB or 22GB"),
    ("model: {idle_unload: 15}", "model.idle_unload: 15 needs a unit: 15s, 15m or 15h"),
    ("jobs: {backoff: '30'}", "jobs.backoff: '30' needs a unit: 30s, 30m or 30h"),
    ("model: {dtype: bf16}", "model.dtype: 'bf16' is not one of auto, bfloat16, float16, float32 (did you mean 'bfloat16'?)"),
    ("model: {dtype: fp16}", "(did you mean 'float16'?)"),
])
def test_values_that_used_to_fail_later_are_caught_by_check(tmp_path: Path, body: str, message: str) -> None:
    # issue 11.4
    config = write_config(tmp_path, f"include: [ocr]\n{body}\n")
    fake_one_gpu = {"VLWATCH_FAKE_CUDA_DEVICES": "1"} if "cuda:1" in body else {}
    done = run_vlwatch("check", "--config", config, env=fake_one_gpu)
    assert done.returncode == 1, done.stdout
    assert message in done.stdout, done.stdout


def test_good_units_and_devices_pass(tmp_path: Path) -> None:
    config = write_config(tmp_path, """
        include: [ocr]
        model: {device: cpu, max_gpu_memory: 22GiB, idle_unload: 15m, dtype: bfloat16}
        jobs: {rescan: 0, backoff: 500ms}
    """)
    parsed = parse_config(config.read_text(), config)
    assert parsed.model.max_gpu_memory == 22 * 2**30 and parsed.model.idle_unload == 900.0
    assert parsed.jobs.rescan == 0 and parsed.jobs.backoff == 0.5
    # an openai backend does not care about this machine's GPUs
    remote = write_config(tmp_path, "include: [ocr]\nmodel: {backend: openai, device: cuda}\n")
    parse_config(remote.read_text(), remote)


# ----------------------------------------------------------------- 11.9


def test_explain_says_why(tmp_path: Path) -> None:
    # issue 11.9: no match shows the globs and the watch's filter; our own
    # output and temporary files are named as such; a missing file is exit 1
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, """
        include: [ocr, code]
        watch: [{path: ./inbox, rules: [code]}]
    """)
    (inbox / "notes.txt").parent.mkdir(parents=True)
    (inbox / "notes.txt").write_text("hi")
    done = run_vlwatch("explain", "--config", config, inbox / "notes.txt")
    assert done.returncode == 1
    assert "no rule matches 'notes.txt'; it was held against:" in done.stdout
    assert "rule code (" in done.stdout and "match *.png, *.jpg" in done.stdout
    assert "(not tried: ocr; this folder's `rules:` leaves them out)" in done.stdout
    # The daemon's own words (ignoring.ignore_reason: one answer for both, issue 10.5).
    for name, words in [("a.png.code.html", "vlwatch's own sidecar of rule 'code'"),
                        (".vlwatch-0123456789ab.tmp", "vlwatch's own temporary file"),
                        ("scan.png.part", "partial download")]:
        (inbox / name).write_bytes(b"x")
        done = run_vlwatch("explain", "--config", config, inbox / name)
        assert done.returncode == 1 and f"never processed: {words}" in done.stdout, (name, done.stdout)
    done = run_vlwatch("explain", "--config", config, inbox / "absent.png")
    assert done.returncode == 1 and "absent.png: no such file" in done.stderr
    png(inbox / "shot.png")
    done = run_vlwatch("explain", "--config", config, inbox / "shot.png")
    assert done.returncode == 0 and "rule code (" in done.stdout


# ----------------------------------------------------------------- 11.3


def test_the_example_config_works_out_of_the_box() -> None:
    # issue 11.3: its watched folders exist in the source tree
    example = REPO / "examples" / "config.yaml"
    config = parse_config(example.read_text(), example)
    assert config.warnings == (), config.warnings
    assert all(w.path.is_dir() for w in config.watch)


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    # issue 11.3: `status` created examples/state/state.db in the source tree
    import shutil

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    png(tmp_path / "examples" / "inbox" / "scans" / "a.png")
    config = tmp_path / "examples" / "config.yaml"
    before = files_under(tmp_path)
    for args in (["status"], ["status", "--json"], ["check"], ["explain", tmp_path / "examples" / "inbox" / "scans" / "a.png"],
                 ["scan", "--dry-run"], ["retry", "--all"]):
        done = run_vlwatch(*args, "--config", config)
        assert done.returncode in (0, 1), (args, done.stderr)
        assert files_under(tmp_path) == before, (args, files_under(tmp_path) - before)
    dry = run_vlwatch("scan", "--dry-run", "--config", config)
    assert "missing\tocr\t" in dry.stdout and "1 file needs processing" in dry.stderr


def test_init_writes_a_commented_config_and_its_folders(tmp_path: Path, isolated_env: Path) -> None:
    # issue 11.3: `vlwatch init [DIR]`
    done = run_vlwatch("init", tmp_path / "try")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "try" / "config.yaml"
    text = config.read_text()
    assert text.startswith("# vlwatch config, written by `vlwatch init`")
    for task in ("ocr", "describe", "ground", "code"):
        assert (tmp_path / "try" / "inbox" / task).is_dir()
    check = run_vlwatch("check", "--config", config)
    assert check.returncode == 0 and "(4 rules, 4 watched folders" in check.stdout
    assert f"vlwatch run --config {config}" in done.stdout and "vlwatch pull" in done.stdout
    again = run_vlwatch("init", tmp_path / "try")
    assert again.returncode == 1 and "exists already" in again.stderr and config.read_text() == text
    # without DIR: the XDG config path, which every command then finds by itself
    done = run_vlwatch("init")
    assert done.returncode == 0, done.stderr
    assert (isolated_env / ".config" / "vlwatch" / "config.yaml").is_file()
    assert (isolated_env / "vlwatch" / "inbox" / "ocr").is_dir()
    assert run_vlwatch("check").returncode == 0


# ----------------------------------------------------------------- 11.1 and 11.13, with a real daemon


def test_process_hands_files_to_the_running_daemon_and_redo_follows_the_recipe(tmp_path: Path,
                                                                                tiny_model: Path) -> None:
    # issue 11.1: `process` loaded a second copy of the model next to a running daemon
    # issue 11.13: sidecars of an older recipe are counted and redone on request only
    import signal

    from tests.test_daemon import Daemon, config_text, wait_until

    (tmp_path / "inbox").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(config_text(tiny_model))
    image = png(tmp_path / "elsewhere" / "a.png", seed=3)
    sidecar = image.parent / "a.png.describe.md"
    d = Daemon(tmp_path, config)
    try:
        d.start()
        env = {k: d.env[k] for k in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "HF_HOME")}
        started = time.monotonic()
        done = run_vlwatch("-vv", "process", "--config", config, image, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [str(sidecar)] and sidecar.is_file()
        assert re.search(r"handed 1 job to the running daemon \(pid \d+\)", done.stderr), done.stderr
        # the model was never loaded here: no backend log line, no transformers import of weights
        assert "loaded " not in done.stderr and "loading" not in done.stderr.lower(), done.stderr
        assert f"{image.absolute()}: describe done" in d.log()
        jobs = d.queue.history(image.absolute())
        assert len(jobs) == 1 and jobs[0].recipe and jobs[0].recipe.startswith("r1:")
        print(f"process through the daemon: {time.monotonic() - started:.1f}s")

        # up to date: nothing queued again; --force redoes it (issue 11.13)
        again = run_vlwatch("process", "--config", config, image, env=env)
        assert again.returncode == 0 and again.stdout.splitlines() == [str(sidecar)]
        assert len(d.queue.history(image.absolute())) == 1
        forced = run_vlwatch("process", "--force", "--config", config, image, env=env)
        assert forced.returncode == 0, forced.stderr
        assert len(d.queue.history(image.absolute())) == 2

        # a new recipe (longer answers): counted, not redone, until asked
        config.write_text(config_text(tiny_model).replace("max_new_tokens: 8", "max_new_tokens: 9"))
        d.signal(signal.SIGHUP)
        wait_until(lambda: d.log_count("reloaded:") == 1, "the reload", log=d.log)
        status = json.loads(run_vlwatch("status", "--json", "--config", config, env=env).stdout)
        assert status["outdated"] == 1
        text = run_vlwatch("status", "--config", config, env=env).stdout
        assert "outdated 1 sidecar was made by an older recipe" in text and "`vlwatch scan --redo`" in text
        dry = run_vlwatch("scan", "--dry-run", "--config", config, env=env)
        assert f"outdated\tdescribe\t{image.absolute()}" in dry.stdout
        assert len(d.queue.history(image.absolute())) == 2  # the daemon redoes nothing by itself
        redo = run_vlwatch("scan", "--redo", "--rule", "describe", "--config", config, env=env)
        assert redo.returncode == 0 and "queued 1 job; the running daemon" in redo.stdout, redo.stdout + redo.stderr
        wait_until(lambda: json.loads(run_vlwatch("status", "--json", "--config", config, env=env).stdout)["outdated"] == 0
                   and d.latest(image).state == "done", "the redo", log=d.log)
        assert len(d.queue.history(image.absolute())) == 3

        # a file that does not exist, next to one that does: exit 1, the other still done
        other = png(tmp_path / "elsewhere" / "b.png", seed=4)
        mixed = run_vlwatch("process", "--config", config, other, tmp_path / "nope.png", env=env)
        assert mixed.returncode == 1 and "nope.png: no such file" in mixed.stderr
        assert mixed.stdout.splitlines() == [str(other.parent / "b.png.describe.md")]
    finally:
        d.close()


def test_the_daemon_redoes_outdated_sidecars_only_when_the_config_asks(tmp_path: Path) -> None:
    # issue 11.13: `jobs.redo_outdated` (default false)
    from daemon.intake.recipes import recipe_of
    from daemon.intake.rules import match_file
    from daemon.intake.scanning import find_work
    from daemon.store.keys import content_hash
    from daemon.store.queue import Candidate, Queue

    inbox = tmp_path / "inbox"
    image = png(inbox / "a.png")
    body = "model: {{name: /models/v{n}}}\ninclude: [ocr]\nwatch: [{{path: ./inbox}}]\n{extra}"
    old = parse_config(body.format(n=8, extra=""), tmp_path / "config.yaml")
    with Queue(tmp_path / "state.db") as q:
        st = image.stat()
        [m] = match_file(old, image)
        q.enqueue([Candidate(image.absolute(), "ocr", content_hash(image), st.st_size, st.st_mtime_ns,
                             recipe=recipe_of(old, m))])
        [job] = q.claim(1)
        (inbox / "a.png.ocr.md").write_text("text")
        q.finish([(job.id, [inbox / "a.png.ocr.md"], 1.0)])
        assert list(find_work(old, q)) == []
        new = parse_config(body.format(n=9, extra=""), tmp_path / "config.yaml")
        assert list(find_work(new, q)) == []  # a model or prompt change alone redoes nothing
        asks = parse_config(body.format(n=9, extra="jobs: {redo_outdated: true}\n"), tmp_path / "config.yaml")
        [work] = find_work(asks, q)
        assert work.reason == "outdated"


# ----------------------------------------------------------------- 11.7


def test_scan_right_after_a_copy_waits_for_the_files(tmp_path: Path) -> None:
    # issue 11.7: printed "still being written ...; skipped" per file, then "nothing to process"
    from daemon.store.queue import Queue
    from daemon.store.state import StateLock

    config = write_config(tmp_path, """
        include: [ocr]
        state: ./state.db
        watch: [{path: ./inbox, settle: 1s}]
    """)
    lock = StateLock(tmp_path / "state.db")
    assert lock.acquire()  # a daemon holds the state: the scan only queues
    try:
        image = png(tmp_path / "inbox" / "fresh.png")
        done = run_vlwatch("scan", "--config", config)
        assert done.returncode == 0, done.stderr
        assert "waiting for 1 file still being written" in done.stderr
        assert "queued 1 job; the running daemon" in done.stdout, done.stdout
        with Queue(tmp_path / "state.db") as q:
            assert q.latest(image.absolute(), "ocr").state == "queued"
    finally:
        lock.release()


# ----------------------------------------------------------------- 11.12


def _complete(line: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "completions.txt"
    env = {"_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "_ARGCOMPLETE_IFS": "\n"}
    done = run_vlwatch(env=env)
    assert done.returncode == 0, done.stderr
    return out.read_text().split()


@pytest.mark.parametrize("shell, marker", [("bash", "complete "), ("zsh", "#compdef vlwatch"),
                                           ("fish", "complete --command vlwatch")])
def test_shell_completion_scripts(shell: str, marker: str) -> None:
    # issue 11.12: bash, zsh and fish, generated from the parser by argcomplete
    done = run_vlwatch("--print-completion", shell)
    assert done.returncode == 0 and marker in done.stdout, done.stdout[:500]


def test_completion_offers_commands_options_and_rule_names(tmp_path: Path) -> None:
    config = write_config(tmp_path, "include: [ocr, code]\n")
    assert _complete("vlwatch pro", tmp_path) == ["process"]
    assert set(_complete("vlwatch scan --r", tmp_path)) == {"--redo", "--rule"}
    assert _complete(f"vlwatch process --config {config} --rule o", tmp_path) == ["ocr"]


# ----------------------------------------------------------------- 11.11


def _first_ten_minutes() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The first ten minutes", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_readme_first_ten_minutes_work_as_written(tmp_path: Path, tiny_model: Path, isolated_env: Path) -> None:
    # issue 11.11 ("done when"): a newcomer follows the README from pip install
    # to a first sidecar; the tiny checkpoint stands in for `vlwatch pull`.
    import shutil
    import signal

    from tests.test_daemon import wait_until

    steps = _first_ten_minutes()
    assert steps[:5] == ["python3 -m venv ~/.venvs/vlwatch && . ~/.venvs/vlwatch/bin/activate", "pip install .",
                         "vlwatch init", "vlwatch pull", "vlwatch run"], steps
    home = isolated_env
    shim = tmp_path / "bin" / "vlwatch"  # what `pip install .` puts on PATH
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m daemon \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "HOME": str(home)}
    png(home / "Pictures" / "scan.png", seed=5)
    Image.open(png(tmp_path / "photo.png", seed=6)).convert("RGB").save(home / "Pictures" / "photo.jpg")

    def sh(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    daemon = None
    try:
        for line in steps[2:]:
            if line == "vlwatch pull":  # no download here: model.name points at the tiny checkpoint instead
                config = home / ".config" / "vlwatch" / "config.yaml"
                text = config.read_text()
                assert "  name: Qwen/Qwen2.5-VL-7B-Instruct\n" in text
                config.write_text(text.replace("  name: Qwen/Qwen2.5-VL-7B-Instruct\n", f"  name: {tiny_model}\n"))
            elif line == "vlwatch run":
                daemon = subprocess.Popen(["bash", "-c", "exec vlwatch run"], env=env, cwd=tmp_path,
                                          stdout=open(tmp_path / "daemon.log", "wb"), stderr=subprocess.STDOUT)
            elif line.startswith("ls "):
                def listed() -> bool:
                    assert daemon is not None and daemon.poll() is None, (tmp_path / "daemon.log").read_text()
                    return "scan.png.ocr.md" in sh(line).stdout

                wait_until(listed, "scan.png.ocr.md", timeout=240, log=(tmp_path / "daemon.log").read_text)
            else:
                done = sh(line)
                assert done.returncode == 0, (line, done.stdout, done.stderr)
                if line == "vlwatch status":
                    assert "daemon   running" in done.stdout
                if line.startswith("vlwatch process"):
                    assert done.stdout.strip() == str(home / "Pictures" / "photo.jpg.describe.md")
                    assert "handed 1 job to the running daemon" in done.stderr
        assert (home / "vlwatch" / "inbox" / "ocr" / "scan.png.ocr.md").is_file()
        assert (home / "Pictures" / "photo.jpg.describe.md").is_file()
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
        shutil.rmtree(home / "vlwatch", ignore_errors=True)
