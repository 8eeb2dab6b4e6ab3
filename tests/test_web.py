"""The web page (issue 14) in a REAL headless Chromium against a real ``python -m daemon run``.

One daemon (backend ``tests.web_backend``: answers shaped like the model's,
instantly) serves a watched folder holding an OCR'd scan, a grounded photo,
a screenshot turned into HTML, a file the model rejects and a file whose
answer is hostile markup.  Chromium is Debian's ``/usr/bin/chromium``,
driven by Playwright (never ``playwright install``); where either is
missing the browser tests skip and say why, and the HTTP tests still run.

Every page visit records console errors, page errors and dialogs (an
``alert`` would mean model text ran as script); each browser test ends by
asserting there were none.  A screenshot of each page is saved under the
test's tmp dir (the path is printed); with ``VLWATCH_WRITE_DOCS=1`` the
overview is also written to ``docs/web.png`` for the README.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.test_daemon import Daemon, wait_until

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
EVIL_NAME = '"><img src=x onerror=alert(1)>evil.png'


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it where apt works)"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")


def picture(path: Path, colour: tuple[int, int, int], text: str, size: tuple[int, int] = (480, 320)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, size[0] // 2, size[1] // 2), outline=(20, 40, 80), width=6)
    draw.text((48, size[1] - 60), text, fill=(0, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    tmp = path.with_name(".part-" + path.name)  # arrive complete, as a rename
    tmp.write_bytes(out.getvalue())
    os.rename(tmp, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """\
model: {{backend: webstub, name: web-stub-model, idle_unload: 0}}
state: ./state/state.db
watch:
  - path: ./inbox
    settle: 0.3s
rules:
  - {{name: ocr, match: ["scans/*"], task: custom, prompt: "Transcribe $filename as Markdown with a table", output: md}}
  - {{name: logos, match: ["photos/*"], task: ground, prompt: "Find every logo in $filename; answer bbox JSON"}}
  - {{name: code, match: ["shots/*"], task: code, prompt: "Turn $filename into HTML"}}
