"""The ASGI application: one ``FastAPI`` with the checks every route gets.

``create_app(ctx)`` builds it around a ``ServerContext`` (the live config,
the engine's ``WorkerLoop``, the bearer token), kept on ``app.state.ctx``
for the routes.  In front of every route, static file and 404 alike, a
small ASGI middleware (``Guard``) enforces, in order:

1. the bearer token, when one is configured (``Authorization: Bearer``,
   or ``X-Api-Key`` as docling-serve's clients send it; compared in
   constant time; the web page may send it as the ``vlwatch_token`` cookie
   instead, which it sets ``SameSite=Strict``);
2. on loopback TCP, a ``Host`` header naming the loopback address: a web
   site the user visits cannot rebind its own name to 127.0.0.1 and read
   the API (DNS rebinding);
3. an ``Origin`` header, when a browser sends one, equal to the API's own:
   another site's page cannot post jobs or chats (CSRF);
4. on every state-changing method (anything but GET, HEAD, OPTIONS), a
   browser's ``Sec-Fetch-Site`` of ``same-origin`` or ``none`` (typed in,
   a bookmark): a browser that names another site is refused even without
   an ``Origin``, on ``/v1/chat/completions``, ``/api/v1/jobs`` and retry as
   on ``/web/*`` (issue 27: one rule for every route); programs that send no
   such header (curl, the SDKs) are not concerned;
5. the request body size (``MAX_BODY``), by ``Content-Length`` and by
   counting what actually arrives.

Errors leave in the OpenAI shape ``{"error": {"message", "type", "code"}}``,
also for FastAPI's validation errors (400, not 422) and anything unexpected
(500, logged with a traceback; the message says nothing about internals).
The token is never logged: uvicorn's access log is off.
"""

from __future__ import annotations

import hmac
import http.cookies
import importlib
import json
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from daemon.asking import MAX_BODY
from daemon.config import is_loopback_host
from daemon.server.context import ApiError, ServerContext, error_response

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)

# MAX_BODY, the largest request body (a conversation with a dozen full-size
# photos as data: URLs), lives with the API's client so both use one number.
#: The cookie the web page may carry the token in (a browser cannot add a header to a page load).
TOKEN_COOKIE = "vlwatch_token"


def create_app(ctx: ServerContext) -> FastAPI:
    """The application: ``daemon.server.api``'s routes, the document converters, the web page if installed, the guard."""
    from daemon.server import api, convert, extract
    from daemon.server.tasks import TaskStore

    app = FastAPI(title="vlwatch", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.state.tasks = TaskStore()
    app.include_router(api.router)
    app.include_router(convert.router)
    app.include_router(extract.router)
    web = _optional("daemon.server.web")
    if web is not None and hasattr(web, "router"):
        app.include_router(web.router)
        app.include_router(importlib.import_module("daemon.server.conversations").router)
        app.include_router(importlib.import_module("daemon.server.thumbnails").router)
    if web is not None and callable(getattr(web, "setup", None)):
        web.setup(app)  # e.g. app.mount("/static", StaticFiles(...)): the Guard covers mounts too
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(Guard, ctx=ctx)
    return app


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise  # the web module exists but something it imports is missing: say so
        return None


# ------------------------------------------------------------------ errors


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, code=exc.code, type=exc.type, param=exc.param, detail=exc.detail)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such path: {request.url.path}"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return error_response(400, "; ".join(parts) or "invalid request", code="invalid_request")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error (see the daemon's log)", code="internal_error")


# ------------------------------------------------------------------- guard

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class Guard:
    """Token, Host, Origin and body size, checked before any route sees a request (see the module doc)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        self.loopback_hosts = _loopback_hosts(ctx.listen)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(headers, scope.get("method", "GET"))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            await _drain(receive, int(length))
            await _too_large()(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _drain(receive, MAX_DRAIN)
                await _too_large()(scope, receive, send)

    def _refusal(self, headers: dict[str, str], method: str) -> JSONResponse | None:
        token = self.ctx.token
        if token is not None and not _token_ok(token, headers):
            return error_response(401, "a bearer token is required (Authorization: Bearer <token>, or "
                                       "X-Api-Key: <token>; the daemon reads it from the variable named by "
                                       "api.token_env)",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}, detail=True)
        host = headers.get("host", "")
        if self.loopback_hosts is not None and host.lower() not in self.loopback_hosts:
            return error_response(403, f"Host {host!r} is not this loopback address (DNS rebinding?)",
                                  code="bad_host")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in (f"http://{host.lower()}", f"https://{host.lower()}"):
            return error_response(403, f"cross-origin request from {origin!r} refused", code="bad_origin")
        site = headers.get("sec-fetch-site")
        if method not in SAFE_METHODS and site is not None and site not in ("same-origin", "none"):
            return error_response(403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]})",
                                  code="cross_site")
        return None


#: Methods that change nothing (RFC 9110, 9.2.1): the Sec-Fetch-Site rule spares them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


#: An oversized body is read and thrown away up to this much before the 413
#: goes out: closing a socket with unread data makes the kernel reset the
#: connection, and the client would lose the answer that says why.
MAX_DRAIN = 4 * MAX_BODY


async def _drain(receive: Receive, length: int) -> None:
    if length > MAX_DRAIN:
        return
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _too_large() -> JSONResponse:
    return error_response(413, f"request body over {MAX_BODY // (1024 * 1024)} MiB", code="body_too_large",
                          headers={"Connection": "close"})


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _token_ok(token: str, headers: dict[str, str]) -> bool:
    expected = token.encode()
    auth = headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
        return True
    # docling-serve's clients (Open WebUI's Docling loader...) send their key here.
    api_key = headers.get("x-api-key")
    if api_key is not None and hmac.compare_digest(api_key.strip().encode(), expected):
        return True
    cookie = headers.get("cookie")
    if cookie:
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(cookie)
        except http.cookies.CookieError:
            return False
        morsel = jar.get(TOKEN_COOKIE)
        if morsel is not None and hmac.compare_digest(morsel.value.encode(), expected):
            return True
    return False


def _loopback_hosts(listen: str | None) -> set[str] | None:
    """The Host values a loopback TCP listener accepts; None = no Host check (unix socket, non-loopback)."""
    from daemon.config import split_host_port

    if not listen or listen.startswith("unix:"):
        return None
    try:
        host, port = split_host_port(listen)
    except ValueError:
        return None
    if not is_loopback_host(host):
        return None  # reached by name from elsewhere; the token guards it
    names = {"localhost", "127.0.0.1", "[::1]", host if ":" not in host else f"[{host}]"}
    return {f"{n}:{port}" for n in names} | ({n for n in names} if port == 80 else set())
