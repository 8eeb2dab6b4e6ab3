"""The real transformers backend on random weights, for daemon benchmarks: ``VLWATCH_PLUGINS=benchmarks.dummy_backend``.

Registers ``transformers-dummy``: ``TransformersBackend`` with
``load_format="dummy"`` (the real Qwen2.5-VL architecture built from its
config, random weights, as ``vlwatch bench --load-format dummy``), so a
whole daemon can be measured on a GPU host without the weights.  Random
weights stop at arbitrary end-of-sequence tokens; ``VLWATCH_DUMMY_IGNORE_EOS=1``
(the default) makes every request generate its full budget, so the work
per job is fixed.
"""

from __future__ import annotations

import os

from daemon.backends import register_engine
from daemon.backends.transformers import TransformersBackend
from daemon.config import EngineOptions, ModelConfig


def _dummy(config: ModelConfig, options: EngineOptions) -> TransformersBackend:
    # register_engine: the daemon's engine: section reaches it, as it reaches the real backend.
    backend = TransformersBackend(config, load_format="dummy", options=options)
    backend.ignore_eos = os.environ.get("VLWATCH_DUMMY_IGNORE_EOS", "1") == "1"
    return backend


register_engine("transformers-dummy", _dummy)
