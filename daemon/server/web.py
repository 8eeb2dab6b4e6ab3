"""The web page served by ``vlwatch run`` at ``GET /``: see what happened, find anything, fix failures, ask.

Server-rendered (Jinja2, autoescape on) with one small vendored script
(``static/vlwatch.js``, plain JS, no build step).  Pages:

- ``/``          overview (queue, backlog progress and rate, model, last
                 failures, latest results), kept live by the script from
                 ``/api/v1/events`` (SSE) and ``/web/overview.json``;
- ``/results``   every current result, newest first, thumbnail beside its
                 rendered sidecar; keyset-paginated on ``(finished_at, id)``
                 so page 5,000 costs what page 1 does;
- ``/search``    full-text search (``daemon.store.search``), with folder, rule and
                 date filters; ``GET /api/v1/search`` answers from the same function;
- ``/failures``  reasons, files, retry one or all;
- ``/ask``       ask and compare: images from the watched folders or
                 uploaded, a streamed answer (the script reads
                 ``/v1/chat/completions``), conversations kept in the state
                 database until cleared (``conversations.py``, its routes).

Security (issue 14): every page carries a strict Content-Security-Policy
(``script-src 'self'``, no inline script or style, frames only from
``/api/v1/file``, whose responses are themselves sandboxed); a sidecar's
HTML is shown in an ``<iframe sandbox>`` with neither ``allow-scripts`` nor
``allow-same-origin``; Markdown is rendered with raw HTML off and images
shown as their alt text; model text and file names are escaped by the
templates; files are served only through the API's checks (inside a
watched folder or output_dir, symlinks resolved).  State changes are POSTs;
the app's guard refuses cross-origin ``Origin`` headers, and these routes
also refuse a browser's cross-site ``Sec-Fetch-Site``.  The bearer token
(off loopback) guards every route here too: the guard sits in front of the
whole app.

What the pages show is read through ``daemon.store.history`` (the
conversations through ``daemon.store.conversations``): no SQL here.

Deliberately not here: editing sidecars, deleting files, or queueing new
files (the API's ``POST /api/v1/jobs`` does that).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from markdown_it import MarkdownIt
from starlette.concurrency import run_in_threadpool

from daemon.config import Config
from daemon.errors import printable
from daemon.server.context import MAX_ROW_ID, ApiError, ServerContext, context, parse_json
from daemon.store import history
from daemon.store.history import Done, Failed
from daemon.store.keys import safe_text
from daemon.store.page import PageConnection
from daemon.store.search import Filters, SearchIndex, parse_date

log = logging.getLogger(__name__)

router = APIRouter()

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
PAGE_SIZE = 20
#: Sidecar text rendered on a results page (a runaway answer must not make the page huge).
MAX_RENDER = 200_000
#: Uploaded images: at most this big each (the chat API's own limit is similar).
MAX_UPLOAD = 20 * 1024 * 1024
#: How many recent jobs count towards "rate".
RATE_WINDOW = 600.0

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _when(ts: object) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _iso(ts: object) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


_env.filters["when"] = _when
_env.filters["iso"] = _iso
_env.filters["printable"] = printable


def _q(value: object) -> str:
    """A path (or any text) for a query string; a non-UTF-8 name keeps its raw bytes."""
    return urllib.parse.quote(os.fsencode(str(value)), safe="/")


_env.filters["q"] = _q


# ------------------------------------------------------------------ markdown


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")

    def image_as_text(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        # A model's ![](https://...) would make the page fetch from anywhere (and the CSP
        # refusal would be noise); its alt text is what the reader needs.
        alt = "".join(t.content for t in (tokens[idx].children or ()))
        return f'<span class="img-alt">[image: {md.utils.escapeHtml(alt)}]</span>' if alt else ""

    md.add_render_rule("image", image_as_text)
    md.core.ruler.push("align_as_class", _align_as_class)
    return md


def _align_as_class(state: Any) -> None:
    """Table alignment as a class: the page's CSP allows no inline style (``style="text-align:..."``)."""
    for token in state.tokens:
        if token.type in ("th_open", "td_open"):
            style = token.attrs.pop("style", None) if token.attrs else None
            if isinstance(style, str) and style.startswith("text-align:"):
                token.attrSet("class", "align-" + style.split(":", 1)[1].strip())


_MD = _markdown()


def render_markdown(text: str) -> str:
    """Markdown -> HTML with every raw HTML tag escaped (model text is hostile)."""
    return _MD.render(text[:MAX_RENDER])


# ------------------------------------------------------------------ headers


def page_csp(request: Request) -> str:
    base = str(request.base_url).rstrip("/")
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"connect-src 'self'; frame-src {base}/api/v1/file; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


