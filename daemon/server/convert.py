"""The subset of docling-serve's API that paperless-gpt and Open WebUI call, answered by the model.

Routes (shapes from docling-serve's ``docling_serve/app.py`` and docling's
``docling/datamodel/service/responses.py``):

- ``POST /v1/convert/file``: multipart, the document in the field
  ``files``; options as flat form fields.  ``POST /v1/convert/source``:
  JSON ``{"sources": [{"kind": "file", "base64_string", "filename"} |
  {"kind": "http", "url", "headers"}], "options": {...}}`` (the older
  ``file_sources`` / ``http_sources`` lists too).  Both answer
  ``{"document": {"filename", "md_content", "text_content", "html_content",
  "json_content", "doctags_content"}, "status", "errors",
  "processing_time", "timings"}``, formats not asked for null.
- ``.../async`` twins answer at once with ``{"task_id", "task_type",
  "task_status", "task_position", "task_meta"}``; ``callbacks`` (a bare URL
  or a JSON ``{"url", "headers"}`` per form field, or a JSON list) are POSTed
  when the task ends.  ``GET /v1/status/poll/{task_id}?wait=S`` waits up to
  S seconds (at most ``MAX_POLL_WAIT``) for the end; ``GET
  /v1/result/{task_id}`` is a 404 until then.
- ``GET /health``: ``{"status": "ok"}``.

Options honoured: ``to_formats`` (``md``, ``text``, ``html``; others get a
"not supported" entry in ``errors``), ``page_range``, ``target_type`` /
``target`` (``inbody`` only).  Every other docling option (``do_ocr``,
``pipeline``, ``image_export_mode``, ``ocr_engine``, ``table_mode``...) is
accepted and ignored: the model reads every page as an image either way.

One document per request: docling-serve answers several with a zip
archive, which vlwatch does not make.  The synchronous routes answer
within ``api.sync_wait`` or with docling-serve's 504 (its
``DOCLING_SERVE_MAX_SYNC_WAIT``), which names the async route; a
synchronous conversion whose client leaves or times out is cancelled, so
it holds the model no longer.  ``kind: http`` sources are refused unless
``api.http_sources: true`` (nothing is fetched from the network otherwise).
Errors carry docling's ``detail`` beside vlwatch's usual ``error`` object.

Accepted risk: a caller of the API (who holds the token, off loopback) can
make the daemon POST to any http(s) URL it names in ``callbacks``; what is
sent is only the task's id and status, never the document or its text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from daemon.asking import MAX_BODY
from daemon.config import Config
from daemon.errors import VlwatchError
from daemon.server.context import ApiError, ServerContext, context
from daemon.server.documents import Converted, Options, Upload, safe_name
from daemon.server.tasks import Callback, Task, TaskStore
from daemon.webhooks import redacted, url_problem

log = logging.getLogger(__name__)

router = APIRouter()

#: Longest ``wait`` a status poll is held for (a client asking more is answered then).
MAX_POLL_WAIT = 120.0
#: Seconds a ``kind: http`` source may take to arrive (when ``api.http_sources`` allows them).
FETCH_TIMEOUT = 60.0


def _tasks(request: Request) -> TaskStore:
    return request.app.state.tasks


def _bad(message: str, param: str | None = None, status: int = 400, code: str = "invalid_request") -> ApiError:
    return ApiError(status, message, param=param, code=code, detail=True)


# ------------------------------------------------------------------ routes


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/v1/convert/file")
async def convert_file(request: Request, ctx: ServerContext = Depends(context)) -> Any:
    upload, options, _ = await _file_request(request, with_callbacks=False)
    return await _sync(request, ctx, upload, options)


@router.post("/v1/convert/file/async")
async def convert_file_async(request: Request, ctx: ServerContext = Depends(context)) -> Any:
    upload, options, callbacks = await _file_request(request, with_callbacks=True)
    return _status(_tasks(request), _start(request, ctx, upload, options, callbacks))


@router.post("/v1/convert/source")
async def convert_source(request: Request, ctx: ServerContext = Depends(context)) -> Any:
    upload, options, fetch, _ = await _source_request(request, ctx.config())
    return await _sync(request, ctx, upload, options, fetch=fetch)


@router.post("/v1/convert/source/async")
async def convert_source_async(request: Request, ctx: ServerContext = Depends(context)) -> Any:
    upload, options, fetch, callbacks = await _source_request(request, ctx.config())
    return _status(_tasks(request), _start(request, ctx, upload, options, callbacks, fetch=fetch))


@router.get("/v1/status/poll/{task_id}")
async def poll(task_id: str, request: Request, wait: float = 0.0) -> Any:
    task = _task(request, task_id)
    if wait > 0 and task.result is None:
        done = asyncio.wrap_future(task.conversion.future)
        await asyncio.wait({done}, timeout=min(wait, MAX_POLL_WAIT))  # never cancels the conversion
    return _status(_tasks(request), task)


@router.get("/v1/result/{task_id}")
def result(task_id: str, request: Request) -> Any:
    task = _task(request, task_id)
    converted = task.result
    if converted is None:
        raise _bad("Task result not found. Please wait for a completion status.", status=404,
                   code="task_not_finished")
    return response_body(converted)


def _task(request: Request, task_id: str) -> Task:
    task = _tasks(request).get(task_id)
    if task is None:
        raise _bad("Task not found.", status=404, code="task_not_found")
    return task


# ------------------------------------------------------------- answering


def response_body(c: Converted) -> dict[str, Any]:
    """docling-serve's ConvertDocumentResponse for one document."""
    return {
        "document": {"filename": c.filename, "md_content": c.md, "json_content": None, "html_content": c.html,
                     "text_content": c.text, "doctags_content": None},
        "status": c.status,
        "errors": list(c.errors),
        "processing_time": c.seconds,
        "timings": {},
    }


