"""Read and validate config.yaml and the rule packs it includes, into ``daemon.config``'s dataclasses.

``parse_config`` reads the text with ``yaml.compose`` (the safe loader's
node graph) so that each value keeps its line number; nothing in a config
can construct Python objects, and prompt templates are plain ``$name``
substitutions (``string.Template``).  Validation is complete before anything
runs: every problem is collected with its file and line
(``config.yaml:14: rules[2].output: 'pdf' is not one of md, html, json``)
and reported at once, as a ``ConfigError``.  ``check``, ``run`` and every
other command share this loader (``load_config``: find, read, parse); only
their exit codes differ.

Things that may legitimately be missing on the machine that checks a config
(the model weights, a watch folder not mounted yet) are warnings, not errors.
"""

from __future__ import annotations

import os
import re
import string
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from wcmatch import glob as wcglob

from daemon.config import (ANSWER_FORMATS, ATTENTIONS, BACKENDS, COMPILE_PARTS, DECODE_ATTENTIONS, DEFAULT_LISTEN,
                           DEFAULT_OUTPUT, ENGINE_KEYS, FORMAT_ALIASES, FORMATS, GLOB_FLAGS, EngineOptions, IMAGE_GLOBS, OUTPUTS, TASKS, TEMPLATE_VARIABLES, ApiConfig, Config,
                           HooksConfig, JobsConfig, ModelConfig, PageRanges, Rule, WatchConfig, bundled_packs, canonical, default_state_path,
                           find_config, is_loopback_host, load_plugins, local_model_path, parse_pages, split_host_port)
