"""A long document is rendered a few pages at a time (issue 24, item 2).

A 300-page scan used to be rendered whole before its first page reached the
model: every page image in memory at once.  These tests run a real 40-page
PDF through the worker's batch path (``vlwatch process --local``, ``scan``,
server backends) and the daemon's live feed (``JobFeed``, the slot engine's
way in), with plugin backends that count, at each call, the rendered page
images still alive: a weak reference to each image PDFium's page renderer
(``pdf._page``) returns, so whoever holds one (a request, a policy,
the worker) is caught.  (Not ``gc.get_objects()``: it takes references to
tuples other threads are still building, which CPython then refuses to
resize: SystemError.)  The bound is two chunks of ``page_chunk(batch_size)``
pages; the sidecar must still list every page, in order, with its own answer.
"""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from daemon import pdf
from daemon.backends import Answer, Feed, Request
from daemon.config_reader import load_config
from daemon.engine.loop import WorkerLoop
from daemon.engine.outcomes import Processor
from daemon.engine.worker import Worker, page_chunk
from daemon.intake.rules import match_file
from daemon.store.keys import content_hash
from daemon.store.queue import Candidate, Queue
from tests.conftest import wait_until, write_config
from tests.olmocr_backend import OlmocrStub, colour, page_pdf

PAGES = 40
BATCH = 4
#: Pages of one document held at most: the chunk in the engine and the next one being rendered.
BOUND = 2 * page_chunk(BATCH)
#: Weak references to every page image rendered in the test.
RENDERED: list[weakref.ref] = []


@pytest.fixture(autouse=True)
def track_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    render = pdf._page

    def tracked(*args, **kwargs):  # type: ignore[no-untyped-def]
        page = render(*args, **kwargs)
        RENDERED.append(weakref.ref(page.image))
        return page

    RENDERED.clear()
    monkeypatch.setattr(pdf, "_page", tracked)


def page_colours(n: int, names: Sequence[str] = ("red", "green", "blue", "grey")) -> list[str]:
    """An order no shifted or shuffled reading of the pages would reproduce."""
    rng = np.random.default_rng(24)
    return [names[i] for i in rng.integers(0, len(names), n)]


def alive_pages() -> int:
    """Rendered page images alive now, whoever holds them (a turned copy is another image, not counted)."""
    gc.collect()  # anything held only by a reference cycle is gone
    return sum(1 for ref in list(RENDERED) if ref() is not None)


class Counting:
    """A plugin-style backend: answers each page with its colour, noting the page images alive at each call."""

    name = "counting"
    model = "counting-model"

    def __init__(self) -> None:
        self.loaded = False
        self.alive: list[int] = []

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self.loaded = True
        self.alive.append(alive_pages())
        return [Answer(colour(r.images[-1])) for r in requests]

    def unload(self) -> None:
        self.loaded = False


class CountingOlmocr(OlmocrStub):
    """The olmOCR stub (retries, turned pages, invalid pages), counting as ``Counting`` does."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.alive: list[int] = []

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self.alive.append(alive_pages())
        return super().generate(requests)


class Slots(Counting):
    """A backend that admits requests itself (``serve``), as the slot engine does, with ``slots`` in flight."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots
        self.served = 0

    def serve(self, feed: Feed) -> None:
        self.loaded = True
        running = []
        while True:
            while len(running) < self.slots and (item := feed.next()) is not None:
                running.append(item)
            self.alive.append(alive_pages())
            if running:
                item = running.pop(0)  # oldest first: a sequence ends, its slot frees up
                feed.deliver(item.key, Answer(colour(item.request.images[-1])))
                self.served += 1
                continue
            if not feed.more():
                return
            feed.wait(0.05)


def pages_of(markdown: str) -> list[tuple[int, str]]:
    markdown = markdown.split("\n<!-- vlwatch:")[0]  # the provenance comment
    return [(int(n), text.strip()) for n, text in re.findall(r"## Page (\d+)\n\n(.*?)(?=\n## Page |\Z)",
                                                            markdown, re.S)]


def config_for(tmp_path: Path, rules: str = "") -> object:
    # The worker is handed the backend object itself; the config only needs a registered name.
    return load_config(write_config(tmp_path, f"""
        model: {{backend: olmocr-stub, name: counting-model, batch_size: {BATCH}}}
        state: ./state.db
        watch: [{{path: ./inbox}}]
        jobs: {{batch_wait: 0s, backoff: 1s, attempts: 2}}
        {rules or 'rules: [{name: text, task: ocr, match: ["*.pdf"], prompt: "Read it.", output: md}]'}
    """))


def long_pdf(tmp_path: Path, colours: Sequence[str]) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    path = inbox / "long.pdf"
    path.write_bytes(page_pdf([(c, f"page {i}") for i, c in enumerate(colours, 1)]))
    return path


@pytest.mark.parametrize("threads", [1, 4])
def test_the_batch_path_holds_a_few_pages_of_a_long_document(tmp_path: Path, threads: int) -> None:
    colours = page_colours(PAGES)
    path = long_pdf(tmp_path, colours)
    config = config_for(tmp_path)
    backend = Counting()
    worker = Worker(config, backend, threads=threads)  # type: ignore[arg-type]
    try:
        [outcome] = worker.process(match_file(config, path))
    finally:
        worker.close()
    assert outcome.ok, outcome.error
    assert backend.alive and max(backend.alive) <= BOUND, backend.alive
    assert pages_of((path.parent / "long.pdf.text.md").read_text()) == list(enumerate(colours, 1))
    assert alive_pages() == 0  # nothing kept once the sidecar is written


