"""Answer policies: what becomes of a page's answer when it comes back, kept or asked again.

A rule with ``answers: olmocr`` reads each page's answer as olmOCR-2 writes
it (``daemon.answers.frontmatter``) and, like olmOCR's own pipeline
(allenai/olmocr, ``olmocr/pipeline.py`` ``process_page``; Apache-2.0), asks
again when the answer is not valid:

- the prompt comes before the page in the user turn, as olmOCR-2 was
  trained (its training configs' ``prompt_first: true``) and as its
  pipeline asks (``build_page_query``);
- every try has its temperature from a ladder (``OLMOCR_TEMPERATURES``, the
  pipeline's ``TEMPERATURE_BY_ATTEMPT``; a rule's ``temperatures:`` replaces
  it, and its length is the number of tries);
- an answer is valid when its front matter checks out and generation
  stopped by itself (not at ``max_new_tokens``, not cut for repeating);
- when the model says the page is not upright (``is_rotation_valid: false``),
  the page is turned by ``rotation_correction`` (added up over the tries,
  as olmOCR does) and the next try sees the turned page;
- after the last try, a valid answer that still called the page rotated is
  kept; with none, the page is settled as invalid and its sidecar writer
  falls back to the PDF's own text layer (``daemon.documents``).

A request that fails in the backend (an error for that one request) counts
as a failed try.  Failures that are not the page's (the backend down, the
GPU lost, out of memory) are passed on unchanged, as without a policy.

Where it sits: outside the engine.  The engine answers ``Request``s; the
worker's batch path (``Worker.infer``) and the daemon's live feed
(``engine.JobFeed.deliver``) hand each page's answer to its document's
policy (``settle``) and send the ``Request`` it returns, if any, through the
same path as the first.  A policy is made per document (``policy_for``) and
keeps its pages' state until a page's answer is final, and then lets go of
it (and so of the page's image: a long document is not held whole, issue
24); it is called from one thread at a time, but locks anyway as it is cheap.

Deliberately not here: the text-layer fallback itself and the merged front
matter (``daemon.documents`` writes the sidecar), and olmOCR's parallel
retries when its queue runs empty (our engine keeps the GPU busy with other
pages instead).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, Sequence

from daemon.answers.frontmatter import PageFrontMatter, parse_page
from daemon.backends import Answer, DeviceLostError, Message, Request, is_sticky_cuda_error
from daemon.config import Rule
from daemon.errors import BackendUnavailableError, VlwatchError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: olmOCR's ``TEMPERATURE_BY_ATTEMPT`` (olmocr/pipeline.py): one per try, 8 tries.
OLMOCR_TEMPERATURES = (0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0)


class AnswerPolicy(Protocol):
    """What a rule does with each page's answer: keep it, or ask again."""

    def first(self, index: int, request: Request) -> Request:
        """The first request for page ``index`` (0-based), made from the rule's plain one."""
        ...

    def settle(self, index: int, got: Answer | BaseException) -> Request | Answer | BaseException:
        """What page ``index``'s answer ``got`` becomes: a ``Request`` to send next for
        the same page (a retry), or the page's final answer (or error)."""
        ...


@dataclass(frozen=True)
class Try:
    """One try of a page, for the sidecar and the log."""

    temperature: float
    rotation: int  # degrees the page was turned for this try
    problem: str | None  # why the answer was not valid; None when it was


@dataclass(frozen=True)
class PageAnswer(Answer):
    """A page's final answer under an answer policy (an ``Answer``: the engine passes it on as one).

    ``text`` is the last answer as the model wrote it; ``body`` the page's
    text without its front matter.  ``problem`` is set when no try gave a
    valid answer: the sidecar then falls back to the PDF's text layer.
    """

    body: str = ""
    front_matter: PageFrontMatter | None = None
    rotation: int = 0  # degrees the page was turned for the answer kept
    tries: tuple[Try, ...] = ()
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None


#: Tries of a page of a multi-page document whose request fails, under a rule without ``answers:``.
PAGE_TRIES = 2


def policy_for(rule: Rule, pages: int = 1) -> AnswerPolicy | None:
    """A new policy for one document of ``rule`` with ``pages`` pages (None: answers are taken as they come).

    A rule without ``answers:`` gets a policy only for a document of several
    pages (``PagedPolicy``): a page whose request fails is tried again, then
    left out, so it does not lose the others (issue 24).  A one-page file
    that fails fails as a job, retried with the queue's backoff.
    """
    if rule.answers == "olmocr":
        return OlmocrPolicy(rule.temperatures or OLMOCR_TEMPERATURES)
    if pages > 1:
        return PagedPolicy(PAGE_TRIES)
    return None


class PagedPolicy:
    """Pages of a document under a plain rule: every answer kept; a failed request tried again, then left out."""

    def __init__(self, tries: int) -> None:
        self.tries = max(1, tries)
        self._requests: dict[int, Request] = {}
        self._failures: dict[int, int] = {}
        self._lock = threading.Lock()

    def first(self, index: int, request: Request) -> Request:
        with self._lock:
            self._requests[index] = request
        return request

    def settle(self, index: int, got: Answer | BaseException) -> Request | Answer | BaseException:
        if not isinstance(got, BaseException) or _not_the_page(got):
            with self._lock:
                self._requests.pop(index, None)  # final: the page's image may go
            return got
        with self._lock:
            failures = self._failures[index] = self._failures.get(index, 0) + 1
            if failures < self.tries:
                return self._requests[index]
            request = self._requests.pop(index)
        problem = f"the request failed {failures} time{'s' if failures > 1 else ''}: {_error_text(got)}"
        return PageAnswer(text="", finished=False, problem=problem,
                          tries=tuple(Try(request.temperature, 0, problem) for _ in range(failures)))


