"""The ``.md`` body of an OCR / description answer, and its raw HTML made inert.

``clean_markdown`` removes a fence that only wraps the whole answer and tidies
blank lines and line ends; ``escape_raw_html`` turns ``<`` outside code into
``&lt;`` for a sidecar whose rule does not allow raw HTML (issue 10.14).

It deliberately does not render or validate Markdown, and keeps the prose
around a fenced block as the model wrote it.
"""

from __future__ import annotations

import re

from daemon.answers.fences import _fence_closes, _fence_open, _normalise

# Info strings that mean "this fence is only wrapping the answer": a ```python
# fence around the whole answer is content (OCR of code) and is kept.
_WRAPPER_LANGS = frozenset({"", "markdown", "md", "text", "plaintext", "txt"})


def clean_markdown(text: str) -> str:
    """The .md body: whole-answer fence removed, LF endings, no trailing spaces.

    Trailing spaces go even though two of them mean a hard break in Markdown:
    models scatter them at random and the OCR line structure is kept by the
    newlines themselves.  Prose around a fenced block is kept as written.
    """
    lines = [line.rstrip() for line in _normalise(text).split("\n")]
    lines = _trim_blank(lines)
    if lines:
        lines = _trim_blank(_unwrap_whole_fence(lines))
    return "\n".join(lines) + "\n" if lines else ""


def escape_raw_html(markdown: str, *, keep_tables: bool = False) -> str:
    """``markdown`` with its raw HTML made inert: ``<`` outside code becomes ``&lt;`` (issue 10.14).

    The model reads attacker-controlled pixels; a Markdown viewer that renders
    inline HTML would run a ``<script>`` it wrote, or load ``<img
    src=http://...>`` and tell a stranger the file was opened.  Escaping the
    ``<`` of every tag, comment and declaration turns them into visible text,
    which every renderer shows as written.  Fenced code blocks and inline code
    spans are left as they are: renderers show their content literally
    already, and ``&lt;`` there would be shown as ``&lt;``.  ``>`` stays (a
    quote marker; harmless without its ``<``).

    ``keep_tables`` keeps the bare tags of an HTML table (``<table>``,
    ``<tr>``, ``<td colspan="2">``, ``<br>``...: no other attribute, so no
    script, style or URL can ride along), which is how olmOCR-2 writes tables.
    """
    out: list[str] = []
    fence: tuple[str, int] | None = None
    for line in markdown.split("\n"):
        if fence is not None:
            out.append(line)
            if _fence_closes(line, *fence):
                fence = None
            continue
        opened = _fence_open(line)
        if opened is not None:
            fence = (opened[0], opened[1])
            out.append(line)
            continue
        out.append(_escape_outside_code_spans(line, keep_tables))
    return "\n".join(out)


_CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")


#: A table tag as escaped: only these names, only numeric spans as attributes.
_TABLE_TAG = re.compile(r'&lt;(/?(?:table|thead|tbody|tfoot|tr|th|td|caption)(?: (?:colspan|rowspan)="\d{1,3}")*'
                        r'|br ?/?)>', re.IGNORECASE)


def _escape_outside_code_spans(line: str, keep_tables: bool = False) -> str:
    if "<" not in line:
        return line
    parts, last = [], 0
    for m in _CODE_SPAN.finditer(line):
        parts.append(_escaped(line[last:m.start()], keep_tables))
        parts.append(m.group(0))
        last = m.end()
    parts.append(_escaped(line[last:], keep_tables))
    return "".join(parts)


def _escaped(text: str, keep_tables: bool) -> str:
    text = text.replace("<", "&lt;")
    return _TABLE_TAG.sub(r"<\1>", text) if keep_tables else text


def _trim_blank(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start]:
        start += 1
    while end > start and not lines[end - 1]:
        end -= 1
    return lines[start:end]


def _unwrap_whole_fence(lines: list[str]) -> list[str]:
    opened = _fence_open(lines[0])
    if opened is None or opened[2] not in _WRAPPER_LANGS:
        return lines
    char, length, _ = opened
    close = _outer_close(lines[1:], char, length)
    if close is None:
        return lines[1:]  # never closed: cut at max_new_tokens, keep what came
    if close == len(lines) - 2:
        return lines[1:-1]
    return lines  # closes early and text follows: a block inside prose, not a wrapper


def _outer_close(inner: list[str], char: str, length: int) -> int | None:
    """Index in ``inner`` of the line closing the wrapper fence.

    A bare fence that could close the wrapper does close it; an inner block must
    open with an info string (```python), which models nearly always write.
    That rule keeps ```` ```markdown A ``` B ```python C ``` ```` from being read
    inside-out.
    """
    block: tuple[str, int] | None = None
    for i, line in enumerate(inner):
        opened = _fence_open(line)
        if opened is None:
            continue
        c, n, lang = opened
        if block is not None:
            if c == block[0] and n >= block[1] and lang == "":
                block = None
        elif c == char and n >= length and lang == "":
            return i
        else:
            block = (c, n)
    return None
