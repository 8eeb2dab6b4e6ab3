"""The routes: OpenAI-compatible ``/v1`` and vlwatch's own ``/api/v1``.

Each route is a thin call of a library function the CLI calls too
(``daemon.commands``); the chat route hands its request to the engine
(``WorkerLoop.submit``), which answers it ahead of the folder backlog.
Blocking work (SQLite, image decoding) runs in the thread pool, never on the
event loop.

``/api/v1/events`` follows the state database, not the engine: it polls
the job-change log (``Queue.events_since``) and the model's meta record every
``POLL`` seconds, so it sees jobs added by any process (``scan``,
``retry``), and a client may resume with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import stat
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Iterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from daemon import commands
from daemon.backends import Answer
from daemon.config import Config
from daemon.errors import BackendError, BackendUnavailableError, VlwatchError
from daemon.errors import printable
from daemon.intake.rules import links_out, normalised
from daemon.process import Submitted, submit
from daemon.server.chat import ChatCall, parse_chat, resolves_outside, served_roots
from daemon.server.context import ApiError, RowId, ServerContext, context, error_body, parse_json
from daemon.store.queue import STATES, Job, Queue

log = logging.getLogger(__name__)

router = APIRouter()

#: How often the event stream looks at the state database.
POLL = 0.5
#: A comment line this often keeps proxies and clients from timing an idle stream out.
HEARTBEAT = 15.0
#: Largest file ``/api/v1/file`` serves.
MAX_FILE = 512 * 1024 * 1024
#: What ``/api/v1/file`` serves besides sidecars: the image types the rules take.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".pdf", ".heic", ".heif"}
#: Every file the API serves carries this: a sidecar's HTML (the code task's
#: page, made by a model from an image anyone could drop) runs sandboxed, in
#: no origin, with no network, so it cannot call the API with the user's
#: cookie or reach anywhere else.
FILE_CSP = "sandbox; default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'; font-src data:"


async def _json_body(request: Request) -> Any:
    return parse_json(await request.body())


# ---------------------------------------------------------------- /v1


@router.api_route("/health", methods=["GET", "HEAD"])
def health() -> dict[str, str]:
    """What uptime monitors ask (HEAD too): the API answers; the daemon's state is /api/v1/status."""
    return {"status": "ok"}


