"""``vlwatch bench --verify``: the slot engine's tokens against stock ``model.generate``, in float32.

Images of several sizes run through fewer slots than requests (so slots
are refilled mid-run) with different budgets; every request's tokens must
equal stock ``generate``'s, one request per call; exit 1 on any mismatch.
Run it after upgrading torch or transformers, and after any engine change.
With ``--kv-cache-dtype fp8`` the stock side rounds its cache as the
engine's FP8 cache does (``stock.rounding_cache``).  Where a request parts,
stock's scores at that token are read again (``stock.scores_at``) and the
table gives how far its own token was ahead of the engine's: quantized runs
part at near-ties (docs/engine.md, "Checking exactness").
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from daemon.bench.setups import command_line, configs, describe, load_backend, parse_size, save, synthetic_images
from daemon.errors import ExitCode, VlwatchError

log = logging.getLogger(__name__)

#: --verify's image sizes: small to a full 1036 px image, square, wide and tall,
#: one wider than an attention window and several with clipped edge windows.
VERIFY_SIZES = ("224x224", "448x336", "336x672", "1036x1036", "812x476", "112x112", "644x980", "560x560")


@dataclass(frozen=True)
class VerifyRow:
    size: str
    image_tokens: int
    budget: int
    engine_tokens: int
    stock_tokens: int
    first_difference: int | None  # index of the first differing token, None when equal
    #: at the first differing token: stock's score for its own token minus its score for the engine's (its
    #: processed logits; >= 0, greedy takes the largest), and its own token's score; None where one side
    #: only ended sooner
    stock_margin: float | None = None
    stock_score: float | None = None

    @property
    def same(self) -> bool:
        return self.first_difference is None


def run_verify(args: argparse.Namespace) -> int:
    """The engine against stock ``model.generate`` in float32, token for token; exit 1 on a mismatch."""
    from daemon.backends import Request

    sizes = [parse_size(item) for item in args.verify_sizes.split(",") if item.strip()]
    slots = max(1, args.verify_slots)
    if len(sizes) <= slots:
        log.warning("--verify: %d sizes through %d slots: no slot is refilled", len(sizes), slots)
    largest = max(w * h for w, h in sizes)
    model, options = configs(args, largest)
    model = replace(model, dtype="float32", batch_size=slots)
    if model.backend != "transformers":
        raise VlwatchError("--verify needs the transformers backend", ExitCode.USAGE)
    backend = load_backend(model, args.load_format, options)
    # Budgets differ, so sequences end at different steps and slots refill mid-run.
    step = max(1, args.new_tokens // (2 * len(sizes)))
    budgets = [max(2, args.new_tokens - step * i) for i in range(len(sizes))]
    requests = [Request((synthetic_images(1, w, h)[0],), args.prompt, n) for (w, h), n in zip(sizes, budgets)]
    started = time.perf_counter()
    backend.set_engine("auto")
    engine = backend.token_ids(requests, engine="auto")
    backend.set_engine("hf")
    stock = backend.token_ids(requests, engine="hf")
    rows = []
    for (w, h), request, a, b in zip(sizes, requests, engine, stock):
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        margin = score = None
        if diff is not None:
            margin, score = _margin(backend.stock_scores(request, diff), b[diff], a[diff])
        elif len(a) != len(b):
            diff = min(len(a), len(b))
        rows.append(VerifyRow(f"{w}x{h}", (w // 28) * (h // 28), request.max_new_tokens, len(a), len(b), diff,
                              margin, score))
    same = sum(r.same for r in rows)
    header = describe(backend, model, args, *sizes[0])
    header.pop("image", None), header.pop("image_tokens", None)
    header.pop("eos", None)  # both sides stop at end-of-sequence; neither has the loop stop
    header.update(dtype="float32", slots=slots, requests=len(rows))
    table = format_verify(header, rows, same)
    report = {"command": command_line(), "header": header, "rows": [asdict(r) for r in rows], "same": same,
              "requests": len(rows), "seconds": time.perf_counter() - started}
    print(json.dumps(report, indent=2) if args.json else table)
    if args.save:
        save(args.save, report, table, prefix="verify")
    return ExitCode.OK if same == len(rows) else ExitCode.FAILED


def _margin(scores: Any, stock_token: int, engine_token: int) -> tuple[float, float]:
    """(stock's score for its token minus its score for the engine's, stock's score for its token)."""
    own = float(scores[stock_token])
    if float(scores.max()) > own:
        raise VlwatchError(f"--verify: stock's scores at a parting do not make its own token {stock_token} the "
                           f"largest (token {int(scores.argmax())} is): the scores read are not the step's")
    return own - float(scores[engine_token]), own


def format_verify(header: dict[str, Any], rows: list[VerifyRow], same: int) -> str:
    first = ", ".join(f"{k} {v}" for k, v in header.items())
    lines = ["| image | image tokens | budget | engine tokens | stock tokens | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = "same" if r.same else f"DIFFERENT from token {r.first_difference}"
        if r.stock_margin is not None:
            result += f" (stock's token ahead by {r.stock_margin:.3g} of {r.stock_score:.3g})"
        lines.append(f"| {r.size} | {r.image_tokens} | {r.budget} | {r.engine_tokens} | {r.stock_tokens} | {result} |")
    verdict = f"{same} of {len(rows)} requests gave the same tokens" + ("" if same == len(rows) else ": MISMATCH")
    return f"vlwatch bench --verify: {first}\n\n" + "\n".join(lines) + f"\n\n{verdict}"
