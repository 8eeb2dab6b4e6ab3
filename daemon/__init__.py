"""vlwatch: drop an image into a watched folder, get the model's answer beside it.

The package is laid out as one module per pipeline stage, and data flows one
way through them:

    config -> intake (watching, readiness, rules) -> queue -> worker -> backends -> outputs

with ``images`` (decoding and sizing) feeding the worker, and ``cli``,
``service`` and ``periodic`` on top.  Nothing imports ``cli``.
"""

__version__ = "0.1.0"
