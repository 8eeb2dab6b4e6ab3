"""The few environment variables vlwatch reads, in one place (issue 22.3).

Everything that shapes what the engine computes is configuration (the
``engine:`` section, ``daemon.config.EngineOptions``): typed, checked by
``vlwatch check``, shown by ``status``, recorded in sidecars.  What is left
in the environment is what must be known before a config is read, or what
only the tests and benchmarks set:

- ``VLWATCH_CONFIG``: the config file when ``--config`` is absent;
- ``VLWATCH_LOG_LEVEL``: DEBUG, INFO, WARNING... (over ``--verbose``);
- ``VLWATCH_PLUGINS``: modules imported before the config is read (a
  plugin registers a backend);
- ``VLWATCH_FAKE_CUDA_DEVICES``: tests only, a count of GPUs to pretend
  when checking ``model.device`` on a machine without one.

The tests' and benchmarks' own plugin backends read a few more of their
own (``VLWATCH_STUB_DELAY``, ``VLWATCH_STUB_DOWN``, ``VLWATCH_STUB_LOG``,
``VLWATCH_OLMOCR_LOG``): they are part of those plugins, not of vlwatch.
``VLWATCH_DUMMY_IGNORE_EOS`` belongs to the bench's ``transformers-dummy``
backend (``daemon.bench.dummy_backend``), which ships with vlwatch.

Not read here because vlwatch never reads them: the variables it *sets* for
hook commands (``VLWATCH_SOURCE``... ``daemon.hooks``), and the variables a
config *names* for secrets (``api_key_env``, ``token_env``).

The engine switches that used to be environment variables are gone; one set
in a systemd unit gets one warning naming the config key that replaces it
(``warn_removed``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

CONFIG = "VLWATCH_CONFIG"
LOG_LEVEL = "VLWATCH_LOG_LEVEL"
PLUGINS = "VLWATCH_PLUGINS"
FAKE_CUDA_DEVICES = "VLWATCH_FAKE_CUDA_DEVICES"
DUMMY_IGNORE_EOS = "VLWATCH_DUMMY_IGNORE_EOS"
#: PyTorch's, set by vlwatch when unset (``cuda_allocator_defaults``).
CUDA_ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"

#: Every variable vlwatch reads, with what it does (the README lists the same).
READ = {
    CONFIG: "the config file when --config is absent",
    LOG_LEVEL: "the log level (DEBUG, INFO, WARNING, ERROR)",
    PLUGINS: "comma-separated modules imported before the config is read (plugin backends)",
    FAKE_CUDA_DEVICES: "tests only: pretend this many CUDA GPUs when checking model.device",
    DUMMY_IGNORE_EOS: "bench only: the transformers-dummy backend (random weights) generates every token of "
                      "its budget (1, the default) or stops at end-of-sequence (0)",
    CUDA_ALLOC_CONF: "PyTorch's CUDA allocator settings; vlwatch sets expandable_segments:True when it is unset",
}

#: The engine switches that moved into the config: variable -> the key that replaces it.
REMOVED = {
    "VLWATCH_COMPILE": "engine.compile",
    "VLWATCH_COMPILE_DECODE": "engine.compile",
    "VLWATCH_COMPILE_VISION": "engine.compile",
    "VLWATCH_COMPILE_PREFILL": "engine.compile",
    "VLWATCH_CUDA_GRAPHS": "engine.cuda_graphs",
    "VLWATCH_DECODE_FLASH": "engine.decode_attention",
    "VLWATCH_OVERLAP_ROUNDS": "engine.overlap_rounds",
    "VLWATCH_PACKED_PREFILL": "engine.packed_prefill",
    "VLWATCH_VISION_BLOCKS": "engine.vision_blocks",
    "VLWATCH_VISION_VARLEN": "engine.vision_varlen",
    "VLWATCH_ALLOW_FP16": "engine.allow_fp16",
    "VLWATCH_ENGINE_LOST_AFTER": "engine.engine_lost_after",
}


def get(name: str) -> str | None:
    """The value of one of ``READ``'s variables (None when unset or empty)."""
    assert name in READ, f"{name} is not one of the variables vlwatch reads (daemon.env.READ)"
    return os.environ.get(name) or None


def cuda_allocator_defaults() -> None:
    """Let PyTorch's CUDA allocator grow segments in place, unless the user configured it (before CUDA starts).

    Without it the slot cache's re-size and the prefill's varying shapes
    leave memory reserved but unusable: under ``max_gpu_memory: 22GiB`` the
    7B in FP8 ran out of memory with 2.76 GiB "reserved by PyTorch but
    unallocated" and halved its slots (620 images/min); with it the planned
    104 slots ran (777 images/min, peak 20.5 GiB), and the whole card was
    unchanged (868 against 866): benchmarks/NOTES.md, session 5.
    """
    os.environ.setdefault(CUDA_ALLOC_CONF, "expandable_segments:True")


_warned = False


def warn_removed() -> list[str]:
    """Log one warning (once per process) naming the removed variables that are set and their config keys.

    Returns the variables found (for tests and ``check``).
    """
    global _warned
    found = sorted(v for v in REMOVED if v in os.environ)
    if found and not _warned:
        _warned = True
        moved = ", ".join(f"{v} -> {REMOVED[v]}" for v in found)
        log.warning("ignoring environment variable%s that moved into the config's engine: section: %s",
                    "s" if len(found) != 1 else "", moved)
    return found
