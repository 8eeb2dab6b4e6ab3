"""Print a bundled rule's page size for a US-letter scan and write its prompt to a file (call G3).

``python benchmarks/rule_page.py RULE PROMPT_FILE`` prints ``WxH PROMPT_FILE``: the size a 2550x3300
(300 dpi letter) page is shown to the model at under that rule (its ``max_pixels`` or
``longest_side``, as ``daemon.images`` sizes it), and the rule's prompt rendered for a typical name.
"""

from __future__ import annotations

import sys
from pathlib import Path

from daemon.config_reader import parse_config
from daemon.pages import shown_size
from daemon.intake.rules import render_prompt


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    config = parse_config(f"include: [{name}]\n", "rule_page.yaml")
    rule = config.rule(name)
    assert rule is not None, name
    w, h = 2550, 3300
    if rule.longest_side:
        scale = rule.longest_side / max(w, h)
        w, h = round(w * scale), round(h * scale)
    w, h = shown_size(w, h, min_pixels=rule.min_pixels or config.model.min_pixels,
                      max_pixels=rule.max_pixels or config.model.max_pixels)
    out.write_text(render_prompt(rule, Path("/srv/scans/scan_0001.pdf")))
    print(f"{w}x{h} {out}")


if __name__ == "__main__":
    main()
