"""Exit codes and the exceptions that carry them (the OCRmyPDF habit).

Every error a user can cause is a ``VlwatchError`` whose ``code`` is what the
command exits with, so the CLI maps exceptions to exit codes in one place.
``printable`` is how every message names a file (a hostile name escaped).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a file or job failed, or `check` found problems
    USAGE = 2  # bad usage, or an unreadable / invalid config


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none): an error in one log line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plural(n: int, word: str, words: str | None = None) -> str:
    """``"1 file"``, ``"2 files"``: a count with its noun in the right number (issue 11.8)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


class VlwatchError(Exception):
    """An error with a message meant for the user, and the exit code it implies."""

    code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, code: ExitCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a config or rule file, located for the user."""

    file: str
    line: int | None
    where: str  # key path, e.g. ``rules[2].output``
    message: str

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}" if self.line else self.file
        return f"{place}: {self.where}: {self.message}" if self.where else f"{place}: {self.message}"


class ConfigError(VlwatchError):
    """The config (or a rule pack it includes) is invalid; carries every problem found."""

    code = ExitCode.USAGE

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StateError(VlwatchError):
    """The state database cannot be opened: an unwritable folder, a corrupt file (issue 10.16).

    A problem of the machine's setup, not of a file: exit 2, so systemd does
    not restart the daemon in a loop (``RestartPreventExitStatus=2``).
    """

    code = ExitCode.USAGE


class ModelMissingError(VlwatchError):
    """The configured model is neither a local directory nor in the local HF cache."""


class InputError(VlwatchError):
    """A source file cannot be used (unreadable, not an image, too large...).

    ``permanent`` says whether trying the same bytes again could ever help.
    A plain ``InputError`` is transient (an I/O error, a file that went away,
    a truncated file that may still be growing): the job is retried with
    backoff.  The subclasses below are facts about the bytes themselves: the
    job fails at once (issue 10.10).  New bytes make a new job either way.
    """

    permanent: bool = False


class UnusableInputError(InputError):
    """The file's bytes can never be processed, however often they are tried."""

    permanent = True


class LinkOutsideError(UnusableInputError):
    """A symbolic link out of every watched folder, and its watch does not follow such links.

    Failed at once with the reason (issue 27: it was retried three times):
    only a change of the link or of ``follow_symlinks_out`` can help, and
    ``vlwatch retry`` takes it again then.
    """


class NotAnImageError(UnusableInputError):
    """Not an image or PDF vlwatch can read (text, an unknown format, empty)."""


class UnsupportedFormatError(UnusableInputError):
    """An image of a format this rule (or this install) does not take."""


class ImageTooLargeError(UnusableInputError):
    """Over the decompression-bomb limit, or more pages than vlwatch takes."""


class AspectRatioError(UnusableInputError):
    """An aspect ratio the model cannot be shown (over 200:1)."""


class NoPagesError(UnusableInputError):
    """None of the rule's pages exist, or the document has none / is locked."""


class BackendError(VlwatchError):
    """The model backend failed on a request."""


class AbandonedError(BackendError):
    """An interactive request whose client went away: the engine dropped it at its next step."""


class BackendUnavailableError(BackendError):
    """The backend cannot be reached at all (server down, connection refused).

    Not the job's fault: the worker pauses the queue and tries again later
    instead of spending the job's attempts.
    """

    #: the ``meta`` key ``vlwatch status`` reads the outage from.
    meta_key = "backend"
    #: the queue's first pause, doubling on each failed try up to ``max_pause`` (seconds).
    first_pause = 5.0
    max_pause = 300.0


class StorageUnavailableError(BackendUnavailableError):
    """The output disk refuses writes (full, over quota, read-only): issue 10.8.

    An outage like an unreachable backend, and handled by the same path: the
    queue pauses without spending attempts and resumes by itself once a
    write works again.  ``status`` shows it under ``storage``.
    """

    meta_key = "storage"
    max_pause = 60.0  # a probe write tells whether it is over: cheap to look often


class StateUnavailableError(BackendUnavailableError):
    """The state database refuses a commit (its disk is full, I/O error): issue 10.7.

    The outcomes of the jobs in hand are kept in memory and recorded once
    the database takes writes again; meanwhile the queue pauses.
    """

    meta_key = "state"
    first_pause = 1.0  # trying a commit again costs nothing
    max_pause = 30.0


def printable(path: object) -> str:
    """``path`` for a message or a log line: control characters escaped.

    A file name may hold a newline (which would forge a second log line) or
    bytes that are not UTF-8 (which would make printing it raise); both are
    shown escaped, as ``repr`` would.
    """
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
