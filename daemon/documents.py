"""The ``.md`` sidecar of a whole document read with olmOCR-2 answers (``answers: olmocr``).

One YAML front matter for the document on top, then the pages' text in
order; the model's per-page front matter never appears in the body::

    ---
    source: report.pdf
    pages: 3
    primary_languages: [en]
    rotated_pages: {2: 90}        # turned before the answer kept (degrees, counter-clockwise)
    table_pages: [3]
    diagram_pages: []
    fallback_pages: [2]           # text from the PDF's own text layer, not from the model
    missing_pages:
    - page: 3
      reason: ...
    rule: olmocr
    model: allenai/olmOCR-2-7B-1025
    ---

    <!-- page 1 -->
    ...

A page with no valid answer after its tries (``daemon.policies``) falls
back to the PDF's text layer, marked as such; a page with neither (an image,
a scan with no text layer, or a request that failed) is missing, with the
reason, and the other pages are still written.  ``document_note`` says the
same in one line for the job's record.

Everything from the model or the file is hostile: the body's raw HTML is
escaped except bare table tags (olmOCR-2 writes tables as HTML; a rule with
``raw_html: true`` keeps it all), the front matter is written by
``yaml.safe_dump`` from values we built, and comments cannot be closed early.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import yaml

from daemon import answers
from daemon.errors import VlwatchError
from daemon.errors import printable
from daemon.images import pdf_page_text
from daemon.policies import PageAnswer
from daemon.results import Result

log = logging.getLogger(__name__)


def document_markdown(result: Result, roots: Sequence[Path] | None = None) -> str:
    """The whole sidecar text of ``result`` (a ``results.Result``), provenance comment excluded.

    Args:
        roots: where the source may really be (``rules.allowed_roots``), for
            reading its text layer again.
    """
    rule = result.match.rule
    summary: dict[str, object] = {"source": _text(result.match.path.name), "pages": len(result.pages)}
    languages: list[str] = []
    rotated: dict[int, int] = {}
    tables, diagrams, fallback, missing = [], [], [], []
    bodies = []
    multi = len(result.pages) > 1 or (result.pages and result.pages[0].number != 1)
    for page in result.pages:
        answer = page.answer
        front = answer.front_matter if isinstance(answer, PageAnswer) else None
        n = page.number
        if isinstance(answer, PageAnswer) and not answer.valid:
            text, reason = _fallback(result, n, answer.problem or "no valid answer", roots)
            if text is None:
                missing.append({"page": n, "reason": " ".join(_text(reason).split())[:500]})
                bodies.append(f"<!-- page {n} missing: {_comment_safe(reason)} -->")
                continue
            fallback.append(n)
            head = f"<!-- page {n}: from the PDF's text layer, not the model ({_comment_safe(reason)}) -->"
        else:
            text = answer.body if isinstance(answer, PageAnswer) else answer.text
            head = f"<!-- page {n} -->" if multi else ""
        if front is not None:
            if front.primary_language and front.primary_language not in languages:
                languages.append(front.primary_language)
            if isinstance(answer, PageAnswer) and answer.rotation:
                rotated[n] = answer.rotation
            if front.is_table:
                tables.append(n)
            if front.is_diagram:
                diagrams.append(n)
        body = answers.clean_markdown(text)
        body = body if rule.raw_html else answers.escape_raw_html(body, keep_tables=True)
        bodies.append(f"{head}\n{body}".strip("\n") if head else body.rstrip("\n"))
    summary.update(primary_languages=languages, rotated_pages=rotated, table_pages=tables,
                   diagram_pages=diagrams, fallback_pages=fallback, missing_pages=missing,
                   rule=rule.name, model=_text(result.model))
    front_matter = yaml.safe_dump(summary, sort_keys=False, allow_unicode=True, default_flow_style=None, width=1000)
    return f"---\n{front_matter}---\n\n" + "\n\n".join(b for b in bodies if b) + "\n"


def document_note(result: Result) -> str | None:
    """One line for the job's record: the pages that have no answer of the model, and why (None: all have)."""
    bad = [(p.number, p.answer.problem) for p in result.pages
           if isinstance(p.answer, PageAnswer) and not p.answer.valid]
    if not bad:
        return None
    where = " (the sidecar has the PDF's text layer for these pages where there is one)" \
        if result.match.rule.answers == "olmocr" else " (the sidecar marks these pages as missing)"
    return "; ".join(f"page {n}: {problem}" for n, problem in bad)[:2000] + where


def _fallback(result: Result, number: int, problem: str,
              roots: Sequence[Path] | None) -> tuple[str | None, str]:
    """The text layer of page ``number`` (or None) and the reason to show for it."""
    try:
        text = pdf_page_text(result.match.path, number, roots)
    except VlwatchError as exc:
        log.warning("%s: page %d: no text layer to fall back on: %s", printable(result.match.path), number, exc)
        return None, f"{problem}; the text layer could not be read: {exc}"
    if text is None:
        return None, f"{problem}; the file has no text layer for this page"
    log.warning("%s: page %d: %s; took the PDF's text layer", printable(result.match.path), number, problem)
    return text, problem


def _comment_safe(text: str) -> str:
    # "--" may not appear inside an HTML comment, and ">" could end it early in lax parsers.
    return _text(text).replace("--", "- -").replace(">", ")").replace("\n", " ")[:500]


def _text(value: str) -> str:
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")

