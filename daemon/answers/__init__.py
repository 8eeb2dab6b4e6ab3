"""Turn what Qwen2.5-VL says into content a sidecar file can hold.

This stage sits between the model and the writers.  It takes the decoded
answer text and returns:

* ``clean_markdown`` - the ``.md`` body of an OCR / description answer
  (``escape_raw_html`` makes its raw HTML inert); in ``markdown``;
* ``parse_boxes``    - the boxes of a grounding answer, for the ``.json`` sidecar,
  and ``map_box``, a box from the pixels the model saw to the original image;
  in ``boxes``;
* ``extract_html``   - a complete, network-blocked HTML document for the ``.html``
  sidecar of a screenshot->code answer (``add_csp`` is the blocking step,
  ``CSP`` the policy, with why each directive); in ``html``.

``fences`` is what they share: line endings and end tokens normalised, fenced
blocks found.  Each module says what it deliberately does not do.

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
"""

from __future__ import annotations

from daemon.answers.boxes import Box, Boxes, map_box, parse_boxes
from daemon.answers.html import CSP, Html, add_csp, extract_html
from daemon.answers.markdown import clean_markdown, escape_raw_html

__all__ = [
    "CSP",
    "Box",
    "Boxes",
    "Html",
    "add_csp",
    "clean_markdown",
    "escape_raw_html",
    "extract_html",
    "map_box",
    "parse_boxes",
]
