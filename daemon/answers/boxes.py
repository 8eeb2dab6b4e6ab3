"""The boxes of a grounding answer, and their map to the original image's pixels.

``parse_boxes`` finds the JSON-ish box lists in an answer (fenced blocks first,
prose around them ignored) and recovers what real answers break: trailing
commas, single quotes / Python literals, a list cut off at ``max_new_tokens``
(kept up to the last complete entry, as the cookbooks do), and the Qwen2-VL
``<|box_start|>`` token form.  It never raises on model text: what it could
not use becomes ``Boxes.warnings``.  ``map_box`` scales a box from the image
the model saw to the original and clamps it.

It deliberately does not validate that boxes lie inside the image (that needs
the shown size; ``map_box`` clamps), it does not translate Qwen2-VL's 0..1000
normalised coordinates (boxes in the old ``<|box_start|>`` token form are
taken as absolute pixels, as Qwen2.5-VL fine-tunes write them), and it does not
repair JSON beyond trailing commas, single quotes / Python literals and
truncation.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings as _pywarnings
from dataclasses import dataclass

from daemon.answers.fences import _normalise, _scan_fences


@dataclass(frozen=True)
class Box:
    label: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image the MODEL SAW


@dataclass(frozen=True)
class Boxes:
    boxes: tuple[Box, ...]
    warnings: tuple[str, ...]


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
