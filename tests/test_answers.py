"""Tests for daemon.answers over recorded model answers in tests/answers/.

Every file there has an expectation in EXPECT below, keyed by file name; a file
without one (or an expectation without a file) fails the suite, so adding a
recorded answer means writing down what it should turn into.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so plain `pytest` works without installing the package
    sys.path.insert(0, str(ROOT))

from daemon.answers import (  # noqa: E402
    CSP,
    Box,
    add_csp,
    clean_markdown,
    extract_html,
    map_box,
    parse_boxes,
)

ANSWERS = ROOT / "tests" / "answers"
CSP_TAG = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'

# Per file: what each parser must make of it.
#   "boxes": exact [(label, (x1, y1, x2, y2)), ...]
#   "box_warnings": substrings that must each appear in some warning; [] = no warnings at all
#   "html": {"found", "truncated", "contains": [...], "absent": [...]}
#   "md": the exact clean_markdown output
EXPECT: dict[str, dict] = {
    # ---- grounding ----
    "boxes_cookbook_fenced.txt": {
        "boxes": [
            ("cupcake with white frosting and sprinkles", (41, 566, 207, 751)),
            ("cupcake with pink frosting", (262, 390, 388, 561)),
            ("cupcake with pink frosting", (549, 370, 677, 541)),
            ("cupcake with chocolate frosting", (764, 391, 897, 557)),
        ],
        "box_warnings": [],
    },
    "boxes_bare_list.txt": {
        "boxes": [("tabby cat", (312, 88, 604, 455)), ("laptop", (15, 402, 298, 611))],
        "box_warnings": [],
    },
    # "[as requested]" before the fence and "[102, 64, 288, 590]" after it are prose.
    "boxes_prose_around.txt": {
        "boxes": [
            ("person in red jacket", (102, 64, 288, 590)),
            ("person holding umbrella", (330, 80, 497, 602)),
        ],
        "box_warnings": [],
    },
    # OCR cookbook shape: trailing comma after each object's last member, text_content as label.
    "boxes_text_spotting_trailing_commas.txt": {
        "boxes": [
            ("KEDAI RUNCIT SRI MAJU", (118, 171, 749, 206)),
            ("14 Mar 2019 09:12", (331, 212, 552, 240)),
            ("Receipt #: 00231", (90, 401, 470, 428)),
            ("Total: RM12.40", (501, 725, 770, 749)),
        ],
        "box_warnings": [],
    },
    "boxes_truncated_list.txt": {
        "boxes": [
            ("app icon", (12, 40, 96, 120)),
            ("app icon", (110, 40, 194, 120)),
            ("app icon", (208, 40, 292, 120)),
        ],
        "box_warnings": ["truncated"],
    },
    "boxes_bbox_key_no_label.txt": {
        "boxes": [("stop sign", (455, 120, 690, 388)), ("object", (20, 300, 240, 420))],
        "box_warnings": [],
    },
    "boxes_single_object.txt": {
        "boxes": [("dog", (221, 423, 569, 886))],
        "box_warnings": [],
    },
    "boxes_malformed_entries.txt": {
        "boxes": [
            ("good", (10, 20, 110, 220)),
            ("numbers as strings", (300, 40, 380, 120)),
            ("swapped floats", (420.0, 330.75, 500.5, 410.25)),
        ],
        "box_warnings": [
            "entry 1: bbox [10, 20, 110] is not 4 finite numbers",
            "entry 2: bbox ['left'",
            "entry 3: bbox [nan",
            "entry 4: bbox [50, 60, 50, 90] has zero area",
            "entry 5: str is not an object",
            "entry 8: has no bbox_2d/bbox",
        ],
    },
    "boxes_single_quotes.txt": {
        "boxes": [("children's book", (64, 32, 240, 180)), ("mug", (260, 30, 430, 190))],
        "box_warnings": [],
    },
    "boxes_refusal.txt": {"boxes": [], "box_warnings": ["no usable boxes"]},
    "boxes_empty_list.txt": {"boxes": [], "box_warnings": ["no usable boxes"]},
    "boxes_qwen2_tokens.txt": {
        "boxes": [
            ("Popup close button", (1746, 1012, 1767, 1028)),
            ("sheep", (101, 201, 150, 266)),
            ("sheep", (401, 601, 550, 666)),  # second box after one ref shares its label
        ],
        "box_warnings": ["token form"],
    },
    # A looping model repeating one entry until max_new_tokens.
    "boxes_repetition_loop.txt": {
        "boxes": [("window", (640, 212, 701, 260))],
        "box_warnings": ["truncated", "dropped 5 duplicate boxes"],
    },
    "boxes_wrapped_in_key.txt": {
        "boxes": [("bottle", (33, 47, 301, 512)), ("glass", (320, 51, 588, 509))],
        "box_warnings": [],
    },
    "boxes_points_only.txt": {
        "boxes": [],
        "box_warnings": ["entry 0: has point_2d", "entry 1: has point_2d", "no usable boxes"],
    },
    "boxes_chinese_labels.txt": {
        "boxes": [("红色的苹果", (58, 140, 402, 713)), ("香蕉", (430, 201, 777, 690))],
        "box_warnings": [],
    },
    # ---- screenshot -> code ----
    "html_full_fenced.txt": {
        "html": {
            "found": True,
            "truncated": False,
            "contains": ['<html lang="en">', "<title>Sign in</title>", ".card {", "<button type=\"submit\">Continue</button>"],
            "absent": ["```"],
        },
    },
    # Prose before (Chinese), a ```css snippet after: the page is the html block.
    "html_explanation_after.txt": {
        "html": {
            "found": True,
            "truncated": False,
            "contains": ["<title>天气预报</title>", '<p class="temp">23°C 多云</p>'],
            "absent": ["将图片内容", "这段HTML", ".temp { font-size"],
        },
    },
    "html_fragment.txt": {
        "html": {
            "found": True,
            "truncated": False,
            "contains": ['<div class="pricing">', '<meta charset="utf-8">', "<title>vlwatch</title>", "<body>\n<div"],
            "absent": ["```"],
        },
    },
    # Cut mid-attribute like the document_parsing cookbook's answer: the partial
    # <img src="path_to_image_2 must go, or it would swallow </body></html>.
    "html_truncated.txt": {
        "html": {
            "found": True,
            "truncated": True,
            "contains": ["多模态大模型初体验</a></h3>", 'src="path_to_image_1"'],
            "absent": ["path_to_image_2", "将图片内容"],
        },
    },
    "html_truncated_in_style.txt": {
        "html": {
            "found": True,
            "truncated": True,
            "contains": ["border-radius: 12px; padd\n</style>\n</head>", "<body>"],
            "absent": [],
        },
    },
    "html_own_csp_and_base.txt": {
        "html": {
            "found": True,
            "truncated": False,
            "contains": ["<title>Landing</title>", '<img src="logo.png"'],
            "absent": ["default-src *", "<base", "refresh", "tracker.example.net", "\n\n\n"],
        },
    },
    "html_qwenvl_docparse.txt": {
        "html": {
            "found": True,
            "truncated": False,
            "contains": ['<h2 data-bbox="310 94 658 132">Quarterly Report</h2>', "</head><body>"],
            "absent": [],
        },
    },
    "html_raw_unfenced.txt": {
        "html": {
            "found": True,
            "truncated": False,
            "contains": ["<li>Buy milk</li>", "<title>Todo</title>"],
            "absent": ["This page reproduces"],
        },
    },
    "html_bare_fence_page.txt": {
        "html": {
            "found": True,
            "truncated": False,
            "contains": ["<title>Error 404</title>", "<h1>404</h1>"],
            "absent": ["<!doctype", "```"],
        },
    },
    "html_no_html.txt": {
        "html": {
            "found": False,
            "truncated": False,
            "contains": ["<pre", "&quot;Email&quot; &amp; &quot;Password&quot;", "&lt;Continue&gt;"],
            "absent": ["<Continue>"],
        },
    },
    # ---- OCR / description ----
    "md_fenced_whole.txt": {
        "md": "# Meeting notes\n\n- Budget approved for Q3\n- Hiring: two backend engineers\n",
    },
    "md_fenced_with_inner_code.txt": {
        "md": "## Install\n\nRun the following:\n\n```bash\npip install vlwatch\n```\n\nThen start the daemon.\n",
    },
    "md_inner_code_blocks.txt": {
        "md": (
            "The image shows a code editor with the following Python code:\n\n"
            '```python\ndef greet(name):\n    return f"Hello, {name}!"\n```\n\n'
            "And a terminal below it:\n\n```\n$ python greet.py\nHello, world!\n```\n"
        ),
    },
    "md_table.txt": {
        "md": (
            "以下是图片中表格的内容：\n\n| 商品 | 数量 | 单价 |\n|------|------|------|\n"
            "| 苹果 | 3 | ¥5.00 |\n| 牛奶 | 1 | ¥12.50 |\n\n合计：¥27.50\n"
        ),
    },
    "md_chinese_ocr.txt": {
        "md": "品名：黑巧克力\n配料：可可液块、白砂糖、可可脂、乳粉\n保质期：18个月\n贮存条件：请置于阴凉干燥处\n",
    },
    "md_truncated_fence.txt": {
        "md": "# Annual Report 2023\n\n## Summary\n\nRevenue increased by 8% year over year, while operating costs\n",
    },
    "md_plaintext_fence.txt": {"md": "WARNING\nAuthorised personnel only\n"},
    # A ```python fence around the whole answer is content (OCR of code): kept.
    "md_code_only.txt": {"md": "```python\nimport os\nprint(os.getcwd())\n```\n"},
    # Fenced block inside prose: not a whole-answer wrapper, kept as written.
    "md_prose_then_fence.txt": {
        "md": (
            "Here is the text from the image:\n\n```\nOpening hours\nMon-Fri 9:00-18:00\n```\n\n"
            "The sign is partially covered by a plant.\n"
        ),
    },
    # ---- every parser ----
    "empty.txt": {
        "boxes": [],
        "box_warnings": ["empty answer"],
        "html": {"found": False, "truncated": False, "contains": ["<pre"], "absent": []},
        "md": "",
    },
    "whitespace_only.txt": {
        "boxes": [],
        "box_warnings": ["empty answer"],
        "html": {"found": False, "truncated": False, "contains": [], "absent": []},
        "md": "",
    },
}


def _answer(name: str) -> str:
    return (ANSWERS / name).read_text(encoding="utf-8")


def _check_document(document: str) -> None:
    """What every extract_html document must satisfy."""
    assert document.startswith("<!DOCTYPE html>\n<html")
    assert document.rstrip().endswith("</html>")
    for tag in (r"<head\b", r"</head>", r"<body\b", r"</body>"):
        assert re.search(tag, document, re.IGNORECASE), tag
    # The policy is the first child of <head>, and the only CSP meta.
    head = re.search(r"<head\b[^>]*>", document, re.IGNORECASE)
    assert head is not None
    assert document[head.end() :].lstrip().startswith(CSP_TAG)
    assert document.count(CSP_TAG) == 1
    assert len(re.findall(r"<meta\b[^>]*content-security-policy", document, re.IGNORECASE)) == 1
    # A browser ends a tag name at whitespace, '/' or '>': "<base<x>" is no <base>.
    assert not re.search(r"<base[\s/>]", document, re.IGNORECASE)
    assert add_csp(document) == document


def test_every_recorded_answer_has_an_expectation() -> None:
    on_disk = {p.name for p in ANSWERS.glob("*.txt")}
    assert on_disk == set(EXPECT)
    assert len(on_disk) >= 20


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECT.items() if "boxes" in e))
def test_recorded_boxes(name: str) -> None:
    expected = EXPECT[name]
    result = parse_boxes(_answer(name))
    assert [(b.label, b.bbox) for b in result.boxes] == [(lbl, tuple(map(float, bb))) for lbl, bb in expected["boxes"]]
    if not expected["box_warnings"]:
        assert result.warnings == ()
    for fragment in expected["box_warnings"]:
        assert any(fragment in w for w in result.warnings), (fragment, result.warnings)
    assert all(isinstance(b, Box) and b.bbox[0] < b.bbox[2] and b.bbox[1] < b.bbox[3] for b in result.boxes)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECT.items() if "html" in e))
def test_recorded_html(name: str) -> None:
    expected = EXPECT[name]["html"]
    result = extract_html(_answer(name))
    assert result.found_html is expected["found"]
    assert result.truncated is expected["truncated"]
    _check_document(result.document)
    for fragment in expected["contains"]:
        assert fragment in result.document, fragment
    for fragment in expected["absent"]:
        assert fragment not in result.document, fragment
    if expected["truncated"]:
        assert any("truncated" in w for w in result.warnings)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECT.items() if "md" in e))
def test_recorded_markdown(name: str) -> None:
    assert clean_markdown(_answer(name)) == EXPECT[name]["md"]


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_every_parser_survives_every_recorded_answer(name: str) -> None:
    text = _answer(name)
    assert not any(w.startswith("internal error") for w in parse_boxes(text).warnings)
    html_result = extract_html(text)
    assert not any(w.startswith("internal error") for w in html_result.warnings)
    _check_document(html_result.document)
    cleaned = clean_markdown(text)
    assert cleaned == "" or (cleaned.endswith("\n") and not cleaned.endswith("\n\n"))


# ---------------------------------------------------------------------------
# clean_markdown details
# ---------------------------------------------------------------------------


def test_markdown_line_endings_and_trailing_spaces() -> None:
    assert clean_markdown("```md\r\nline one  \r\nline two\t\r\n```\r\n\r\n") == "line one\nline two\n"
    assert clean_markdown("old mac\rline\n\n\n") == "old mac\nline\n"


def test_markdown_bare_fences_in_a_row_are_not_turned_inside_out() -> None:
    # code A, prose B, code C - unwrapping would make A and C prose and B code.
    text = "```\nA\n```\nB\n```\nC\n```"
    assert clean_markdown(text) == text + "\n"


def test_markdown_longer_wrapper_fence_keeps_bare_inner_fence() -> None:
    text = "````markdown\nintro\n```\nraw block\n```\n````"
    assert clean_markdown(text) == "intro\n```\nraw block\n```\n"


def test_markdown_drops_end_of_turn_tokens() -> None:
    assert clean_markdown("Hello<|im_end|>") == "Hello\n"


# ---------------------------------------------------------------------------
# parse_boxes details
# ---------------------------------------------------------------------------


def test_boxes_nested_corner_pairs_and_string_bbox() -> None:
    result = parse_boxes('[{"bbox_2d": [[10, 20], [30, 40]], "label": "a"}, {"bbox": "50, 60, 70, 80"}]')
    assert [b.bbox for b in result.boxes] == [(10.0, 20.0, 30.0, 40.0), (50.0, 60.0, 70.0, 80.0)]


def test_boxes_booleans_are_not_coordinates() -> None:
    result = parse_boxes('[{"bbox_2d": [true, 2, 30, 40]}]')
    assert result.boxes == ()


def test_boxes_ignore_gemini_box_2d_key() -> None:
    # box_2d is [y1, x1, y2, x2] in 0..1000 elsewhere: reading it as pixels would be wrong.
    assert parse_boxes('[{"box_2d": [10, 20, 30, 40], "label": "x"}]').boxes == ()


def test_boxes_truncated_inside_fence_with_end_token() -> None:
    text = '```json\n[\n  {"bbox_2d": [1, 2, 3, 4], "label": "a"},\n  {"bbox_2d": [5, 6<|endoftext|>'
    result = parse_boxes(text)
    assert [b.label for b in result.boxes] == ["a"]


def test_boxes_huge_numbers_do_not_raise() -> None:
    result = parse_boxes('[{"bbox_2d": [1e999, 2, 3, 4]}, {"bbox_2d": [' + "9" * 5000 + ", 2, 3, 4]}]")
    assert result.boxes == ()
    assert not any(w.startswith("internal error") for w in result.warnings)


# ---------------------------------------------------------------------------
# add_csp details
# ---------------------------------------------------------------------------


def test_add_csp_creates_head_when_missing() -> None:
    out = add_csp("<!DOCTYPE html>\n<html><body><p>x</p></body></html>")
    assert out.startswith("<!DOCTYPE html>\n<html>\n<head>\n" + CSP_TAG)


def test_add_csp_goes_before_content_that_precedes_head() -> None:
    # A <style> before <head> opens an implied head; the policy must come first.
    out = add_csp("<html><style>p{}</style><head><title>t</title></head><body></body></html>")
    assert out.index(CSP_TAG) < out.index("<style>")
    assert add_csp(out) == out


@pytest.mark.parametrize(
    "tag",
    [
        '<meta http-equiv="refresh" content="0;url=https://example.com/">',
        "<META HTTP-EQUIV=Refresh CONTENT='0;url=https://example.com/'>",
        '<meta http-equiv="&#114;efresh" content="0;url=https://example.com/">',
        '<meta name="http-equiv=x" http-equiv="refresh" content="0;url=https://example.com/">',
        '<meta content="a>b" http-equiv="refresh">',
        '<meta http-equiv="Content-Security-Policy-Report-Only" content="default-src *">',
        '<base href="https://example.com/">',
        '<ba<base href="x">se href="https://example.com/">',
        '<link rel="preconnect dns-prefetch" href="https://example.com">',
    ],
)
def test_add_csp_removes_what_the_policy_cannot_stop(tag: str) -> None:
    out = add_csp(f"<!DOCTYPE html>\n<html>\n<head>\n{tag}\n<title>t</title>\n</head>\n<body></body>\n</html>\n")
    assert "example.com" not in out
    assert not re.search(r"refresh|<base\b", out, re.IGNORECASE)
    assert add_csp(out) == out


def test_add_csp_plains_the_tags_parsed_before_the_policy() -> None:
    doc = (
        '<!DOCTYPE html>\n<html style="background:url(https://example.com/a.png)" lang="zh-CN" dir=ltr>\n'
        "<head profile='https://example.com/p'><title>t</title></head><body></body></html>"
    )
    out = add_csp(doc)
    assert '<html lang="zh-CN" dir=ltr>\n<head>\n' + CSP_TAG in out
    assert "example.com" not in out
    assert add_csp(out) == out


def test_add_csp_custom_policy_replaces_default() -> None:
    doc = extract_html("<p>x</p>").document
    out = add_csp(doc, "default-src 'none'")
    assert CSP not in out
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">' in out


def test_policy_blocks_scripts_and_network() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'none'"
    assert all("http" not in v and "*" not in v and "'self'" not in v for v in directives.values())


def test_extract_html_csp_opt_out_and_custom_policy() -> None:
    text = '```html\n<html><head><base href="https://example.com/"></head><body>x</body></html>\n```'
    bare = extract_html(text, csp=None).document
    assert bare.startswith("<!DOCTYPE html>\n<html>")
    assert "Content-Security-Policy" not in bare
    assert '<base href="https://example.com/">' in bare  # opted out: left as the model wrote it
    assert add_csp(bare) == extract_html(text).document
    custom = extract_html(text, csp="default-src 'none'").document
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">' in custom


def test_title_is_escaped() -> None:
    doc = extract_html("no html here", title="<script>x</script> & co").document
    assert "<title>&lt;script&gt;x&lt;/script&gt; &amp; co</title>" in doc


# ---------------------------------------------------------------------------
# map_box
# ---------------------------------------------------------------------------

# 3000x2000 photo; smart_resize(2000, 3000, 28, max_pixels=1280*28*28) -> (812, 1204),
# i.e. the model saw 1204x812.  qwen-vl-utils returns (height, width).
SMART_SHOWN = (1204, 812)


def test_smart_resize_size_is_what_we_hard_code() -> None:
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils")
    height, width = qwen_vl_utils.smart_resize(2000, 3000, 28, max_pixels=1280 * 28 * 28)
    assert (width, height) == SMART_SHOWN


@pytest.mark.parametrize(
    ("bbox", "shown", "expected"),
    [
        # the whole shown image is the whole original
        ((0, 0, 1204, 812), SMART_SHOWN, (0, 0, 3000, 2000)),
        # 100*3000/1204=249.17, 50*2000/812=123.15, 300*3000/1204=747.51, 200*2000/812=492.61
        ((100, 50, 300, 200), SMART_SHOWN, (249, 123, 748, 493)),
        # the brief's 1036x700: centre quarter
        ((518, 350, 1036, 700), (1036, 700), (1500, 1000, 3000, 2000)),
        # 10.4*3000/1036=30.12, 20.6*2000/700=58.86, 100*3000/1036=289.58, 200*2000/700=571.43
        ((10.4, 20.6, 100, 200), (1036, 700), (30, 59, 290, 571)),
        # half rounds up: 0.5*2=1.0+... 1.25*2=2.5 -> 3
        ((1.25, 1.25, 10, 10), (100, 100), (3, 3, 20, 20)),
        # clamped to the image
        ((-5, -5, 2000, 900), (1036, 700), (0, 0, 3000, 2000)),
        # swapped corners are put in order
        ((300, 200, 100, 50), SMART_SHOWN, (249, 123, 748, 493)),
    ],
)
def test_map_box(bbox, shown, expected) -> None:
    assert map_box(bbox, shown, (3000, 2000) if shown != (100, 100) else (200, 200)) == expected


@pytest.mark.parametrize(
    "bbox",
    [
        (1036, 10, 1100, 20),  # entirely right of the image: clamps to a line
        (10.0, 10.0, 10.1, 20),  # 28.96 and 29.25 both round to 29
        (5, 5, 5, 50),  # zero width from the start
        (float("nan"), 0, 10, 10),
    ],
)
def test_map_box_without_area_is_none(bbox) -> None:
    assert map_box(bbox, (1036, 700), (3000, 2000)) is None


def test_map_box_infinite_coordinates_are_none() -> None:
    # parse_boxes never yields them; a caller passing them has no box to draw.
    assert map_box((-float("inf"), 0, float("inf"), 700), (1036, 700), (3000, 2000)) is None


def test_map_box_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError):
        map_box((0, 0, 1, 1), (0, 700), (3000, 2000))


def test_parsed_boxes_map_to_original_pixels() -> None:
    result = parse_boxes('```json\n[{"bbox_2d": [602, 406, 1204, 812], "label": "lower right"}]\n```')
    assert map_box(result.boxes[0].bbox, SMART_SHOWN, (3000, 2000)) == (1500, 1000, 3000, 2000)


# ---------------------------------------------------------------------------
# properties: arbitrary text never raises, documents stay complete and locked down
# ---------------------------------------------------------------------------

# Pieces of real answers, so generated text hits the interesting code paths.
_PIECES = st.sampled_from(
    [
        "```", "```json\n", "```html\n", "```markdown\n", "````", "~~~", "\n", " ", ",", ":",
        "[", "]", "{", "}", '"', "'", "bbox_2d", '"bbox_2d": [1, 2, 30, 40]', '"label": "cat"',
        "NaN", "1e999", "-3.5", "<!DOCTYPE html>", "<html>", "</html>", "<head>", "</head>",
        "<body>", "</body>", "<style>", "</style>", "<script>", "<!--", "-->", "<img src=\"",
        '<meta http-equiv="Content-Security-Policy" content="default-src *">',
        '<meta http-equiv="refresh" content="0;url=http://x">', "<base href=x>", "<ba", "se>",
        "<head", "<|box_start|>", "(1,2),(3,4)", "<|box_end|>", "<|object_ref_start|>a<|object_ref_end|>",
        "<|im_end|>", "\r\n", "\r", "你好", "<",  ">", "&",
    ]
)
_ANSWERS = st.one_of(st.text(), st.lists(st.one_of(_PIECES, st.text(max_size=5)), max_size=40).map("".join))


@settings(max_examples=200, deadline=None)
@given(_ANSWERS)
def test_parsers_never_raise(text: str) -> None:
    boxes = parse_boxes(text)
    assert not any(w.startswith("internal error") for w in boxes.warnings)
    for box in boxes.boxes:
        x1, y1, x2, y2 = box.bbox
        assert x1 < x2 and y1 < y2
    cleaned = clean_markdown(text)
    assert cleaned == "" or (cleaned.endswith("\n") and not cleaned.endswith("\n\n"))
    assert clean_markdown(cleaned) == cleaned or cleaned.startswith(("```", "~~~"))


@settings(max_examples=200, deadline=None)
@given(_ANSWERS)
def test_extract_html_always_complete_and_locked_down(text: str) -> None:
    result = extract_html(text)
    assert not any(w.startswith("internal error") for w in result.warnings)
    document = add_csp(result.document)
    assert document.startswith("<!DOCTYPE html>")
    assert CSP_TAG in document
    _check_document(result.document)
    assert add_csp(add_csp(text)) == add_csp(text)
