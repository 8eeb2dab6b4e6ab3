"""The web page's routes in the real application (``create_app``), without a browser or a model.

What the browser tests cannot see cheaply: the token guarding the page off
loopback, conversations surviving a restart (a new app on the same state
file), Markdown rendered with raw HTML escaped, keyset pages, and the
upload checks.  A real SQLite state file and real sidecars in tmp_path.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from daemon.config_reader import parse_config
from daemon.server import web
from daemon.server.app import create_app
from daemon.server.context import ServerContext
from daemon.store.queue import Queue
from tests.test_search import finish_job


@pytest.fixture
def config(tmp_path: Path):
    (tmp_path / "inbox").mkdir()
    return parse_config(f"""
model: {{name: some-model}}
state: {tmp_path / 'state.db'}
watch:
  - path: {tmp_path / 'inbox'}
rules:
  - {{name: ocr, task: ocr, output: md}}
""", tmp_path / "config.yaml")


def client(config, token: str | None = None) -> TestClient:
    ctx = ServerContext(config=lambda: config, token=token, listen="0.0.0.0:8765" if token else "127.0.0.1:8765")
    return TestClient(create_app(ctx), base_url="http://127.0.0.1:8765")


@pytest.fixture(autouse=True)
def fresh_web_state():
    # Each test's app opens its own state file; drop the per-state cache between tests.
    yield
    for ws in web._states.values():
        ws.close()
    web._states.clear()


def png(size=(60, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_the_token_guards_the_page_too(config) -> None:
    # issue 14: the token (off loopback) guards the page too
    with client(config, token="s3cret") as c:
        for path in ("/", "/results", "/search?q=x", "/failures", "/ask", "/static/vlwatch.js", "/api/v1/search?q=x"):
            assert c.get(path).status_code == 401, path
        c.cookies.set("vlwatch_token", "s3cret")
        assert c.get("/").status_code == 200
        assert c.get("/static/vlwatch.js").status_code == 200


def test_markdown_is_rendered_without_raw_html(config, tmp_path: Path) -> None:
    with Queue(config.state) as q:
        finish_job(q, tmp_path / "inbox" / "a.png", "ocr",
                   {"md": "# Title\n\n<script>alert(1)</script>\n\n<b onclick=x()>b</b> [js](javascript:alert(1))"
                          " ![logo](https://tracker.example/x.png)\n\n| a | b |\n|:-:|--:|\n| 1 | 2 |\n"})
    with client(config) as c:
        page = c.get("/results").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b onclick" not in page and 'href="javascript:' not in page
    assert "tracker.example" not in page.split("[image:")[0]  # no <img> fetching from anywhere
    assert "<img src=\"https://tracker" not in page and "[image: logo]" in page
    assert "<table>" in page and "<h1>Title</h1>" in page
    assert "style=" not in page and 'class="align-center"' in page  # the CSP allows no inline style


def test_results_are_keyset_paginated_newest_first(config, tmp_path: Path) -> None:
    with Queue(config.state) as q:
        for i in range(web.PAGE_SIZE * 2 + 3):
            finish_job(q, tmp_path / "inbox" / f"f{i:03d}.png", "ocr", {"md": f"text {i}"})
    names: list[str] = []
    with client(config) as c:
        url = "/results"
        while url:
            page = c.get(url).text
            names += [line.split("<strong class=\"name\">")[1].split("<")[0]
                      for line in page.splitlines() if "<strong class=\"name\">" in line]
            nxt = [line for line in page.splitlines() if 'rel="next"' in line]
            url = nxt[0].split('href="')[1].split('"')[0].replace("&amp;", "&") if nxt else ""
    assert names == [f"f{i:03d}.png" for i in reversed(range(web.PAGE_SIZE * 2 + 3))]


def test_conversations_survive_a_restart_until_cleared(config) -> None:
    # issue 14: conversations kept across restarts in the state DB, with timestamps, until Clear
    with client(config) as c:
        cid = c.post("/web/conversations", json={}).json()["id"]
        # 280x168: multiples of 28 within min/max_pixels, so the model sees it at its own size.
        image = c.post(f"/web/conversations/{cid}/images", content=png((280, 168)),
                       headers={"Content-Type": "image/png", "X-Filename": "a.png"}).json()
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image["url"]}},
                                            {"type": "text", "text": "Where is the logo?"}]}
        answer = {"role": "assistant", "content": '```json\n[{"bbox_2d": [10, 10, 30, 20], "label": "logo"}]\n```'}
        saved = c.post(f"/web/conversations/{cid}/messages", json={"messages": [user, answer]}).json()
        assert saved["messages"][1]["boxes"] == [{"label": "logo", "bbox": [10, 10, 30, 20]}]
        assert saved["messages"][1]["size"] == [280, 168]
    for ws in web._states.values():  # a new process: nothing cached
        ws.close()
    web._states.clear()
    with client(config) as c:
        conv = c.get(f"/web/conversations/{cid}").json()
        assert conv["title"] == "Where is the logo?" and conv["created"] <= time.time()
        assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
        assert all(m["when"] for m in conv["messages"])
        assert c.get(image["url"]).content == png((280, 168))
        assert c.post("/web/conversations/clear", json={}).json() == {"cleared": 1}
        assert c.get(f"/web/conversations/{cid}").status_code == 404
        assert c.get(image["url"]).status_code == 404


def test_uploads_and_messages_are_checked(config) -> None:
    with client(config) as c:
        cid = c.post("/web/conversations", json={}).json()["id"]
        html = b"<html><script>alert(1)</script></html>"
        r = c.post(f"/web/conversations/{cid}/images", content=html, headers={"Content-Type": "image/png"})
        assert r.status_code == 400  # judged by its bytes, not by what the client said
        for bad in ({"role": "system", "content": "x"},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/web/conversations/999/images/1"}}]}):
            assert c.post(f"/web/conversations/{cid}/messages", json={"messages": [bad]}).status_code == 400
        assert c.post("/web/conversations/999/messages", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 404
        assert c.post("/web/retry", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 400
        # A cross-site form's text/plain body, even if it parses as JSON, is not taken.
        assert c.post("/web/retry", content=b'{"all": true}', headers={"Content-Type": "text/plain"}).status_code == 415
        assert c.post("/web/retry", json={"ids": ["1; DROP"]}).status_code == 400


def test_overview_json_counts_rate_and_model(config, tmp_path: Path) -> None:
    with Queue(config.state) as q:
        for i in range(3):
            finish_job(q, tmp_path / "inbox" / f"g{i}.png", "ocr", {"md": "x"})
        q.set_meta("model", {"backend": "transformers", "model": "m", "loaded": True, "since": time.time(),
                             "attention": "sdpa", "engine": "fastgen", "gpus": [{"name": "cuda:0", "state": "loaded",
                                                                                  "memory": "15.2 GiB"}]})
    with client(config) as c:
        o = c.get("/web/overview.json").json()
        page = c.get("/").text
    assert o["counts"]["done"] == 3 and o["rate_per_min"] > 0
    assert o["model"]["attention"] == "sdpa" and o["model"]["engine"] == "fastgen"
    assert o["model"]["gpus"] == [{"name": "cuda:0", "state": "loaded", "detail": "memory 15.2 GiB"}]
    assert "fastgen" in page and "cuda:0" in page and json.dumps(o)


def test_retry_one_or_all_failed_jobs(config, tmp_path: Path) -> None:
    # issue 14: failures with a retry button (one, or all)
    with Queue(config.state) as q:
        ids = [finish_job(q, tmp_path / "inbox" / f"f{i}.png", "ocr", {"md": "x"}) for i in range(3)]
        for i in ids:
            q.fail(i, "broken", retry_at=None)
    with client(config) as c:
        assert c.post("/web/retry", json={"ids": [ids[0]]}).json() == {"requeued": [ids[0]]}
        assert c.post("/web/retry", json={"ids": [ids[0]]}).json() == {"requeued": []}  # not failed any more
        assert sorted(c.post("/web/retry", json={"all": True}).json()["requeued"]) == ids[1:]
        page = c.get("/failures").text
    assert "no failures" in page
    with Queue(config.state) as q:
        assert [q.job(i).state for i in ids] == ["queued"] * 3