@router.get("/v1/models")
def list_models(ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    config = ctx.config()
    return {"object": "list", "data": [{"id": config.model.name, "object": "model", "created": 0,
                                        "owned_by": "vlwatch"}]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, ctx: ServerContext = Depends(context)) -> Any:
    arrived = time.monotonic()
    body = await _json_body(request)
    config = ctx.config()
    if ctx.loop is None:
        raise ApiError(503, "no model is served by this process", code="model_not_served")
    read = time.monotonic()
    call = await run_in_threadpool(parse_chat, body, config)
    # Where a question's time goes before the engine sees it; the engine's feed logs how long it then
    # waited there (session 11's call Q2 placed a slow first token by these two lines: NOTES "Calls Q1, Q3, Q2").
    log.debug("chat request: body read in %.3f s, parsed in %.3f s", read - arrived, time.monotonic() - read)
    served = config.model.name
    if call.stream:
        return StreamingResponse(_chat_stream(ctx, call, served), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    future = ctx.loop.submit(call.request)
    try:
        answer = await _unless_client_leaves(request, asyncio.wrap_future(future))
    except asyncio.CancelledError:
        future.cancel()  # the server is stopping: drop the request
        raise
    except Exception as exc:
        raise _engine_error(exc) from None
    if answer is None:
        future.cancel()  # the client went away: the engine drops the request at its next step
        log.info("a chat request's client went away before its answer; the request is dropped")
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return _completion(answer, served, call.prompt_tokens)


async def _unless_client_leaves(request: Request, answer: Awaitable[Answer]) -> Answer | None:
    """``answer``'s result, or None as soon as the HTTP client disconnects (vLLM's ``with_cancellation``).

    The body has been read, so the next ASGI message is the disconnect: a
    non-streaming handler is otherwise never told that nobody waits any more.
    """
    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    waiting, listening = asyncio.ensure_future(answer), asyncio.ensure_future(client_left())
    try:
        await asyncio.wait((waiting, listening), return_when=asyncio.FIRST_COMPLETED)
    finally:
        listening.cancel()
    if waiting.done():
        return waiting.result()
    waiting.cancel()
    return None


def _engine_error(exc: BaseException) -> ApiError:
    if isinstance(exc, BackendUnavailableError):
        return ApiError(503, f"the model is unavailable: {exc}", code="model_unavailable")
    if isinstance(exc, (BackendError, VlwatchError)):
        return ApiError(500, f"the model failed: {exc}", code="model_error")
    log.error("chat request failed unexpectedly", exc_info=exc)
    return ApiError(500, "the model failed (see the daemon's log)", code="model_error")


def _completion(answer: Answer, served: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": "stop" if answer.finished else "length", "logprobs": None}],
        "usage": _usage(answer, prompt_tokens),
    }


def _usage(answer: Answer, prompt_tokens: int) -> dict[str, int]:
    # The prompt as the API counted it before the engine saw it (daemon.server.budget).
    return {"prompt_tokens": prompt_tokens, "completion_tokens": answer.new_tokens,
            "total_tokens": prompt_tokens + answer.new_tokens}


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _chat_stream(ctx: ServerContext, call: ChatCall, served: str) -> AsyncIterator[bytes]:
    """OpenAI's streaming shape: a role chunk, content chunks, a finish chunk, ``[DONE]``."""
    assert ctx.loop is not None
    aloop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def put(item: str | None) -> None:
        try:
            aloop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the event loop is gone (the server stopped): nobody is listening
            pass

    future = ctx.loop.submit(replace(call.request, stream=put))
    future.add_done_callback(lambda _: put(None))
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": served,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not None:
            if piece:
                yield chunk({"content": piece})
        try:
            answer = future.result()
        except Exception as exc:
            error = _engine_error(exc)
            yield _sse(error_body(error.message, status=error.status, code=error.code))
        else:
            yield chunk({}, "stop" if answer.finished else "length")
            if call.include_usage:
                yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": served,
                            "choices": [], "usage": _usage(answer, call.prompt_tokens)})
        yield b"data: [DONE]\n\n"
    finally:
        future.cancel()  # a client that left: drop the request if it has not started


# ------------------------------------------------------------- /api/v1


