"""Issue 25: the docling-serve subset, Open WebUI's ``/process`` and webhooks, against a real daemon.

Each client test sends the bytes that client sends (multipart field names
and order, part headers, the request headers) and reads only what that
client reads, as its source does:

- paperless-gpt, ``ocr/docling_provider.go``: Go's ``mime/multipart``
  writer, the file first in ``files`` named ``document.pdf`` whatever it
  holds, then ``to_formats=md``, ``do_ocr=true``, ``pipeline=vlm``,
  ``image_export_mode=embedded``; ``Accept: application/json``; it takes
  ``text_content`` or else ``md_content`` and fails on any status but
  ``success``.
- Open WebUI's Docling loader (``retrieval/loaders/main.py``): requests'
  multipart, the form fields first (``image_export_mode=placeholder`` and
  ``DOCLING_PARAMS``), then ``files`` with the upload's full path as its
  name; ``X-Api-Key`` when a key is set; reads ``document.md_content``.
- Open WebUI's external loader (``external_document.py``): ``PUT /process``,
  the raw bytes, ``Content-Type``, ``Authorization: Bearer KEY``,
  ``X-Filename`` URL-quoted; reads ``page_content`` and ``metadata``.

The daemon runs ``tests/convert_backend.py``, which answers like an OCR model
and says which prompt and page size it was given.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from daemon.backends import Answer, Request
from daemon.config_reader import load_config
from daemon.webhooks import redacted
from tests.conftest import Daemon, png_bytes, put, tiny_daemon_config, wait_until, write_config
from tests.data.make_hostile import _pages_pdf
from tests.olmocr_backend import page_pdf
from tests.test_api import free_port

TOKEN = "vlw-convert-token-9f3a"
PLUGIN = "tests.convert_backend"


# ------------------------------------------------------------- receivers


class Receiver:
    """A local HTTP server that records POSTs; the first ``fail_first`` of each path get a 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.seen: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                path = self.path.split("?")[0]
                receiver.seen[path] = receiver.seen.get(path, 0) + 1
                if receiver.seen[path] <= receiver.fail_first:
                    self.send_response(500)
                else:
                    receiver.posts.append((self.path, dict(self.headers), body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------ multipart


def go_multipart(file_name: str, data: bytes, fields: list[tuple[str, str]]) -> tuple[bytes, str]:
    """A body as Go's ``mime/multipart.Writer`` writes it: CreateFormFile, then WriteField each, then Close."""
    boundary = secrets.token_hex(30)  # Go: 30 random bytes, hex
    out = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{file_name}\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n".encode() + data]
    for name, value in fields:
        out.append(f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}".encode())
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def requests_multipart(fields: list[tuple[str, str]], file_name: str, data: bytes, mime: str) -> tuple[bytes, str]:
    """A body as requests (urllib3's ``encode_multipart_formdata``) writes ``files=``/``data=``: fields first."""
    boundary = secrets.token_hex(16)  # urllib3: uuid4().hex
    out = []
    for name, value in fields:
        out.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    out.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{file_name}\"\r\n"
               f"Content-Type: {mime}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------- daemon


def convert_config(workdir: Path, listen: str, *, api_extra: str = "", rules: str = "") -> Path:
    (workdir / "inbox").mkdir(parents=True, exist_ok=True)
    return write_config(workdir, f"""
        model:
          backend: convertstub
          name: stub-model
          max_new_tokens: 64
          max_pixels: 50000
          batch_size: 1
        state: ./state/state.db
        include: [ocr]
        watch:
          - path: ./inbox
            settle: 0.3s
        jobs: {{batch_wait: 0s}}
        {rules}
        api:
          listen: {listen}
          sync_wait: 3s
        {api_extra}
        """)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[tuple[Daemon, str]]:
    """One daemon for the module: loopback, no token, the ``ocr`` pack, a rule with a webhook."""
    workdir = tmp_path_factory.mktemp("convert")
    port = free_port()
    rules = f"""rules:
          - name: scan
            task: ocr
            match: ["hooked/**"]
            prompt: "Read the text of $filename."
            webhook: http://127.0.0.1:{receiver.port}/hook?secret=s3cr3t-q"""
    d = Daemon(workdir, convert_config(workdir, f"127.0.0.1:{port}", rules=rules), VLWATCH_PLUGINS=PLUGIN).start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _health(base) == 200, "the API to answer", log=d.log)
    try:
        yield d, base
    finally:
        d.stop()
        d.close()


def _health(base: str, **headers: str) -> int | None:
    try:
        return httpx.get(base + "/health", headers=headers, timeout=2).status_code
    except httpx.HTTPError:
        return None


# ------------------------------------------------------------- clients


def test_paperless_gpt_sends_a_png_named_document_pdf(served: tuple[Daemon, str]) -> None:  # issue 25.4
    _, base = served
    body, content_type = go_multipart("document.pdf", png_bytes(7, (320, 200)), [
        ("to_formats", "md"), ("do_ocr", "true"), ("pipeline", "vlm"), ("image_export_mode", "embedded")])
    r = httpx.post(base + "/v1/convert/file", content=body, timeout=60, headers={
        "Content-Type": content_type, "Accept": "application/json", "User-Agent": "Go-http-client/1.1",
        "Accept-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "success", doc  # paperless-gpt fails on anything else
    text = doc["document"]["text_content"] or doc["document"]["md_content"]  # what it reads, in its order
    # The PNG was read as a PNG (type from the bytes), with the ocr rule's prompt naming the file.
    assert text.startswith("# Read all the text in this image (document.pdf) and write it out as Markdown.")
    assert "| widget | 2 |" in text
    assert doc["document"]["filename"] == "document.pdf" and doc["errors"] == []
    assert isinstance(doc["processing_time"], float)


def test_open_webui_docling_loader_with_its_params(served: tuple[Daemon, str]) -> None:  # issue 25.4
    _, base = served
    pdf = _pages_pdf(2)
    # DOCLING_PARAMS {"do_ocr": true, "to_formats": ["md", "text"]} as requests encodes them: str(True), lists repeated.
    fields = [("image_export_mode", "placeholder"), ("do_ocr", "True"), ("to_formats", "md"), ("to_formats", "text")]
    body, content_type = requests_multipart(fields, "/app/backend/data/uploads/0f1e_scan 2031.pdf", pdf,
                                            "application/pdf")
    r = httpx.post(base + "/v1/convert/file", content=body, timeout=60, headers={
        "Content-Type": content_type, "User-Agent": "python-requests/2.32.3", "Accept": "*/*"})
    assert r.is_success, r.text
    result = r.json()
    text = result.get("document", {}).get("md_content", "<No text content found>")
    assert text.count("# Read all the text in this image (0f1e_scan 2031.pdf)") == 2  # two pages, in order
    assert result["document"]["filename"] == "0f1e_scan 2031.pdf"  # the name only, not the uploader's path
    plain = result["document"]["text_content"]
    assert "widget\t2" in plain and "|" not in plain and "#" not in plain


def test_open_webui_external_loader_put_process(served: tuple[Daemon, str]) -> None:  # issue 25.2, 25.4
    _, base = served
    name = "Rechnung März 2031.pdf"
    r = httpx.put(base + "/process", content=_pages_pdf(1), timeout=30, headers={
        "Content-Type": "application/pdf", "Authorization": "Bearer unused-on-loopback",
        "X-Filename": urllib.parse.quote(name), "User-Agent": "python-requests/2.32.3"})
    assert r.is_success, r.text
    data = r.json()
    assert isinstance(data, dict)
    assert data.get("page_content").startswith(f"# Read all the text in this image ({name})")
    assert data.get("metadata")["source"] == name
    assert all(isinstance(v, (str, int, float, bool)) for v in data["metadata"].values())


# -------------------------------------------------------------- async


def test_async_file_poll_result_and_callback(served: tuple[Daemon, str], receiver: Receiver) -> None:  # 25.1, 25.3
    _, base = served
    url = f"http://127.0.0.1:{receiver.port}/done?key=cb-secret"
    r = httpx.post(base + "/v1/convert/file/async", files={"files": ("page.png", png_bytes(3), "image/png")},
                   data={"to_formats": "md", "callbacks": url}, timeout=30)
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["task_status"] in ("pending", "started", "success") and task["task_type"] == "convert"
    assert httpx.get(base + f"/v1/result/{task['task_id']}").status_code in (200, 404)
    deadline = time.monotonic() + 30
    while task["task_status"] not in ("success", "partial_success", "failure"):
        assert time.monotonic() < deadline, task
        task = httpx.get(base + f"/v1/status/poll/{task['task_id']}", params={"wait": 5}, timeout=30).json()
    assert task["task_status"] == "success" and task["task_meta"]["num_succeeded"] == 1
    result = httpx.get(base + f"/v1/result/{task['task_id']}").json()
    assert result["document"]["md_content"].startswith("# Read all the text in this image (page.png)")
    wait_until(lambda: any(p.startswith("/done") for p, _, _ in receiver.posts), "the callback")
    path, headers, body = next(p for p in receiver.posts if p[0].startswith("/done"))
    assert json.loads(body) == {"task_id": task["task_id"], "task_status": "success",
                                "progress": {"kind": "task_completed", "task_status": "success"}}
    assert receiver.seen["/done"] == 2  # the first try got a 500 and was retried
    assert httpx.get(base + "/v1/status/poll/no-such-task").status_code == 404


def test_source_file_works_and_http_sources_are_refused_by_default(served: tuple[Daemon, str]) -> None:  # 25.1
    d, base = served
    payload = base64.b64encode(png_bytes(5)).decode()
    r = httpx.post(base + "/v1/convert/source", timeout=30, json={
        "options": {"to_formats": ["md"], "do_ocr": True},
        "sources": [{"kind": "file", "base64_string": payload, "filename": "a.png"}]})
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    r = httpx.post(base + "/v1/convert/source", timeout=30,
                   json={"sources": [{"kind": "http", "url": "http://127.0.0.1:9/secret.pdf"}]})
    assert r.status_code == 403, r.text
    assert "api.http_sources" in r.json()["detail"]


def test_unsupported_input_and_formats_are_error_entries(served: tuple[Daemon, str]) -> None:  # issue 25.1
    _, base = served
    r = httpx.post(base + "/v1/convert/file", files={"files": ("notes.pdf", b"just some text, not a PDF", "application/pdf")},
                   timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "failure" and doc["document"]["md_content"] is None
    assert doc["errors"][0]["error_message"].startswith("notes.pdf: ")
    r = httpx.post(base + "/v1/convert/file", files={"files": ("a.png", png_bytes(1), "image/png")},
                   data={"to_formats": ["md", "json", "doctags"]}, timeout=30)
    doc = r.json()
    assert doc["status"] == "partial_success" and doc["document"]["md_content"]
    assert [e["error_message"].split(":")[1].strip() for e in doc["errors"]] == ["'json' is not supported by vlwatch (it makes md, text, html)",
                                                                               "'doctags' is not supported by vlwatch (it makes md, text, html)"]
    r = httpx.put(base + "/process", content=b"PK\x03\x04 a docx", headers={"X-Filename": "a.docx"}, timeout=30)
    assert r.status_code == 415 and "a.docx" in r.json()["detail"], r.text
    r = httpx.post(base + "/v1/convert/file", files={"files": ("bad.png", png_bytes(2), "image/png")}, timeout=30)
    assert r.json()["status"] == "failure" and r.json()["errors"][0]["component_type"] == "model"


def test_a_slow_document_answers_504_naming_async(served: tuple[Daemon, str]) -> None:  # issue 25.1
    _, base = served
    started = time.monotonic()
    r = httpx.post(base + "/v1/convert/file", files={"files": ("slow-scan.png", png_bytes(4), "image/png")},
                   timeout=30)
    assert r.status_code == 504, r.text
    assert "/v1/convert/file/async" in r.json()["detail"]
    assert time.monotonic() - started < 4.5  # api.sync_wait is 3s


def test_folder_rule_webhook_after_each_sidecar_retried_url_query_not_logged(
        served: tuple[Daemon, str], receiver: Receiver) -> None:  # issue 25.3
    d, _ = served
    image = put(d.workdir / "inbox" / "hooked" / "slip.png", png_bytes(9))
    d.wait_done(image, "scan")
    wait_until(lambda: any(p.startswith("/hook") for p, _, _ in receiver.posts), "the webhook", log=d.log)
    path, headers, body = next(p for p in receiver.posts if p[0].startswith("/hook"))
    assert path == "/hook?secret=s3cr3t-q" and headers["Content-Type"] == "application/json"
    event = json.loads(body)
    assert event["event"] == "job.done" and event["status"] == "done" and event["rule"] == "scan"
    assert event["path"] == str(image) and event["sidecars"] == [str(image) + ".scan.md"]
    assert receiver.seen["/hook"] == 2  # a 500 first, then delivered on the retry
    log = d.log()
    assert f"http://127.0.0.1:{receiver.port}/hook" in log and "s3cr3t-q" not in log


def test_twenty_conversions_go_ahead_of_a_folder_backlog(served: tuple[Daemon, str]) -> None:  # issue 25.4
    d, base = served
    inbox = d.workdir / "inbox" / "backlog"
    for i in range(40):
        put(inbox / f"lag-{i:02d}.png", png_bytes(200 + i, (32, 32)))  # 0.15 s each: 6 s of backlog
    wait_until(lambda: d.queue.counts()["queued"] >= 10, "the backlog to be queued", log=d.log)
    results: list[httpx.Response] = []

    def one(i: int) -> None:
        results.append(httpx.post(base + "/v1/convert/file", timeout=60,
                                  files={"files": (f"doc-{i}.png", png_bytes(i, (40, 40)), "image/png")}))

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - started
    left = d.queue.counts()["queued"]
    assert len(results) == 20 and all(r.status_code == 200 and r.json()["status"] == "success" for r in results)
    # Each waited for the backlog job in hand at most, not for the backlog: most of it is still queued.
    assert left > 0, (left, took)
    wait_until(lambda: d.queue.counts()["queued"] == 0 and d.queue.counts()["running"] == 0, "the backlog", log=d.log)


# ------------------------------------------------------ token, olmocr rule


def test_token_off_loopback_and_the_olmocr_rule(tmp_path: Path) -> None:  # issue 25.1, 25.2
    port = free_port()
    rules = """rules:
          - name: olmocr
            task: ocr
            match: ["never/**"]
            prompt: "Answer with front matter, then the text of $filename." """
    config = convert_config(tmp_path, f"0.0.0.0:{port}", rules=rules, api_extra="  token_env: VLWATCH_TEST_TOKEN")
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS=PLUGIN, VLWATCH_TEST_TOKEN=TOKEN).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _health(base) == 401, "the API to answer", log=d.log)
        files = {"files": ("scan.png", png_bytes(11), "image/png")}
        r = httpx.post(base + "/v1/convert/file", files=files, timeout=30)
        assert r.status_code == 401 and "X-Api-Key" in r.json()["detail"]
        assert httpx.post(base + "/v1/convert/file", files=files, headers={"X-Api-Key": "wrong"}).status_code == 401
        r = httpx.post(base + "/v1/convert/file", files=files, headers={"X-Api-Key": TOKEN}, timeout=30)
        assert r.status_code == 200, r.text
        md = r.json()["document"]["md_content"]
        # The olmocr rule read it, and its per-page front matter is not part of the Markdown.
        assert md.startswith("# Answer with front matter, then the text of scan.png.") and "primary_language" not in md
        r = httpx.put(base + "/process", content=png_bytes(12), headers={"X-Filename": "x.png"}, timeout=30)
        assert r.status_code == 401
        r = httpx.put(base + "/process", content=png_bytes(12), timeout=30,
                      headers={"X-Filename": "x.png", "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["metadata"]["rule"] == "olmocr"
    finally:
        d.stop()
        d.close()
    assert TOKEN not in d.log()


def test_an_olmocr_document_is_asked_as_a_folder_page_is(tmp_path: Path) -> None:  # issue 24 through the API
    """The ``olmocr`` rule's policy behind /v1/convert/file: prompt first at 1288 pixels, up the temperature
    ladder while invalid, the page turned when the model says so, the PDF's text layer when nothing was valid."""
    port = free_port()
    (tmp_path / "inbox").mkdir()
    requests_log = tmp_path / "requests.jsonl"
    config = write_config(tmp_path, f"""
        model: {{backend: olmocr-stub, name: stub-olmocr, batch_size: 2}}
        state: ./state/state.db
        include: [olmocr]
        watch: [{{path: ./inbox}}]
        api: {{listen: "127.0.0.1:{port}", sync_wait: 60s}}
        """)
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.olmocr_backend", VLWATCH_OLMOCR_LOG=str(requests_log)).start()
    base = f"http://127.0.0.1:{port}"
    pdf = page_pdf([("red", None), ("green", None), ("blue", None), ("grey", "Grey page from its text layer"),
                    ("grey", None)])
    try:
        wait_until(lambda: _health(base) == 200, "the API", log=d.log)
        r = httpx.post(base + "/v1/convert/file", files={"files": ("scan.pdf", pdf, "application/pdf")},
                       data={"to_formats": ["md", "text", "html"]}, timeout=90)
    finally:
        d.stop()
        d.close()
    assert r.status_code == 200, r.text
    doc = r.json()
    md = doc["document"]["md_content"]
    # The other formats take the table as a table: rows of cells in text, a real <table> in HTML.
    assert "<table>" not in doc["document"]["text_content"] and "\n1\n" in doc["document"]["text_content"]
    assert "<table><tr><td>1</td></tr></table>" in doc["document"]["html_content"]
    for page in ("red", "green", "blue"):
        assert f"Text of the {page} page" in md, md
    assert "Grey page from its text layer" in md and "sideways gibberish" not in md and "primary_language" not in md
    assert md.index("red") < md.index("green") < md.index("blue") < md.index("Grey")
    assert "<table><tr><td>1</td></tr></table>" in md  # olmOCR-2's HTML table kept, as in its sidecar
    # Pages 4 and 5 never gave a valid answer: the text layer, else the model's last answer; both said,
    # and the document is whole (paperless-gpt takes nothing but "success").
    four, five = (e["error_message"] for e in doc["errors"])
    assert four.startswith("page 4: no valid answer in 8 tries") and four.endswith("the PDF's own text layer")
    assert five.startswith("page 5: no valid answer in 8 tries") and five.endswith("the model's last answer, not a valid one")
    assert "and so on" in md.split("Grey page from its text layer")[1] or "no front matter at all" in md
    assert doc["status"] == "success"
    asked = [json.loads(line) for line in requests_log.read_text().splitlines()]
    assert all(a["prompt_first"] for a in asked) and asked[0]["max_new_tokens"] == 8000
    assert [a["temperature"] for a in asked if a["colour"] == "blue"] == [0.1, 0.1, 0.2, 0.3]
    assert [(a["size"], a["marker"]) for a in asked if a["colour"] == "green"] == [
        ([1288, 868], "top-left"), ([868, 1288], "bottom-left")]
    assert len([a for a in asked if a["colour"] == "grey"]) == 16


class _Engine:
    """The engine as a conversion sees it (``WorkerLoop.submit``): each request waits for the test to answer it."""

    def __init__(self) -> None:
        self.asked: list[Future[Answer]] = []
        self.lock = threading.Lock()

    def submit(self, request: Request) -> Future[Answer]:
        f: Future[Answer] = Future()
        f.set_running_or_notify_cancel()
        with self.lock:
            self.asked.append(f)
        return f

    def open(self) -> list[Future[Answer]]:
        with self.lock:
            return [f for f in self.asked if not f.done()]


def test_a_long_document_is_decoded_a_few_pages_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12-page PDF with ``IN_FLIGHT`` 3: three pages asked at first; each answer lets one more in, in order."""
    import tests.convert_backend  # noqa: F401  (registers the backend the config names)
    from daemon.server import documents

    monkeypatch.setattr(documents, "IN_FLIGHT", 3)
    config = load_config(convert_config(tmp_path, f"127.0.0.1:{free_port()}"))
    engine, renderer = _Engine(), ThreadPoolExecutor(1)
    conversion = documents.Conversion(engine, config, documents.Upload("long.pdf", _pages_pdf(12)),
                                      documents.Options(), renderer=renderer)
    try:
        conversion.start()
        assert len(engine.asked) == 3 and len(engine.open()) == 3
        for n in range(1, 13):
            [oldest, *_] = engine.open()
            oldest.set_result(Answer(f"text of page {n}"))
            wait_until(lambda: len(engine.open()) == min(3, 12 - n) or conversion.future.done(),
                       f"page {n + 3} to be asked")
            assert len(engine.open()) <= 3 and len(engine.asked) == min(12, n + 3)
        done = conversion.future.result(timeout=10)
    finally:
        renderer.shutdown()
    assert done.status == "success" and done.pages == 12
    assert [line for line in done.md.splitlines() if line] == [f"text of page {n}" for n in range(1, 13)]


def test_redacted_drops_user_info_query_and_fragment() -> None:  # issue 25.3
    assert redacted("https://user:pw@hooks.example.org:8443/a/b?token=x#frag") == "https://hooks.example.org:8443/a/b"
    assert redacted("http://[::1]/h?k=v") == "http://[::1]/h"


def test_a_pdf_through_the_tiny_checkpoint(tmp_path: Path, tiny_model: Path) -> None:  # issue 25.1
    """The real model path (processor, generate) behind /v1/convert/file: random weights, real shapes."""
    (tmp_path / "inbox").mkdir()
    port = free_port()
    config = tiny_daemon_config(tmp_path, tiny_model, port=port, include="ocr")
    d = Daemon(tmp_path, config).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _health(base) == 200, "the API", log=d.log)
        r = httpx.post(base + "/v1/convert/file", files={"files": ("two.pdf", _pages_pdf(2), "application/pdf")},
                       data={"to_formats": ["md", "text"]}, timeout=300)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["status"] == "success", doc
        assert isinstance(doc["document"]["md_content"], str) and isinstance(doc["document"]["text_content"], str)
        assert "convert " in d.log() and "success (ocr, 2 pages" in d.log()
    finally:
        d.stop()
        d.close()


def test_check_names_a_bad_webhook_with_its_line(tmp_path: Path) -> None:  # issue 25.3
    from tests.conftest import run_vlwatch

    config = convert_config(tmp_path, "127.0.0.1:8765", rules="""rules:
          - name: scan
            task: ocr
            webhook: ftp://example.org/hook""")
    done = run_vlwatch("check", "--config", config, env={"VLWATCH_PLUGINS": PLUGIN})
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "webhook:" in text)
    assert done.returncode == 1
    assert f"config.yaml:{line}: rules[0].webhook: expected an http:// or https:// URL" in done.stdout, done.stdout


def test_text_and_html_take_olmocr_tables_and_nothing_else() -> None:  # docling's text and html outputs
    from daemon.answers import escape_raw_html
    from daemon.server.formats import markdown_html, markdown_text

    table = ('<table><tr><th>Item</th><th>Price</th></tr>'
             '<tr><td>Tea &amp; cake</td><td colspan="2">3<br>EUR</td></tr></table>')
    written = f"# Bill\n\nSome **tea** and <script>alert(1)</script>.\n\n{table}\n\nPaid.\n"
    for md in (escape_raw_html(written, keep_tables=True), written):  # the second: a rule with raw_html: true
        text = markdown_text(md)
        assert "Item\tPrice\nTea & cake\t3 EUR\n" in text, text
        assert "<t" not in text and "Some tea and" in text and "Paid." in text
        page = markdown_html(md, "bill.pdf")
        assert table in page  # rendered as a table
        assert "<script>" not in page and "&lt;script&gt;alert(1)" in page
        assert "<strong>tea</strong>" in page


def test_a_table_tag_with_more_than_spans_stays_text() -> None:
    from daemon.server.formats import markdown_html

    page = markdown_html('<table onmouseover="x()"><tr><td>1</td></tr></table>\n', "t")
    assert "<table" not in page.split("<body>")[1] and "onmouseover" in page
