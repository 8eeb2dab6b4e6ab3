"""Keep `--help` and the README in step (the llm habit), so neither drifts."""

from __future__ import annotations

import re
from pathlib import Path

from daemon.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CONTRACT_COMMANDS = {"init", "run", "process", "scan", "explain", "check", "status", "retry", "pull", "bench", "search",
                     "ask", "plan"}


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return dict(sub.choices)


def test_every_contract_command_exists_and_is_in_the_readme() -> None:
    commands = _subcommands()
    assert set(commands) == CONTRACT_COMMANDS
    documented = set(re.findall(r"^\| `vlwatch (\w+)", README, re.MULTILINE))
    assert documented == CONTRACT_COMMANDS


def test_every_option_in_help_is_in_the_readme() -> None:
    for name, sub in _subcommands().items():
        for action in sub._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help"):
                    continue
                assert opt in README or name == "bench", f"vlwatch {name} {opt} is not documented in README.md"


def test_every_config_key_is_in_the_readme() -> None:
    from daemon import config_reader as config
    from daemon.rules_reader import RULE_KEYS

    for keys in (config.TOP_KEYS, config.MODEL_KEYS, config.WATCH_KEYS, RULE_KEYS, config.JOBS_KEYS,
                 config.API_KEYS, config.HOOKS_KEYS, config.ENGINE_KEYS):
        for key in keys:
            assert re.search(rf"^\s*(- )?{key}:", README, re.MULTILINE), f"config key {key!r} is not in README.md"


def test_the_readme_config_reference_is_a_valid_config(tmp_path) -> None:
    from daemon.config_reader import parse_config

    block = re.search(r"## Configuration.*?```yaml\n(.*?)```", README, re.DOTALL).group(1)
    config = parse_config(block, tmp_path / "config.yaml")
    assert [r.name for r in config.rules][:3] == ["invoice-ocr", "signatures", "mockups"]
