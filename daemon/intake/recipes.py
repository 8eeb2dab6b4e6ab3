"""What made a sidecar: the *recipe* of a job, and the sidecars an older recipe made.

A recipe is a short hash of everything that shapes an answer besides the
image's bytes: the model, the rule's task and output, the prompt as rendered
for this file, and the sizing (min/max pixels, max_new_tokens, pages), and
for a rule that sets them, how answers are read and retried (``answers``,
``temperatures``) and ``longest_side``.  Each
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

from daemon.config import Config, Rule
from daemon.intake.rules import Match, match_file, render_prompt
from daemon.store.queue import Job, Queue

#: Bump when the meaning of the parts below changes (never for a new optional part).
VERSION = "r1"


def recipe_of(config: Config, match: Match) -> str:
    """The recipe hash of ``match`` under ``config``: ``r1:`` and 16 hex digits."""
    head, tail = _frame(config, match.rule)
    text = head + json.dumps(render_prompt(match.rule, match.path)) + tail
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{VERSION}:{digest}"


def _parts(config: Config, rule: Rule, prompt: str) -> dict[str, object]:
    model = config.model
    # Issue 24's keys only when a rule sets them: a key added for every rule would change every recipe.
    extra = {k: v for k, v in (("answers", rule.answers), ("temperatures", rule.temperatures),
                                ("longest_side", rule.longest_side)) if v is not None}
    return {
        **extra,
        "model": model.name,
        "task": rule.task,
        "output": rule.output,
        "prompt": prompt,
        "min_pixels": rule.min_pixels or model.min_pixels,
        "max_pixels": rule.max_pixels or model.max_pixels,
        "max_new_tokens": rule.max_new_tokens or model.max_new_tokens,
        "pages": rule.pages,
        "csp": rule.csp if rule.task == "code" else None,
    }


_MARK = "\x00vlwatch-prompt\x00"
_frames: dict[tuple[int, int], tuple[object, Rule, str, str]] = {}


def _frame(config: Config, rule: Rule) -> tuple[str, str]:
    """The JSON of a recipe's parts before and after the prompt, once per (model, rule).

    ``json.dumps`` of the parts with ``sort_keys`` is that text around the
    prompt's own JSON, so a file's recipe costs its prompt, not the whole
    dictionary (every queued file has one: issue 10.21).
    """
    key = (id(config.model), id(rule))
    hit = _frames.get(key)
    if hit is not None and hit[0] is config.model and hit[1] is rule:
        return hit[2], hit[3]
    text = json.dumps(_parts(config, rule, _MARK), sort_keys=True, default=str)
    mark = json.dumps(_MARK)
    head, _, tail = text.partition(mark)
    assert text.count(mark) == 1, "the prompt's mark appears elsewhere in a recipe"
    if len(_frames) > 256:  # configs reloaded many times: keep only the current ones
        _frames.clear()
    _frames[key] = (config.model, rule, head, tail)
    return head, tail


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
