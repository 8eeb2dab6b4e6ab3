"""The ``transformers-dummy`` backend: the real transformers backend on random weights.

Loaded as a plugin (``VLWATCH_PLUGINS=daemon.bench.dummy_backend``, then ``model:
backend: transformers-dummy``), so a whole daemon runs the real Qwen2.5-VL
architecture without its weights, as ``vlwatch bench --load-format dummy``
does: ``bench --end-to-end`` and ``benchmarks/api_ttft.py`` start daemons
this way.  Random weights stop at arbitrary end-of-sequence tokens;
``VLWATCH_DUMMY_IGNORE_EOS=1`` (the default, what api_ttft.py wants) makes
every request generate its full budget, ``0`` stops where the daemon on real
weights would (the model's generation config, the loop stop).  Not a backend
for users: the answers are noise.
"""

from __future__ import annotations

from daemon import env
from daemon.backends import register_engine
from daemon.backends.transformers.backend import TransformersBackend
from daemon.config import EngineOptions, ModelConfig

#: The environment variable that sets ``ignore_eos`` (``1``, the default, or ``0``).
IGNORE_EOS_ENV = env.DUMMY_IGNORE_EOS


def dummy_backend(config: ModelConfig, options: EngineOptions) -> TransformersBackend:
    # register_engine: the daemon's engine: section reaches it, as it reaches the real backend.
    backend = TransformersBackend(config, load_format="dummy", options=options)
    backend.ignore_eos = (env.get(IGNORE_EOS_ENV) or "1") == "1"
    return backend


register_engine("transformers-dummy", dummy_backend)
