#!/usr/bin/env bash
# Call Q2 (next session, an H100; carry .whl; from a clean, committed tree): where P2's one slow ask under
# `--ask-after 12` (1.691 s to its first token, sent as a wave of 256 folder jobs ended) spent its time. The
# daemon now logs, per chat request, how long its body took to read and to parse, and how long the engine
# took to take it after it was submitted; api_ttft.json now holds each request's send time (Unix), so the
# wait before the handler began shows too. Predictions: NOTES "Call Q2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
ttft ttft-full --ask-after 12
zcat "$OUT/ttft-full/api_ttft-daemon.log.gz" | grep -e 'chat request: body' -e 'taken by the engine' \
    > "$OUT/ttft-full/asks.log"
exit 0
