"""The state database: every read and write of the one SQLite file (``state:``) lives here.

- ``queue``: the durable job queue and its history (``Queue``, ``Job``,
  ``Candidate``), and the daemon's shared facts (``meta``);
- ``keys``: what a job is keyed on: content hashes, paths as stored;
- ``state``: the state file's folder, its lock (``StateLock``), why it cannot be opened;
- ``migrations``: the schema, as ordered, named migrations;
- ``search``: the full-text index of sidecars (FTS5), caught up from the jobs table;
- ``page``: the web page's one connection (``PageConnection``), which
  ``history`` (the page's reads of jobs and meta) and ``conversations``
  (its kept ask/compare conversations) run on.

Nothing here imports the server, the engine or the intake: they import this.
"""
