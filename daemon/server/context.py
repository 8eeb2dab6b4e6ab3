"""What every route shares: the daemon's context, and errors in the OpenAI shape.

Kept apart from ``app.py`` (which assembles the routers) so the route modules
import this and the app imports them, with no circle between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Callable

from fastapi import Path as PathParam
from fastapi import Request
from fastapi.responses import JSONResponse

from daemon.config import Config

if TYPE_CHECKING:
    import threading

    from daemon.engine.loop import WorkerLoop


@dataclass
class ServerContext:
    """What the routes need from the daemon.

    Args:
        config: returns the config in force now (a reload swaps it).
        loop: the engine; None where the API runs without one (then the
            model routes answer 503).
        token: the bearer token every request must carry; None = none needed.
        listen: the address served, e.g. ``127.0.0.1:8765`` or ``unix:/run/x.sock``
            (the ``Host`` check of loopback TCP uses it).
        stopping: set when the server shuts down, so long streams end.
    """

    config: Callable[[], Config]
    loop: "WorkerLoop | None" = None
    token: str | None = None
    listen: str | None = None
    stopping: "threading.Event | None" = field(default=None)


class ApiError(Exception):
    """An error answer in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 type: str | None = None, param: str | None = None, detail: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or _error_type(status)
        self.param = param
        #: also give the message as a top-level ``detail``, where FastAPI-based
        #: servers put it (docling-serve's clients read that)
        self.detail = detail


def error_body(message: str, *, status: int, code: str | None = None, type: str | None = None,
               param: str | None = None, detail: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"message": message, "type": type or _error_type(status), "param": param,
                                      "code": code}}
    if detail:
        body["detail"] = message
    return body


def error_response(status: int, message: str, *, code: str | None = None, type: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None,
                   detail: bool = False) -> JSONResponse:
    return JSONResponse(error_body(message, status=status, code=code, type=type, param=param, detail=detail),
                        status_code=status, headers=headers)


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "request_too_large"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def context(request: Request) -> ServerContext:
    """The ``ServerContext`` of the app serving ``request`` (for routes: ``Depends(context)``)."""
    return request.app.state.ctx


#: SQLite's largest integer: a row id past it cannot exist, and binding one raises OverflowError.
MAX_ROW_ID = 2**63 - 1
#: A row id in a route's path (a job, a conversation): a larger number is a 400, not a 500.
RowId = Annotated[int, PathParam(ge=0, le=MAX_ROW_ID)]


def parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw``; a 400 for anything that is not one (issue 27: never a 500).

    Python's parser recurses once per nesting level: a body of 100,000
    ``[`` raises ``RecursionError``, which is the client's error like any
    other malformed body.
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