from daemon.config import QUANTIZATIONS  # model.quantization (issue 23)
from daemon.plan import canonical_name
from daemon import env
from daemon.errors import ConfigError, ExitCode, Problem, VlwatchError
from daemon.webhooks import url_problem


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Find, read and validate the config; raise ``ConfigError`` listing every problem."""
    env.warn_removed()  # an engine switch left in a systemd unit from before the engine: section
    load_plugins()
    path = find_config(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VlwatchError(f"{path}: cannot read config: {exc}", ExitCode.USAGE) from exc
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    path = canonical(path)
    reader = _Reader(str(path), base=path.parent)
    node = reader.compose(text)
    config = _read_config(reader, node, path) if node is not None else None
    if reader.problems or config is None:
        problems = reader.problems or [Problem(str(path), None, "", "empty config")]
        # Report in file order (the config first, then each pack), as a reader scans them.
        order = {f: i for i, f in enumerate(dict.fromkeys([str(path)] + [p.file for p in problems]))}
        raise ConfigError(sorted(problems, key=lambda p: (order[p.file], p.line or 0)))
    return config



# ------------------------------------------------------------------------ reader


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class _Reader:
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
                hint = _did_you_mean(str(key), allowed)
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
    def _scalar(self, node: yaml.Node, where: str, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, where, f"expected {what}")
            return None
        return self.value(node)

    def string(self, node: yaml.Node, where: str, *, nonempty: bool = True) -> str | None:
        value = self._scalar(node, where, "a string")
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
        value = self._scalar(node, where, "a string")
        if value is None:
            return None
        if value not in choices:
            # `dtype: bf16` gets "did you mean 'bfloat16'?" (issue 11.4): common
            # spellings first, then whatever is close.
            alias = (aliases or {}).get(str(value).lower())
            hint = f" (did you mean {alias!r}?)" if alias else _did_you_mean(str(value), choices)
            self.problem(node, where, f"{value!r} is not one of {', '.join(choices)}{hint}")
            return None
        return value

    def boolean(self, node: yaml.Node, where: str) -> bool | None:
        value = self._scalar(node, where, "true or false")
        if not isinstance(value, bool):
            if value is not None:
                self.problem(node, where, f"expected true or false, got {value!r}")
            return None
        return value

    def integer(self, node: yaml.Node, where: str, *, minimum: int = 0) -> int | None:
        value = self._scalar(node, where, "a whole number")
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
        value = self._scalar(node, where, "a duration like 2s")
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
        value = self._scalar(node, where, "a size like 22GiB")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.problem(node, where, f"{value!r} needs a unit, like {value}GiB or {value}GB "
                                      f"(a bare number would be bytes)")
            return None
        m = _SIZE.match(str(value)) if isinstance(value, str) else None
        if m is None or m.group(2) is None:
            if m is not None:
                self.problem(node, where, f"{value!r} needs a unit, like {m.group(1)}GiB or {m.group(1)}GB "
                                          f"(a bare number would be bytes)")
            elif value is not None:
                self.problem(node, where, f"expected a size like 22GiB or 500MB, got {value!r}")
            return None
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
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


def _did_you_mean(key: str, allowed: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------- sections

_TOP_KEYS = ("model", "engine", "state", "include", "watch", "rules", "jobs", "api", "hooks")
_MODEL_KEYS = ("backend", "name", "attention", "dtype", "device", "devices", "min_pixels", "max_pixels", "batch_size",
               "max_gpu_memory", "max_new_tokens", "quantization", "idle_unload", "base_url", "api_key_env",
               "max_concurrency", "timeout")
_WATCH_KEYS = ("path", "rules", "recursive", "polling", "settle", "output_dir", "follow_symlinks_out")
_RULE_KEYS = ("name", "match", "task", "prompt", "output", "also", "csp", "raw_html", "objects", "max_new_tokens",
              "min_pixels", "max_pixels", "formats", "pages", "reference", "on_done", "on_failed",
              "webhook", "answers", "temperatures", "longest_side")
_JOBS_KEYS = ("attempts", "backoff", "rescan", "keep_history", "batch_wait", "redo_outdated")
_API_KEYS = ("listen", "token_env", "sync_wait", "http_sources", "max_context", "max_pdf_pages",
             "max_request_pixels")
_HOOKS_KEYS = ("on_done", "on_failed", "timeout")




def _read_config(r: _Reader, node: yaml.Node, path: Path) -> Config | None:
    keys = r.mapping(node, "", _TOP_KEYS)
    model = _read_model(r, keys["model"]) if "model" in keys else ModelConfig()
    state = default_state_path()
    if "state" in keys and (p := r.path(keys["state"], "state")) is not None:
        state = p
    jobs = _read_jobs(r, keys["jobs"]) if "jobs" in keys else JobsConfig()
    api = _read_api(r, keys["api"]) if "api" in keys else ApiConfig()
    hooks = _read_hooks(r, keys["hooks"]) if "hooks" in keys else HooksConfig()
    engine = _read_engine(r, keys["engine"], "engine") if "engine" in keys else EngineOptions()
    if model.dtype == "float16" and not engine.allow_fp16:
        # Qwen2.5-VL was trained in bfloat16: in float16 its activations overflow and the logits turn NaN.
        r.problem(keys["model"], "model.dtype", "float16 overflows Qwen2.5-VL (NaN logits); use bfloat16 or "
                                                "float32, or set engine.allow_fp16: true to insist")

    own_rules = _read_rules(r, keys["rules"], "rules") if "rules" in keys else []
    include = [(s, n) for s, n in r.string_list(keys["include"], "include")] if "include" in keys else []
    pack_rules = _read_packs(r, include)
    rules = _unique_rules(r, own_rules + pack_rules)
    rules = [(_with_default_prompt(r, rule), n) for rule, n in rules]

    watch = []
    if "watch" in keys:
        for i, item in enumerate(r.sequence(keys["watch"], "watch")):
            w = _read_watch(r, item, f"watch[{i}]", {rule.name for rule, _ in rules})
            if w is not None:
                watch.append(w)

    if not rules and not _has_rule_problems(r):
        # A config with no rules used to pass `check` and make `run` load the
        # model only to ignore every file (issue 11.2).
        packs = ", ".join(sorted(bundled_packs()))
        r.problem(keys.get("rules") or keys.get("include") or node, "rules",
                  f"no rules: nothing will be processed; include a bundled pack (include: [{packs}]) "
                  "or write rules of your own")
    model_warning = None
    if model.backend == "transformers":
        model_warning = _check_model_present(r, keys.get("model"), model.name)
    return Config(
        model=model, state=state, include=tuple(s for s, _ in include), watch=tuple(watch),
        rules=tuple(rule for rule, _ in rules), jobs=jobs, api=api, hooks=hooks, engine=engine, source=path,
        warnings=tuple(r.warnings), model_warning=model_warning,
    )


def _has_rule_problems(r: _Reader) -> bool:
    """Whether rules were given but refused (then "no rules" would only add noise)."""
    return any(p.where.startswith(("rules", "include", "name")) or p.file != r.file for p in r.problems)


def _read_model(r: _Reader, node: yaml.Node) -> ModelConfig:
    keys = r.mapping(node, "model", _MODEL_KEYS)
    kw: dict[str, Any] = {}
    w = "model."
    if "backend" in keys:
        kw["backend"] = r.choice(keys["backend"], w + "backend", _known_backends())
    if "name" in keys:
        kw["name"] = r.string(keys["name"], w + "name")
        if kw["name"] and kw["name"].startswith(("~", "$")):
            kw["name"] = os.path.expandvars(str(Path(kw["name"]).expanduser()))
        elif kw["name"] and not Path(kw["name"]).is_dir():
            kw["name"] = canonical_name(kw["name"])  # `name: 3b` -> Qwen/Qwen2.5-VL-3B-Instruct (issue 23)
    if "attention" in keys:
        kw["attention"] = r.choice(keys["attention"], w + "attention", ATTENTIONS)
    if "dtype" in keys:
        kw["dtype"] = r.choice(keys["dtype"], w + "dtype", DTYPES, DTYPE_ALIASES)
    if "quantization" in keys:
        kw["quantization"] = r.choice(keys["quantization"], w + "quantization", QUANTIZATIONS,
                                      {"bf16": "none", "bfloat16": "none", "float8": "fp8", "fp8_e4m3": "fp8"})
    if "device" in keys:
        kw["device"] = _read_device(r, keys["device"], w + "device",
                                    local=kw.get("backend", "transformers") == "transformers")
    if "devices" in keys and not r.is_null(keys["devices"]):
        if r.value(keys["devices"]) == "auto":
            kw["devices"] = ("auto",)
        else:
            kw["devices"] = tuple(d for d, _ in r.string_list(keys["devices"], w + "devices"))
    for k in ("min_pixels", "max_pixels", "max_new_tokens"):
        if k in keys:
            kw[k] = r.integer(keys[k], w + k, minimum=1)
    if "batch_size" in keys:
        n = keys["batch_size"]
        kw["batch_size"] = None if r.value(n) == "auto" else r.integer(n, w + "batch_size", minimum=1)
    if "max_gpu_memory" in keys and not r.is_null(keys["max_gpu_memory"]):
        kw["max_gpu_memory"] = r.size(keys["max_gpu_memory"], w + "max_gpu_memory")
    for k in ("idle_unload", "timeout"):
        if k in keys:
            kw[k] = r.duration(keys[k], w + k)
    if "base_url" in keys:
        urls = r.string_list(keys["base_url"], w + "base_url")
        for url, n in urls:
            if not re.match(r"^https?://[^/\s]+", url):
                r.problem(n, w + "base_url", f"{url!r} is not an http(s) URL")
        kw["base_url"] = tuple(u for u, _ in urls) or None
    if "api_key_env" in keys and not r.is_null(keys["api_key_env"]):
        name = r.string(keys["api_key_env"], w + "api_key_env")
        if name and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            # Catches the mistake of pasting the key itself here.
            r.problem(keys["api_key_env"], w + "api_key_env",
                      "must be the NAME of an environment variable holding the key, not the key")
            name = None
        kw["api_key_env"] = name
    if "max_concurrency" in keys:
        kw["max_concurrency"] = r.integer(keys["max_concurrency"], w + "max_concurrency", minimum=1)
    kw = {k: v for k, v in kw.items() if v is not None}
    model = ModelConfig(**kw)
    if model.min_pixels > model.max_pixels:
        r.problem(keys.get("min_pixels") or node, w + "min_pixels", "must not exceed max_pixels")
    return model


DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
                 "fp32": "float32", "f32": "float32", "float": "float32", "full": "float32"}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "gpu0": "cuda:0", "gpu:0": "cuda:0",
                  "cuda1": "cuda:1", "gpu1": "cuda:1", "gpu:1": "cuda:1"}


def _read_device(r: _Reader, node: yaml.Node, where: str, *, local: bool = True) -> str | None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a CUDA device this machine lacks is a problem.

    ``device: gpu`` or ``device: cuda`` on a machine without one used to pass
    `check` and end in a traceback at the first job (issue 11.4).
    """
    value = r.string(node, where)
    if value is None:
        return None
    if not _DEVICE.match(value):
        alias = DEVICE_ALIASES.get(value.lower())
        hint = f" (did you mean {alias!r}?)" if alias else ""
        r.problem(node, where, f"{value!r} is not a device: auto, cpu, cuda, cuda:N (N counts from 0) or mps{hint}")
        return None
    if local and value.startswith("cuda") and (problem := _cuda_problem(value)) is not None:
        r.problem(node, where, problem)
        return None
    return value


