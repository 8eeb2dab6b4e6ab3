"""Kept for old command lines: the plugin now lives in the package, ``daemon.bench.dummy_backend``.

``VLWATCH_PLUGINS=benchmarks.dummy_backend`` registers ``transformers-dummy``
exactly as ``VLWATCH_PLUGINS=daemon.bench.dummy_backend`` does (see that module).
"""

from daemon.bench.dummy_backend import dummy_backend  # noqa: F401  (importing registers the backend)
