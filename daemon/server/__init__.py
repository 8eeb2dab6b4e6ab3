"""The daemon's HTTP face: the OpenAI-compatible API, vlwatch's own ``/api/v1`` and the web page.

- ``app``: ``create_app(ctx)``, the ASGI application: auth, size limits and
  errors in the OpenAI shape for every route (the web page's too);
- ``api``: the routes of ``/v1`` and ``/api/v1`` (they call the same library
  functions as the CLI: ``daemon.commands``);
- ``chat``: an OpenAI chat request turned into a ``Request`` (images decoded
  and sized by ``daemon.images``, paths kept inside the watched folders);
- ``serve``: uvicorn in a thread of ``vlwatch run``;
- ``web`` (when present): the web page at ``/``.

Nothing imports this package except ``daemon.service`` (to start it) and the
CLI's client side (``daemon.asking.ask``) never does: it talks HTTP.
"""
