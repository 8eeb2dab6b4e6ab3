"""Model text is hostile: control characters out of sidecars and off terminals (issue 27).

A model can be led by an image to print terminal escape sequences (ESC,
BEL, CSI ...); the tiny checkpoint's sidecars held raw C0 characters.
Sidecars are read with ``cat``, and ``ask``, ``search`` and ``status`` print
model text to terminals, so:

- a sidecar (``for_file``) keeps tab and newline and gets U+FFFD (the
  replacement character) for every other C0 control, DEL and C1 control
  (U+0080-U+009F: U+009B is CSI to some terminals); a CR of a CRLF pair is
  dropped, a lone CR replaced.  A visible mark, valid in Markdown, HTML and
  JSON strings alike, that no terminal acts on; the exact byte is not kept
  (nobody needs an ESC in an OCR result).
- a terminal (``for_terminal``) gets the same characters as visible escapes
  (``\\x1b``, ``\\x9b``), so the user sees what the model sent.
- JSON printed for programs (``json_text``) escapes them as ``\\u001b``, which
  ``json.dumps`` already does for C0 but not for DEL and C1.
"""

from __future__ import annotations

import json
from typing import Any

_CONTROLS = [c for c in range(0x20) if c not in (0x09, 0x0A)] + [0x7F] + list(range(0x80, 0xA0))
_FILE = {c: "\ufffd" for c in _CONTROLS}
_TERMINAL = {c: f"\\x{c:02x}" for c in _CONTROLS}
_JSON = {c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0))}


def for_file(text: str) -> str:
    """``text`` for a sidecar: controls but tab and newline become U+FFFD (CRLF becomes LF)."""
    if text.isprintable():
        return text
    return text.replace("\r\n", "\n").translate(_FILE)


def for_terminal(text: str) -> str:
    """``text`` for a terminal: controls but tab and newline shown as ``\\xNN``."""
    if text.isprintable():
        return text
    return text.translate(_TERMINAL)


def json_text(doc: Any, **kwargs: Any) -> str:
    """``json.dumps(doc, ensure_ascii=False, **kwargs)`` with DEL and C1 escaped as well."""
    return json.dumps(doc, ensure_ascii=False, **kwargs).translate(_JSON)