def _page(request: Request, template: str, **values: Any) -> HTMLResponse:
    config = request.app.state.ctx.config()
    body = _env.get_template(template).render(request=request, nav=template.split(".")[0],
                                              model_name=config.model.name, **values)
    return HTMLResponse(body, headers=_page_headers(request))


def _page_headers(request: Request) -> dict[str, str]:
    return {"Content-Security-Policy": page_csp(request), "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


def same_site(request: Request) -> None:
    """Refuse a state change a browser says comes from another site (CSRF, with the guard's Origin check)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise ApiError(403, f"cross-site request refused (Sec-Fetch-Site: {site})", code="cross_site")


# ------------------------------------------------------------------ state


class WebState:
    """The page's connection to the state database and the search index, per state file.

    One connection (``daemon.store.page.PageConnection``), used under its
    lock (routes run in the thread pool); reads never take a write lock, so
    the page never slows the daemon.  Routes read and write through
    ``daemon.store.history`` and ``daemon.store.conversations``.  The
    search index is built in a background thread the first time the page
    is used, then kept in step by each search and every ``CATCH_UP`` seconds.
    """

    CATCH_UP = 20.0
    SWEEP = 600.0

    def __init__(self, state: Path, stopping: threading.Event | None) -> None:
        self.state = state
        self.store = PageConnection(state)
        self.index = SearchIndex(state)  # migrates the database if needed
        self._stopping = stopping or threading.Event()
        self._closed = threading.Event()
        self._indexer = threading.Thread(target=self._index_loop, name="web-search-index", daemon=True)
        self._indexer.start()

    def close(self) -> None:
        self._closed.set()
        self._indexer.join(30)
        with self.store.lock:
            self.index.close()
            self.store.close()

    def _index_loop(self) -> None:
        last_sweep = time.monotonic()
        while not (self._stopping.is_set() or self._closed.is_set()):
            try:
                with self.index.catching:
                    self.index.catch_up()
                if time.monotonic() - last_sweep > self.SWEEP:
                    self.index.sweep()
                    last_sweep = time.monotonic()
            except Exception:  # a locked or full disk: log, try again later
                log.exception("search index: catch-up failed; retrying in %gs", self.CATCH_UP)
            self._closed.wait(self.CATCH_UP)


_states: dict[Path, WebState] = {}
_states_lock = threading.Lock()


def web_state(ctx: ServerContext) -> WebState:
    config = ctx.config()
    with _states_lock:
        ws = _states.get(config.state)
        if ws is None:
            ws = _states[config.state] = WebState(config.state, ctx.stopping)
        return ws


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Result:
    id: int
    path: Path
    rule: str
    finished_at: float
    seconds: float | None
    sidecars: tuple[Path, ...]
    kind: str  # md | html | json | ground | missing
    body_html: str = ""  # rendered Markdown (safe) or JSON text
    boxes: tuple[dict, ...] = ()
    size: tuple[int, int] | None = None
    frame: Path | None = None  # the html sidecar shown in the sandboxed iframe
    #: inside a watched folder or output_dir, so the API serves its files; False for a file
    #: `vlwatch process` took from elsewhere (shown without image, links or ask: see ``served``)
    served: bool = True

    @property
    def name(self) -> str:
        return printable(self.path.name)


#: vlwatch's own comment lines in a Markdown sidecar (``outputs.provenance_comment`` and the notes).
_OWN_NOTE = re.compile(r"^<!-- vlwatch: (.*) -->[ \t]*$", re.MULTILINE)


def own_notes(markdown: str) -> str:
    """A sidecar's Markdown for a result card: vlwatch's comments are not shown as text (issue 27).

    The page renders Markdown with raw HTML escaped, so an HTML comment
    would show verbatim.  The provenance line (which rule and model, when)
    is dropped: the card says that already; a note (cut off, kept
    repeating) stays visible, as an emphasised line.
    """
    def shown(m: re.Match[str]) -> str:
        note = m.group(1)
        return "" if note.startswith("rule ") else f"*[vlwatch: {note}]*"

    return _OWN_NOTE.sub(shown, markdown).rstrip() + "\n"


def _result(job: Done) -> Result:
    base = dict(id=job.id, path=job.path, rule=job.rule, finished_at=job.finished_at,
                seconds=job.seconds, sidecars=job.sidecars)
    text_sidecar = next((s for s in job.sidecars if s.suffix in (".md", ".html", ".json")), None)
    if text_sidecar is None:
        return Result(**base, kind="missing")
    if text_sidecar.suffix == ".html":
        return Result(**base, kind="html", frame=text_sidecar)
    try:
        with open(text_sidecar, "rb") as f:
            text = f.read(MAX_RENDER).decode("utf-8", "replace")
    except OSError:
        return Result(**base, kind="missing")
    if text_sidecar.suffix == ".md":
        return Result(**base, kind="md", body_html=render_markdown(own_notes(text)))
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("boxes"), list):
        boxes = tuple(b for b in doc["boxes"] if _is_box(b))
        size = doc.get("size")
        size_t = (int(size[0]), int(size[1])) if _is_size(size) else None
        return Result(**base, kind="ground", boxes=boxes, size=size_t)
    answer = doc.get("answer") if isinstance(doc, dict) else None
    shown = answer if isinstance(answer, str) else text
    return Result(**base, kind="json", body_html=render_markdown(f"```\n{shown}\n```"))


def _is_box(b: object) -> bool:
    return (isinstance(b, dict) and isinstance(b.get("label"), str) and isinstance(b.get("bbox"), list)
            and len(b["bbox"]) == 4 and all(isinstance(v, (int, float)) for v in b["bbox"]))


def _is_size(s: object) -> bool:
    return isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)


def results_page(ws: WebState, before: tuple[float, int] | None, limit: int = PAGE_SIZE,
                 rule: str | None = None) -> tuple[list[Result], tuple[float, int] | None]:
    """Current results newest first, after the keyset ``before``; and the key of the next page."""
    done, nxt = history.results(ws.store, before, limit, rule)
    return [_result(job) for job in done], nxt


def _parse_key(text: str | None) -> tuple[float, int] | None:
    if not text:
        return None
    at, _, job = text.partition(":")
    try:
        return float(at), int(job)
    except ValueError:
        raise ApiError(400, "before: expected FINISHED_AT:JOB_ID", param="before", code="invalid_request") from None


# ------------------------------------------------------------------ overview


def overview(ctx: ServerContext, ws: WebState) -> dict[str, Any]:
    """Everything the overview shows, as JSON (the page and its live updates use the same)."""
    config = ctx.config()
    now = time.time()
    counts = history.counts_by_state(ws.store)
    meta = history.meta(ws.store)
    daemon = meta.get("daemon") or {}
    started = daemon.get("started") if isinstance(daemon, dict) else None
    recent = history.done_since(ws.store, now - RATE_WINDOW)
    rate = recent / (RATE_WINDOW / 60.0)  # per minute
    done_since = counts["done"]
    if isinstance(started, (int, float)):
        done_since = history.done_since(ws.store, started)
    backlog = counts["queued"] + counts["running"]
    total = done_since + backlog
    failures = [_job_row(f) for f in history.failures(ws.store, 5)]
    latest = [{"id": j.id, "path": safe_text(str(j.path)), "name": printable(j.path.name),
               "rule": j.rule, "finished_at": j.finished_at, "when": _when(j.finished_at)}
              for j in history.latest_done(ws.store, 8)]
    return {
        "counts": counts,
        "backlog": backlog,
        "progress": {"done": done_since, "total": total, "percent": round(100.0 * done_since / total, 1) if total else 100.0},
        "rate_per_min": round(rate, 2),
        "eta_s": round(backlog / rate * 60) if rate > 0 and backlog else None,
        "model": _model_info(config, meta),
        "backend": meta.get("backend"),
        "daemon": {"pid": daemon.get("pid"), "started": started, "since": _when(started)} if daemon else None,
        "failures": failures,
        "latest": latest,
        "indexed": _indexed(ws),
        "at": now,
    }


def _indexed(ws: "WebState") -> int:
    """Sidecars in the search index, counting those finished since the last search (issue 27: the
    count only moved when someone searched).  At most ``INDEX_PER_REFRESH`` jobs are indexed per call:
    a burst is caught up over a few refreshes, and no refresh waits long."""
    ws.index.catch_up(limit=INDEX_PER_REFRESH)
    return ws.index.count()


#: Jobs the overview indexes per refresh (the rest at the next one, or at a search).
INDEX_PER_REFRESH = 200


def _model_info(config: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """The model, how it runs (attention, engine) and its state per GPU, from the config and the daemon's meta."""
    m = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    info: dict[str, Any] = {
        "name": m.get("model") or config.model.name,
        "backend": m.get("backend") or config.model.backend,
        "loaded": bool(m.get("loaded")),
        "since": _when(m.get("since")),
        "attention": m.get("attention") or config.model.attention,
        "engine": m.get("engine") or ("remote server" if config.model.backend == "openai" else ""),
        "dtype": m.get("dtype") or "",
        "device": m.get("device") or config.model.device,
    }
    gpus = m.get("gpus") or m.get("devices")
    info["gpus"] = [_gpu(g, i) for i, g in enumerate(gpus)] if isinstance(gpus, list) else []
    # Whatever else the engine records (it grows): shown as plain key/value text.
    known = {"model", "backend", "loaded", "since", "attention", "engine", "dtype", "device", "gpus", "devices"}
    info["extra"] = {str(k): _short(v) for k, v in m.items() if k not in known}
    return info


def _gpu(g: Any, i: int) -> dict[str, str]:
    if not isinstance(g, dict):
        return {"name": f"GPU {i}", "state": _short(g)}
    return {"name": _short(g.get("name") or g.get("device") or f"GPU {i}"),
            "state": _short(g.get("state") or ("loaded" if g.get("loaded") else "idle")),
            "detail": ", ".join(f"{k} {_short(v)}" for k, v in g.items()
                                if k not in ("name", "device", "state", "loaded"))}


def _short(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return text[:200]


def _job_row(f: Failed) -> dict[str, Any]:
    return {"id": f.id, "path": safe_text(str(f.path)), "name": printable(f.path.name), "rule": f.rule,
            "attempts": f.attempts, "finished_at": f.finished_at, "when": _when(f.finished_at),
            "error": f.error or ""}


# ------------------------------------------------------------------ pages


# HEAD too: uptime monitors ask with HEAD (issue 27); the server sends the headers only.
@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
def index_page(request: Request, ctx: ServerContext = Depends(context)) -> HTMLResponse:
    ws = web_state(ctx)
    return _page(request, "overview.html", o=overview(ctx, ws))


@router.get("/web/overview.json")
def overview_json(ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    return overview(ctx, web_state(ctx))


@router.get("/results", response_class=HTMLResponse)
def results_view(request: Request, before: str | None = None, rule: str | None = None,
                 ctx: ServerContext = Depends(context)) -> HTMLResponse:
    ws = web_state(ctx)
    results, nxt = results_page(ws, _parse_key(before), rule=rule or None)
    config = ctx.config()
    results = [replace(r, served=served(config, r.path)) for r in results]
    return _page(request, "results.html", results=results, next_key=f"{nxt[0]!r}:{nxt[1]}" if nxt else None,
                 rule=rule or "", rules=[r.name for r in ctx.config().rules], first=before is None)


@router.get("/search", response_class=HTMLResponse)
def search_view(request: Request, q: str = "", folder: str = "", rule: str = "", since: str = "", until: str = "",
                ctx: ServerContext = Depends(context)) -> HTMLResponse:
    ws = web_state(ctx)
    error, hits = None, []
    if q.strip():
        try:
            hits = _search(ws, q, 50, folder, rule, since, until)
        except ApiError as exc:
            error = exc.message
    config = ctx.config()
    hits = [{**h, "served": served(config, Path(str(h["path"])))} for h in hits]
    folders = [printable(w.path) for w in config.watch]
    return _page(request, "search.html", q=q, folder=folder, rule=rule, since=since, until=until, hits=hits,
                 error=error, rules=[r.name for r in config.rules], folders=folders)


@router.get("/failures", response_class=HTMLResponse)
def failures_view(request: Request, ctx: ServerContext = Depends(context)) -> HTMLResponse:
    ws = web_state(ctx)
    failed = history.failures(ws.store, 500)
    total = history.failed_count(ws.store)
    return _page(request, "failures.html", failures=[_job_row(f) for f in failed], total=total)


@router.get("/ask", response_class=HTMLResponse)
def ask_view(request: Request, path: list[str] = Query(default=[]), ctx: ServerContext = Depends(context)) -> HTMLResponse:
    ws = web_state(ctx)
    config = ctx.config()
    # Only files the API will read for the chat: one `vlwatch process` took from elsewhere is not offered.
    recent = [{"path": safe_text(str(p)), "name": printable(p.name)}
              for p in history.done_paths(ws.store, 50) if served(config, p)][:12]
    preset = [p for p in path if p.startswith("/") and served(config, Path(p))][:8]
    return _page(request, "ask.html", recent=recent, preset=preset, examples=EXAMPLES)


def served(config: Config, path: Path) -> bool:
    """Whether the API serves ``path`` (issue 27): inside a watched folder or output_dir, symlinks resolved.

    A file ``vlwatch process`` took from anywhere else was named by whoever
    ran it, with their rights; the daemon's API does not serve it (its
    rights may be wider), so the page shows its result without the image,
    the file links or "ask about it", and says why.
    """
    from daemon.server.chat import resolves_outside, served_roots

    roots = served_roots(config)
    wanted = Path(os.path.normpath(path))
    return any(r in wanted.parents for r in roots) and not resolves_outside(wanted, roots)


EXAMPLES = (
    ("Extract a table", "Extract every table in this image as a Markdown table. Keep the column headers."),
    ("Describe for a product page", "Describe this product for an online shop's product page: what it is, "
                                    "its colour, material and notable details, in two short paragraphs."),
    ("Find every logo", "Find every logo in this image. Answer with JSON: "
                        "[{\"bbox_2d\": [x1, y1, x2, y2], \"label\": \"brand name\"}]."),
    ("Screenshot to HTML", "Turn this screenshot into a single HTML page with inline CSS that looks the same."),
)


# ------------------------------------------------------------------ search API


def _search(ws: WebState, q: str, limit: int, folder: str, rule: str, since: str, until: str) -> list[dict[str, Any]]:
    try:
        filters = Filters(folder=Path(os.path.normpath(folder)) if folder.startswith("/") else None,
                          rule=rule or None, since=parse_date(since) if since else None,
                          until=parse_date(until, end=True) if until else None)
    except ValueError:
        raise ApiError(400, "since/until: dates are YYYY-MM-DD", code="invalid_request") from None
    if folder and not folder.startswith("/"):
        raise ApiError(400, "folder: expected an absolute path", param="folder", code="invalid_request")
    # The background indexer builds a large index; a search only catches up on what is new.
    if ws.index.catching.acquire(blocking=False):
        try:
            ws.index.catch_up(limit=200)
        finally:
            ws.index.catching.release()
    hits = ws.index.search(q, limit=limit, filters=filters, catch_up=False)
    return [h.as_dict() for h in hits]


@router.get("/api/v1/search")
def search_api(q: str = "", limit: int = Query(20, ge=1, le=1000), folder: str = "", rule: str = "",
               since: str = "", until: str = "", ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """JSON hits with path, rule, sidecar and snippet (what ``vlwatch search --json`` prints)."""
    ws = web_state(ctx)
    return {"query": q, "hits": _search(ws, q, limit, folder, rule, since, until)}


# ------------------------------------------------------------------ retry


@router.post("/web/retry")
async def retry(request: Request, ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """Body ``{"ids": [..]}`` or ``{"all": true}``: put failed jobs back on the queue."""
    same_site(request)
    body = await _json(request)
    ids = body.get("ids")
    every = body.get("all") is True
    if not every and (not isinstance(ids, list) or not ids
                      or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_ROW_ID for i in ids)):
        raise ApiError(400, "expected {\"ids\": [JOB_ID, ...]} or {\"all\": true}", code="invalid_request")
    from daemon.store.queue import Queue

    def work() -> list[int]:
        with Queue(ctx.config().state) as queue:
            return [j.id for j in queue.retry(None if every else ids)]

    requeued = await run_in_threadpool(work)
    if ctx.loop is not None and requeued:
        ctx.loop.wake()
    return {"requeued": requeued}


async def _json(request: Request) -> dict[str, Any]:
    # A cross-site HTML form cannot send application/json without a CORS preflight,
    # which this server never grants: one more wall besides Origin and Sec-Fetch-Site.
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise ApiError(415, "expected a JSON body (Content-Type: application/json)", code="invalid_content_type")
    body = parse_json(await request.body())
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object", code="invalid_json")
    return body


# ------------------------------------------------------------------ paths


def allowed_path(config: Config, path: str) -> Path:
    """``path`` as a normalised absolute path inside a watched folder or ``output_dir`` (400/403 otherwise);
    the file itself is opened through the API's checks (symlinks resolved)."""
    from daemon.server.chat import served_roots

    if not path.startswith("/"):
        raise ApiError(400, "path: expected an absolute path", param="path", code="invalid_request")
    wanted = Path(os.path.normpath(path))
    if not any(r in wanted.parents for r in served_roots(config)):
        raise ApiError(403, f"{printable(wanted)} is not inside a watched folder or output_dir", param="path",
                       code="path_not_allowed")
    return wanted


# ------------------------------------------------------------------ static


_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
_static_files = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in _STATIC_TYPES} \
    if STATIC.is_dir() else {}


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The vendored script and style (a fixed list: nothing else on disk is reachable here)."""
    path = _static_files.get(name)
    if path is None:
        raise ApiError(404, f"no such file: /static/{name}", code="not_found")
    return Response(path.read_bytes(), media_type=_STATIC_TYPES[path.suffix],
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@router.get("/favicon.ico")
def favicon() -> Response:
    return static("favicon.svg")
