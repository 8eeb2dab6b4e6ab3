"""The YAML front matter olmOCR-2 writes on top of each page's answer, read and checked.

olmOCR-2 (allenai/olmOCR-2-7B-1025) was trained to answer a page with::

    ---
    primary_language: en
    is_rotation_valid: True
    rotation_correction: 0
    is_table: False
    is_diagram: False
    ---
    The page's text, as read naturally ...

``parse_page`` reads that the way olmOCR itself does (allenai/olmocr,
``olmocr/train/front_matter.py`` ``FrontMatterParser`` and the
``PageResponse`` checks of ``olmocr/prompts/prompts.py``; Apache-2.0): the
answer must start with ``---``, the block up to the next ``\\n---`` must load
with ``yaml.safe_load`` into a mapping with exactly the five fields (none
missing, none extra), ``"true"``/``"false"`` strings count as booleans, a
numeric string as a number, and ``rotation_correction`` is 0, 90, 180 or
270.  Anything else is not a valid answer: the caller retries the page.

Two deliberate differences: ``primary_language`` must be one word like a
language code or name (olmOCR's own guided decoding allows ``[a-z]{2}`` or
null; nothing else from the model reaches the document's front matter), and
YAML 1.1 reads Norwegian's code ``no`` as the boolean False: olmOCR turns
that into "no language", we give it back as ``"no"``.

Pure and never raising on model text (it is hostile input): a front matter
longer than ``MAX_FRONT_MATTER`` characters is refused before YAML sees it.
Whether generation stopped by itself is the caller's check (``Answer.finished``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from daemon.answers.fences import _normalise
from daemon.errors import first_line

#: The fields of olmOCR's ``PageResponse`` front matter, in the order the model writes them.
FIELDS = ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram")
ROTATIONS = (0, 90, 180, 270)
#: A language code as olmOCR-2 writes them ("en", "de"), a BCP 47-like tag ("zh-Hant") or a name.
_LANGUAGE = re.compile(r"[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8}){0,3}\Z")
#: The five fields take ~120 characters; anything much longer is not a front matter.
MAX_FRONT_MATTER = 2000


@dataclass(frozen=True)
class PageFrontMatter:
    """What olmOCR-2 says about one page."""

    primary_language: str | None  # a two-letter code; None: no text to read
    is_rotation_valid: bool
    rotation_correction: int  # degrees to turn the page (counter-clockwise, as PIL's ROTATE_*) before asking again
    is_table: bool
    is_diagram: bool


@dataclass(frozen=True)
class ParsedPage:
    """One answer taken apart: the front matter (None when invalid), the text below it, and what was wrong."""

    front_matter: PageFrontMatter | None
    text: str  # the page's text without the front matter ("" when there is none)
    problem: str | None = None  # why the answer is not valid; None when it is

    @property
    def valid(self) -> bool:
        return self.problem is None


def parse_page(answer: str) -> ParsedPage:
    """Split an olmOCR-2 answer into its front matter and its text, and check the front matter.

    Returns a ``ParsedPage`` whose ``problem`` says why the answer is not
    valid (no front matter, YAML that does not load, a missing or extra
    field, a value of the wrong type); its ``text`` is then the answer as it
    came, stripped.
    """
    text = _normalise(answer)
    if not text.startswith("---\n"):
        return ParsedPage(None, text.strip(), "the answer does not start with a YAML front matter (---)")
    end = text.find("\n---", 4)
    if end == -1:
        return ParsedPage(None, text.strip(), "the front matter is never closed (no second ---)")
    block, body = text[4:end], text[end + 4:].strip()
    if len(block) > MAX_FRONT_MATTER:
        return ParsedPage(None, text.strip(), f"the front matter is longer than {MAX_FRONT_MATTER} characters")
    try:
        loaded = yaml.safe_load(block)
    except yaml.YAMLError as exc:
        return ParsedPage(None, text.strip(), f"the front matter is not YAML: {first_line(exc)[:200]}")
    except RecursionError:
        return ParsedPage(None, text.strip(), "the front matter nests too deep")
    if not isinstance(loaded, dict):
        return ParsedPage(None, text.strip(), "the front matter is not a mapping of fields")
    front, problem = _checked(loaded)
    if front is None:
        return ParsedPage(None, text.strip(), problem)
    return ParsedPage(front, body)


def _checked(fields: dict[object, object]) -> tuple[PageFrontMatter | None, str | None]:
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        return None, f"the front matter lacks {', '.join(missing)}"
    extra = sorted(str(k) for k in fields if k not in FIELDS)
    if extra:
        return None, f"the front matter has unexpected fields: {', '.join(extra)[:200]}"
    language = _language(fields["primary_language"])
    flags = {name: _boolean(fields[name]) for name in ("is_rotation_valid", "is_table", "is_diagram")}
    rotation = _integer(fields["rotation_correction"])
    if language is False:
        return None, "primary_language is not a language code"
    wrong = [name for name, value in flags.items() if value is None]
    if wrong:
        return None, f"{', '.join(wrong)} not true or false"
    if rotation not in ROTATIONS:
        return None, "rotation_correction is not 0, 90, 180 or 270"
    return PageFrontMatter(language, flags["is_rotation_valid"], rotation, flags["is_table"],  # type: ignore[arg-type]
                           flags["is_diagram"]), None


def _language(value: object) -> str | None | bool:
    """The language code, None for "none", False when the value is no such thing."""
    if value is None:
        return None
    if value is False:
        return "no"  # YAML 1.1 reads Norwegian's code as a boolean
    if isinstance(value, str):
        code = value.strip()
        if not code or code.lower() in ("null", "none"):
            return None
        return code if _LANGUAGE.match(code) else False
    return False


def _boolean(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _integer(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 6:
        return int(value.strip())
    return None
