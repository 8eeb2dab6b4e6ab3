"""The local API (issue 13) against a real ``python -m daemon run``, with the openai SDK as the client.

The daemon runs the stub backend (``tests/stub_backend.py``), which answers a
chat with what it saw: the number of turns, the images in order with the
sizes they reached the model at, and the last user text.  That is how these
tests see that images and turns arrive as sent and sized exactly as a folder
file is (``daemon.images``).  The tiny real checkpoint answers chats in
``test_api_model.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from PIL import Image

from daemon.pages import shown_size
from tests.conftest import run_vlwatch, write_config
from tests.test_daemon import Daemon, png_bytes, put, wait_until

MAX_PIXELS = 50000
TOKEN = "vlw-test-token-5d1c0e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_config(workdir: Path, port: int, *, api_extra: str = "", rules: str = "", jobs: str = "",
               model_extra: str = "") -> Path:
    (workdir / "inbox").mkdir(parents=True, exist_ok=True)
    return write_config(workdir, f"""
        model:
          backend: stub
          name: stub-model
          max_new_tokens: 64
          max_pixels: {MAX_PIXELS}
        {model_extra}
        state: ./state/state.db
        include: [describe]
        watch:
          - path: ./inbox
            settle: 0.3s
        {rules}
        {jobs}
        api:
          listen: 127.0.0.1:{port}
        {api_extra}
        """)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def shown(size: tuple[int, int]) -> str:
    w, h = shown_size(*size, min_pixels=4 * 28 * 28, max_pixels=MAX_PIXELS)
    return f"{w}x{h}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str, Path]]:
    """One stub daemon with its API for the module: (daemon, base URL, watched folder)."""
    workdir = tmp_path_factory.mktemp("api")
    port = free_port()
    config = api_config(workdir, port)
    d = Daemon(workdir, config, VLWATCH_PLUGINS="tests.stub_backend",
               VLWATCH_STUB_LOG=str(workdir / "stub.log")).start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(base), "the API to answer", log=d.log)
    try:
        yield d, base, workdir / "inbox"
    finally:
        d.stop()
        d.close()


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def client(served: tuple[Daemon, str, Path]) -> Iterator[openai.OpenAI]:
    _, base, _ = served
    with openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


# ------------------------------------------------------------------ chat


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:  # issue 13.1
    assert [m.id for m in client.models.list()] == ["stub-model"]


def test_plain_chat(client: openai.OpenAI) -> None:  # issue 13.1
    reply = client.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "hello there"}])
    assert reply.choices[0].message.content == "chat: 1 turns, 0 images (); last: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_streamed_chat(client: openai.OpenAI) -> None:  # issue 13.1
    stream = client.chat.completions.create(model="stub-model", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "tell me word by word"}])
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    text = "".join(pieces)
    assert text == "chat: 1 turns, 0 images (); last: tell me word by word"
    assert len(pieces) > 3  # streamed in pieces, not one lump
    assert finish == "stop" and usage is not None


def test_two_images_arrive_in_order_sized_like_folder_files(client: openai.OpenAI) -> None:  # issue 13.1, 13.2
    a, b = png_bytes(1, (64, 48)), png_bytes(2, (400, 300))
    reply = client.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": [
        image_part(data_url(a)), image_part(data_url(b)), {"type": "text", "text": "which differs?"}]}])
    assert reply.choices[0].message.content == (
        f"chat: 1 turns, 2 images ({shown((64, 48))}, {shown((400, 300))}); last: which differs?")


def test_two_turn_conversation_with_an_image_in_the_first(client: openai.OpenAI) -> None:  # issue 13.1
    img = png_bytes(3, (120, 90))
    reply = client.chat.completions.create(model="stub-model", messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [image_part(data_url(img)), {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "noise"},
        {"role": "user", "content": "and its colours?"},
    ])
    assert reply.choices[0].message.content == f"chat: 4 turns, 1 images ({shown((120, 90))}); last: and its colours?"


def test_file_url_inside_a_watched_folder(client: openai.OpenAI, served: tuple[Daemon, str, Path]) -> None:  # 13.2
    inbox = served[2]
    path = put(inbox / "sub dir" / "shot one.png", png_bytes(4, (200, 100)))
    for url in (path.as_uri(), str(path)):  # file:// (percent-encoded) and a plain absolute path
        reply = client.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": [
            image_part(url), {"type": "text", "text": "read it"}]}])
        assert reply.choices[0].message.content == f"chat: 1 turns, 1 images ({shown((200, 100))}); last: read it"


def test_paths_outside_the_watched_folders_are_refused(client: openai.OpenAI, served: tuple[Daemon, str, Path],
                                                        tmp_path: Path) -> None:  # issue 13.2
    inbox = served[2]
    outside = put(tmp_path / "secret.png", png_bytes(5))
    link = inbox / "link-out.png"
    link.symlink_to(outside)
    try:
        for url in (outside.as_uri(), str(outside), str(inbox / ".." / "secret.png"), link.as_uri()):
            with pytest.raises(openai.PermissionDeniedError) as caught:
                client.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": [
                    image_part(url), {"type": "text", "text": "x"}]}])
            assert "watched folder" in caught.value.body["message"]  # type: ignore[index]
    finally:
        link.unlink()


@pytest.mark.parametrize("url, status, code", [
    ("http://127.0.0.1:1/x.png", 400, "url_not_allowed"),
    ("https://example.com/x.png", 400, "url_not_allowed"),
    ("ftp://example.com/x.png", 400, "url_not_allowed"),
    ("relative/x.png", 400, "url_not_allowed"),
    ("data:image/png;base64,!!!notbase64", 400, "invalid_image"),
    ("data:image/png,rawbytes", 400, "invalid_image"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), 400, "invalid_image"),
])
def test_bad_image_urls_get_a_4xx_with_the_reason(served: tuple[Daemon, str, Path], url: str, status: int,
                                                  code: str) -> None:  # issue 13.2
    r = httpx.post(served[1] + "/v1/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": [image_part(url), {"type": "text", "text": "x"}]}]})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"


def test_bombs_oversized_and_truncated_images_are_4xx_never_500(served: tuple[Daemon, str, Path]) -> None:  # 13.2
    base = served[1]
    # A PNG header claiming 30000x30000 pixels: over Pillow's bomb limit, refused before decoding.
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    truncated = png_bytes(6, (300, 300))[:200]
    for data, status in ((bomb.getvalue(), 400), (truncated, 400), (b"\x89PNG" + os.urandom(33 * 2**20), 413)):
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": [image_part(data_url(data)), {"type": "text", "text": "x"}]}]})
        assert r.status_code == status, r.text[:300]
        assert r.json()["error"]["message"]
    # A body over the limit is refused by its length, before it is read.
    r = httpx.post(base + "/v1/chat/completions", content=b"{" + b" " * (65 * 2**20) + b"}", timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]"),
])
def test_malformed_chat_bodies(served: tuple[Daemon, str, Path], body: dict, param: str) -> None:  # issue 13.1
    r = httpx.post(served[1] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = httpx.post(served[1] + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# ------------------------------------------------------------- browsers


def test_dns_rebinding_and_cross_origin_requests_are_refused(served: tuple[Daemon, str, Path]) -> None:  # 13.3
    base = served[1]
    r = httpx.get(base + "/v1/models", headers={"Host": "evil.example:80"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "bad_host"
    r = httpx.post(base + "/api/v1/jobs", headers={"Origin": "https://evil.example"}, json={"paths": ["/x"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "bad_origin"
    port = base.rsplit(":", 1)[1]
    r = httpx.get(base + "/v1/models", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert r.status_code == 200  # the web page itself


# ------------------------------------------------------------- /api/v1


def test_status_is_what_the_cli_prints(served: tuple[Daemon, str, Path]) -> None:  # issue 13.1
    d, base, _ = served
    api = httpx.get(base + "/api/v1/status").json()
    cli = json.loads(run_vlwatch("status", "--json", "--config", d.config,
                                 env={"VLWATCH_PLUGINS": "tests.stub_backend"}).stdout)
    assert api.keys() == cli.keys() and api["state"] == cli["state"] and api["daemon"] == cli["daemon"]


def test_submit_list_and_retry_jobs(served: tuple[Daemon, str, Path], tmp_path: Path) -> None:  # issue 13.1
    d, base, inbox = served
    good = put(inbox / "jobs" / "one.png", png_bytes(7))
    bad = put(inbox / "jobs" / "bad-two.png", png_bytes(8))  # the stub rejects it
    d.wait_done(good)
    r = httpx.post(base + "/api/v1/jobs", json={"paths": [str(good), str(tmp_path / "elsewhere.png"),
                                                          str(inbox / "jobs" / "missing.png")], "force": True})
    assert r.status_code == 202, r.text
    first, elsewhere, missing = r.json()["jobs"]
    assert first["queued"] and first["job"] is not None and first["rule"] == "describe"
    assert elsewhere["error"] == "not inside a watched folder" and missing["error"] == "no such file"
    wait_until(lambda: httpx.get(f"{base}/api/v1/jobs/{first['job']}").json()["state"] == "done", "the job")
    jobs = httpx.get(base + "/api/v1/jobs", params={"state": "done", "limit": 500}).json()["jobs"]
    assert first["job"] in [j["id"] for j in jobs]
    assert httpx.get(base + "/api/v1/jobs", params={"state": "nonsense"}).status_code == 400
    # retry: 409 for a job that is not failed, 404 for none, 200 for a failed one
    assert httpx.post(f"{base}/api/v1/jobs/{first['job']}/retry").status_code == 409
    assert httpx.post(f"{base}/api/v1/jobs/999999/retry").status_code == 404
    failed = d.wait_state(bad, "failed")
    r = httpx.post(f"{base}/api/v1/jobs/{failed.id}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued"


def test_a_file_name_that_is_not_utf8_is_listed_not_a_500(served: tuple[Daemon, str, Path]) -> None:  # 13.2
    # Hostile names: JSON is UTF-8, so the undecodable byte is shown escaped, and the job is still listed.
    d, base, inbox = served
    (inbox / "odd").mkdir(exist_ok=True)
    raw = os.fsencode(inbox / "odd") + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(png_bytes(21))
    path = Path(os.fsdecode(raw))
    job = d.wait_done(path)
    got = httpx.get(f"{base}/api/v1/jobs/{job.id}")
    assert got.status_code == 200, got.text
    assert got.json()["path"].endswith("/odd/caf\\xe9.png")
    listed = httpx.get(base + "/api/v1/jobs", params={"limit": 500})
    assert listed.status_code == 200 and job.id in [j["id"] for j in listed.json()["jobs"]]


def test_events_stream_job_changes(served: tuple[Daemon, str, Path]) -> None:  # issue 13.1
    d, base, inbox = served
    seen: list[dict] = []
    opened = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", base + "/api/v1/events", timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            opened.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if any(e["type"] == "job.done" and e["job"]["path"].endswith("evented.png") for e in seen):
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert opened.wait(30)
    image = put(inbox / "evented.png", png_bytes(9))
    t.join(60)
    mine = [e["type"] for e in seen if e.get("job", {}).get("path") == str(image)]
    assert mine[-3:] == ["job.queued", "job.started", "job.done"], seen


def test_file_serves_images_and_sidecars_inside_only(served: tuple[Daemon, str, Path], tmp_path: Path) -> None:  # 13.1
    d, base, inbox = served
    image = put(inbox / "files" / "pic.png", png_bytes(10))
    d.wait_done(image)
    r = httpx.get(base + "/api/v1/file", params={"path": str(image)})
    assert r.status_code == 200 and r.content == image.read_bytes() and r.headers["content-type"] == "image/png"
    sidecar = image.parent / "pic.png.describe.md"
    r = httpx.get(base + "/api/v1/file", params={"path": str(sidecar)})
    assert r.status_code == 200 and "sandbox" in r.headers["content-security-policy"]
    other = put(inbox / "files" / "notes.txt", b"private")
    outside = put(tmp_path / "o.png", png_bytes(11))
    link = inbox / "files" / "out.png"
    link.symlink_to(outside)
    for path, status in ((other, 403), (outside, 403), (link, 403), (Path("/etc/passwd"), 403),
                         (inbox / "files" / "nope.png", 404)):
        r = httpx.get(base + "/api/v1/file", params={"path": str(path)})
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]["message"]


# ------------------------------------------------------------------- token


def test_token_is_required_when_configured(tmp_path: Path) -> None:  # issue 13.3
    port = free_port()
    config = api_config(tmp_path, port, api_extra="  token_env: VLWATCH_TEST_API_TOKEN")
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend", VLWATCH_TEST_API_TOKEN=TOKEN).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(base) == 401, "the API to answer", log=d.log)
        with openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        for path in ("/v1/models", "/api/v1/status", "/api/v1/events", "/", "/no/such/path"):
            r = httpx.get(base + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        with openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0) as c:
            reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content.endswith("last: hi")
        assert httpx.get(base + "/api/v1/status", cookies={"vlwatch_token": TOKEN}).status_code == 200
    finally:
        d.stop()
        d.close()
    assert TOKEN not in d.log()


def _status(base: str) -> int | None:
    try:
        return httpx.get(base + "/v1/models", timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_unix_socket_owner_and_group_only(tmp_path: Path) -> None:  # issue 13.3
    sock = Path(f"/tmp/vlw-api-{os.getpid()}-{time.monotonic_ns()}.sock")
    config = api_config(tmp_path, 0).read_text().replace("listen: 127.0.0.1:0", f"listen: unix:{sock}")
    (tmp_path / "config.yaml").write_text(config)
    d = Daemon(tmp_path, tmp_path / "config.yaml", VLWATCH_PLUGINS="tests.stub_backend").start()
    try:
        wait_until(sock.exists, "the socket", log=d.log)
        assert sock.stat().st_mode & 0o777 == 0o660
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost") as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "stub-model"
    finally:
        d.stop()
        d.close()
    assert not sock.exists()


def test_a_port_in_use_leaves_the_daemon_watching(tmp_path: Path) -> None:  # issue 13.1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = api_config(tmp_path, port)
        d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend").start()
        try:
            image = put(tmp_path / "inbox" / "still.png", png_bytes(12))
            d.wait_done(image)
            assert "api: not started: api.listen 127.0.0.1:" in d.log()
        finally:
            d.stop()
            d.close()


def test_check_refuses_a_wide_listen_without_a_token(tmp_path: Path) -> None:  # issue 13.3
    config = api_config(tmp_path, 8765).read_text().replace("listen: 127.0.0.1:8765", "listen: 0.0.0.0:8765")
    (tmp_path / "config.yaml").write_text(config)
    done = run_vlwatch("check", "--config", tmp_path / "config.yaml", env={"VLWATCH_PLUGINS": "tests.stub_backend"})
    assert done.returncode == 1
    line = next(n for n, text in enumerate(config.splitlines(), 1) if "0.0.0.0" in text)
    assert f"config.yaml:{line}: api.listen: '0.0.0.0:8765' is reachable from other machines" in done.stdout
    (tmp_path / "config.yaml").write_text(config.replace("listen: 0.0.0.0:8765",
                                                         "listen: 0.0.0.0:8765\n  token_env: VLWATCH_API_TOKEN"))
    done = run_vlwatch("check", "--config", tmp_path / "config.yaml", env={"VLWATCH_PLUGINS": "tests.stub_backend"})
    assert done.returncode == 0, done.stdout
    for bad in ("listen: nonsense", "listen: unix:relative.sock", "token_env: sk-12345-not-a-name"):
        key = bad.split(":")[0]
        (tmp_path / "config.yaml").write_text(config.replace("listen: 0.0.0.0:8765", bad))
        done = run_vlwatch("check", "--config", tmp_path / "config.yaml", env={"VLWATCH_PLUGINS": "tests.stub_backend"})
        assert done.returncode == 1 and f"api.{key}:" in done.stdout, done.stdout


# ---------------------------------------------------------------- priority


def test_an_api_request_is_answered_ahead_of_the_folder_backlog(tmp_path: Path) -> None:  # issue 13.1 priority
    port = free_port()
    inbox = tmp_path / "inbox"
    for i in range(120):
        put(inbox / f"backlog-{i:03d}.png", png_bytes(100 + i, (32, 32)))
    old = time.time() - 60
    for p in inbox.iterdir():
        os.utime(p, (old, old))  # settled already: the catch-up queues them at once
    config = api_config(tmp_path, port, model_extra="  batch_size: 1",
                        jobs="jobs: {batch_wait: 0s}")
    d = Daemon(tmp_path, config, VLWATCH_PLUGINS="tests.stub_backend", VLWATCH_STUB_DELAY="0.25").start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: d.queue.counts()["done"] >= 2, "the backlog to start", log=d.log)
        started = time.monotonic()
        with openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "me first"}])
        took = time.monotonic() - started
        left = d.queue.counts()["queued"]
        assert reply.choices[0].message.content.endswith("last: me first")
        # The backlog needs 120 x 0.25 s = 30 s; the request waits for one batch at most.
        assert took < 5.0, took
        assert left >= 60, left
    finally:
        d.stop()
        d.close()


def test_system_unit_gives_the_socket_to_its_group_and_stays_sandboxed() -> None:  # issue 13.3
    import re
    import shutil
    import subprocess

    unit = (Path(__file__).resolve().parent.parent / "systemd" / "vlwatch.service")
    text = unit.read_text()
    assert "RuntimeDirectory=vlwatch" in text and "RuntimeDirectoryMode=0750" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                          timeout=120)
    m = re.search(r"Overall exposure level for vlwatch\.service: (\d+\.\d+)", done.stdout + done.stderr)
    assert m and float(m.group(1)) <= 2.0, done.stdout[-2000:]
