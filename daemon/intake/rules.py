"""Match a file against the rules and render the prompt each would send.

A file is matched with globs relative to the watch root it sits under (or to
its own folder, for a one-shot ``vlwatch process`` outside any watch).  Rules
are tried in config order: the config's own ``rules:`` first, then the packs
of ``include:``; the first match wins unless a rule says ``also: true``, which
lets the rules after it run too.

Prompts are ``string.Template`` substitutions of a fixed set of variables: a
template can never run code, and a variable the loader does not know is a
config error long before a file arrives.

Paths are made absolute and normalised lexically (``a/../b``) before they are
matched, so ``watch/../elsewhere/x.png`` is not taken for a file of ``watch``.
Symlinks are judged by ``allowed_roots``: a file whose real location is
outside every watched folder is read only where the watch says
``follow_symlinks_out: true`` (``daemon.images`` checks the file it actually
opened, so the check cannot be raced).
"""

from __future__ import annotations

import functools
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daemon.config import Config, Rule, WatchConfig, owning_watch


@dataclass(frozen=True)
class Match:
    """A source file paired with one rule that applies to it: what gets queued."""

    path: Path
    rule: Rule
    root: Path  # the watch root (or the file's folder): globs and output_dir mirroring start here
    output_dir: Path | None = None

    @property
    def relative(self) -> str:
        return relative_to_root(self.path, self.root)


def relative_to_root(path: Path | str, root: Path) -> str:
    # String work: this runs for every file of a burst.
    text, base = os.fspath(path), str(root).rstrip(os.sep) + os.sep
    if text.startswith(base):
        rel = text[len(base):]
        return rel if os.sep == "/" else rel.replace(os.sep, "/")
    return path.name if isinstance(path, Path) else os.path.basename(text)


def watch_for(config: Config, path: Path) -> WatchConfig | None:
    """The most specific watch entry whose folder holds ``path``, if any.

    A non-recursive watch owns only its direct children.  Compared as string
    prefixes of normalised paths: this runs for every event of a burst.
    """
    return owning_watch(config.watch, str(normalised(path)))


def candidate_rules(config: Config, watch: WatchConfig | None) -> list[Rule]:
    if watch is None or watch.rules is None:
        return list(config.rules)
    allowed = set(watch.rules)
    return [r for r in config.rules if r.name in allowed]


def match_file(config: Config, path: Path, rule_name: str | None = None) -> list[Match]:
    """The rules that apply to ``path``, in order.

    Args:
        config: the loaded config.
        path: the source file (need not exist, for ``explain``).
        rule_name: force this rule, ignoring globs (``process --rule``).
    """
    path = normalised(path)
    watch = watch_for(config, path)
    root = watch.path if watch else path.parent  # a watch's path is canonical already (config)
    output_dir = watch.output_dir if watch else None
    if rule_name is not None:
        rule = config.rule(rule_name)
        return [Match(path, rule, root, output_dir)] if rule else []
    return [Match(path, rule, root, output_dir) for rule in _matching(config, watch, relative_to_root(path, root))]


def watched_rules(config: Config, text: str, watch: WatchConfig) -> list[Rule]:
    """The rules of ``match_file`` for a file under ``watch``, from its normalised absolute path as text.

    What the watcher needs for each new file of a burst (issue 10.21): the
    rules only, with no ``Path`` and no ``Match`` made for them.
    """
    return _matching(config, watch, relative_to_root(text, watch.path))


def _matching(config: Config, watch: WatchConfig | None, rel: str) -> list[Rule]:
    out: list[Rule] = []
    for rule in candidate_rules(config, watch):
        if rule.matches(rel):
            out.append(rule)
            if not rule.also:
                break
    return out


def normalised(path: Path) -> Path:
    """Absolute, with ``.`` and ``..`` folded lexically (symlinks are left alone)."""
    text = str(path)
    if os.path.isabs(text) and os.path.normpath(text) == text:
        return path  # already canonical, as every path from the watcher is: no new Path
    return Path(os.path.normpath(os.path.abspath(text)))


def allowed_roots(config: Config, match: Match) -> tuple[Path, ...] | None:
    """Where the file of ``match`` may really be (symlinks resolved); None = anywhere.

    A file under a watched folder may be a symlink only to somewhere inside a
    watched folder, unless its watch has ``follow_symlinks_out: true``: anyone
    who can drop a symlink into the folder could otherwise have the daemon
    read, and describe into a sidecar, any file its user can read.  A file
    outside every watch (``vlwatch process ~/x.png``) was named by the user
    and may be anywhere.
    """
    watch = watch_for(config, match.path)
    if watch is None or watch.follow_symlinks_out:
        return None
    return real_roots(config)


def links_out(config: Config, path: Path) -> bool:
    """Whether ``path``, in a watched folder, resolves outside every one while its watch forbids that.

    The check ``daemon.images`` makes on the file it opens, made before a job
    exists, so such a file is refused once with the reason (issue 27) rather
    than queued, failed and retried.  The open-time check stays: this one
    can be raced, that one cannot.
    """
    watch = watch_for(config, path)
    if watch is None or watch.follow_symlinks_out:  # as allowed_roots decides
        return False
    real = Path(os.path.realpath(path))
    return not any(real == r or r in real.parents for r in real_roots(config))


