"""A backend for the web page's tests (``VLWATCH_PLUGINS=tests.web_backend``): answers shaped like the model's.

The tiny checkpoint answers random tokens; the page's tests need answers with
a Markdown table, grounding boxes, an HTML page, hostile markup, and a chat
that streams.  The rule's prompt says which (it names the task), so each
folder job gets the kind of answer its rule asks for:

- a prompt with ``table``: Markdown with a heading and a table (and, for a
  file whose name contains ``evil``, markup that must stay text);
- with ``bbox``: a grounding answer in the pixels of the image it was shown;
- with ``HTML``: a small page;
- a file whose name contains ``bad``: the model rejects the request (the job fails);
- a chat: streams ``You asked: ...`` word by word, with boxes when asked for logos.
"""

from __future__ import annotations

import json
from typing import Sequence

from daemon.backends import Answer, Request, register
from daemon.errors import BackendError
from tests.stub_backend import StubBackend

EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(2)> **still bold**'


class WebBackend(StubBackend):
    """The stub's model state; answers shaped like the model's (tables, boxes, HTML, hostile markup)."""

    name = "webstub"

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        if any("bad" in r.prompt and not r.messages for r in requests):
            raise BackendError("the model rejected the request (web stub)")
        self._loaded = True
        return [self._chat(r) if r.messages else Answer(text=self._job(r), new_tokens=8) for r in requests]

    @staticmethod
    def _job(r: Request) -> str:
        p = r.prompt
        if "bbox" in p:
            w, h = r.images[0].size
            return "```json\n" + json.dumps([
                {"bbox_2d": [w // 10, h // 10, w // 2, h // 2], "label": "acme logo"},
                {"bbox_2d": [w // 2, h // 2, w - 4, h - 4], "label": "price tag"}]) + "\n```"
        if "HTML" in p:
            return ("```html\n<!DOCTYPE html><html><head><title>t</title><style>h1{color:#24476b}</style></head>"
                    "<body><h1>Sign in</h1><p>Welcome back to Acme dashboard</p><button>Log in</button>"
                    "<script>document.body.innerHTML='scripted'</script></body></html>\n```")
        if "table" in p:
            extra = f"\n\n{EVIL}\n" if "evil" in p else ""
            return (f"# Invoice 2031\n\nError: **quota exceeded** for project *atlas*.{extra}\n\n"
                    "| item | qty | price |\n| --- | --- | --- |\n| widget | 2 | 9.50 |\n| gadget | 1 | 24.00 |\n")
        return f"A photo. {p[:60]}"

    @staticmethod
    def _chat(request: Request) -> Answer:
        last = next((p for m in reversed(request.messages) if m.role == "user"
                     for p in reversed(m.parts) if isinstance(p, str)), "")
        sizes = ", ".join(f"{i.width}x{i.height}" for i in request.images)
        text = f"You asked: {last} ({len(request.messages)} turns, {len(request.images)} images {sizes})"
        if "logo" in last.lower() and request.images:
            w, h = request.images[-1].size
            text += '\n```json\n[{"bbox_2d": [%d, %d, %d, %d], "label": "logo"}]\n```' % (w // 4, h // 4, w // 2, h // 2)
        if request.stream is not None:
            words = text.split(" ")
            for i, word in enumerate(words):
                request.stream(word + (" " if i < len(words) - 1 else ""))
        return Answer(text=text, new_tokens=len(text.split()))


register("webstub", WebBackend)
