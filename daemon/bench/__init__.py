"""``vlwatch bench``: what the engine does on this machine, and what the daemon then delivers.

- ``run``: the command: its arguments, which setups run, the report;
- ``setups``: the engine-only setups (one at a time, batch 1, the batched
  worker, under a memory cap), the helpers the others share, the table;
- ``verify``: ``--verify``, the engine's tokens against stock ``generate``;
- ``engines``: ``--devices``, one engine per GPU at once;
- ``end_to_end``: ``--end-to-end``, the real daemon on a temp watched folder;
- ``results``: one setup's row, shared by both;
- ``dummy_backend``: the ``transformers-dummy`` plugin backend, which lets a
  whole daemon run on random weights (``VLWATCH_PLUGINS=daemon.bench.dummy_backend``).

The random weights themselves (``--load-format dummy``) are the loader's:
``daemon.backends.transformers.dummy``.
"""
