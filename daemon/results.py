"""What the engine hands the sidecar writers: one job's answers, page by page.

Frozen, and free of writing code, so that both the plain writers
(``daemon.outputs``) and the whole-document writer (``daemon.documents``)
build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.backends import Answer
from daemon.intake.rules import Match
from daemon.policies import PageAnswer


@dataclass(frozen=True)
class PageResult:
    number: int
    answer: Answer
    original: tuple[int, int]  # (width, height) of the page as decoded
    shown: tuple[int, int]  # (width, height) the model saw


@dataclass(frozen=True)
class Result:
    match: Match
    pages: tuple[PageResult, ...]
    backend: str
    model: str
    #: where the source may really be (``rules.allowed_roots``) when a writer reads it again
    roots: tuple[Path, ...] | None = None
    #: "fp8" when the model ran with FP8 weights (issue 23: it changes the text); None for full precision
    quantization: str | None = None
    #: the engine choices in effect that can change the text (``TransformersBackend.provenance``:
    #: precision, kernels, what is compiled); "" for a backend that has none to tell
    engine: str = ""


def missing(page: PageResult) -> str | None:
    """Why ``page`` has no answer (its requests failed; issue 24), or None when it has one.

    Only a page of a document under a plain rule (``policies.PagedPolicy``):
    an ``olmocr`` page with no valid answer has the text layer to fall back
    on and is judged by ``daemon.documents``.
    """
    answer = page.answer
    return answer.problem if isinstance(answer, PageAnswer) and answer.problem else None
