"""Open WebUI's "External" content extraction engine: ``PUT /process``, answered by the model.

The request, as Open WebUI's ``ExternalDocumentLoader``
(``backend/open_webui/retrieval/loaders/external_document.py``) sends it:
the raw file bytes as the body, ``Content-Type`` (the upload's type, which
vlwatch ignores: the type comes from the bytes), ``Authorization: Bearer
KEY`` (checked by the API's guard like any request) and ``X-Filename``, the
file's name URL-quoted.  The answer it reads: ``{"page_content",
"metadata"}``.

The document goes through the same conversion as ``/v1/convert/file``
(``documents.Conversion``: the document rule, the shared engine at
interactive priority) and the same bounded wait (``api.sync_wait``; Open
WebUI gives up after its own ``EXTERNAL_DOCUMENT_LOADER_TIMEOUT``, 30 s by
default, and the conversion is then cancelled).  ``metadata`` holds plain
values only (Open WebUI stores it beside each chunk in its vector store,
some of which take no lists).

Errors are answered with an HTTP status and ``detail`` (Open WebUI quotes
it and falls back to its own loader): 415 for bytes that are no image or
PDF vlwatch reads, 503 when the model is unavailable, 504 past the wait,
502 when the model failed on every page.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from fastapi import APIRouter, Depends, Request

from daemon.server.context import ApiError, ServerContext, context
from daemon.server.convert import finish
from daemon.server.documents import Options, Upload, safe_name

router = APIRouter()


@router.put("/process")
async def process(request: Request, ctx: ServerContext = Depends(context)) -> Any:
    if ctx.loop is None:
        raise ApiError(503, "no model is served by this process", code="model_not_served", detail=True)
    data = await request.body()
    if not data:
        raise ApiError(400, "the body is empty: send the file's bytes", code="invalid_request", detail=True)
    name = safe_name(urllib.parse.unquote(request.headers.get("x-filename", "")))
    config = ctx.config()
    store = request.app.state.tasks
    task = store.start(ctx.loop, config, Upload(name, data), Options(to_formats=("md",)))
    try:
        converted = await finish(request, task, config.api.sync_wait)
    finally:
        store.forget(task.id)
    if converted is None:
        raise ApiError(504, f"{name}: not converted within api.sync_wait ({config.api.sync_wait:g}s)",
                       code="timeout", detail=True)
    if converted.md is None:
        message = "; ".join(e["error_message"] for e in converted.errors) or f"{name}: conversion failed"
        status, code = (415, "unsupported_input") if converted.input_error else \
            (503, "model_unavailable") if converted.unavailable else (502, "model_error")
        raise ApiError(status, message, code=code, detail=True)
    return {"page_content": converted.md,
            "metadata": {"source": name, "pages": converted.pages, "status": converted.status,
                         "rule": converted.rule, "extracted_by": "vlwatch"}}
