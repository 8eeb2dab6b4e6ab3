"""What a config is: the frozen dataclasses every stage receives, and where the config file is found.

``Config``, ``ModelConfig``, ``WatchConfig``, ``Rule`` (and the jobs, API and
hooks sections) are built once by ``config_reader.parse_config`` from
config.yaml and the rule packs it includes, then passed down; nothing changes
them afterwards.  Here too: the small helpers later stages share (page ranges,
``host:port``, which watch owns a path), finding the file (``find_config``),
the bundled rule packs and plugins, and where the weights and the state live.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from wcmatch import glob as wcglob

from daemon.errors import ConfigError, ExitCode, VlwatchError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
TASKS = ("ocr", "describe", "ground", "code", "custom")
OUTPUTS = ("md", "html", "json")
DEFAULT_OUTPUT = {"ocr": "md", "describe": "md", "ground": "json", "code": "html"}
BACKENDS = ("transformers", "openai")
#: How a rule's answers are read and retried (``daemon.policies``): ``olmocr`` is
#: olmOCR-2's per-page YAML front matter, checked, retried, merged per document.
ANSWER_FORMATS = ("olmocr",)
ATTENTIONS = ("auto", "flash_attention_2", "sdpa", "eager")
#: model.quantization (issue 23); vLLM's word and values
QUANTIZATIONS = ("auto", "none", "fp8")
#: model.kv_cache_dtype: vLLM's word; auto = the model's dtype, fp8 = e4m3 with a scale per token and KV head
KV_CACHE_DTYPES = ("auto", "fp8")
#: What a prompt template may name.  Anything else is a config error, so a
#: typo is caught by `check` rather than sent to the model verbatim.
TEMPLATE_VARIABLES = frozenset({"filename", "stem", "suffix", "folder", "path", "rule", "objects"})
#: Image files the bundled packs match when a rule gives no `match:`.
IMAGE_GLOBS = ("*.png", "*.jpg", "*.jpeg", "*.webp", "*.bmp", "*.gif", "*.tif", "*.tiff", "*.pdf",
               "*.heic", "*.heif")
#: Input formats a rule's `formats:` may name (``daemon.images`` tells them
#: apart by content, not by file name), and the spellings people also use.
FORMATS = ("png", "jpeg", "webp", "bmp", "gif", "tiff", "pdf", "heif")
FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff", "heic": "heif"}
#: A rule's `pages:` as inclusive 1-based ranges: ``"1-3,7-"`` is ``((1, 3), (7, None))``.
PageRanges = tuple[tuple[int, int | None], ...]
#: Glob flags: `**` spans folders, a pattern without `/` matches the file name
#: at any depth (as .gitignore does), and case is ignored because scanners
#: write `.TIF` as often as `.tif`.
GLOB_FLAGS = wcglob.GLOBSTAR | wcglob.MATCHBASE | wcglob.IGNORECASE | wcglob.BRACE

#: Bundled rule packs: `rules/` of a source checkout, installed as `daemon/rules`.
_PACK_DIRS = (Path(__file__).resolve().parent / "rules", Path(__file__).resolve().parent.parent / "rules")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ModelConfig:
    backend: str = "transformers"
    name: str = DEFAULT_MODEL
    attention: str = "auto"
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto = cuda if present, else cpu
    #: one engine per device (issue 12.5): () = one engine on ``device``;
    #: ("auto",) = every visible GPU; or a list such as ("cuda:0", "cuda:1")
    devices: tuple[str, ...] = ()
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1003520
    batch_size: int | None = None  # None = auto
    max_gpu_memory: int | None = None  # bytes
    max_new_tokens: int = 2048
    #: auto | none | fp8 (issue 23): auto takes FP8 weights on a card with FP8
    #: tensor cores when bf16 leaves no room for a useful batch (daemon.plan)
    quantization: str = "auto"
    #: auto | fp8: the KV cache in the model's dtype, or in FP8 (half the bytes a slot takes: twice the slots
    #: under a memory cap; CUDA, compute capability 8.9+). Changes answers, as FP8 weights do
    kv_cache_dtype: str = "auto"
    idle_unload: float = 900.0  # seconds; 0 disables
    base_url: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    api_key_env: str | None = None
    max_concurrency: int = 8
    timeout: float = 120.0


#: The parts of the engine ``torch.compile`` may compile (``engine.compile``).
COMPILE_PARTS = ("decode", "vision", "prefill")
#: The decode step's attention kernels (``engine.decode_attention``).
DECODE_ATTENTIONS = ("flash", "sdpa")
#: How vlwatch's FP8 kernels widen e4m3 to bf16 (``engine.fp8_widen``).
FP8_WIDENS = ("convert", "bits")


@dataclass(frozen=True)
class EngineOptions:
    """The local engine's switches (``engine:``): typed config, not environment (issue 22.3).

    Each defaults to what the engine does best where it applies; a switch
    for something this machine cannot do (CUDA graphs, compiling, flash
    kernels on a CPU) changes nothing there.  The scheduler's knobs are
    ``daemon.backends.scheduler.SchedulerOptions``'s, passed on as they are.
    """

    #: the parts that run through torch.compile on CUDA: () compiles nothing
    compile: tuple[str, ...] = COMPILE_PARTS
    #: the decode step replayed as one CUDA graph
    cuda_graphs: bool = True
    #: the decode step's attention: FlashAttention-2's varlen kernel (CUDA, half
    #: precision) or PyTorch's SDPA with a mask
    decode_attention: str = "flash"
    #: a prefill round's prompts through one packed pass of the text layers
    #: (off: the stock text model per prompt)
    packed_prefill: bool = True
    #: a prefill round's first tokens read once the next round is queued
    overlap_rounds: bool = True
    #: the vision tower's blocks as one fused function each (CUDA, half precision)
    vision_blocks: bool = True
    #: the vision tower's windows through torch's varlen attention (faster, not bit-equal)
    vision_varlen: bool = False
    #: FP8 weights times few rows (a decode step with few slots: ``fp8_rows_max``) through vlwatch's weight-only kernel
    #: (``backends.transformers.fp8_gemv``; CUDA with Triton) instead of ``torch._scaled_mm``
    fp8_rows_kernel: bool = True
    #: parts of K each output tile of that kernel is cut into (split-K: the narrow layers leave SMs idle at
    #: one part); 0 picks by the card's SMs (``fp8_gemv.split_for``): batch 1 on an H100 1.153 s against
    #: 1.285 s at 1 (session 8).  Not an answer-changing switch: the sums differ in fp32 rounding only
    fp8_rows_split: int = 0
    #: rows up to which that kernel runs (1-128; a decode step with more slots takes ``_scaled_mm``).  Rows
    #: past 16 take its 32-, 64- and 128-row tiles, 16 until an H100 measures them
    fp8_rows_max: int = 16
    #: how vlwatch's FP8 kernels (the few-row weights, the FP8 KV cache) widen e4m3 to bf16: ``convert``
    #: (Triton's conversion, on the conversion unit's 16 results a clock an SM) or ``bits`` (moved into place by
    #: integer instructions: the same numbers, ``backends.transformers.e4m3``).  ``convert`` until an H100
    #: times ``bits``
    fp8_widen: str = "convert"
    #: let ``model.dtype: float16`` load Qwen2.5-VL, which overflows float16
    allow_fp16: bool = False
    #: seconds without a heartbeat before an engine process counts as hung and is killed
    engine_lost_after: float = 120.0
    #: prompt tokens a turn of queued prefills may take while an interactive answer decodes
    step_tokens: int = 2048
    #: share of the engine's time the folder backlog keeps while interactive answers run
    backlog_share: float = 0.5
    #: the lowest slots, which folder work takes last and interactive requests take back (preempting)
    interactive_slots: int = 4

    def compiles(self, part: str) -> bool:
        return part in self.compile

    def shown(self) -> dict[str, object]:
        """The options as the config spells them (``status --json``): ``compile`` true, false or the parts."""
        out: dict[str, object] = {k: getattr(self, k) for k in ENGINE_KEYS}
        out["compile"] = (True if set(self.compile) == set(COMPILE_PARTS) else list(self.compile)) if self.compile \
            else False
        return out

    def line(self) -> str:
        """``KEY=VALUE`` pairs as ``vlwatch bench --engine`` takes them (``check``, ``status``)."""
        def text(key: str, value: object) -> str:
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, list):
                return "[" + ",".join(value) + "]"
            return f"{value:g}s" if key == "engine_lost_after" else str(value)

        return " ".join(f"{k}={text(k, v)}" for k, v in self.shown().items())


#: ``engine:``'s keys, in the order ``check`` shows them.
ENGINE_KEYS = ("compile", "cuda_graphs", "decode_attention", "packed_prefill", "overlap_rounds", "vision_blocks",
               "vision_varlen", "fp8_rows_kernel", "fp8_rows_split", "fp8_rows_max",
               "fp8_widen", "allow_fp16", "engine_lost_after", "step_tokens", "backlog_share",
               "interactive_slots")


@dataclass(frozen=True)
class JobsConfig:
    """How the daemon treats its queue (vlwatch's own keys, beyond the contract)."""

    attempts: int = 3  # tries per job before it is marked failed
    backoff: float = 30.0  # first retry delay; doubles each attempt
    rescan: float = 600.0  # periodic rescan of watched folders; 0 disables
    keep_history: float = 30 * 86400.0  # prune finished jobs older than this
    batch_wait: float = 0.2  # how long the worker waits to fill a batch
    #: redo sidecars made by an older recipe (model, prompt, sizing) by itself;
    #: off: a model upgrade must not silently re-run every file (issue 11.13)
    redo_outdated: bool = False


@dataclass(frozen=True)
class WatchConfig:
    path: Path
    rules: tuple[str, ...] | None = None  # None = every rule
    recursive: bool = True
    polling: bool = False
    settle: float = 2.0
    output_dir: Path | None = None
    #: Read a symlinked file whose target lies outside every watched folder.
    #: Off by default: anyone who can write into the folder could otherwise
    #: make the daemon read (and describe into a sidecar) any file it can read.
    follow_symlinks_out: bool = False


@dataclass(frozen=True)
class Rule:
    name: str
    match: tuple[str, ...]
    task: str
    prompt: str
    output: str
    also: bool = False
    csp: bool = True  # code task: add a network-blocking Content-Security-Policy
    raw_html: bool = False  # md output: keep the model's raw HTML instead of escaping it
    objects: str = "all distinct objects"  # ground task: what to detect ($objects)
    max_new_tokens: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    formats: tuple[str, ...] | None = None  # None = every supported format (see FORMATS)
    pages: PageRanges | None = None  # None = every page of a multi-page file
    #: images shown to the model before the file, in every request of this rule
    reference: tuple[Path, ...] = ()
    #: commands run after this rule's sidecars are written / its job fails for
    #: good; None = the top-level ``hooks:`` (``daemon.hooks``)
    on_done: tuple[str, ...] | None = None
    on_failed: tuple[str, ...] | None = None
    #: an http(s) URL POSTed JSON after each job of this rule (``daemon.webhooks``)
    webhook: str | None = None
    #: how answers are read and retried (one of ANSWER_FORMATS); None = taken as they come
    answers: str | None = None
    #: the temperature of each try of a page whose answer is not valid (its length is the
    #: number of tries); None = the answer format's own ladder
    temperatures: tuple[float, ...] | None = None
    #: scale each page so its longer side has this many pixels before sizing (olmOCR: 1288)
    longest_side: int | None = None
    source: str = ""  # "file:line" where the rule was defined

    def matches(self, relative: str) -> bool:
        """Whether a path relative to its watch root (``/``-separated) matches."""
        return _glob_matcher(self.match).match(relative)


@functools.lru_cache(maxsize=512)
def _glob_matcher(patterns: tuple[str, ...]) -> wcglob.WcMatcher:
    # Compiled once per pattern list: `globmatch` recompiles (brace expansion
    # and all) on every call, which dominated the cost of a burst of 10,000 files.
    return wcglob.compile(list(patterns), flags=GLOB_FLAGS)


_PAGE_PART = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*$")


#: Bytes per unit of a size as vlwatch writes them (``22GiB``, ``500MB``, ``1.5TiB``): the config,
#: ``plan --gpu-memory`` and ``bench --max-gpu-memory`` read sizes the same way, each with its own rule
#: for a bare number.
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def size_parts(text: str) -> tuple[float, str | None] | None:
    """(number, unit in lower case, or None for a bare number) of a size like ``22GiB``; None if it is not
    one.  ``SIZE_UNITS[unit]`` is the unit's bytes."""
    m = _SIZE.match(text)
    if m is None:
        return None
    return float(m.group(1)), (m.group(2).lower() if m.group(2) else None)


def parse_pages(spec: str | int) -> PageRanges:
    """``"1-3,7,10-"`` -> ``((1, 3), (7, 7), (10, None))``.

    Raises:
        ValueError: with a message fit for a config problem.
    """
    out: list[tuple[int, int | None]] = []
    for part in str(spec).split(","):
        m = _PAGE_PART.match(part)
        if m is None:
            raise ValueError(f"{part.strip()!r} is not a page or range like 3, 1-5 or 10-")
        first = int(m.group(1))
        last: int | None = first if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
        if first < 1 or (last is not None and last < first):
            raise ValueError(f"{part.strip()!r}: pages count from 1 and a range must not run backwards")
        out.append((first, last))
    return tuple(out)


def page_selected(number: int, ranges: PageRanges | None) -> bool:
    return ranges is None or any(a <= number and (b is None or number <= b) for a, b in ranges)


def last_page_wanted(ranges: PageRanges | None) -> int | None:
    """The highest page number ``ranges`` can select; None when open-ended."""
    if ranges is None or any(b is None for _, b in ranges):
        return None
    return max(b for _, b in ranges if b is not None)


#: Where the API listens unless the config says otherwise (loopback only).
DEFAULT_LISTEN = "127.0.0.1:8765"


@dataclass(frozen=True)
class ApiConfig:
    """The local HTTP API and web page (``api:``; ``daemon.server``).

    ``listen`` is ``host:port``, ``unix:/path`` or None (off).  The token is
    read from the environment variable named by ``token_env`` when the
    server starts; it never sits in the config.
    """

    listen: str | None = DEFAULT_LISTEN
    token_env: str | None = None
    #: seconds a synchronous conversion (``/v1/convert/file``, ``/process``)
    #: waits before answering 504 "use the async endpoint" (docling-serve's
    #: ``DOCLING_SERVE_MAX_SYNC_WAIT``, 120 s there too)
    sync_wait: float = 120.0
    #: ``/v1/convert/source`` may fetch ``kind: http`` sources from the network
    #: (off: nothing enters this machine that way unless the user says so)
    http_sources: bool = False
    #: Tokens one chat request may use, prompt plus max_tokens (the model's own context when smaller).
    max_context: int = 32768
    #: Pages of one PDF a chat request may send; a longer PDF is refused, not cut.
    max_pdf_pages: int = 64
    #: Pixels decoded for one chat request, all images and pages together, before any downscaling.
    max_request_pixels: int = 256_000_000

    @property
    def unix_socket(self) -> Path | None:
        return Path(self.listen[5:]) if self.listen and self.listen.startswith("unix:") else None

    def host_port(self) -> tuple[str, int] | None:
        """(host, port) of a TCP ``listen``; None for a unix socket or off."""
        if not self.listen or self.unix_socket is not None:
            return None
        return split_host_port(self.listen)


def split_host_port(listen: str) -> tuple[str, int]:
    """``127.0.0.1:8765`` / ``[::1]:8765`` / ``localhost:8765`` -> (host, port).

    Raises:
        ValueError: with a message fit for a config problem.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{listen!r} is not host:port (like 127.0.0.1:8765) or unix:/path/to/socket")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{listen!r}: an IPv6 address is written in brackets, like [::1]:8765")
        host = host[1:-1]
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HooksConfig:
    """Commands run after a job (``hooks:``); a rule's own ``on_done``/``on_failed`` replace these."""

    on_done: tuple[str, ...] | None = None
    on_failed: tuple[str, ...] | None = None
    timeout: float = 60.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    state: Path
    include: tuple[str, ...]
    watch: tuple[WatchConfig, ...]
    rules: tuple[Rule, ...]  # the config's own rules first, then the packs', in order
    jobs: JobsConfig = field(default_factory=JobsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    engine: EngineOptions = field(default_factory=EngineOptions)
    source: Path | None = None
    warnings: tuple[str, ...] = ()
    #: "the weights are not downloaded", kept apart from ``warnings``: the
    #: commands that need the model stop with the full message instead, so it
    #: is said once (issue 11.8); ``check`` shows it as a warning.
    model_warning: str | None = None

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)


@functools.lru_cache(maxsize=16)
def watch_prefixes(watches: tuple[WatchConfig, ...]) -> tuple[tuple[str, WatchConfig], ...]:
    """``(folder + os.sep, watch)``, deepest folder first, so the first hit is the most specific."""
    entries = [(os.path.normpath(w.path).rstrip(os.sep) + os.sep, w) for w in watches]
    return tuple(sorted(entries, key=lambda e: len(e[0]), reverse=True))


def owning_watch(watches: tuple[WatchConfig, ...], text: str) -> WatchConfig | None:
    """The most specific watch holding the normalised absolute path ``text`` (string prefixes:
    this runs for every event of a burst).  A non-recursive watch owns only its direct children."""
    for prefix, watch in watch_prefixes(watches):
        if text.startswith(prefix) and (watch.recursive or os.sep not in text[len(prefix):]):
            return watch
    return None


@dataclass(frozen=True)
class Snapshot:
    """One config with everything derived from it, swapped whole on reload (issue 10.17).

    Observer threads read ``daemon.snapshot`` once per event and use only
    that object, so no event is ever judged by half an old config and half
    a new one (a rule list from one, watch roots from the other).
    """

    config: Config
    #: the names whose sidecars are ours: the rules of this config, no more
    rule_names: frozenset[str]
    #: per watch: output folders of any watch strictly inside it (never input)
    skip_dirs: dict[WatchConfig, tuple[Path, ...]]

    @classmethod
    def of(cls, config: Config) -> Snapshot:
        watch_prefixes(config.watch)  # compiled now, not by the first event
        for rule in config.rules:
            _glob_matcher(rule.match)
        return cls(config, frozenset(r.name for r in config.rules),
                   {w: tuple(output_dirs_inside(w, config)) for w in config.watch})

    def find(self, path: Path) -> tuple[WatchConfig, Path, tuple[Path, ...]] | None:
        """(watch, its root, output folders to skip) for ``path``, or None outside every watch."""
        watch = owning_watch(self.config.watch, os.path.normpath(path))
        if watch is None:
            return None
        return watch, watch.path, self.skip_dirs[watch]


def output_dirs_inside(watch: WatchConfig, config: Config) -> list[Path]:
    """Output folders (of any watch) strictly inside ``watch``'s tree: never input.

    The watched folder itself is not one (issue 10.4): sidecars written
    beside the images are told apart by name.
    """
    root = watch.path
    return [w.output_dir for w in config.watch
            if w.output_dir is not None and w.output_dir != root and w.output_dir.is_relative_to(root)]


# ----------------------------------------------------------------------- finding


def config_candidates() -> list[Path]:
    """The places a config is looked for when ``--config`` is not given, in order."""
    out: list[Path] = []
    from daemon import env as environment

    if env := environment.get(environment.CONFIG):
        out.append(Path(env).expanduser())
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    out.append(Path(xdg).expanduser() / "vlwatch" / "config.yaml")
    out.append(Path("/etc/vlwatch/config.yaml"))
    return out


def canonical(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute (against the working directory) with ``.``/``..`` folded lexically.

    Every path the daemon stores, compares, logs or prints goes through this
    once, at load time (issue 10.1): the watcher, the catch-up and ``scan``
    then all see one spelling of a file whatever the working directory.
    Symlinks are left alone: the watch folder is what the user named.
    """
    return Path(os.path.abspath(os.fspath(path)))


def find_config(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise VlwatchError(f"{path}: config file not found", ExitCode.USAGE)
        return canonical(path)
    candidates = config_candidates()
    for path in candidates:
        if path.is_file():
            return canonical(path)
    tried = ", ".join(str(p) for p in candidates)
    raise VlwatchError(f"no config file found (tried {tried}); pass --config PATH", ExitCode.USAGE)


def bundled_packs() -> dict[str, Path]:
    packs: dict[str, Path] = {}
    for folder in _PACK_DIRS:
        if folder.is_dir():
            for f in sorted(folder.glob("*.yaml")):
                packs.setdefault(f.stem, f)
    return packs


#: Environment variable naming modules to import before a config is read (``daemon.env``).
PLUGINS_ENV = "VLWATCH_PLUGINS"


def load_plugins() -> None:
    """Import the modules named in ``$VLWATCH_PLUGINS`` (comma-separated), once.

    A plugin registers a backend with ``daemon.backends.register`` when
    imported, as a built-in one does, so a config may name it; the tests and
    benchmarks use this for their fakes.
    """
    import importlib

    from daemon import env

    for name in filter(None, (n.strip() for n in (env.get(env.PLUGINS) or "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise VlwatchError(f"{PLUGINS_ENV}: cannot import {name!r}: {exc}", ExitCode.USAGE) from exc


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return canonical(Path(base).expanduser() / "vlwatch" / "state.db")


def local_model_path(name: str) -> Path | None:
    """The local directory holding model ``name`` (a path, or an id in the HF cache), or None."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, or an offline-mode variant of it
        return None


def describe_problems(exc: ConfigError) -> str:
    n = len(exc.problems)
    return f"{exc}\n{n} problem{'s' if n != 1 else ''} found"
