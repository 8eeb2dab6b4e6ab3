"""``GET /web/thumb``: the web page's thumbnails, downsized JPEGs of images in the watched folders.

Only a file inside a watched folder or an ``output_dir`` is read (the API's
``_open_inside``: symlinks resolved, 403/404 otherwise); the JPEGs are kept
in memory (``_ThumbCache``, keyed by path, size, mtime and width: a changed
file misses) and answered with an ETag, so a results page scrolled again
costs nothing.  A file that is not an image we can read gets a grey tile:
the page stays whole.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from daemon.errors import printable
from daemon.server.context import ServerContext, context
from daemon.server.web import allowed_path

log = logging.getLogger(__name__)

router = APIRouter()

THUMB_WIDTHS = (160, 320, 640)


class _ThumbCache:
    """Downsized images in memory, keyed by path, size, mtime and width (a changed file misses)."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


_thumbs = _ThumbCache()


@router.get("/web/thumb")
def thumb(request: Request, path: str, w: int = 320, ctx: ServerContext = Depends(context)) -> Response:
    """A JPEG of the image at ``path`` (inside a watched folder or output_dir), at most ``w`` pixels wide."""
    from daemon.server.api import _open_inside
    from daemon.server.chat import served_roots

    width = min(THUMB_WIDTHS, key=lambda t: abs(t - w))
    wanted = allowed_path(ctx.config(), path)
    roots = served_roots(ctx.config())
    f = _open_inside(wanted, roots)  # 403/404 for anything outside, symlinks resolved
    with f:
        st = os.fstat(f.fileno())
        key = (str(wanted), st.st_size, st.st_mtime_ns, width)
        etag = '"' + hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest() + '"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = _thumbs.get(key)
        if data is None:
            data = _make_thumb(wanted, width)
            _thumbs.put(key, data)
    return Response(data, media_type="image/jpeg", headers=headers)


def _make_thumb(path: Path, width: int) -> bytes:
    from daemon.images import open_image

    try:
        image = open_image(path)
    except Exception as exc:  # not an image we can read: a grey tile says so, the page stays whole
        log.debug("%s: no thumbnail: %s", printable(path), exc)
        return _placeholder(width)
    try:
        image.thumbnail((width, width * 4))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=82)
        return out.getvalue()
    finally:
        image.close()


def _placeholder(width: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, width * 3 // 4), (210, 210, 210)).save(out, format="JPEG")
    return out.getvalue()
