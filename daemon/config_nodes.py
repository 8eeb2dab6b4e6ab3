"""Typed values out of YAML nodes, each problem kept with its file and line.

``Reader`` is what ``config_reader`` (config.yaml) and ``rules_reader`` (the
rules, in the config or in a pack) read with: a string, a number, a
duration ("30s"), a size ("22GiB"), a path relative to the file, a mapping
with only known keys, each refusal recorded as a ``Problem``
(``config.yaml:14: rules[2].output: ...``) so that every problem of a file
is reported at once.  Nodes come from ``yaml.compose`` (the safe loader's
node graph): nothing in a config constructs Python objects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from daemon.config import SIZE_UNITS, canonical, size_parts
from daemon.errors import Problem


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Reader:
    """Turns YAML nodes into typed values, collecting problems with their lines."""

    def __init__(self, file: str, base: Path) -> None:
        self.file = file
        self.base = base
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self._constructor = yaml.constructor.SafeConstructor()

    # -- plumbing
    def compose(self, text: str) -> yaml.Node | None:
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            self.problems.append(Problem(self.file, line, "", f"invalid YAML: {exc.problem or exc}"))
        except yaml.YAMLError as exc:
            self.problems.append(Problem(self.file, None, "", f"invalid YAML: {exc}"))
        return None

    def problem(self, node: yaml.Node | None, where: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(Problem(self.file, line, where, message))

    def warn(self, node: yaml.Node | None, where: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.warnings.append(str(Problem(self.file, line, where, message)))

    def value(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, where: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, where, "expected a mapping of keys to values")
            return {}
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = f"{where}.{key}" if where else str(key)
            if key not in allowed:
                hint = did_you_mean(str(key), allowed)
                self.problem(key_node, sub, f"unknown key{hint}; allowed: {', '.join(allowed)}")
            elif key in out:
                self.problem(key_node, sub, "given twice")
            else:
                out[key] = value_node
        return out

    def sequence(self, node: yaml.Node, where: str) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        self.problem(node, where, "expected a list")
        return []

    # -- typed scalars; each returns None after recording a problem
    def scalar(self, node: yaml.Node, where: str, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, where, f"expected {what}")
            return None
        return self.value(node)

    def string(self, node: yaml.Node, where: str, *, nonempty: bool = True) -> str | None:
        value = self.scalar(node, where, "a string")
        if value is None:
            return None
        if not isinstance(value, str):
            value = str(value)
        if nonempty and not value.strip():
            self.problem(node, where, "must not be empty")
            return None
        return value

    def choice(self, node: yaml.Node, where: str, choices: tuple[str, ...],
               aliases: dict[str, str] | None = None) -> str | None:
        value = self.scalar(node, where, "a string")
        if value is None:
            return None
        if value not in choices:
            # `dtype: bf16` gets "did you mean 'bfloat16'?" (issue 11.4): common
            # spellings first, then whatever is close.
            alias = (aliases or {}).get(str(value).lower())
            hint = f" (did you mean {alias!r}?)" if alias else did_you_mean(str(value), choices)
            self.problem(node, where, f"{value!r} is not one of {', '.join(choices)}{hint}")
            return None
        return value

    def boolean(self, node: yaml.Node, where: str) -> bool | None:
        value = self.scalar(node, where, "true or false")
        if not isinstance(value, bool):
            if value is not None:
                self.problem(node, where, f"expected true or false, got {value!r}")
            return None
        return value

    def integer(self, node: yaml.Node, where: str, *, minimum: int = 0) -> int | None:
        value = self.scalar(node, where, "a whole number")
        if isinstance(value, bool) or not isinstance(value, int):
            if value is not None:
                self.problem(node, where, f"expected a whole number, got {value!r}")
            return None
        if value < minimum:
            self.problem(node, where, f"must be at least {minimum}, got {value}")
            return None
        return value

    def duration(self, node: yaml.Node, where: str) -> float | None:
        """``2s``, ``15m``, ``1h``, ``500ms``, ``30d``; a bare number needs a unit, except 0 (issue 11.4).

        ``idle_unload: 15`` read as seconds surprised everyone who meant
        minutes, so a number alone is refused rather than guessed at.
        """
        value = self.scalar(node, where, "a duration like 2s")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value == 0:
                return 0.0
            self.problem(node, where, f"{value!r} needs a unit: {value}s, {value}m or {value}h")
            return None
        m = _DURATION.match(str(value)) if isinstance(value, str) else None
        if m is None or m.group(2) is None and float(m.group(1)) != 0:
            if m is not None:
                self.problem(node, where, f"{value!r} needs a unit: {m.group(1)}s, {m.group(1)}m or {m.group(1)}h")
            elif value is not None:
                self.problem(node, where, f"expected a duration like 2s, 15m or 1h, got {value!r}")
            return None
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]

    def size(self, node: yaml.Node, where: str) -> int | None:
        """``22GiB``, ``500MB``, ``1.5TiB``; a bare number is refused: 22 would be 22 bytes (issue 11.4)."""
        value = self.scalar(node, where, "a size like 22GiB")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.problem(node, where, f"{value!r} needs a unit, like {value}GiB or {value}GB "
                                      f"(a bare number would be bytes)")
            return None
        parts = size_parts(value) if isinstance(value, str) else None
        if parts is None or parts[1] is None:
            if parts is not None:
                number = value.strip()  # type: ignore[union-attr]
                self.problem(node, where, f"{value!r} needs a unit, like {number}GiB or {number}GB "
                                          f"(a bare number would be bytes)")
            elif value is not None:
                self.problem(node, where, f"expected a size like 22GiB or 500MB, got {value!r}")
            return None
        size = int(parts[0] * SIZE_UNITS[parts[1]])
        if size <= 0:
            self.problem(node, where, f"must be more than 0, got {value!r}")
            return None
        return size

    def path(self, node: yaml.Node, where: str) -> Path | None:
        value = self.string(node, where)
        if value is None:
            return None
        p = Path(os.path.expandvars(value)).expanduser()
        # Relative paths are relative to the config file, not to wherever the
        # daemon happens to be started from (systemd starts it in /), and all
        # of them absolute and normalised (issue 10.1).
        return canonical(p if p.is_absolute() else (self.base / p))

    def is_null(self, node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def string_list(self, node: yaml.Node, where: str) -> list[tuple[str, yaml.Node]]:
        """A list of strings; a single string is taken as a list of one."""
        if isinstance(node, yaml.ScalarNode):
            s = self.string(node, where)
            return [(s, node)] if s is not None else []
        out = []
        for i, item in enumerate(self.sequence(node, where)):
            s = self.string(item, f"{where}[{i}]")
            if s is not None:
                out.append((s, item))
        return out


def did_you_mean(key: str, allowed: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
