"""A backend for the document-conversion tests (``VLWATCH_PLUGINS=tests.convert_backend``).

It answers each page the way an OCR model would (Markdown with a heading and
a table), and says what it was shown, so a test reads from the Markdown
that the right rule, file name and page reached the model:

    # <the prompt's first line>

    Page shown at <w>x<h>.

    | item | qty |
    | --- | --- |
    | widget | 2 |

A prompt that mentions ``front matter`` (the tests' stand-in for the olmocr
rule) gets olmOCR's per-page YAML front matter first.  The file name is in
the prompt (``$filename``), so it steers the answer, as ``bad`` does for the
stub backend:

- ``bad``: the model rejects the request (``BackendError``);
- ``slow-``: 5 s per request (a document past ``api.sync_wait``);
- ``lag-``: 0.15 s per request (a folder backlog that takes a while).
"""

from __future__ import annotations

import time
from typing import Sequence

from daemon.backends import Answer, Request, register
from daemon.errors import BackendError
from tests.stub_backend import StubBackend


class ConvertBackend(StubBackend):
    name = "convertstub"

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        if any("bad" in r.prompt and not r.messages for r in requests):
            raise BackendError("the model rejected the request (convert stub)")
        time.sleep(sum(5.0 if "slow-" in r.prompt else 0.15 if "lag-" in r.prompt else 0.0 for r in requests))
        self._loaded = True
        return [self._chat(r) if r.messages else Answer(text=self._page(r), new_tokens=20) for r in requests]

    @staticmethod
    def _page(r: Request) -> str:
        w, h = r.images[-1].size
        head = "---\nprimary_language: en\nis_rotation_valid: true\n---\n" if "front matter" in r.prompt else ""
        first = r.prompt.strip().splitlines()[0]
        return (f"{head}# {first}\n\nPage shown at {w}x{h}.\n\n"
                "| item | qty |\n| --- | --- |\n| widget | 2 |\n")


register("convertstub", ConvertBackend)
