"""Kept for old command lines: the plugin now lives in the package, ``daemon.bench_dummy``.

``VLWATCH_PLUGINS=benchmarks.dummy_backend`` registers ``transformers-dummy``
exactly as ``VLWATCH_PLUGINS=daemon.bench_dummy`` does (see that module).
"""

from daemon.bench_dummy import dummy_backend  # noqa: F401  (importing registers the backend)
