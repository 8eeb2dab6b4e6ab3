"""``vlwatch init [DIR]``: a commented starter config, and the folders it names.

The first thing a newcomer runs (issue 11.3): it writes a config that passes
``vlwatch check`` as it stands and creates every folder it watches, so the
next steps are ``vlwatch pull``, ``vlwatch run`` and dropping an image in.
One inbox folder per bundled task (``inbox/ocr``, ``inbox/describe``,
``inbox/ground``, ``inbox/code``) shows every kind of sidecar without a rule
of one's own.

Without DIR the config goes where every command looks for it first after
``$VLWATCH_CONFIG`` (``$XDG_CONFIG_HOME/vlwatch/config.yaml``) and the inbox
under ``~/vlwatch``; with DIR, everything (config, inbox, state) sits inside
DIR, which is handy to try vlwatch out and to delete afterwards.

Deliberately not here: downloading the model (``vlwatch pull``) and
overwriting a config that exists (``--force`` does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from daemon.config import DEFAULT_MODEL, default_state_path
from daemon.config_reader import parse_config
from daemon.errors import ExitCode, VlwatchError

TASKS = ("ocr", "describe", "ground", "code")

_TEMPLATE = """\
# vlwatch config, written by `vlwatch init`.  Check it with `vlwatch check`;
# every key is described in the README ("Configuration").
# Relative paths are relative to this file; ~ and $VARS are expanded.

model:
  backend: transformers          # transformers (local GPU/CPU) | openai (an OpenAI-compatible server)
  # A model id in the local Hugging Face cache (`vlwatch pull` fetches it once,
  # about 16 GB; `3b` is Qwen/Qwen2.5-VL-3B-Instruct, 7.5 GB) or a local directory holding the weights.
  name: {model}
  device: auto                   # auto = cuda if present, else cpu; or cuda, cuda:1, cpu
  max_pixels: 1003520            # larger images are downscaled before the model sees them
  max_new_tokens: 2048
  # max_gpu_memory: 22GiB        # to fit a 24 GB card or share a GPU (sizes need a unit)
  # quantization: auto           # auto | none | fp8; `vlwatch plan --gpu-memory 12GiB` says what fits (name: 3b is smaller)
  # kv_cache_dtype: auto         # auto | fp8: half the KV cache per slot (RTX 40xx and later)
  idle_unload: 15m               # free GPU memory after this long with nothing to do

state: {state}   # the durable queue (SQLite)

# The bundled rule packs: each defines the rule of its name.
include: [ocr, describe, ground, code]

# Drop an image into one of these folders; its answer appears beside it:
#   inbox/ocr       -> IMAGE.ocr.md          all text, tables as Markdown
#   inbox/describe  -> IMAGE.describe.md     a structured description
#   inbox/ground    -> IMAGE.ground.json     boxes (+ IMAGE.ground.overlay.png)
#   inbox/code      -> IMAGE.code.html       an HTML page reproducing a screenshot
watch:
{watch}
# Rules of your own come first and may use a prompt of your own, e.g.:
# rules:
#   - name: receipts
#     match: ["receipts/**/*.jpg"]
#     task: custom
#     prompt: "List every item and price on the receipt $filename as a Markdown table."
#     output: md
"""

_WATCH = """\
  - path: {path}
    rules: [{task}]
    settle: 2s                   # complete once closed, or unchanged this long
"""


@dataclass(frozen=True)
class Initialised:
    """What ``init`` wrote: the config file and the folders it created (or found)."""

    config: Path
    inbox: dict[str, Path]
    default_location: bool


def default_dir() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg).expanduser() / "vlwatch"


def render(*, inbox: Path | str, state: str, model: str = DEFAULT_MODEL) -> str:
    """The config text, with one watched folder per bundled task under ``inbox``."""
    watch = "".join(_WATCH.format(path=_yaml_str(f"{inbox}/{task}"), task=task) for task in TASKS)
    return _TEMPLATE.format(model=_yaml_str(model), state=_yaml_str(state), watch=watch)


def _home_relative(path: Path) -> str:
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def _yaml_str(value: str) -> str:
    """A YAML scalar for ``value``: plain when safe, else double-quoted with escapes."""
    import json

    plain = value and all(c.isalnum() or c in "/._-~" for c in value)
    return value if plain else json.dumps(value)


def init(folder: Path | None = None, *, model: str | None = None, force: bool = False) -> Initialised:
    """Write the starter config and create its folders.

    Args:
        folder: where config.yaml goes; with it, the inbox and state sit inside
            it too.  None: ``$XDG_CONFIG_HOME/vlwatch``, inbox ``~/vlwatch/inbox``.
        model: ``model.name`` to write (default: the 7B model ``pull`` fetches).
        force: replace an existing config.yaml.

    Raises:
        VlwatchError: the config exists (without ``force``), or cannot be written.
    """
    default_location = folder is None
    folder = (default_dir() if folder is None else folder).expanduser().absolute()
    config = folder / "config.yaml"
    if config.exists() and not force:
        raise VlwatchError(f"{config} exists already; `vlwatch check --config {config}` checks it, "
                           "`vlwatch init --force` replaces it", ExitCode.FAILED)
    if model is not None and Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().absolute())  # the config may not sit beside it
    if default_location:
        inbox_text, inbox = "~/vlwatch/inbox", Path.home() / "vlwatch" / "inbox"
        state = _home_relative(default_state_path())
    else:
        inbox_text, inbox, state = "./inbox", folder / "inbox", "./state/state.db"
    text = render(inbox=inbox_text, state=state, model=model or DEFAULT_MODEL)
    parse_config(text, config)  # never write a config that `check` would refuse
    folders = {task: inbox / task for task in TASKS}
    try:
        for f in (folder, *folders.values()):
            f.mkdir(parents=True, exist_ok=True)
        tmp = config.with_name(".config.yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, config)
    except OSError as exc:
        raise VlwatchError(f"{config}: cannot write the config: {exc}", ExitCode.FAILED) from exc
    return Initialised(config, folders, default_location)


def next_steps(done: Initialised, model_present: bool) -> str:
    """What to do now, as the README's "first ten minutes" says it."""
    flag = "" if done.default_location else f" --config {done.config}"
    lines = [f"wrote {done.config}"]
    lines += [f"created {f}/" for f in done.inbox.values()]
    lines.append("next:")
    if not model_present:
        lines.append(f"  vlwatch pull{flag}    # fetch the model once (about 16 GB)")
    lines.append(f"  vlwatch run{flag}     # the daemon, in the foreground (Ctrl-C stops it)")
    lines.append(f"  cp some-scan.png {done.inbox['ocr']}/    # its text appears as some-scan.png.ocr.md beside it")
    lines.append(f"  vlwatch status{flag}  # in another terminal: what is queued, done, failed")
    return "\n".join(lines)
