"""``vlwatch bench``: measure the inference worker on this machine (see issue 5)."""

from __future__ import annotations

import argparse

from daemon.errors import ExitCode, VlwatchError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="dummy: random weights of the real architecture (no download)")


def run_bench(args: argparse.Namespace) -> int:
    raise VlwatchError("bench is not implemented yet", ExitCode.USAGE)