#: id(config) -> (the config, its watch roots resolved).  See ``real_roots``.
_real_roots: dict[int, tuple[Config, tuple[Path, ...]]] = {}


def real_roots(config: Config) -> tuple[Path, ...]:
    """Every watch root of ``config`` with symlinks resolved, once per config (and per rescan).

    ``os.path.realpath`` of every root for every file read was ~17% of
    preparing a file in a burst (issue 10.21).  A root's real location
    changes only when it, or a folder above it, is a symlink given a new
    target (or a folder swapped for one).  Resolving once per config is safe
    for three reasons: a reload brings a new config, resolved afresh; every
    catch-up and rescan forgets the cache (``forget_real_roots``) before it
    walks the roots, so a file found through a root's new target is judged
    by the new target; and the check on the file itself is still made on the
    file actually opened (``daemon.images``), so it cannot be raced.  What a
    stale entry can do until then is refuse a file under the root's new
    target (it fails, with the reason, and is retried) or accept one under
    its old target: a folder the user had configured to be read, and which
    the watcher's inotify watch still follows itself until then.
    """
    hit = _real_roots.get(id(config))
    if hit is not None and hit[0] is config:
        return hit[1]
    roots = tuple(Path(os.path.realpath(w.path)) for w in config.watch)
    if len(_real_roots) > 16:  # many reloads: keep only what is asked for now
        _real_roots.clear()
    _real_roots[id(config)] = (config, roots)  # the entry holds the config: its id is not reused meanwhile
    return roots


def forget_real_roots() -> None:
    """Resolve the watch roots again next time (a catch-up or rescan is about to walk them)."""
    _real_roots.clear()


def render_prompt(rule: Rule, path: Path) -> str:
    """The prompt for ``path`` under ``rule``: ``$name`` substitution only, never code.

    ``string.Template.safe_substitute``'s result, from a template taken
    apart once (``_pieces``) and only the values it names worked out: every
    queued file is rendered for its recipe (issue 10.21), and building all
    seven values and running the template's regular expression over the
    whole prompt per file was most of what queueing a file cost.
    """
    pieces = _pieces(rule.prompt)
    values = {name: neutralise(_VALUES[name](rule, path)) for name in pieces.names}
    return "".join(values[part] if named else part for named, part in pieces.parts).strip()


#: How each template variable is worked out, by name (each only when a prompt uses it).
_VALUES: dict[str, Callable[[Rule, Path], str]] = {
    "filename": lambda rule, path: path.name,
    "stem": lambda rule, path: path.stem,
    "suffix": lambda rule, path: path.suffix.lstrip("."),
    "folder": lambda rule, path: path.parent.name,
    "path": lambda rule, path: str(path),
    "rule": lambda rule, path: rule.name,
    "objects": lambda rule, path: rule.objects,
}


@dataclass(frozen=True)
class _Pieces:
    #: (True, variable name) or (False, literal text), in order
    parts: tuple[tuple[bool, str], ...]
    #: the variables used (only names ``_VALUES`` knows: any other ``$name`` stays as written)
    names: frozenset[str]


@functools.lru_cache(maxsize=256)
def _pieces(prompt: str) -> _Pieces:
    """``prompt`` split as ``string.Template.safe_substitute`` reads it: ``$$`` is ``$``, a
    known ``$name``/``${name}`` a variable, anything else literal text."""
    parts: list[tuple[bool, str]] = []
    at = 0
    for mo in string.Template.pattern.finditer(prompt):
        if mo.start() > at:
            parts.append((False, prompt[at:mo.start()]))
        named = mo.group("named") or mo.group("braced")
        if named is not None and named in _VALUES:
            parts.append((True, named))
        elif mo.group("escaped") is not None:
            parts.append((False, string.Template.delimiter))
        else:  # an unknown name or an invalid "$": safe_substitute leaves it as it is
            parts.append((False, mo.group()))
        at = mo.end()
    if at < len(prompt):
        parts.append((False, prompt[at:]))
    return _Pieces(tuple(parts), frozenset(name for named, name in parts if named))


#: ``<`` and ``>`` in text from outside become these lookalikes (U+2039,
#: U+203A: no Unicode normalisation maps them back to ``<`` ``>``).
_ANGLES = str.maketrans({"<": "\u2039", ">": "\u203a"})


def neutralise(value: str) -> str:
    """``value`` (a file name, folder or path) made unable to become a chat special token.

    Anyone who can write into a watched folder chooses file names: a name
    that holds ``<|im_end|>`` would end the user turn and speak for the
    system, ``<|image_pad|>`` would add an image placeholder.  Removing such
    tokens cannot be made safe (``a<|im_<|x|>end|>b`` becomes ``a<|im_end|>b``
    after one pass: issue 10.11), so nothing is removed: every ``<`` and ``>``
    becomes a lookalike.  Every special and added token of Qwen's tokenizer
    (``<|...|>``, ``<tool_call>``...) starts with ``<`` and ends with ``>``,
    so no token can lie in the text, whatever its bytes, and the model still
    reads the name almost as it is.  The same text goes to both backends
    (an OpenAI-compatible server tokenizes what we send with the same rules).
    A name that is not valid UTF-8 arrives with surrogate escapes, which no
    tokenizer can encode: those bytes become U+FFFD.
    """
    return _text(value).translate(_ANGLES)


def _text(value: str) -> str:
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
