"""The web page's ask/compare conversations: kept in the state database until cleared.

Routes under ``/web/conversations`` (the page's script drives them): create,
list, read, append a turn (the answer itself streams from
``/v1/chat/completions``; the script posts it back here), upload images
(kept only for their conversation, migration ``m031_conversations``), and
clear everything.  Split from ``web.py``, whose page state and CSRF check
they share.  What they keep and read is ``daemon.store.conversations``: no
SQL here.
"""

from __future__ import annotations

import io
import logging
import time
import urllib.parse
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from daemon import answers
from daemon.config import Config
from daemon.pages import shown_size
from daemon.server.context import ApiError, RowId, ServerContext, context
from daemon.store import conversations as stored

# The page's shared helpers (state, CSRF check, body and time formats, file checks).
from daemon.server.web import (
    MAX_RENDER,
    MAX_UPLOAD,
    WebState,
    allowed_path,
    _json,
    _when,
    render_markdown,
    same_site,
    web_state,
)

log = logging.getLogger(__name__)

router = APIRouter()


ROLES = ("user", "assistant")


def _conversation(ws: WebState, cid: int) -> stored.Conversation:
    conv = stored.get(ws.store, cid)
    if conv is None:
        raise ApiError(404, f"no conversation {cid}", code="not_found")
    return conv


