"""The answer text as every parser reads it: normalised, and its fenced blocks found.

``_normalise`` makes line endings LF and drops the end-of-turn tokens a backend
leaves when it decodes without ``skip_special_tokens``; ``_scan_fences`` (with
``_fence_open`` / ``_fence_closes``) finds fenced code blocks the way CommonMark
does.  ``markdown``, ``boxes`` and ``html`` all read answers through these.

It deliberately does not parse Markdown beyond fence lines (no lists, indented
code or HTML blocks), and it keeps the grounding tokens (``<|box_start|>`` and
the like) for ``parse_boxes``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