def _status(store: TaskStore, task: Task) -> dict[str, Any]:
    """docling-serve's TaskStatusResponse."""
    converted = task.result
    failed = converted is not None and converted.status == "failure"
    return {"task_id": task.id, "task_type": "convert", "task_status": task.status,
            "task_position": store.position(task), "task_meta": task.meta(),
            "error_message": "; ".join(e["error_message"] for e in converted.errors) if failed else None}


def _start(request: Request, ctx: ServerContext, upload: Upload, options: Options,
           callbacks: tuple[Callback, ...] = (), fetch: Any = None) -> Task:
    if ctx.loop is None:
        raise _bad("no model is served by this process", status=503, code="model_not_served")
    return _tasks(request).start(ctx.loop, ctx.config(), upload, options, callbacks=callbacks, fetch=fetch)


async def _sync(request: Request, ctx: ServerContext, upload: Upload, options: Options, fetch: Any = None) -> Any:
    task = _start(request, ctx, upload, options, fetch=fetch)
    config = ctx.config()
    try:
        converted = await finish(request, task, config.api.sync_wait)
    finally:
        _tasks(request).forget(task.id)
    if converted is None:
        raise _bad(f"Conversion is taking too long: the synchronous endpoints wait at most "
                   f"{config.api.sync_wait:g}s (api.sync_wait). Use /v1/convert/file/async or "
                   "/v1/convert/source/async and poll /v1/status/poll/{task_id}.", status=504, code="timeout")
    if converted.unavailable:
        raise _bad(f"the model is unavailable: {converted.errors[-1]['error_message']}", status=503,
                   code="model_unavailable")
    return response_body(converted)


async def finish(request: Request, task: Task, seconds: float) -> Converted | None:
    """``task``'s outcome within ``seconds``, or None after cancelling it (timed out, or the client left)."""
    done = asyncio.wrap_future(task.conversion.future)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                task.conversion.cancel(f"not done within api.sync_wait ({seconds:g}s)")
                return None
            finished, _ = await asyncio.wait({done}, timeout=min(1.0, left))
            if finished:
                return task.result
            if await request.is_disconnected():
                task.conversion.cancel("the client went away")
                return None
    except asyncio.CancelledError:  # the server stops
        task.conversion.cancel("the server is stopping")
        raise


# --------------------------------------------------------------- parsing


async def _file_request(request: Request, *, with_callbacks: bool) -> tuple[Upload, Options, tuple[Callback, ...]]:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise _bad("expected a multipart/form-data body with the document in the field 'files'", "files")
    try:
        form = await request.form(max_files=8, max_fields=200)
    except Exception as exc:  # noqa: BLE001 - python-multipart's errors: the body is not valid multipart
        raise _bad(f"the multipart body cannot be read: {type(exc).__name__}: {exc}", "files") from None
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise _bad("files: no document was sent (a file in the multipart field 'files')", "files")
        if len(files) > 1:
            raise _bad("files: one document per request (docling-serve answers several as a zip archive, "
                       "which vlwatch does not make); send them one at a time", "files")
        data = await files[0].read()
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(key, []).append(value)
        options = _options(fields, "")
        target = (fields.get("target_type") or ["inbody"])[-1]
        _check_target(target, "target_type")
        callbacks = _callbacks(fields.get("callbacks", []), "callbacks") if with_callbacks else ()
        return Upload(safe_name(files[0].filename), data), options, callbacks
    finally:
        await form.close()


def _options(fields: dict[str, list[Any]], where: str) -> Options:
    """The options vlwatch honours, from form fields (lists of strings) or a JSON object (as lists)."""
    formats: list[str] = []
    for value in fields.get("to_formats", []):
        items = value if isinstance(value, list) else str(value).split(",")
        for item in items:
            name = str(item).strip().lower()
            if name and name not in formats:
                formats.append(name)
    page_range = None
    values = [v for value in fields.get("page_range", []) for v in (value if isinstance(value, list) else [value])]
    if values:
        try:
            numbers = [int(v) for v in values]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 2 or numbers[0] < 1 or numbers[1] < numbers[0]:
            raise _bad(f"{where}page_range: expected two page numbers, first and last, counting from 1",
                       f"{where}page_range")
        page_range = (numbers[0], numbers[1])
    return Options(to_formats=tuple(formats) or ("md",), page_range=page_range)


