"""What made a sidecar: the *recipe* of a job, and the sidecars an older recipe made.

A recipe is a short hash of everything that shapes an answer besides the
image's bytes: the model, the rule's task and output, the prompt as rendered
for this file, and the sizing (min/max pixels, max_new_tokens, pages).  Each
job records the recipe it was queued under (the ``recipe`` column, migration
``m010_recipe``), so when a rule's prompt or the model changes, the sidecars
made before can be counted (``vlwatch status``, ``scan --dry-run``) and redone
on request (``scan --redo``, ``process --force``) — issue 11.13.

Deliberately not here: redoing anything by itself.  A model upgrade must not
silently re-run 100,000 pages, so the daemon redoes outdated sidecars only
when the config says ``jobs.redo_outdated: true``.  Jobs recorded before this
existed have no recipe and count as current.  The backend is left out (the
same model behind an OpenAI-compatible server gives the same answers), as
are keys that change nothing in the answer (attention, batch size, device).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from daemon.config import Config
from daemon.queue import Job, Queue
from daemon.rules import Match, match_file, render_prompt

#: Bump when the meaning of the parts below changes (never for a new optional part).
VERSION = "r1"


def recipe_of(config: Config, match: Match) -> str:
    """The recipe hash of ``match`` under ``config``: ``r1:`` and 16 hex digits."""
    rule, model = match.rule, config.model
    parts = {
        "model": model.name,
        "task": rule.task,
        "output": rule.output,
        "prompt": render_prompt(rule, match.path),
        "min_pixels": rule.min_pixels or model.min_pixels,
        "max_pixels": rule.max_pixels or model.max_pixels,
        "max_new_tokens": rule.max_new_tokens or model.max_new_tokens,
        "pages": rule.pages,
        "csp": rule.csp if rule.task == "code" else None,
    }
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode("utf-8", "surrogatepass"),
                             digest_size=8).hexdigest()
    return f"{VERSION}:{digest}"


@dataclass(frozen=True)
class Outdated:
    """A finished job whose sidecars an older recipe made, and the match that would redo it."""

    job: Job
    match: Match


def outdated(config: Config, queue: Queue, rule: str | None = None) -> list[Outdated]:
    """The newest done job of each (file, rule) made by a recipe other than today's.

    Jobs without a recorded recipe, of a rule that no longer exists, or of a
    file that is gone are left out: there is nothing to compare or redo.
    """
    out: list[Outdated] = []
    for job in queue.latest_done_with_recipe(rule):
        matches = match_file(config, job.path, job.rule)
        if not matches or not job.path.exists():
            continue
        if recipe_of(config, matches[0]) != job.recipe:
            out.append(Outdated(job, matches[0]))
    return out
