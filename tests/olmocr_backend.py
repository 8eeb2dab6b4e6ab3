"""A backend that answers like olmOCR-2, loaded with ``VLWATCH_PLUGINS=tests.olmocr_backend`` (or imported).

It registers itself as ``olmocr-stub`` like any backend and tells what to
answer from the page it is shown (the request's last image), by the page's
main colour (``page_pdf`` below draws such pages):

- ``red``: a valid answer (front matter, then "Text of the red page"),
  with ``is_table: true``;
- ``green``: valid only once the black marker drawn in the page's top-left
  corner has come to the bottom-left (the page turned 90 degrees counter-
  clockwise, as PIL's ROTATE_90); before that it says
  ``is_rotation_valid: false, rotation_correction: 90``;
- ``blue``: no front matter until the temperature reaches 0.3;
- ``grey``: never valid: no front matter, or a valid one cut at the token
  limit (``finished=False``), in turn;
- ``yellow``: the request fails (``BackendError``).

Each request is logged as one JSON line to ``$VLWATCH_OLMOCR_LOG`` when set:
colour, temperature, image size, the corner holding the marker, whether the
prompt came before the image, and ``max_new_tokens``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from PIL import Image, ImageStat

from daemon.backends import Answer, Request, register
from daemon.config import ModelConfig
from daemon.errors import BackendError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "grey": (128, 128, 128),
           "yellow": (230, 230, 30)}


def front(*, rotation_valid: bool = True, rotation: int = 0, table: bool = False, language: str = "en") -> str:
    return (f"---\nprimary_language: {language}\nis_rotation_valid: {rotation_valid}\n"
            f"rotation_correction: {rotation}\nis_table: {table}\nis_diagram: False\n---\n")


class OlmocrStub:
    name = "olmocr-stub"

    def __init__(self, config: ModelConfig) -> None:
        self.model = config.name
        self._loaded = False
        self._grey = 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    def unload(self) -> None:
        self._loaded = False

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self._loaded = True
        if any(colour(r.images[-1]) == "yellow" for r in requests):
            # The worker then sends each request of the batch alone: only those are logged.
            if len(requests) == 1:
                _log(requests[0])
            raise BackendError("the model rejected the request (olmocr stub)")
        return [self._answer(r) for r in requests]

    def _answer(self, request: Request) -> Answer:
        page = request.images[-1]
        seen = _log(request)
        name = seen["colour"]
        if name == "red":
            return Answer(front(table=True) + "Text of the red page\n\n<table><tr><td>1</td></tr></table>")
        if name == "green":
            if seen["marker"] == "bottom-left":
                return Answer(front(language="de") + "Text of the green page")
            return Answer(front(rotation_valid=False, rotation=90) + "sideways gibberish")
        if name == "blue":
            if request.temperature >= 0.3:
                return Answer(front() + "Text of the blue page")
            return Answer("I think this page says: blue")
        self._grey += 1
        if self._grey % 2:
            return Answer("no front matter at all " * 3)
        return Answer(front() + "and so on " * 50, finished=False)


def colour(image: Image.Image) -> str:
    """The name of the page's main colour (the one most pixels have)."""
    small = image.convert("RGB").reduce(8)
    _, rgb = max(small.getcolors(small.width * small.height) or [(0, (0, 0, 0))])
    return min(COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(COLOURS[n], rgb)))


def marker(image: Image.Image) -> str:
    """The corner holding the black marker: the darkest of the four."""
    grey = image.convert("L")
    w, h = grey.size
    box = max(2, min(w, h) // 10)
    corners = {"top-left": (0, 0), "top-right": (w - box, 0), "bottom-left": (0, h - box),
               "bottom-right": (w - box, h - box)}

    def mean(at: tuple[int, int]) -> float:
        return ImageStat.Stat(grey.crop((at[0], at[1], at[0] + box, at[1] + box))).mean[0]

    return min(corners, key=lambda c: mean(corners[c]))


def _log(request: Request) -> dict[str, object]:
    page = request.images[-1]
    first = request.messages[0].parts[0] if request.messages else None
    seen = {"colour": colour(page), "temperature": request.temperature, "size": list(page.size),
            "marker": marker(page), "prompt_first": isinstance(first, str) and first == request.prompt,
            "max_new_tokens": request.max_new_tokens}
    if path := os.environ.get("VLWATCH_OLMOCR_LOG"):
        with open(path, "a") as f:
            f.write(json.dumps(seen) + "\n")
    return seen


def page_pdf(pages: Sequence[tuple[str, str | None]], size: tuple[int, int] = (300, 200)) -> bytes:
    """A PDF of landscape pages, each filled with a colour of ``COLOURS``, a black marker in its
    top-left corner, and the given text as its text layer (None: no text layer)."""
    from tests.data.make_hostile import pdf

    w, h = size
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for name, text in pages:
        r, g, b = (c / 255 for c in COLOURS[name])
        content = b"%.3f %.3f %.3f rg 0 0 %d %d re f 0 0 0 rg 0 %d 30 30 re f" % (r, g, b, w, h, h - 30)
        if text is not None:
            content += b" BT /F1 12 Tf 60 90 Td (%s) Tj ET" % text.encode("latin-1")
        number = len(objects) + 1
        kids.append(b"%d 0 R" % number)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font << /F1 3 0 R >> >> "
                       b"/Contents %d 0 R >>" % (w, h, number + 1))
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(pages))
    return pdf(objects)


register("olmocr-stub", OlmocrStub)
