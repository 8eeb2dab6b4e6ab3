#!/usr/bin/env bash
# Call G3: issue 22's latency targets after the feed declares its rules (benchmarks/api_ttft.py, a 1200-image
# backlog, 20 asks of 32 tokens), then issue 24's olmocr pack against the plain ocr rule on document pages,
# one attempt per page (random weights answer no valid front matter: the retry ladder is not measurable here),
# each rule's own prompt and page size, the same bench in the same call.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
ttft
for rule in ocr olmocr; do
    read -r size prompt_file < <(python3 benchmarks/rule_page.py "$rule" "$OUT/prompt-$rule.txt")
    step bench-page-$rule ${BENCH_LIMIT:-120} bench --load-format dummy --ignore-eos --size "$size" --new-tokens 768 \
        --images 256 --batch-sizes auto --baseline-images 0 --latency-images 0 --prompt "$(cat "$prompt_file")"
done
exit 0