@router.get("/web/conversations")
def list_conversations(ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    ws = web_state(ctx)
    return {"conversations": [{"id": c.id, "title": c.title, "created": c.created, "updated": c.updated,
                               "when": _when(c.updated)} for c in stored.recent(ws.store, 200)]}


@router.post("/web/conversations")
async def new_conversation(request: Request, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    same_site(request)
    body = await _json(request)
    title = body.get("title") if isinstance(body.get("title"), str) else ""
    now = time.time()
    ws = web_state(ctx)
    cid = await run_in_threadpool(stored.create, ws.store, title, now)
    return {"id": cid, "created": now}


@router.get("/web/conversations/{cid}")
def get_conversation(cid: RowId, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    ws = web_state(ctx)
    conv = _conversation(ws, cid)
    messages = []
    for m in stored.messages(ws.store, cid):
        item: dict[str, Any] = {"role": m.role, "content": m.content, "created": m.created, "when": _when(m.created)}
        if m.role == "assistant" and isinstance(m.content, str):
            item.update(_rendered_answer(ctx.config(), ws, cid, m.content, m.id))
        messages.append(item)
    return {"id": cid, "title": conv.title, "created": conv.created, "updated": conv.updated,
            "messages": messages}


@router.post("/web/conversations/{cid}/messages")
async def add_messages(cid: RowId, request: Request, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """Body ``{"messages": [{"role", "content"}, ...]}``: a finished turn (question and answer) to keep."""
    same_site(request)
    body = await _json(request)
    ws = web_state(ctx)
    await run_in_threadpool(_conversation, ws, cid)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > 20:
        raise ApiError(400, "messages: expected a list of {role, content}", code="invalid_request")
    clean = [_checked_message(m, cid, i) for i, m in enumerate(messages)]
    now = time.time()

    def work() -> list[dict[str, Any]]:
        ids = stored.append_turn(ws.store, cid, clean, _title(clean), now)
        rendered = []
        for mid, (role, content) in zip(ids, clean):
            item: dict[str, Any] = {"id": mid, "role": role}
            if role == "assistant" and isinstance(content, str):
                item.update(_rendered_answer(ctx.config(), ws, cid, content, mid))
            rendered.append(item)
        return rendered

    return {"messages": await run_in_threadpool(work)}


def _title(messages: list[tuple[str, Any]]) -> str:
    for role, content in messages:
        if role != "user":
            continue
        text = content if isinstance(content, str) else " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return " ".join(text.split())[:80]
    return ""


def _checked_message(m: Any, cid: int, i: int) -> tuple[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"{where}: expected role user or assistant", code="invalid_request")
    content = m.get("content")
    if isinstance(content, str):
        return m["role"], content[:MAX_RENDER]
    if not isinstance(content, list) or len(content) > 40:
        raise ApiError(400, f"{where}.content: expected text or a list of parts", code="invalid_request")
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"][:MAX_RENDER]})
            continue
        url = p.get("image_url", {}).get("url") if isinstance(p, dict) and isinstance(p.get("image_url"), dict) else None
        if isinstance(url, str) and (url.startswith("file:///") or url.startswith(f"/web/conversations/{cid}/images/")):
            # Only references are kept: a watched file, or an image uploaded to this conversation.
            parts.append({"type": "image_url", "image_url": {"url": url[:4096]}})
            continue
        raise ApiError(400, f"{where}.content[{j}]: expected a text part or an image_url of a watched file "
                            "or an image uploaded to this conversation", code="invalid_request")
    return m["role"], parts


def _rendered_answer(config: Config, ws: WebState, cid: int, text: str, before_id: int) -> dict[str, Any]:
    """An answer as safe HTML, and its boxes (if any) in the pixels of the last image asked about."""
    out: dict[str, Any] = {"html": render_markdown(text), "boxes": [], "image": None}
    if "bbox" not in text and "<|box_start|>" not in text:
        return out
    image = _last_image(ws, cid, before_id)
    if image is None:
        return out
    size = _image_size(config, ws, cid, image)
    if size is None:
        return out
    shown = shown_size(size[0], size[1], min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels)
    boxes = []
    for box in answers.parse_boxes(text).boxes:
        mapped = answers.map_box(box.bbox, shown, size)
        if mapped is not None:
            boxes.append({"label": box.label, "bbox": list(mapped)})
    out.update(boxes=boxes, image=image, size=list(size))
    return out


def _last_image(ws: WebState, cid: int, before_id: int) -> str | None:
    for content in stored.user_contents_before(ws.store, cid, before_id):
        if isinstance(content, list):
            urls = [p["image_url"]["url"] for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
            if urls:
                return urls[-1]
    return None


def _image_size(config: Config, ws: WebState, cid: int, url: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        if url.startswith("file://"):
            from daemon.images import open_image

            path = allowed_path(config, urllib.parse.unquote(urllib.parse.urlsplit(url).path))
            with open_image(path) as image:
                return image.size
        image_id = int(url.rsplit("/", 1)[-1])
        data = stored.image_data(ws.store, cid, image_id)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as image:
            from PIL import ImageOps

            return ImageOps.exif_transpose(image).size
    except Exception:  # an unreadable image has no boxes to show
        return None


@router.post("/web/conversations/{cid}/images")
async def upload_image(cid: RowId, request: Request, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """The raw image bytes as the body; kept only for this conversation (cleared with it)."""
    same_site(request)
    data = await request.body()
    if not data or len(data) > MAX_UPLOAD:
        raise ApiError(413 if data else 400, f"an image of 1 byte to {MAX_UPLOAD // (1024 * 1024)} MiB is expected",
                       code="invalid_image")
    mime = _image_type(data)
    if mime is None:
        raise ApiError(400, "the upload is not an image this page can show (PNG, JPEG, WebP, GIF, BMP)",
                       code="invalid_image")
    name = request.headers.get("x-filename", "image")[:200]
    ws = web_state(ctx)
    await run_in_threadpool(_conversation, ws, cid)
    image_id = await run_in_threadpool(stored.add_image, ws.store, cid, name, mime, data, time.time())
    return {"id": image_id, "url": f"/web/conversations/{cid}/images/{image_id}", "name": name}


def _image_type(data: bytes) -> str | None:
    """The MIME type of an image the browser can show, judged by its bytes (never by what the client said)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except Exception:
        return None
    return {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
            "BMP": "image/bmp"}.get(fmt or "")


@router.get("/web/conversations/{cid}/images/{image_id}")
def get_image(cid: RowId, image_id: RowId, ctx: ServerContext = Depends(context)) -> Response:
    ws = web_state(ctx)
    image = stored.image(ws.store, cid, image_id)
    if image is None:
        raise ApiError(404, f"no image {image_id} in conversation {cid}", code="not_found")
    return Response(image.data, media_type=image.mime,
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600",
                             "Content-Security-Policy": "sandbox; default-src 'none'"})


@router.post("/web/conversations/clear")
async def clear_conversations(request: Request, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """Forget every conversation and the images uploaded for them."""
    same_site(request)
    ws = web_state(ctx)
    return {"cleared": await run_in_threadpool(stored.clear, ws.store)}

