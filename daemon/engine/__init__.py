"""The engine: what runs the daemon's jobs and interactive requests on a backend.

- ``loop``: the worker loop (one per engine): claims jobs, runs them, serves interactive requests;
- ``feed``: its live feed for a backend that admits requests itself: queued pages and interactive
  requests (``JobFeed``, ``Ask``);
- ``worker``: a rule's requests for a file, and its answers made into outputs;
- ``outcomes``: what became of each job (recorded in the queue, hooks, backoff);
- ``processes`` / ``child``: one engine per further GPU, each in a process of its own.

Which sequences run on a GPU step by step is the slot engine's scheduler
(``daemon.backends.transformers.scheduler``); the memory plan is ``daemon.plan``.
"""