jobs: {{attempts: 1, backoff: 0.2s, batch_wait: 0.05s}}
api: {{listen: "127.0.0.1:{port}"}}
"""


class Site:
    def __init__(self, root: Path, daemon: Daemon, port: int) -> None:
        self.root, self.daemon, self.port = root, daemon, port
        self.base = f"http://127.0.0.1:{port}"
        self.inbox = root / "inbox"
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "state" / "state.db", timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def job(self, path: Path, rule: str) -> sqlite3.Row | None:
        with self.db() as db:
            return db.execute("SELECT * FROM jobs WHERE path = ? AND rule = ? ORDER BY id DESC LIMIT 1",
                              (str(path), rule)).fetchone()

    def wait_state(self, path: Path, rule: str, state: str) -> sqlite3.Row:
        wait_until(lambda: (j := self.job(path, rule)) is not None and j["state"] == state,
                   f"{path.name} [{rule}] to be {state}", log=self.daemon.log)
        job = self.job(path, rule)
        assert job is not None
        return job


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web")
    port = free_port()
    config = root / "config.yaml"
    config.write_text(CONFIG.format(port=port))
    inbox = root / "inbox"
    picture(inbox / "scans" / "invoice-2031.png", (250, 246, 236), "INVOICE 2031")
    picture(inbox / "photos" / "shelf.png", (222, 236, 250), "ACME")
    picture(inbox / "shots" / "login.png", (236, 250, 236), "Sign in")
    picture(inbox / "scans" / "bad-scan.png", (250, 230, 230), "unreadable")
    picture(inbox / "scans" / EVIL_NAME, (240, 240, 240), "evil")
    d = Daemon(root, config, VLWATCH_PLUGINS="tests.web_backend")
    s = Site(root, d, port)
    try:
        d.start()
        for name, rule in (("scans/invoice-2031.png", "ocr"), ("photos/shelf.png", "logos"),
                           ("shots/login.png", "code"), (f"scans/{EVIL_NAME}", "ocr")):
            s.wait_state(inbox / name, rule, "done")
        s.wait_state(inbox / "scans" / "bad-scan.png", "ocr", "failed")
        yield s
    finally:
        s.http.close()
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        d.close()


# ------------------------------------------------------------------ the browser


class Browser:
    """One Chromium page that records every console error, page error and dialog."""

    def __init__(self, pw: object, shots: Path) -> None:
        self.browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)  # type: ignore[attr-defined]
        self.page = self.browser.new_page(viewport={"width": 1200, "height": 900})
        self.problems: list[str] = []
        self.shots = shots
        #: what a generated sidecar page tried and its sandbox blocked (expected: proof the sandbox holds)
        self.blocked_in_sidecar: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))

    def _console(self, m: object) -> None:
        if m.type not in ("error", "warning"):  # type: ignore[attr-defined]
            return
        text = f"console {m.type}: {m.text}"  # type: ignore[attr-defined]
        if "/api/v1/file?" in (m.location or {}).get("url", ""):  # type: ignore[attr-defined]
            self.blocked_in_sidecar.append(text)
        else:
            self.problems.append(text)

    def shot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def assert_clean(self) -> None:
        assert self.problems == [], "\n".join(self.problems)


@pytest.fixture
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        try:
            b = Browser(pw, tmp_path_factory.getbasetemp() / "web-screenshots")
        except Exception as exc:  # installed but cannot start here (a library missing): say so
            pytest.skip(f"{CHROMIUM} does not start: {exc}")
        try:
            yield b
        finally:
            b.browser.close()


# ------------------------------------------------------------------ pages


@needs_browser
def test_overview_shows_processed_files_and_updates_live(site: Site, browser: Browser) -> None:
    # issue 14: the overview shows processed files; updated by SSE, no reload
    page = browser.page
    page.goto(site.base + "/")
    latest = page.locator("#latest")
    for name in ("invoice-2031.png", "shelf.png", "login.png"):
        assert name in latest.inner_text()
    assert page.locator("[data-field='counts.failed']").inner_text() == "1"
    page.locator("#live.on").wait_for(timeout=20_000)  # the event stream is open
    marker = page.evaluate("() => { window.__same = 1; return window.__same; }")
    done_before = int(page.locator("[data-field='counts.done']").inner_text())
    picture(site.inbox / "scans" / "arrived-later.png", (250, 250, 220), "LATER")
    page.locator("#latest", has_text="arrived-later.png").wait_for(timeout=60_000)
    page.wait_for_function(f"() => Number(document.querySelector(\"[data-field='counts.done']\").textContent) > {done_before}",
                           timeout=30_000)
    assert page.evaluate("() => window.__same") == marker, "the page reloaded instead of updating"
    browser.shot("overview")
    browser.assert_clean()


@needs_browser
def test_results_render_each_sidecar_safely(site: Site, browser: Browser) -> None:
    page = browser.page
    page.goto(site.base + "/results")
    page.wait_for_load_state("networkidle")
    # Markdown rendered: a real table.
    card = page.locator("article.result", has_text="invoice-2031.png")
    assert card.locator("table td", has_text="widget").count() == 1
    # Grounding: the overlay's boxes and their list.
    photo = page.locator("article.result", has_text="shelf.png")
    assert photo.locator("svg rect").count() == 2
    assert "acme logo" in photo.locator("ol.boxes").inner_text()
    # The generated page: in a sandbox with no scripts and no same origin.
    frame = page.locator("article.result", has_text="login.png").locator("iframe")
    assert frame.get_attribute("sandbox") == ""
    inner = page.frame_locator("article.result:has-text('login.png') iframe")
    assert "Welcome back" in inner.locator("body").inner_text()
    assert "scripted" not in inner.locator("body").inner_text()  # its <script> did not run
    # Hostile model text and a hostile file name are shown as text, never run.
    evil = page.locator("article.result", has_text="evil.png")
    assert '<script>alert("pwned")</script>' in evil.locator(".sidecar").inner_text()
    assert evil.locator(".sidecar script, .sidecar img").count() == 0
    assert EVIL_NAME in evil.locator(".name").inner_text()
    browser.shot("results")
    if os.environ.get("VLWATCH_WRITE_DOCS"):  # the README's picture: the results page
        page.screenshot(path=str(REPO / "docs" / "web.png"), full_page=True)
        print(f"screenshot: {REPO / 'docs' / 'web.png'}")
    browser.assert_clean()


@needs_browser
def test_search_finds_a_word_from_a_sidecar(site: Site, browser: Browser) -> None:
    # issue 14: a search for a word from a sidecar finds it
    page = browser.page
    page.goto(site.base + "/")
    page.locator(".quick-search input").fill("quota")
    page.locator(".quick-search input").press("Enter")
    page.wait_for_url("**/search?q=quota")
    hits = page.locator("li.hit")
    assert "invoice-2031.png" in hits.first.inner_text() or "invoice-2031.png" in page.locator("ol.hits").inner_text()
    assert page.locator("li.hit mark").first.inner_text().lower() == "quota"
    # Filters: a rule with no such word gives nothing.
    page.goto(site.base + "/search?q=quota&rule=code")
    assert page.locator("li.hit").count() == 0
    page.goto(site.base + "/search?q=welcome")  # visible text of the generated HTML page
    assert "login.png" in page.locator("ol.hits").inner_text()
    page.goto(site.base + "/search?q=" + urllib.parse.quote('NEAR( "quota'))  # hostile: no error page
    assert page.locator("#hit-count").is_visible()
    browser.shot("search")
    browser.assert_clean()


@needs_browser
def test_retry_button_requeues_a_failed_job(site: Site, browser: Browser) -> None:
    # issue 14: the retry button requeues a failed job
    bad = site.inbox / "scans" / "bad-scan.png"
    before = site.wait_state(bad, "ocr", "failed")
    page = browser.page
    page.goto(site.base + "/failures")
    row = page.locator("tr[data-job]", has_text="bad-scan.png")
    assert "rejected" in row.inner_text()
    browser.shot("failures")
    row.locator("button.retry").click()
    row.locator(".done-note", has_text="requeued").wait_for(timeout=20_000)
    # Back on the queue: the stub rejects it again, as a second attempt run.
    wait_until(lambda: site.daemon.log_count("bad-scan.png: ocr failed") >= 2, "the retried job to run again",
               log=site.daemon.log)
    with site.db() as db:
        states = [r["state"] for r in db.execute(
            "SELECT e.state FROM job_events e WHERE e.job_id = ? ORDER BY e.seq", (before["id"],))]
    assert states.count("queued") >= 2 and states[-1] == "failed", states
    browser.assert_clean()


@needs_browser
def test_ask_streams_an_answer_keeps_the_conversation_and_clears(site: Site, browser: Browser) -> None:
    # issue 14: an ask returns an answer; follow-ups keep the conversation and its images; clear forgets
    page = browser.page
    page.goto(site.base + "/ask?path=" + urllib.parse.quote(str(site.inbox / "photos" / "shelf.png")))
    assert page.locator("#tray img").count() == 1  # the file picked on the results page came along
    page.locator("button.example", has_text="Find every logo").click()
    assert "logo" in page.locator("#question").input_value()
    page.locator("#send").click()
    answer = page.locator(".msg.assistant:not(.streaming)").last
    answer.locator("text=/You asked: Find every logo/").wait_for(timeout=60_000)
    # The answer's boxes, drawn on the image.
    answer.locator("svg.boxes-svg rect").wait_for(timeout=20_000)
    # A follow-up keeps the image: 2 user turns + 1 answer = 3 turns, 1 image.
    page.locator("#question").fill("And the colour?")
    page.locator("#send").click()
    page.locator(".msg.assistant:not(.streaming)", has_text="(3 turns, 1 images").wait_for(timeout=60_000)
    # An image uploaded from the browser, and a text-only question in a new conversation.
    page.locator("#new-conv").click()
    upload = site.root / "upload-me.png"
    picture(upload, (200, 220, 250), "uploaded", (320, 200))
    page.locator("#file").set_input_files(str(upload))
    page.locator("#tray img").wait_for(timeout=20_000)
    page.locator("#question").fill("What is this?")
    page.locator("#send").click()
    page.locator(".msg.assistant:not(.streaming)", has_text="1 images").wait_for(timeout=60_000)
    # Compare: two files from the watched folders in one question.
    page.locator("#new-conv").click()
    page.locator("button.pick", has_text="invoice-2031.png").first.click()
    page.locator("button.pick", has_text="login.png").first.click()
    assert page.locator("#tray img").count() == 2
    page.locator("#question").fill("What changed between these?")
    page.locator("#send").click()
    page.locator(".msg.assistant:not(.streaming)", has_text="2 images").wait_for(timeout=60_000)
    page.locator("#new-conv").click()
    page.locator("#question").fill("Hello without images")
    page.locator("#send").click()
    page.locator(".msg.assistant:not(.streaming)", has_text="0 images").wait_for(timeout=60_000)
    browser.shot("ask")
    # Kept across a reload (and a restart: they live in the state database).
    page.goto(site.base + "/ask")
    page.locator("#conv-list li").nth(3).wait_for(timeout=20_000)
    assert page.locator("#conv-list li").count() == 4
    page.locator("#conv-list li", has_text="Find every logo").click()
    page.locator(".msg.assistant:not(.streaming)", has_text="(3 turns, 1 images").wait_for(timeout=20_000)
    with site.db() as db:
        assert db.execute("SELECT COUNT(*) FROM conversation_images").fetchone()[0] == 1
    # Clear: two clicks forget every conversation and the uploaded image.
    page.locator("#clear-convs").click()
    page.locator("#clear-convs").click()
    page.wait_for_function("() => document.querySelectorAll('#conv-list li').length === 0", timeout=20_000)
    with site.db() as db:
        assert db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM conversation_images").fetchone()[0] == 0
    browser.assert_clean()


@needs_browser
def test_phone_width_is_readable(site: Site, browser: Browser) -> None:
    page = browser.page
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/", "/results"):
        page.goto(site.base + path)
        page.wait_for_load_state("networkidle")
        # Nothing wider than the screen: no sideways scrolling.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390 + 1, path
    browser.shot("results-phone")
    browser.assert_clean()


# ------------------------------------------------------------------ HTTP


PAGES = ("/", "/results", "/search?q=quota", "/failures", "/ask")


def test_every_page_sends_a_strict_csp(site: Site) -> None:
    # issue 14: strict Content-Security-Policy on every page
    for path in PAGES:
        r = site.http.get(path)
        assert r.status_code == 200, path
        csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
        assert csp["script-src"] == ["'self'"], path
        assert csp["default-src"] == ["'none'"]
        assert not any("unsafe" in v for vs in csp.values() for v in vs), path
        assert csp["frame-src"] == [f"{site.base}/api/v1/file"], path  # the sandboxed sidecar route only
        assert csp["frame-ancestors"] == ["'none'"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in r.text and " on" + "click=" not in r.text  # no inline script or handlers


def test_sidecar_html_is_served_sandboxed(site: Site) -> None:
    sidecar = site.inbox / "shots" / "login.png.code.html"
    r = site.http.get("/api/v1/file", params={"path": str(sidecar)})
    assert r.status_code == 200
    assert r.headers["content-security-policy"].startswith("sandbox")


def test_files_outside_the_watched_folders_are_refused(site: Site, tmp_path: Path) -> None:
    # issue 14: path traversal and outside-root requests to /api/v1/file get 403/404
    secret = tmp_path / "secret.png"
    picture(secret, (0, 0, 0), "secret")
    link = site.inbox / "scans" / "link-out.png"
    link.symlink_to(secret)
    try:
        inside = str(site.inbox / "scans" / "invoice-2031.png")
        for route in ("/api/v1/file", "/web/thumb"):
            assert site.http.get(route, params={"path": inside}).status_code == 200, route
            for path in (str(secret), "/etc/passwd", f"{site.inbox}/../config.yaml",
                         f"{site.inbox}/scans/../../state/state.db", str(link), "relative.png",
                         f"{site.inbox}/scans/missing.png"):
                code = site.http.get(route, params={"path": path}).status_code
                assert code in (400, 403, 404), (route, path, code)
            assert site.http.get(route, params={"path": str(link)}).status_code == 403
    finally:
        link.unlink()


def test_state_changes_refuse_cross_site_requests(site: Site) -> None:
    # issue 14: state-changing requests are POSTs protected against cross-site requests
    body = json.dumps({"all": True})
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}):
        for path in ("/web/retry", "/web/conversations", "/web/conversations/clear"):
            r = site.http.post(path, content=body, headers={"Content-Type": "application/json", **headers})
            assert r.status_code == 403, (path, headers, r.status_code)
    assert site.http.get("/web/retry").status_code in (404, 405)  # no state change by GET
    ok = site.http.post("/web/conversations", json={}, headers={"Origin": site.base, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200


HOSTILE = ['"', "NEAR(", "a OR", "*", "'; DROP TABLE jobs; --", "name:x", "\x00", "x" * 3000, "((", "^", "-"]


def test_search_api_answers_hostile_queries(site: Site) -> None:
    # issue 14: a hostile query must never raise a 500
    for q in HOSTILE:
        r = site.http.get("/api/v1/search", params={"q": q})
        assert r.status_code == 200, (q, r.text)
        assert isinstance(r.json()["hits"], list)
    r = site.http.get("/api/v1/search", params={"q": "quota"})
    hits = r.json()["hits"]
    assert [h["rule"] for h in hits] and all(h["rule"] == "ocr" for h in hits)
    assert any(h["path"].endswith("invoice-2031.png") and "quota" in h["snippet"].lower() for h in hits)
    assert site.http.get("/api/v1/search", params={"q": "x", "since": "yesterday"}).status_code == 400


def test_result_cards_hide_the_provenance_comment(site: Site) -> None:
    # issue 27: the sidecar's `<!-- vlwatch: ... -->` line showed as text in the cards
    invoice = site.inbox / "scans" / "invoice-2031.png"
    assert "<!-- vlwatch: rule ocr" in (invoice.parent / (invoice.name + ".ocr.md")).read_text()
    page = site.http.get("/results").text
    assert "invoice-2031.png" in page
    assert "vlwatch: rule" not in page and "&lt;!-- vlwatch" not in page


def test_failures_count_attempts_in_the_right_number(site: Site) -> None:
    # issue 27: "1 attempts"
    job = site.wait_state(site.inbox / "scans" / "bad-scan.png", "ocr", "failed")
    page = site.http.get("/failures").text
    n = job["attempts"]
    assert f"{n} attempt{'s' if n != 1 else ''}</small>" in page and "1 attempts" not in page


def test_the_index_count_is_live(site: Site) -> None:
    # issue 27: the overview's "sidecars in the search index" only moved when someone searched
    before = site.http.get("/web/overview.json").json()["indexed"]
    fresh = picture(site.inbox / "scans" / "count-me.png", (250, 250, 250), "COUNT 1")
    site.wait_state(fresh, "ocr", "done")
    assert site.http.get("/web/overview.json").json()["indexed"] == before + 1


def test_a_file_from_elsewhere_is_shown_but_not_served(site: Site) -> None:
    # issue 27: `vlwatch process` on a file outside every watched folder: the page showed a broken
    # thumbnail, a sidecar link answering 403 and an ask link that failed.  Now the page, the API
    # and the ask picker agree: its result is shown, its files are not served, and it says why.
    from tests.conftest import run_vlwatch

    outside = picture(site.root / "elsewhere" / "outside-scan.png", (240, 240, 250), "ELSEWHERE")
    done = run_vlwatch("process", "--rule", "ocr", "--config", site.root / "config.yaml", outside, timeout=120,
                       env={"VLWATCH_PLUGINS": "tests.web_backend"})
    assert done.returncode == 0, done.stderr
    sidecar = outside.parent / (outside.name + ".ocr.md")
    assert sidecar.is_file()
    quoted = urllib.parse.quote(str(outside), safe="")
    page = site.http.get("/results").text
    at = page.index("outside-scan.png")
    card = page[page.rindex("<article", 0, at):page.index("</article>", at)]
    assert "not served here" in card
    assert f"/web/thumb?path={quoted}" not in page and f"/ask?path={quoted}" not in page
    assert "/api/v1/file?path=" + urllib.parse.quote(str(sidecar), safe="") not in page
    assert site.http.get("/api/v1/file", params={"path": str(sidecar)}).status_code == 403
    ask = site.http.get("/ask", params={"path": str(outside)}).text
    assert "outside-scan.png" not in ask  # neither offered in the picker nor preset


@needs_browser
def test_a_failed_ask_says_so_and_gives_the_question_back(site: Site, browser: Browser) -> None:
    # issue 27: a failed turn stayed "…"
    page = browser.page
    page.goto(site.base + "/ask")
    question = "x " * 120_000  # over api.max_context: the API refuses it with a 400
    page.locator("#question").fill(question)
    page.locator("#send").click()
    failed = page.locator(".msg.assistant.failed")
    failed.wait_for(timeout=30_000)
    assert failed.inner_text().startswith("failed: ") and "max_context" in failed.inner_text()
    assert page.locator("#question").input_value() == question.strip()
