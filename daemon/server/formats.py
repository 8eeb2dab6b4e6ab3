"""A converted document's Markdown as docling-serve's other outputs: ``text`` and ``html`` (``/v1/convert``).

The Markdown comes out of ``documents.page_markdown``: raw HTML escaped,
except the bare table tags olmOCR-2 writes its tables in (``<table>``,
``<tr>``, ``<td colspan="2">``, ``<br>``: no other attribute).  Those are
the only raw HTML either output takes: the HTML document renders them as a
table, the text lays their rows out as Markdown tables come out (cells
tab-separated).  Everything is escaped once more on the way in, so Markdown
from a rule that allows raw HTML (``raw_html: true``, for its sidecars)
cannot put a ``<script>`` into the HTML a client shows.
"""

from __future__ import annotations

import functools
import html
import re
from html.parser import HTMLParser
from typing import Any


@functools.cache
def _markdown_it() -> Any:
    from markdown_it import MarkdownIt

    # Raw HTML on: after _inert() the only raw HTML left is the bare table tags.
    return MarkdownIt("commonmark", {"html": True}).enable("table")


def _inert(md: str) -> str:
    from daemon import answers

    return answers.escape_raw_html(md, keep_tables=True)


def markdown_html(md: str, title: str) -> str:
    """A whole HTML document of ``md``: its Markdown rendered, olmOCR's HTML tables as tables, other HTML as text."""
    body = _markdown_it().render(_inert(md))
    return (f"<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"</head>\n<body>\n{body}</body>\n</html>\n")


def markdown_text(md: str) -> str:
    """``md`` as plain text: the words, lines and table rows (cells tab-separated), without Markdown's markup."""
    out: list[str] = []
    row: list[str] | None = None
    in_cell = False
    for tok in _markdown_it().parse(_inert(md)):
        kind = tok.type
        if kind == "tr_open":
            row = []
        elif kind in ("th_open", "td_open"):
            in_cell = True
        elif kind in ("th_close", "td_close"):
            in_cell = False
        elif kind == "tr_close" and row is not None:
            out.append("\t".join(row) + "\n")
            row = None
        elif kind == "inline":
            piece = "".join(_inline_text(c) for c in tok.children or ())
            if in_cell and row is not None:
                row.append(piece)
            else:
                out.append(piece)
        elif kind in ("fence", "code_block"):
            out.append(tok.content.rstrip("\n") + "\n\n")
        elif kind == "html_block":  # an olmOCR table
            out.append(html_table_text(tok.content) + "\n\n")
        elif kind == "paragraph_close":
            out.append("\n" if tok.hidden else "\n\n")  # hidden: a tight list's item
        elif kind in ("heading_close", "table_close", "hr", "bullet_list_close", "ordered_list_close",
                      "blockquote_close"):
            out.append("\n\n")
    text = re.sub(r"\n{3,}", "\n\n", "".join(out)).strip()
    return text + "\n" if text else ""


def _inline_text(tok: Any) -> str:
    if tok.type in ("text", "code_inline"):
        return tok.content
    if tok.type in ("softbreak", "hardbreak"):
        return "\n"
    if tok.type == "html_inline":  # a kept tag inside a paragraph: <br> breaks the line, others go
        return "\n" if tok.content.lower().startswith("<br") else ""
    if tok.type == "image":
        return "".join(_inline_text(c) for c in tok.children or ())
    return ""


class _Rows(HTMLParser):
    """An HTML table's rows as lists of cell texts; text outside any cell as lines of its own."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.row: list[str] | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self._end_row()
            self.row = []
        elif tag in ("td", "th"):
            self._end_cell()
            self.cell = []
        elif tag == "br" and self.cell is not None:
            self.cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._end_cell()
        elif tag in ("tr", "table"):
            self._end_row()

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
        elif data.strip():
            self.lines.append(data.strip())

    def close(self) -> None:
        super().close()
        self._end_row()  # a table cut off before its </tr> keeps its last row

    def _end_cell(self) -> None:
        if self.cell is not None:
            if self.row is None:
                self.row = []
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None

    def _end_row(self) -> None:
        self._end_cell()
        if self.row is not None:
            self.lines.append("\t".join(self.row))
            self.row = None


def html_table_text(block: str) -> str:
    """An HTML table (olmOCR-2's) as text: one line per row, cells tab-separated, entities decoded."""
    rows = _Rows()
    rows.feed(block)
    rows.close()
    return "\n".join(rows.lines)