@router.get("/api/v1/status")
def status(ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    return commands.status_info(ctx.config())


@router.get("/api/v1/jobs")
def list_jobs(ctx: ServerContext = Depends(context), state: str | None = None,
              limit: int = Query(50, ge=1, le=1000), path: str | None = None, rule: str | None = None) -> dict[str, Any]:
    if state is not None and state not in STATES:
        raise ApiError(400, f"state: {state!r} is not one of {', '.join(STATES)}", param="state",
                       code="invalid_request")
    if path is not None and not os.path.isabs(path):
        raise ApiError(400, "path: expected an absolute path", param="path", code="invalid_request")
    return {"jobs": commands.jobs_info(ctx.config(), state, limit, path=None if path is None else Path(path),
                                       rule=rule)}


@router.get("/api/v1/jobs/{job_id}")
def get_job(job_id: RowId, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    job = commands.job_info(ctx.config(), job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}", code="job_not_found")
    return job


@router.post("/api/v1/jobs", status_code=202)
async def submit_jobs(request: Request, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    body = await _json_body(request)
    paths = body.get("paths") if isinstance(body, dict) else None
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ApiError(400, "paths: expected a non-empty list of absolute paths", param="paths", code="invalid_request")
    if len(paths) > 10_000:
        raise ApiError(400, "paths: at most 10000 per request", param="paths", code="invalid_request")
    rule = body.get("rule")
    if rule is not None and not isinstance(rule, str):
        raise ApiError(400, "rule: expected a rule name", param="rule", code="invalid_request")
    flags = {k: body.get(k, False) for k in ("force", "stale")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ApiError(400, f"{key}: expected true or false", param=key, code="invalid_request")
    try:
        results = await run_in_threadpool(_submit, ctx.config(), paths, rule, flags["force"], flags["stale"])
    except VlwatchError as exc:
        raise ApiError(400, str(exc), param="rule", code="unknown_rule") from None
    if ctx.loop is not None and any(r.state == "queued" for r in results):
        ctx.loop.wake()
    return {"jobs": [r.as_dict() for r in results]}


#: Why the API refuses a file that is a symbolic link out of the watched folders.
LINKS_OUT = "resolves outside every watched folder (a symbolic link; the watch has no follow_symlinks_out)"


def _submit(config: Config, paths: list[str], rule: str | None, force: bool, stale: bool) -> list[Submitted]:
    """``process.submit`` as the API may: absolute paths inside a watched folder only (issue 13.4),
    and not through a symbolic link out of them (issue 27: refused now, not failed three times later)."""
    refused = {i: Submitted(normalised(Path(p)), rule, error=LINKS_OUT) for i, p in enumerate(paths)
               if os.path.isabs(p) and links_out(config, normalised(Path(p)))}
    rest = [p for i, p in enumerate(paths) if i not in refused]
    with Queue(config.state) as queue:
        results = submit(config, queue, rest, rule, force=force, stale=stale, watched_only=True,
                         absolute_only=True) if rest else []
    if refused:
        results = _in_order(paths, refused, results)
    for r in results:  # one line per file, as the watcher logs its own
        if r.state == "queued":
            how = "queued through the API as" if r.queued else "moved ahead through the API:"
            log.info("%s: %s %s job #%s, ahead of the folder backlog", printable(r.path), r.rule, how, r.job_id)
    return results


def _in_order(paths: list[str], refused: dict[int, Submitted], submitted: list[Submitted]) -> list[Submitted]:
    """``refused`` (by index in ``paths``) and ``submit``'s answers (one or more per path, in order), merged."""
    out: list[Submitted] = []
    rest = iter(submitted)
    pending = next(rest, None)
    for i, p in enumerate(paths):
        if i in refused:
            out.append(refused[i])
            continue
        while pending is not None and pending.path in (normalised(Path(p)), Path(p)):
            out.append(pending)
            pending = next(rest, None)
    return out + ([pending] if pending is not None else []) + list(rest)


@router.post("/api/v1/jobs/{job_id}/retry")
def retry_job(job_id: RowId, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    config = ctx.config()
    job = commands.retry_job(config, job_id)
    if job is None:
        known = commands.job_info(config, job_id)
        if known is None:
            raise ApiError(404, f"no job {job_id}", code="job_not_found")
        raise ApiError(409, f"job {job_id} is {known['state']}, not failed", code="job_not_failed")
    if ctx.loop is not None:
        ctx.loop.wake()
    return job.as_dict()


# --------------------------------------------------------------- events

_EVENT_OF_STATE = {"queued": "job.queued", "running": "job.started", "done": "job.done", "failed": "job.failed"}


@router.get("/api/v1/events")
async def events(request: Request, ctx: ServerContext = Depends(context)) -> StreamingResponse:
    config = ctx.config()
    last_id = request.headers.get("last-event-id", "")
    queue = await run_in_threadpool(Queue, config.state)
    try:
        since = int(last_id) if last_id.isdigit() else await run_in_threadpool(queue.last_event)
    except BaseException:
        queue.close()
        raise
    return StreamingResponse(_event_stream(request, ctx, queue, since), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(request: Request, ctx: ServerContext, queue: Queue, since: int) -> AsyncIterator[bytes]:
    """Job and model events as they show in the state database; ends when the server stops."""
    model: tuple[object, object] | None = None
    beat = time.monotonic()
    try:
        yield b"retry: 2000\n\n"
        while not (ctx.stopping is not None and ctx.stopping.is_set()):
            changes, meta = await run_in_threadpool(_poll, queue, since)
            for seq, state, at, job in changes:
                since = seq
                data: dict[str, Any] = {"type": _EVENT_OF_STATE.get(state, f"job.{state}"), "at": at}
                data["job"] = job.as_dict() if isinstance(job, Job) else {"id": job}
                if isinstance(job, Job) and job.state != state:
                    data["job"]["state"] = state  # as it was then; it has moved on since
                yield f"id: {seq}\n".encode() + _sse(data)
            now_model = meta.get("model")
            key = (now_model or {}).get("loaded"), (now_model or {}).get("model")
            if model is not None and key != model and now_model is not None:
                kind = "model.loaded" if now_model.get("loaded") else "model.unloaded"
                yield _sse({"type": kind, "model": now_model})
            model = key
            if time.monotonic() - beat > HEARTBEAT:
                beat = time.monotonic()
                yield b": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL)
    finally:
        queue.close()


def _poll(queue: Queue, since: int) -> tuple[list[tuple[int, str, float, Job | int]], dict[str, Any]]:
    return queue.events_since(since), queue.meta()


# ----------------------------------------------------------------- files


@router.get("/api/v1/file")
def get_file(path: str, ctx: ServerContext = Depends(context)) -> StreamingResponse:
    config = ctx.config()
    if not path.startswith("/"):
        raise ApiError(400, "path: expected an absolute path", param="path", code="invalid_request")
    wanted = Path(os.path.normpath(path))
    roots = served_roots(config)
    if not any(r in wanted.parents for r in roots):
        raise ApiError(403, f"{printable(wanted)} is not inside a watched folder or output_dir", param="path",
                       code="path_not_allowed")
    names = {r.name for r in config.rules}
    from daemon.intake.sidecars import is_output_name

    if wanted.suffix.lower() not in IMAGE_SUFFIXES and not is_output_name(wanted.name, names):
        raise ApiError(403, f"{printable(wanted.name)} is neither an image nor a sidecar", param="path",
                       code="path_not_allowed")
    f = _open_inside(wanted, roots)
    media = _media_type(wanted)
    size = os.fstat(f.fileno()).st_size
    return StreamingResponse(_chunks(f), media_type=media, headers={
        "Content-Length": str(size), "Content-Security-Policy": FILE_CSP, "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache", "Content-Disposition": "inline"})


def _open_inside(path: Path, roots: tuple[Path, ...]) -> Any:
    """Open ``path`` and check the file actually opened lies inside ``roots`` (symlinks resolved)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if resolves_outside(path, roots):
        # Before the open: a missing file through a symlinked folder answers as an existing one would
        # (issue 27: 403 for one and 404 for the other told which outside files exist).
        raise ApiError(403, f"{printable(path)}: resolves to a file outside every watched folder",
                       param="path", code="path_not_allowed")
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ApiError(404, f"{printable(path)}: no such file", param="path", code="file_not_found") from None
    except OSError as exc:
        raise ApiError(403, f"{printable(path)}: cannot be read: {exc.strerror}", param="path",
                       code="path_not_allowed") from None
    try:
        st = os.fstat(fd)
        real = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists(f"/proc/self/fd/{fd}") \
            else Path(os.path.realpath(path))
        real_roots = [Path(os.path.realpath(r)) for r in roots]
        if not any(r in real.parents for r in real_roots):
            raise ApiError(403, f"{printable(path)}: resolves to a file outside every watched folder",
                           param="path", code="path_not_allowed")
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(404, f"{printable(path)}: not a regular file", param="path", code="file_not_found")
        if st.st_size > MAX_FILE:
            raise ApiError(413, f"{printable(path)}: over {MAX_FILE // (1024 * 1024)} MiB", param="path",
                           code="file_too_large")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _chunks(f: Any) -> Iterator[bytes]:
    with f:
        while chunk := f.read(1 << 16):
            yield chunk


def _media_type(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".md"):
        return "text/markdown; charset=utf-8"
    if name.endswith(".json"):
        return "application/json"
    if name.endswith(".html"):
        return "text/html; charset=utf-8"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