def _cuda_problem(device: str) -> str | None:
    """Why ``device`` (``cuda`` or ``cuda:N``) cannot be used here, or None.

    Imports torch only for a config that names a CUDA device; ``$VLWATCH_FAKE_CUDA_DEVICES``
    (a count) stands in for the GPUs in tests that have none.
    """
    fake = env.get(env.FAKE_CUDA_DEVICES)
    if fake is not None and fake.isdigit():
        count, why = int(fake), "no CUDA GPU"
    else:
        try:
            import torch
        except ImportError:
            return None
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        why = ("torch was built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES?)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if count == 0:
        return f"{device!r} but {why} on this machine; use device: auto (the GPU when there is one, else the CPU) or cpu"
    if index >= count:
        return f"{device!r} but this machine has {count} CUDA GPU{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})"
    return None


def _known_backends() -> tuple[str, ...]:
    """The built-in backends plus any a plugin registered (``$VLWATCH_PLUGINS``; the tests' fake).

    Read from ``sys.modules`` rather than imported: ``daemon.backends`` imports
    this module, and a plugin has loaded it by the time a config names one.
    """
    registry = getattr(sys.modules.get("daemon.backends"), "_REGISTRY", {})
    return tuple(dict.fromkeys((*BACKENDS, *registry)))


def _read_jobs(r: _Reader, node: yaml.Node) -> JobsConfig:
    keys = r.mapping(node, "jobs", _JOBS_KEYS)
    kw: dict[str, Any] = {}
    if "attempts" in keys:
        kw["attempts"] = r.integer(keys["attempts"], "jobs.attempts", minimum=1)
    for k in ("backoff", "rescan", "keep_history", "batch_wait"):
        if k in keys:
            kw[k] = r.duration(keys[k], f"jobs.{k}")
    if "redo_outdated" in keys:
        kw["redo_outdated"] = r.boolean(keys["redo_outdated"], "jobs.redo_outdated")
    return JobsConfig(**{k: v for k, v in kw.items() if v is not None})


def _read_api(r: _Reader, node: yaml.Node) -> ApiConfig:
    if r.is_null(node):
        return ApiConfig(listen=None)
    keys = r.mapping(node, "api", _API_KEYS)
    listen: str | None = DEFAULT_LISTEN
    if "listen" in keys:
        listen = None if r.is_null(keys["listen"]) else r.string(keys["listen"], "api.listen")
    token_env = None
    if "token_env" in keys and not r.is_null(keys["token_env"]):
        token_env = r.string(keys["token_env"], "api.token_env")
        if token_env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", token_env):
            r.problem(keys["token_env"], "api.token_env",
                      "must be the NAME of an environment variable holding the token, not the token")
            token_env = None
    extra: dict[str, Any] = {}
    if "sync_wait" in keys:
        extra["sync_wait"] = r.duration(keys["sync_wait"], "api.sync_wait")
    if "http_sources" in keys:
        extra["http_sources"] = r.boolean(keys["http_sources"], "api.http_sources")
    extra = {k: v for k, v in extra.items() if v is not None}
    for key in ("max_context", "max_pdf_pages", "max_request_pixels"):
        if key in keys:
            extra[key] = r.integer(keys[key], f"api.{key}", minimum=1)
    extra = {k: v for k, v in extra.items() if v is not None}
    where = keys.get("listen", node)
    if listen is not None and listen.startswith("unix:"):
        socket_path = Path(os.path.expandvars(listen[5:])).expanduser()
        if not socket_path.is_absolute():
            r.problem(where, "api.listen", f"{listen!r}: a unix socket needs an absolute path, like unix:/run/vlwatch/api.sock")
        listen = f"unix:{socket_path}"
    elif listen is not None:
        try:
            host, _ = split_host_port(listen)
        except ValueError as exc:
            r.problem(where, "api.listen", str(exc))
            return ApiConfig(listen=None, token_env=token_env, **extra)
        if not is_loopback_host(host) and token_env is None:
            # Loopback is reachable by every local user already; anything
            # wider reaches the network, where the API must not be open.
            r.problem(where, "api.listen", f"{listen!r} is reachable from other machines: set api.token_env "
                                           "to the name of a variable holding a bearer token (or listen on "
                                           "127.0.0.1 or a unix: socket)")
    return ApiConfig(listen=listen, token_env=token_env, **extra)


def _read_engine(r: _Reader, node: yaml.Node, where: str) -> EngineOptions:
    """The ``engine:`` section; ``{}`` or null is every default (issue 22.3)."""
    if r.is_null(node):
        return EngineOptions()
    keys = r.mapping(node, where, ENGINE_KEYS)
    kw: dict[str, Any] = {}
    w = where + "."
    if "compile" in keys:
        kw["compile"] = _read_compile(r, keys["compile"], w + "compile")
    for k in ("cuda_graphs", "packed_prefill", "overlap_rounds", "vision_blocks", "vision_varlen", "fp8_rows_kernel",
              "allow_fp16"):
        if k in keys:
            kw[k] = r.boolean(keys[k], w + k)
    if "decode_attention" in keys:
        kw["decode_attention"] = r.choice(keys["decode_attention"], w + "decode_attention", DECODE_ATTENTIONS)
    if "engine_lost_after" in keys:
        kw["engine_lost_after"] = r.duration(keys["engine_lost_after"], w + "engine_lost_after")
        if kw["engine_lost_after"] is not None and kw["engine_lost_after"] < 1:
            r.problem(keys["engine_lost_after"], w + "engine_lost_after", "must be at least 1s")
            kw["engine_lost_after"] = None
    for k in ("step_tokens", "interactive_slots"):
        if k in keys:
            kw[k] = r.integer(keys[k], w + k, minimum=1 if k == "step_tokens" else 0)
    for k, lowest, highest in (("fp8_rows_split", 0, 8), ("fp8_rows_max", 1, 64)):  # 64: fp8_gemv.MAX_ROWS
        if k in keys:
            kw[k] = r.integer(keys[k], w + k, minimum=lowest)
            if kw[k] is not None and kw[k] > highest:
                r.problem(keys[k], w + k, f"must be at most {highest}, got {kw[k]}")
                kw[k] = None
    if "backlog_share" in keys:
        n = keys["backlog_share"]
        value = r._scalar(n, w + "backlog_share", "a number from 0 to 1")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            if value is not None:
                r.problem(n, w + "backlog_share", f"expected a number above 0 and at most 1, got {value!r}")
        else:
            kw["backlog_share"] = float(value)
    return EngineOptions(**{k: v for k, v in kw.items() if v is not None})


def _read_compile(r: _Reader, node: yaml.Node, where: str) -> tuple[str, ...] | None:
    """``compile: true`` (every part), ``false`` (none), or the parts: ``[decode, prefill]``."""
    if isinstance(node, yaml.ScalarNode) and isinstance(r.value(node), bool):
        return COMPILE_PARTS if r.value(node) else ()
    if not isinstance(node, yaml.SequenceNode):
        r.problem(node, where, f"expected true, false or a list of parts ({', '.join(COMPILE_PARTS)})")
        return None
    parts = [r.choice(n, where, COMPILE_PARTS) for n in node.value]
    return tuple(p for p in COMPILE_PARTS if p in parts)


def parse_engine_options(pairs: list[str], base: EngineOptions | None = None) -> EngineOptions:
    """``KEY=VALUE`` strings (``vlwatch bench --engine``) on top of ``base``, read like the config's ``engine:``.

    Each pair is one line of a YAML mapping, so a problem reads ``--engine:2: engine.packed_prefill: ...``
    for the second ``--engine``.

    Raises:
        ConfigError: every problem, as the config loader reports them.
    """
    from dataclasses import asdict

    r = _Reader("--engine", base=Path.cwd())
    lines = []
    for i, pair in enumerate(pairs):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            r.problems.append(Problem("--engine", i + 1, "", f"{pair!r} is not KEY=VALUE (like packed_prefill=false)"))
            lines.append("{}")  # keeps the line numbers of the pairs after it
            continue
        lines.append(f"{key.strip()}: {value.strip() or 'null'}")
    node = r.compose("\n".join(f"- {line}" for line in lines)) if lines else None
    kw: dict[str, Any] = {}
    for item in (node.value if isinstance(node, yaml.SequenceNode) else []):
        got = _read_engine(r, item, "engine")
        given = [k.value for k, _ in item.value] if isinstance(item, yaml.MappingNode) else []
        kw.update({k: getattr(got, k) for k in given if k in ENGINE_KEYS})
    if r.problems:
        raise ConfigError(sorted(r.problems, key=lambda p: p.line or 0))
    return EngineOptions(**{**asdict(base or EngineOptions()), **kw})


def _read_argv(r: _Reader, node: yaml.Node, where: str) -> tuple[str, ...] | None:
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


def _read_webhook(r: _Reader, node: yaml.Node, where: str) -> str | None:
    url = r.string(node, where)
    if url is None:
        return None
    if (problem := url_problem(url)) is not None:
        r.problem(node, where, problem)
        return None
    return url.strip()


def _read_hooks(r: _Reader, node: yaml.Node) -> HooksConfig:
    keys = r.mapping(node, "hooks", _HOOKS_KEYS)
    kw: dict[str, Any] = {}
    for k in ("on_done", "on_failed"):
        if k in keys:
            kw[k] = _read_argv(r, keys[k], f"hooks.{k}")
    if "timeout" in keys:
        kw["timeout"] = r.duration(keys["timeout"], "hooks.timeout")
    return HooksConfig(**{k: v for k, v in kw.items() if v is not None})


def _read_reference(r: _Reader, node: yaml.Node, where: str) -> tuple[Path, ...]:
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


def _read_watch(r: _Reader, node: yaml.Node, where: str, rule_names: set[str]) -> WatchConfig | None:
    keys = r.mapping(node, where, _WATCH_KEYS)
    if "path" not in keys:
        r.problem(node, where, "missing required key 'path'")
        return None
    path = r.path(keys["path"], f"{where}.path")
    if path is None:
        return None
    kw: dict[str, Any] = {"path": path}
    if "rules" in keys:
        names = r.string_list(keys["rules"], f"{where}.rules")
        for name, n in names:
            if name not in rule_names and name in bundled_packs():
                # The bundled rule exists, it is just not included (issue 11.2).
                r.problem(n, f"{where}.rules", f"rule {name!r} is not defined; the bundled pack {name!r} defines it: "
                                               f"add it to include (include: [{name}])")
            elif name not in rule_names:
                r.problem(n, f"{where}.rules", f"rule {name!r} is not defined{_did_you_mean(name, tuple(rule_names))}")
        kw["rules"] = tuple(name for name, _ in names)
    for k in ("recursive", "polling", "follow_symlinks_out"):
        if k in keys:
            kw[k] = r.boolean(keys[k], f"{where}.{k}")
    if "settle" in keys:
        kw["settle"] = r.duration(keys["settle"], f"{where}.settle")
    if "output_dir" in keys and not r.is_null(keys["output_dir"]):
        kw["output_dir"] = r.path(keys["output_dir"], f"{where}.output_dir")
    if kw.get("output_dir") is not None and _same_folder(kw["output_dir"], path):
        # issue 10.4: sidecars beside the images is what no output_dir means;
        # treating the watched folder as an output tree would ignore every file.
        kw["output_dir"] = None
    watch = WatchConfig(**{k: v for k, v in kw.items() if v is not None})
    if not watch.path.is_dir():
        r.warn(keys["path"], f"{where}.path", f"folder {watch.path} does not exist (yet)")
    if watch.output_dir is not None and watch.recursive and _inside(watch.output_dir, watch.path):
        # The daemon never treats sidecars as input anyway, but an output tree
        # inside a recursive watch would still be rescanned forever (OCRmyPDF
        # refuses this for the same reason).
        r.warn(keys["output_dir"], f"{where}.output_dir", "is inside the watched folder; its files are ignored")
    return watch


def _same_folder(a: Path, b: Path) -> bool:
    """The same folder, by name or (once both exist) by identity."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _read_rules(r: _Reader, node: yaml.Node, where: str) -> list[tuple[Rule, yaml.Node]]:
    out = []
    for i, item in enumerate(r.sequence(node, where)):
        rule = _read_rule(r, item, f"{where}[{i}]")
        if rule is not None:
            out.append((rule, item))
    return out


def _read_rule(r: _Reader, node: yaml.Node, where: str) -> Rule | None:
    keys = r.mapping(node, where, _RULE_KEYS)
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
            kw[k] = _read_argv(r, keys[k], f"{where}.{k}")
    if "webhook" in keys and not r.is_null(keys["webhook"]):
        kw["webhook"] = _read_webhook(r, keys["webhook"], f"{where}.webhook")
    if name is None or task is None or output is None or (prompt is None and ("prompt" in keys or task == "custom")):
        return None
    line = node.start_mark.line + 1
    return Rule(name=name, match=match, task=task, prompt=prompt or "", output=output,
                source=f"{r.file}:{line}", **{k: v for k, v in kw.items() if v is not None})


#: Tries of one page at most: each is a whole generation.
MAX_TRIES = 16


def _read_temperatures(r: _Reader, node: yaml.Node, where: str) -> tuple[float, ...] | None:
    """``temperatures: [0.1, 0.1, 0.2, 0.3]``: one per try of a page, 0 (greedy) to 2."""
    out: list[float] = []
    items = r.sequence(node, where)
    for n in items:
        value = r._scalar(n, where, "a number")
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


def _read_formats(r: _Reader, node: yaml.Node, where: str) -> tuple[str, ...] | None:
    out: list[str] = []
    given = r.string_list(node, where)
    for value, n in given:
        fmt = value.strip().lower().lstrip(".")
        fmt = FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in FORMATS:
            r.problem(n, where, f"{value!r} is not one of {', '.join(FORMATS)}{_did_you_mean(fmt, FORMATS)}")
        elif fmt not in out:
            out.append(fmt)
    if not given and isinstance(node, yaml.SequenceNode):
        r.problem(node, where, "must list at least one format")
    return tuple(out) or None


def _read_pages(r: _Reader, node: yaml.Node, where: str) -> PageRanges | None:
    """``pages: 1``, ``pages: "1-3,7-"`` or ``pages: [1, "4-6"]``."""
    items = r.sequence(node, where) if isinstance(node, yaml.SequenceNode) else [node]
    ranges: list[tuple[int, int | None]] = []
    for n in items:
        value = r._scalar(n, where, "a page number or a range like 1-3")
        if value is None:
            continue
        try:
            ranges.extend(parse_pages(value if isinstance(value, (int, str)) and not isinstance(value, bool) else "?"))
        except ValueError as exc:
            r.problem(n, where, str(exc))
    return tuple(ranges) or None


def _check_template(r: _Reader, node: yaml.Node, where: str, text: str) -> bool:
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


def _read_packs(r: _Reader, include: list[tuple[str, yaml.Node]]) -> list[tuple[Rule, yaml.Node]]:
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
            r.problem(node, f"include[{i}]", f"no rule pack named {entry!r}{_did_you_mean(entry, tuple(bundled))}; bundled: {names}")
            continue
        out.extend(_read_pack_file(r, pack))
    return out


def _read_pack_file(r: _Reader, pack: Path) -> list[tuple[Rule, yaml.Node]]:
    try:
        text = pack.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        r.problems.append(Problem(str(pack), None, "", f"cannot read rule file: {exc}"))
        return []
    sub = _Reader(str(pack), base=pack.parent)
    node = sub.compose(text)
    rules: list[tuple[Rule, yaml.Node]] = []
    if node is not None:
        keys = sub.mapping(node, "", ("rules",))
        if "rules" in keys:
            rules = _read_rules(sub, keys["rules"], "rules")
        else:
            sub.problem(node, "", "a rule file holds a 'rules:' list")
    r.problems.extend(sub.problems)
    r.warnings.extend(sub.warnings)
    return rules


def _with_default_prompt(r: _Reader, rule: Rule) -> Rule:
    """A rule that names a task but no prompt gets the bundled pack's prompt for that task."""
    if rule.prompt:
        return rule
    pack = bundled_packs().get(rule.task)
    if pack is not None:
        sub = _Reader(str(pack), base=pack.parent)
        for default, _ in _read_pack_file(sub, pack):
            if default.name == rule.task and default.prompt:
                return replace(rule, prompt=default.prompt)
    r.problems.append(Problem(rule.source, None, rule.name, f"no prompt given and no bundled default for task {rule.task!r}"))
    return rule


def _unique_rules(r: _Reader, rules: list[tuple[Rule, yaml.Node]]) -> list[tuple[Rule, yaml.Node]]:
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


# -------------------------------------------------------------------- the model


def _check_model_present(r: _Reader, node: yaml.Node | None, name: str) -> str | None:
    """A warning (not a problem) when the weights are not on this machine: `check` must pass without them."""
    if local_model_path(name) is not None:
        return None
    # The line of `name:` itself (issue 27: the model mapping's first line was cited, often `backend:`);
    # the mapping's when the name is the default.
    line = node.start_mark.line + 1 if node is not None else None
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "name":
                line = value.start_mark.line + 1
    return str(Problem(r.file, line, "model.name", f"model {name!r} is not downloaded; run `vlwatch pull {name}` "
                                                   "or set model.name to a local directory"))





