"""Exit codes and the exceptions that carry them (the OCRmyPDF habit).

Every error a user can cause is a ``VlwatchError`` whose ``code`` is what the
command exits with, so the CLI maps exceptions to exit codes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a file or job failed, or `check` found problems
    USAGE = 2  # bad usage, or an unreadable / invalid config


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


class ModelMissingError(VlwatchError):
    """The configured model is neither a local directory nor in the local HF cache."""


class InputError(VlwatchError):
    """A source file cannot be used (unreadable, not an image, too large...)."""


class BackendError(VlwatchError):
    """The model backend failed on a request."""


class BackendUnavailableError(BackendError):
    """The backend cannot be reached at all (server down, connection refused).

    Not the job's fault: the worker pauses the queue and tries again later
    instead of spending the job's attempts.
    """