def _check_target(target: object, where: str) -> None:
    if target not in ("inbody", None):
        raise _bad(f"{where}: {target!r} is not supported: vlwatch answers in the body only (inbody)", where)


def _callbacks(values: list[Any], where: str) -> tuple[Callback, ...]:
    out: list[Callback] = []
    items: list[Any] = []
    for value in values:
        if isinstance(value, str) and value.strip()[:1] in ("{", "["):
            try:
                value = json.loads(value)
            except ValueError:
                raise _bad(f"{where}: not valid JSON: a bare URL or {{\"url\": ..., \"headers\": {{...}}}}",
                           where) from None
        items.extend(value if isinstance(value, list) else [value])
    for i, item in enumerate(items):
        url, headers = (item.get("url"), item.get("headers") or {}) if isinstance(item, dict) else (item, {})
        if (problem := url_problem(url)) is not None:
            raise _bad(f"{where}[{i}]: {problem}", where)
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in headers.items()):
            raise _bad(f"{where}[{i}].headers: expected an object of strings", where)
        out.append(Callback(str(url).strip(), tuple(headers.items())))
    if len(out) > 8:
        raise _bad(f"{where}: at most 8 per task", where)
    return tuple(out)


async def _source_request(request: Request, config: Config) -> tuple[Upload, Options, Any, tuple[Callback, ...]]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object with 'sources'")
    sources = _sources(body)
    if len(sources) != 1:
        raise _bad(f"sources: one document per request, got {len(sources)} (docling-serve answers several as a "
                   "zip archive, which vlwatch does not make)", "sources")
    raw_options = body.get("options") or {}
    if not isinstance(raw_options, dict):
        raise _bad("options: expected an object", "options")
    options = _options({k: [v] for k, v in raw_options.items()}, "options.")
    target = body.get("target")
    _check_target(target.get("kind") if isinstance(target, dict) else target, "target.kind")
    callbacks = _callbacks(body.get("callbacks") or [], "callbacks")
    upload, fetch = _source(sources[0], "sources[0]", config)
    return upload, options, fetch, callbacks


def _sources(body: dict[str, Any]) -> list[Any]:
    if "sources" in body:
        sources = body["sources"]
        if not isinstance(sources, list):
            raise _bad("sources: expected a list", "sources")
        return sources
    # docling-serve before 1.0: file_sources / http_sources
    legacy = [{"kind": "file", **s} for s in body.get("file_sources") or () if isinstance(s, dict)]
    legacy += [{"kind": "http", **s} for s in body.get("http_sources") or () if isinstance(s, dict)]
    return legacy


def _source(source: Any, where: str, config: Config) -> tuple[Upload, Any]:
    if not isinstance(source, dict):
        raise _bad(f"{where}: expected an object with kind", where)
    kind = source.get("kind")
    if kind == "file":
        payload = source.get("base64_string")
        if not isinstance(payload, str) or not payload:
            raise _bad(f"{where}.base64_string: expected the document as base64", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}.base64_string: not valid base64", where) from None
        return Upload(safe_name(source.get("filename") if isinstance(source.get("filename"), str) else None),
                      data), None
    if kind == "http":
        url = source.get("url")
        if (problem := url_problem(url)) is not None:
            raise _bad(f"{where}.url: {problem}", where)
        if not config.api.http_sources:
            raise _bad(f"{where}: kind 'http' is off: vlwatch fetches nothing from the network unless "
                       "api.http_sources is true; send the document as kind 'file' with base64_string",
                       where, status=403, code="url_not_allowed")
        headers = source.get("headers") or {}
        if not isinstance(headers, dict):
            raise _bad(f"{where}.headers: expected an object of strings", where)
        name = safe_name(str(url).split("?")[0].rstrip("/"))
        return Upload(name, b""), lambda: fetch(str(url), {str(k): str(v) for k, v in headers.items()})
    raise _bad(f"{where}.kind: {kind!r} is not 'file' or 'http'", where)


def fetch(url: str, headers: dict[str, str]) -> bytes:
    """A ``kind: http`` source's bytes (at most the API's body limit), or a ``VlwatchError`` saying why not."""
    import httpx

    shown = redacted(url)
    try:
        with httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=True, max_redirects=5, trust_env=False) as client:
            with client.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    raise VlwatchError(f"{shown}: HTTP {response.status_code}")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise VlwatchError(f"{shown}: over {MAX_BODY // 2**20} MiB")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise VlwatchError(f"{shown}: cannot be fetched ({type(exc).__name__})") from None