def test_answer_policies_keep_the_bound_through_retries_and_turned_pages(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # olmOCR's loop asks again (turned pages, hotter tries, pages never valid): a page in retry stays
    # in memory, a page settled is let go (the policy kept every page's first request before).
    colours = page_colours(PAGES)
    path = long_pdf(tmp_path, colours)
    monkeypatch.delenv("VLWATCH_OLMOCR_LOG", raising=False)
    config = config_for(tmp_path, "include: [olmocr]")
    backend = CountingOlmocr(config.model)  # type: ignore[attr-defined]
    worker = Worker(config, backend, threads=4)  # type: ignore[arg-type]
    try:
        [outcome] = worker.process(match_file(config, path))
    finally:
        worker.close()
    assert outcome.ok, outcome.error
    assert max(backend.alive) <= BOUND, backend.alive
    body = (path.parent / "long.pdf.olmocr.md").read_text()
    expected = [f"Text of the {c} page" if c != "grey" else None for c in colours]
    seen = [next((f"Text of the {c} page" for c in ("red", "green", "blue") if f"Text of the {c} page" in part),
                 None) for part in re.split(r"<!-- page \d+", body)[1:]]
    assert seen == expected
    # grey pages have no valid answer: the text layer, read per page, stands in for them, in place
    for i, c in enumerate(colours, 1):
        if c == "grey":
            assert re.search(rf"<!-- page {i}: from the PDF's text layer[^\n]*-->\npage {i}\n", body), i


def test_the_live_feed_renders_a_long_document_as_slots_free_up(tmp_path: Path) -> None:
    colours = page_colours(PAGES)
    path = long_pdf(tmp_path, colours)
    config = config_for(tmp_path)
    backend = Slots(slots=6)
    queue = Queue(tmp_path / "state.db")
    st = path.stat()
    queue.enqueue([Candidate(path.absolute(), "text", content_hash(path), st.st_size, st.st_mtime_ns)])
    worker = Worker(config, backend, threads=2)  # type: ignore[arg-type]
    loop = WorkerLoop(queue, worker, Processor(queue, lambda p: None))
    loop.start()
    try:
        wait_until(lambda: {j.state for j in queue.history()} == {"done"}, "the document done")
    finally:
        loop.stop()
        loop.join(60)
        worker.close()
        queue.close()
    assert backend.served == PAGES
    assert max(backend.alive) <= BOUND, backend.alive
    assert pages_of((path.parent / "long.pdf.text.md").read_text()) == list(enumerate(colours, 1))


class Replacing(Slots):
    """Replaces the document with another one at its first answer: its later chunks must not be read."""

    def __init__(self, path: Path, slots: int) -> None:
        super().__init__(slots)
        self.path = path
        self.replaced = False

    def _replace(self) -> None:
        if not self.replaced:  # before the first answer
            self.path.write_bytes(page_pdf([("red", None)] * (PAGES + 1)))
            self.replaced = True

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self._replace()
        return super().generate(requests)

    def serve(self, feed: Feed) -> None:
        original = feed.deliver

        def deliver(key, result) -> None:  # type: ignore[no-untyped-def]
            self._replace()
            original(key, result)

        feed.deliver = deliver  # type: ignore[method-assign]
        super().serve(feed)


def test_a_document_replaced_between_chunks_fails_in_the_batch_path(tmp_path: Path) -> None:
    # the pages of two different files are never mixed in one sidecar; the job is retried, as any
    # file that changed while being read
    path = long_pdf(tmp_path, page_colours(PAGES))
    config = config_for(tmp_path)
    worker = Worker(config, Replacing(path, slots=1), threads=1)  # type: ignore[arg-type]
    try:
        [outcome] = worker.process(match_file(config, path))
    finally:
        worker.close()
    assert not outcome.ok and not outcome.permanent
    assert "long.pdf: changed while its pages were being read" in outcome.error
    assert not (path.parent / "long.pdf.text.md").exists()


def test_a_document_replaced_between_chunks_ends_in_the_live_feed(tmp_path: Path) -> None:
    path = long_pdf(tmp_path, page_colours(PAGES))
    config = config_for(tmp_path)
    backend = Replacing(path, slots=6)
    queue = Queue(tmp_path / "state.db")
    st = path.stat()
    queue.enqueue([Candidate(path.absolute(), "text", content_hash(path), st.st_size, st.st_mtime_ns)])
    changed: list[Path] = []
    worker = Worker(config, backend, threads=2)  # type: ignore[arg-type]
    loop = WorkerLoop(queue, worker, Processor(queue, changed.append))
    loop.start()
    try:
        wait_until(lambda: changed, "the changed file to be handed back")
        wait_until(lambda: not loop.in_hand, "the job to leave the engine")
    finally:
        loop.stop()
        loop.join(60)
        worker.close()
        queue.close()
    assert changed == [path.absolute()]
    assert backend.served < PAGES  # the pages after the failed chunk never reached the model
    assert not (path.parent / "long.pdf.text.md").exists()
