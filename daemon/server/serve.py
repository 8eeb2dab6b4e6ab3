"""uvicorn in a thread of ``vlwatch run``.

The socket is bound here, synchronously, before uvicorn starts, so a port in
use or a bad socket path is known at once and reported in one log line; the
API is then off and the folder daemon keeps working (the API is a way in, not
the daemon's job).  uvicorn runs in its own thread with its own event loop
and installs no signal handlers there (it only does in the main thread):
the daemon's main loop handles SIGTERM and calls ``stop``.

A unix socket (``listen: unix:/path``) is created mode 0660 (owner and
group), before ``listen()``, so nobody can connect through wider permissions
in between.  A stale socket file left by a killed daemon is replaced; any
other file at that path is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Callable

from daemon.config import Config, split_host_port
from daemon.engine.loop import WorkerLoop
from daemon.errors import VlwatchError
from daemon.errors import printable

log = logging.getLogger(__name__)

#: Seconds a stop waits for open requests (an answer being streamed) to finish.
GRACE = 3.0


def bind(listen: str) -> socket.socket:
    """A listening socket for ``listen`` (``host:port`` or ``unix:/path``).

    Raises:
        VlwatchError: the address cannot be used, with the reason.
    """
    if listen.startswith("unix:"):
        return _bind_unix(Path(listen[5:]))
    host, port = split_host_port(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise VlwatchError(f"api.listen {listen}: cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise VlwatchError(f"api.listen {listen}: {exc.strerror or exc}") from exc
    sock.set_inheritable(False)
    return sock


def _bind_unix(path: Path) -> socket.socket:
    shown = printable(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise VlwatchError(f"api.listen unix:{shown}: {exc.strerror or exc}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise VlwatchError(f"api.listen unix:{shown}: exists and is not a socket; not replacing it")
        if _answers(path):
            raise VlwatchError(f"api.listen unix:{shown}: another process is listening there")
        path.unlink()  # left behind by a daemon that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Before listen(): no connection can be made through wider permissions.
        os.chmod(path, 0o660)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise VlwatchError(f"api.listen unix:{shown}: {exc.strerror or exc}") from exc
    sock.set_inheritable(False)
    return sock


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def read_token(config: Config) -> str | None:
    """The bearer token from the variable ``api.token_env`` names; None when none is configured.

    Raises:
        VlwatchError: the variable is named but empty or unset (the API must
            not come up open when a token was asked for).
    """
    name = config.api.token_env
    if name is None:
        return None
    token = os.environ.get(name, "").strip()
    if not token:
        raise VlwatchError(f"api.token_env names ${name}, which is not set (or empty); "
                           "the API stays off rather than run without its token")
    return token


class ApiServer:
    """The API of a running daemon: ``start`` binds and serves in a thread, ``stop`` ends it.

    Args:
        config: returns the config in force (reloads swap it).
        loop: the engine that answers chat requests.
    """

    def __init__(self, config: Callable[[], Config], loop: WorkerLoop | None) -> None:
        self._config = config
        self._loop = loop
        self._server = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._unix: Path | None = None
        self._stopping = threading.Event()
        self.listen: str | None = None

    def start(self) -> bool:
        """Bind and serve; False (after logging why) when the API stays off."""
        import uvicorn

        from daemon.server.app import create_app
        from daemon.server.connections import connection_cap, protocol_class, raise_fd_limit
        from daemon.server.context import ServerContext

        config = self._config()
        listen = config.api.listen
        if listen is None:
            log.info("api: off (api.listen is null)")
            return False
        try:
            token = read_token(config)
            self._socket = bind(listen)
        except VlwatchError as exc:
            log.error("api: not started: %s; the folders are still watched", exc)
            return False
        self._unix = config.api.unix_socket
        ctx = ServerContext(config=self._config, loop=self._loop, token=token, listen=listen,
                            stopping=self._stopping)
        app = create_app(ctx)
        # Bounded connections, a header timeout, a short keep-alive (issue 27; daemon.server.connections).
        cap = connection_cap(raise_fd_limit())
        uv_config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=GRACE, server_header=False, ws="none",
                                   http=protocol_class(cap), limit_concurrency=cap, timeout_keep_alive=5)
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self._serve, name="vlwatch-api", daemon=True)
        self._thread.start()
        self.listen = listen
        log.info("api: listening on %s%s", listen, " (bearer token required)" if token else "")
        if token is None and self._unix is None and os.environ.get("INVOCATION_ID"):
            log.warning("api: loopback TCP without a token is open to every local user, and this service may "
                        "read folders they cannot; listen on a unix: socket (docs/service.md, 'The API socket')")
        return True

    def _serve(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            asyncio.run(self._serve_quietly())
        except Exception:
            log.exception("api: the server failed")

    async def _serve_quietly(self) -> None:
        assert self._server is not None and self._socket is not None
        from daemon.server.connections import quiet_accept_errors

        asyncio.get_running_loop().set_exception_handler(quiet_accept_errors())
        await self._server.serve(sockets=[self._socket])

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, let open requests end (``GRACE`` seconds), close the socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACE + 2)
            if self._thread.is_alive():
                log.warning("api: the server did not stop within %gs", GRACE + 2)
        if self._socket is not None:
            self._socket.close()
        if self._unix is not None:
            try:
                self._unix.unlink()
            except OSError:
                pass
