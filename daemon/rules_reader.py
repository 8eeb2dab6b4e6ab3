"""The rules of a config and of the rule packs it includes: each rule read and checked, with file:line.

A rule maps a glob to a task, a prompt template and an output (``daemon.
config.Rule``).  Read here: its keys (the template's ``$names``, the globs,
pages, formats, the temperature ladder, the hooks and webhook it names),
the bundled or user packs of ``include:``, a task's default prompt where a
rule gives none, and one rule per name across the config and its packs.
``config_reader`` calls ``read_rules``, ``read_packs``, ``unique_rules`` and
``with_default_prompt``; the hooks section reuses ``read_argv`` and
``_read_webhook``.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from wcmatch import glob as wcglob

from daemon.config import (ANSWER_FORMATS, DEFAULT_OUTPUT, FORMAT_ALIASES, FORMATS, GLOB_FLAGS, IMAGE_GLOBS, OUTPUTS,
                           TASKS, TEMPLATE_VARIABLES, PageRanges, Rule, bundled_packs, canonical, parse_pages)
from daemon.config_nodes import Reader, did_you_mean
from daemon.errors import Problem
from daemon.webhooks import url_problem


RULE_KEYS = ("name", "match", "task", "prompt", "output", "also", "csp", "raw_html", "objects", "max_new_tokens",
              "min_pixels", "max_pixels", "formats", "pages", "reference", "on_done", "on_failed",
              "webhook", "answers", "temperatures", "longest_side")
#: Tries of one page at most: each is a whole generation.
MAX_TRIES = 16


def read_argv(r: Reader, node: yaml.Node, where: str) -> tuple[str, ...] | None:
    """A command as an argv list (no shell): ``[notify-send, vlwatch, done]``."""
    if r.is_null(node):
        return None
    if not isinstance(node, yaml.SequenceNode):
        r.problem(node, where, "expected a command as a list of words, like [notify-send, vlwatch, done] "
                               "(no shell: use [sh, -c, '...'] for one)")
        return None
    argv = [s for s, _ in r.string_list(node, where)]
    if not argv:
        r.problem(node, where, "must name a command")
        return None
    return tuple(argv)


def _read_webhook(r: Reader, node: yaml.Node, where: str) -> str | None:
    url = r.string(node, where)
    if url is None:
        return None
    if (problem := url_problem(url)) is not None:
        r.problem(node, where, problem)
        return None
    return url.strip()


def _read_reference(r: Reader, node: yaml.Node, where: str) -> tuple[Path, ...]:
    """Reference images, relative to the file that defines the rule.

    A missing one is a warning, like a watch folder not mounted yet: the
    machine that checks a config may not have it; the rule's jobs fail with
    its name until it is there.
    """
    out: list[Path] = []
    for value, n in r.string_list(node, where):
        p = Path(os.path.expandvars(value)).expanduser()
        p = Path(os.path.normpath((p if p.is_absolute() else r.base / p).absolute()))
        if not p.is_file():
            r.warn(n, where, f"reference image {p} does not exist (yet); this rule's files fail until it does")
        out.append(p)
    return tuple(out)


def read_rules(r: Reader, node: yaml.Node, where: str) -> list[tuple[Rule, yaml.Node]]:
    out = []
    for i, item in enumerate(r.sequence(node, where)):
        rule = _read_rule(r, item, f"{where}[{i}]")
        if rule is not None:
            out.append((rule, item))
    return out


def _read_rule(r: Reader, node: yaml.Node, where: str) -> Rule | None:
    keys = r.mapping(node, where, RULE_KEYS)
    missing = [k for k in ("name", "task") if k not in keys]
    if missing:
        r.problem(node, where, f"missing required key {', '.join(repr(m) for m in missing)}")
        return None
    name = r.string(keys["name"], f"{where}.name")
    if name is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        # The name goes into sidecar file names: keep it a plain word.
        r.problem(keys["name"], f"{where}.name", f"{name!r} must be letters, digits, '-', '_' or '.'")
        name = None
    task = r.choice(keys["task"], f"{where}.task", TASKS)
    output = r.choice(keys["output"], f"{where}.output", OUTPUTS) if "output" in keys else DEFAULT_OUTPUT.get(task or "")
    if output is None and task == "custom" and "output" not in keys:
        r.problem(node, where, "a custom rule needs 'output' (md, html or json)")
    if task == "ground" and output not in (None, "json"):
        r.problem(keys["output"], f"{where}.output", "a ground rule writes json (boxes and an overlay)")
    if task == "code" and output not in (None, "html"):
        r.problem(keys["output"], f"{where}.output", "a code rule writes html")
    prompt = None
    if "prompt" in keys:
        prompt = r.string(keys["prompt"], f"{where}.prompt")
        if prompt is not None and not _check_template(r, keys["prompt"], f"{where}.prompt", prompt):
            prompt = None
    elif task == "custom":
        r.problem(node, where, "a custom rule needs a 'prompt'")
    match = IMAGE_GLOBS
    if "match" in keys:
        globs = r.string_list(keys["match"], f"{where}.match")
        for g, n in globs:
            if (msg := _glob_problem(g)) is not None:
                r.problem(n, f"{where}.match", f"bad glob {g!r}: {msg}")
        match = tuple(g for g, _ in globs)
        if not match:
            r.problem(keys["match"], f"{where}.match", "must list at least one glob")
    kw: dict[str, Any] = {}
    for k in ("also", "csp", "raw_html"):
        if k in keys:
            kw[k] = r.boolean(keys[k], f"{where}.{k}")
    if "objects" in keys:
        kw["objects"] = r.string(keys["objects"], f"{where}.objects")
    for k in ("max_new_tokens", "min_pixels", "max_pixels", "longest_side"):
        if k in keys:
            kw[k] = r.integer(keys[k], f"{where}.{k}", minimum=1)
    if "answers" in keys:
        kw["answers"] = r.choice(keys["answers"], f"{where}.answers", ANSWER_FORMATS)
        if kw["answers"] == "olmocr" and output not in (None, "md"):
            r.problem(keys["answers"], f"{where}.answers", "olmocr answers make one Markdown document: output md")
    if "temperatures" in keys:
        kw["temperatures"] = _read_temperatures(r, keys["temperatures"], f"{where}.temperatures")
        if "answers" not in keys:
            r.problem(keys["temperatures"], f"{where}.temperatures",
                      "retries need a way to tell a bad answer: set answers (one of "
                      f"{', '.join(ANSWER_FORMATS)}) too")
    if "formats" in keys:
        kw["formats"] = _read_formats(r, keys["formats"], f"{where}.formats")
    if "pages" in keys:
        kw["pages"] = _read_pages(r, keys["pages"], f"{where}.pages")
    if "reference" in keys:
        kw["reference"] = _read_reference(r, keys["reference"], f"{where}.reference") or None
    for k in ("on_done", "on_failed"):
        if k in keys:
            kw[k] = read_argv(r, keys[k], f"{where}.{k}")
    if "webhook" in keys and not r.is_null(keys["webhook"]):
        kw["webhook"] = _read_webhook(r, keys["webhook"], f"{where}.webhook")
    if name is None or task is None or output is None or (prompt is None and ("prompt" in keys or task == "custom")):
        return None
    line = node.start_mark.line + 1
    return Rule(name=name, match=match, task=task, prompt=prompt or "", output=output,
                source=f"{r.file}:{line}", **{k: v for k, v in kw.items() if v is not None})


def _read_temperatures(r: Reader, node: yaml.Node, where: str) -> tuple[float, ...] | None:
    """``temperatures: [0.1, 0.1, 0.2, 0.3]``: one per try of a page, 0 (greedy) to 2."""
    out: list[float] = []
    items = r.sequence(node, where)
    for n in items:
        value = r.scalar(n, where, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
            if value is not None:
                r.problem(n, where, f"expected a temperature from 0 to 2, got {value!r}")
            continue
        out.append(float(value))
    if isinstance(node, yaml.SequenceNode) and not items:
        r.problem(node, where, "must list at least one temperature (one per try)")
    if len(items) > MAX_TRIES:
        r.problem(node, where, f"at most {MAX_TRIES} tries (each is a whole generation)")
    return tuple(out) or None


def _read_formats(r: Reader, node: yaml.Node, where: str) -> tuple[str, ...] | None:
    out: list[str] = []
    given = r.string_list(node, where)
    for value, n in given:
        fmt = value.strip().lower().lstrip(".")
        fmt = FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in FORMATS:
            r.problem(n, where, f"{value!r} is not one of {', '.join(FORMATS)}{did_you_mean(fmt, FORMATS)}")
        elif fmt not in out:
            out.append(fmt)
    if not given and isinstance(node, yaml.SequenceNode):
        r.problem(node, where, "must list at least one format")
    return tuple(out) or None


def _read_pages(r: Reader, node: yaml.Node, where: str) -> PageRanges | None:
    """``pages: 1``, ``pages: "1-3,7-"`` or ``pages: [1, "4-6"]``."""
    items = r.sequence(node, where) if isinstance(node, yaml.SequenceNode) else [node]
    ranges: list[tuple[int, int | None]] = []
    for n in items:
        value = r.scalar(n, where, "a page number or a range like 1-3")
        if value is None:
            continue
        try:
            ranges.extend(parse_pages(value if isinstance(value, (int, str)) and not isinstance(value, bool) else "?"))
        except ValueError as exc:
            r.problem(n, where, str(exc))
    return tuple(ranges) or None


def _check_template(r: Reader, node: yaml.Node, where: str, text: str) -> bool:
    template = string.Template(text)
    if not template.is_valid():
        r.problem(node, where, "invalid template: a '$' must start $name or ${name}; write $$ for a literal $")
        return False
    unknown = sorted(set(template.get_identifiers()) - TEMPLATE_VARIABLES)
    if unknown:
        known = ", ".join(f"${v}" for v in sorted(TEMPLATE_VARIABLES))
        r.problem(node, where, f"unknown variable {', '.join('$' + u for u in unknown)}; known: {known}")
        return False
    return True


def _glob_problem(pattern: str) -> str | None:
    if pattern.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", pattern):
        return "must be relative to the watched folder"
    if ".." in pattern.replace("\\", "/").split("/"):
        return "must not climb out of the watched folder with '..'"
    if pattern.count("[") != pattern.count("]"):
        return "unbalanced [ ]"
    if pattern.count("{") != pattern.count("}"):
        return "unbalanced { }"
    try:
        wcglob.translate(pattern, flags=GLOB_FLAGS)
    except Exception as exc:  # wcmatch raises several types for bad patterns
        return str(exc)
    return None


def read_packs(r: Reader, include: list[tuple[str, yaml.Node]]) -> list[tuple[Rule, yaml.Node]]:
    bundled = bundled_packs()
    out: list[tuple[Rule, yaml.Node]] = []
    for i, (entry, node) in enumerate(include):
        if entry in bundled:
            pack = bundled[entry]
        elif entry.endswith((".yaml", ".yml")) or "/" in entry:
            pack = Path(os.path.expandvars(entry)).expanduser()
            pack = canonical(pack if pack.is_absolute() else r.base / pack)
            if not pack.is_file():
                r.problem(node, f"include[{i}]", f"rule file {pack} does not exist")
                continue
        else:
            names = ", ".join(sorted(bundled))
            r.problem(node, f"include[{i}]", f"no rule pack named {entry!r}{did_you_mean(entry, tuple(bundled))}; bundled: {names}")
            continue
        out.extend(_read_pack_file(r, pack))
    return out


def _read_pack_file(r: Reader, pack: Path) -> list[tuple[Rule, yaml.Node]]:
    try:
        text = pack.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        r.problems.append(Problem(str(pack), None, "", f"cannot read rule file: {exc}"))
        return []
    sub = Reader(str(pack), base=pack.parent)
    node = sub.compose(text)
    rules: list[tuple[Rule, yaml.Node]] = []
    if node is not None:
        keys = sub.mapping(node, "", ("rules",))
        if "rules" in keys:
            rules = read_rules(sub, keys["rules"], "rules")
        else:
            sub.problem(node, "", "a rule file holds a 'rules:' list")
    r.problems.extend(sub.problems)
    r.warnings.extend(sub.warnings)
    return rules


def with_default_prompt(r: Reader, rule: Rule) -> Rule:
    """A rule that names a task but no prompt gets the bundled pack's prompt for that task."""
    if rule.prompt:
        return rule
    pack = bundled_packs().get(rule.task)
    if pack is not None:
        sub = Reader(str(pack), base=pack.parent)
        for default, _ in _read_pack_file(sub, pack):
            if default.name == rule.task and default.prompt:
                return replace(rule, prompt=default.prompt)
    r.problems.append(Problem(rule.source, None, rule.name, f"no prompt given and no bundled default for task {rule.task!r}"))
    return rule


def unique_rules(r: Reader, rules: list[tuple[Rule, yaml.Node]]) -> list[tuple[Rule, yaml.Node]]:
    """Drop (and report) a second rule of the same name.

    A second definition is almost always a copy-paste slip or a config rule
    that collides with an included pack, so it is an error rather than a
    silent override.  It is reported where the user can fix it: in the
    config file when one of the two is there.
    """
    seen: dict[str, tuple[Rule, yaml.Node]] = {}
    out = []
    for rule, node in rules:
        if rule.name not in seen:
            seen[rule.name] = (rule, node)
            out.append((rule, node))
            continue
        first, first_node = seen[rule.name]
        here, here_node, other = (rule, node, first)
        if not rule.source.startswith(r.file + ":") and first.source.startswith(r.file + ":"):
            here, here_node, other = first, first_node, rule
        r.problems.append(Problem(here.source.rsplit(":", 1)[0], here_node.start_mark.line + 1, "name",
                                  f"rule {rule.name!r} is also defined at {other.source}; rename one "
                                  "(or drop the pack from include)"))
    return out
