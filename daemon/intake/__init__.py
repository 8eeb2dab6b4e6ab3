"""The intake: everything between "a file appears in a watched folder" and "a job is on the queue".

- ``ignoring``: the filter that drops what is not input (hidden, temporary,
  litter, our own outputs): ``ignore_reason``;
- ``watching``: the observers (``Watcher``) and the tree walk (``walk_files``);
- ``readiness``: when a file is complete (closed, moved in whole, or settled)
  and what it holds then (``Settler``, ``look_at``, ``file_signature``);
- ``rules``: which rules match a file (``match_file``, ``Match``), the symlink
  policy, and the prompt each would send (``render_prompt``);
- ``sidecars``: what a sidecar is called, whether a name is ours, whether a
  sidecar is up to date;
- ``recipes``: what made a sidecar (model, rendered prompt, sizing), and which
  sidecars an older recipe made;
- ``scanning``: which files need work (the catch-up at start, the periodic
  rescan, ``vlwatch scan``), and putting it on the queue in chunks.

It imports only ``config``, ``images`` and ``store``; the engine, the server,
``service``, ``commands`` and ``cli`` import it, never the other way round.
Wiring watcher, settler and queue together is ``service``'s job.
"""
