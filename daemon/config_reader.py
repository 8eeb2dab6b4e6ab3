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

The sections (model, engine, jobs, api, hooks, watch) are read here; the
rules and packs in ``rules_reader``; both read nodes with
``config_nodes.Reader``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from daemon import env
from daemon.config import (ATTENTIONS, BACKENDS, COMPILE_PARTS, DECODE_ATTENTIONS, DEFAULT_LISTEN, ENGINE_KEYS,
                           FP8_WIDENS, KV_CACHE_DTYPES, QUANTIZATIONS, ApiConfig, Config, EngineOptions, HooksConfig,
                           JobsConfig, ModelConfig, WatchConfig, bundled_packs, canonical, default_state_path,
                           find_config, is_loopback_host, load_plugins, local_model_path, split_host_port)
from daemon.config_nodes import Reader, did_you_mean
from daemon.errors import ConfigError, ExitCode, Problem, VlwatchError
from daemon.plan import canonical_name
from daemon.rules_reader import read_argv, read_packs, read_rules, unique_rules, with_default_prompt


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
    reader = Reader(str(path), base=path.parent)
    node = reader.compose(text)
    config = _read_config(reader, node, path) if node is not None else None
    if reader.problems or config is None:
        problems = reader.problems or [Problem(str(path), None, "", "empty config")]
        # Report in file order (the config first, then each pack), as a reader scans them.
        order = {f: i for i, f in enumerate(dict.fromkeys([str(path)] + [p.file for p in problems]))}
        raise ConfigError(sorted(problems, key=lambda p: (order[p.file], p.line or 0)))
    return config


# --------------------------------------------------------------------- sections

TOP_KEYS = ("model", "engine", "state", "include", "watch", "rules", "jobs", "api", "hooks")
MODEL_KEYS = ("backend", "name", "attention", "dtype", "device", "devices", "min_pixels", "max_pixels", "batch_size",
               "max_gpu_memory", "max_new_tokens", "quantization", "kv_cache_dtype", "idle_unload", "base_url", "api_key_env",
               "max_concurrency", "timeout")
WATCH_KEYS = ("path", "rules", "recursive", "polling", "settle", "output_dir", "follow_symlinks_out")
JOBS_KEYS = ("attempts", "backoff", "rescan", "keep_history", "batch_wait", "redo_outdated")
API_KEYS = ("listen", "token_env", "sync_wait", "http_sources", "max_context", "max_pdf_pages",
             "max_request_pixels")
HOOKS_KEYS = ("on_done", "on_failed", "timeout")


def _read_config(r: Reader, node: yaml.Node, path: Path) -> Config | None:
    keys = r.mapping(node, "", TOP_KEYS)
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

    own_rules = read_rules(r, keys["rules"], "rules") if "rules" in keys else []
    include = [(s, n) for s, n in r.string_list(keys["include"], "include")] if "include" in keys else []
    pack_rules = read_packs(r, include)
    rules = unique_rules(r, own_rules + pack_rules)
    rules = [(with_default_prompt(r, rule), n) for rule, n in rules]

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


def _has_rule_problems(r: Reader) -> bool:
    """Whether rules were given but refused (then "no rules" would only add noise)."""
    return any(p.where.startswith(("rules", "include", "name")) or p.file != r.file for p in r.problems)


def _read_model(r: Reader, node: yaml.Node) -> ModelConfig:
    keys = r.mapping(node, "model", MODEL_KEYS)
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
    if "kv_cache_dtype" in keys:
        kw["kv_cache_dtype"] = r.choice(keys["kv_cache_dtype"], w + "kv_cache_dtype", KV_CACHE_DTYPES,
                                        {"float8": "fp8", "fp8_e4m3": "fp8"})
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


def _read_device(r: Reader, node: yaml.Node, where: str, *, local: bool = True) -> str | None:
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


def _read_jobs(r: Reader, node: yaml.Node) -> JobsConfig:
    keys = r.mapping(node, "jobs", JOBS_KEYS)
    kw: dict[str, Any] = {}
    if "attempts" in keys:
        kw["attempts"] = r.integer(keys["attempts"], "jobs.attempts", minimum=1)
    for k in ("backoff", "rescan", "keep_history", "batch_wait"):
        if k in keys:
            kw[k] = r.duration(keys[k], f"jobs.{k}")
    if "redo_outdated" in keys:
        kw["redo_outdated"] = r.boolean(keys["redo_outdated"], "jobs.redo_outdated")
    return JobsConfig(**{k: v for k, v in kw.items() if v is not None})


def _read_api(r: Reader, node: yaml.Node) -> ApiConfig:
    if r.is_null(node):
        return ApiConfig(listen=None)
    keys = r.mapping(node, "api", API_KEYS)
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


def _read_engine(r: Reader, node: yaml.Node, where: str) -> EngineOptions:
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
    if "fp8_widen" in keys:
        kw["fp8_widen"] = r.choice(keys["fp8_widen"], w + "fp8_widen", FP8_WIDENS)
    if "engine_lost_after" in keys:
        kw["engine_lost_after"] = r.duration(keys["engine_lost_after"], w + "engine_lost_after")
        if kw["engine_lost_after"] is not None and kw["engine_lost_after"] < 1:
            r.problem(keys["engine_lost_after"], w + "engine_lost_after", "must be at least 1s")
            kw["engine_lost_after"] = None
    for k in ("step_tokens", "interactive_slots"):
        if k in keys:
            kw[k] = r.integer(keys[k], w + k, minimum=1 if k == "step_tokens" else 0)
    for k, lowest, highest in (("fp8_rows_split", 0, 8), ("fp8_rows_max", 1, 128)):  # 128: fp8_gemv.MAX_ROWS
        if k in keys:
            kw[k] = r.integer(keys[k], w + k, minimum=lowest)
            if kw[k] is not None and kw[k] > highest:
                r.problem(keys[k], w + k, f"must be at most {highest}, got {kw[k]}")
                kw[k] = None
    if "backlog_share" in keys:
        n = keys["backlog_share"]
        value = r.scalar(n, w + "backlog_share", "a number from 0 to 1")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            if value is not None:
                r.problem(n, w + "backlog_share", f"expected a number above 0 and at most 1, got {value!r}")
        else:
            kw["backlog_share"] = float(value)
    return EngineOptions(**{k: v for k, v in kw.items() if v is not None})


def _read_compile(r: Reader, node: yaml.Node, where: str) -> tuple[str, ...] | None:
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

    r = Reader("--engine", base=Path.cwd())
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


def _read_hooks(r: Reader, node: yaml.Node) -> HooksConfig:
    keys = r.mapping(node, "hooks", HOOKS_KEYS)
    kw: dict[str, Any] = {}
    for k in ("on_done", "on_failed"):
        if k in keys:
            kw[k] = read_argv(r, keys[k], f"hooks.{k}")
    if "timeout" in keys:
        kw["timeout"] = r.duration(keys["timeout"], "hooks.timeout")
    return HooksConfig(**{k: v for k, v in kw.items() if v is not None})


def _read_watch(r: Reader, node: yaml.Node, where: str, rule_names: set[str]) -> WatchConfig | None:
    keys = r.mapping(node, where, WATCH_KEYS)
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
                r.problem(n, f"{where}.rules", f"rule {name!r} is not defined{did_you_mean(name, tuple(rule_names))}")
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


# -------------------------------------------------------------------- the model


def _check_model_present(r: Reader, node: yaml.Node | None, name: str) -> str | None:
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