@dataclass
class _Page:
    base: Request  # the first request: its last image is the page, upright as decoded
    rotation: int = 0
    tries: list[Try] = field(default_factory=list)
    kept: PageAnswer | None = None  # a valid answer that still called the page rotated


class OlmocrPolicy:
    """olmOCR's page loop (see the module docstring) for the pages of one document."""

    def __init__(self, temperatures: Sequence[float]) -> None:
        if not temperatures:
            raise VlwatchError("an answer policy needs at least one temperature (one per try)")
        self.temperatures = tuple(temperatures)
        self._pages: dict[int, _Page] = {}
        self._lock = threading.Lock()

    def first(self, index: int, request: Request) -> Request:
        with self._lock:
            self._pages[index] = _Page(request)
        return _prompt_first(request, request.images, self.temperatures[0])

    def settle(self, index: int, got: Answer | BaseException) -> Request | Answer | BaseException:
        if isinstance(got, BaseException) and _not_the_page(got):
            with self._lock:
                self._pages.pop(index, None)  # final: the page's image may go
            return got
        with self._lock:
            page = self._pages[index]
            temperature = self.temperatures[min(len(page.tries), len(self.temperatures) - 1)]
            answer = self._judge(page, got, temperature)
            if answer is not None and answer.front_matter is not None and answer.front_matter.is_rotation_valid:
                del self._pages[index]
                return answer  # valid and upright: done
            if answer is not None:
                page.kept = answer  # valid, but the model wants the page turned
            parsed = answer.front_matter if answer is not None else _front_matter(got)
            if parsed is not None and not parsed.is_rotation_valid:
                page.rotation = (page.rotation + parsed.rotation_correction) % 360
            if len(page.tries) < len(self.temperatures):
                return self._again(page)
            del self._pages[index]
            return page.kept or self._gave_up(page, got)

    def _judge(self, page: _Page, got: Answer | BaseException, temperature: float) -> PageAnswer | None:
        """Record this try; the page's answer when it is valid (whatever it says of rotation)."""
        problem: str | None
        if isinstance(got, BaseException):
            problem = f"the request failed: {_error_text(got)}"
            parsed = None
        else:
            parsed = parse_page(got.text)
            problem = parsed.problem
            if problem is None and not got.finished:
                problem = "the answer hit the token limit (max_new_tokens) before it ended"
            if problem is None and got.looped:
                problem = "the model kept repeating itself"
        page.tries.append(Try(temperature, page.rotation, problem))
        if problem is not None or isinstance(got, BaseException) or parsed is None:
            return None
        return PageAnswer(text=got.text, new_tokens=got.new_tokens, finished=got.finished, looped=got.looped,
                          body=parsed.text, front_matter=parsed.front_matter, rotation=page.rotation,
                          tries=tuple(page.tries))

    def _again(self, page: _Page) -> Request:
        images = page.base.images
        turned = (*images[:-1], rotate(images[-1], page.rotation)) if page.rotation and images else images
        return _prompt_first(page.base, turned, self.temperatures[len(page.tries)])

    @staticmethod
    def _gave_up(page: _Page, got: Answer | BaseException) -> PageAnswer:
        last = page.tries[-1].problem or "no valid answer"
        problem = f"no valid answer in {len(page.tries)} tr{'y' if len(page.tries) == 1 else 'ies'} (last: {last})"
        if isinstance(got, BaseException):
            return PageAnswer(text="", finished=False, rotation=page.rotation, tries=tuple(page.tries),
                              problem=problem)
        return PageAnswer(text=got.text, new_tokens=got.new_tokens, finished=got.finished, looped=got.looped,
                          rotation=page.rotation, tries=tuple(page.tries), problem=problem)


def _prompt_first(request: Request, images: tuple["Image.Image", ...], temperature: float) -> Request:
    """``request`` as one user turn with the prompt before its images (a folder job puts images first)."""
    turn = Message("user", (request.prompt, *images))
    return replace(request, images=images, messages=(turn,), temperature=temperature)


def rotate(image: "Image.Image", degrees: int) -> "Image.Image":
    """``image`` turned by ``degrees`` counter-clockwise, as olmOCR's ``build_page_query`` turns a page."""
    from PIL import Image

    transpose = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                 270: Image.Transpose.ROTATE_270}.get(degrees % 360)
    return image if transpose is None else image.transpose(transpose)


def _front_matter(got: Answer | BaseException) -> PageFrontMatter | None:
    """The front matter of an answer that is not valid for another reason (cut off): its rotation still counts."""
    return None if isinstance(got, BaseException) else parse_page(got.text).front_matter


def _not_the_page(exc: BaseException) -> bool:
    """A failure of the machine, not of this page: no retry, passed on as without a policy."""
    from daemon.backends.transformers.oom import is_out_of_memory

    return isinstance(exc, (BackendUnavailableError, DeviceLostError)) or is_out_of_memory(exc) \
        or is_sticky_cuda_error(exc)


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, VlwatchError) else f"{type(exc).__name__}: {exc}"
