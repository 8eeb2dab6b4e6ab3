"""The ``vlwatch`` command: thin argument parsing over the library.

Each subcommand parses its arguments, calls one function of the package and
maps exceptions to exit codes through ``ExitCode`` (0 ok, 1 a file or job
failed or ``check`` found problems, 2 bad usage or an invalid config).  No
logic lives only here.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

from daemon import __version__
from daemon.config import Config, load_config
from daemon.errors import ConfigError, ExitCode, VlwatchError
from daemon.images import printable

log = logging.getLogger("vlwatch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The daemon and a scan report each file's life at INFO; the other commands print their results.
    setup_logging(args.verbose + (1 if args.command in ("run", "scan") else 0))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return int(handler(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.USAGE
    except VlwatchError as exc:
        print(f"vlwatch: {exc}", file=sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlwatch", description="Watch folders for images and write Qwen2.5-VL answers beside them.")
    p.add_argument("--version", action="version", version=f"vlwatch {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(handler=handler)
        return c

    def with_config(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
        c.add_argument("--config", metavar="PATH",
                       help="config file (default: $VLWATCH_CONFIG, then $XDG_CONFIG_HOME/vlwatch/config.yaml, then /etc/vlwatch/config.yaml)")
        return c

    with_config(command("run", cmd_run, "run the daemon in the foreground: watch, queue, infer, write sidecars"))
    c = with_config(command("process", cmd_process, "run the matching (or named) rule on these files now, then exit"))
    c.add_argument("files", nargs="+", metavar="FILE", type=Path)
    c.add_argument("--rule", metavar="NAME", help="use this rule instead of matching")
    c = with_config(command("scan", cmd_scan, "process files under the watched folders whose sidecars are missing or stale"))
    c.add_argument("--dry-run", action="store_true", help="only list the files")
    c = with_config(command("explain", cmd_explain, "show which rules match FILE, their prompts and sidecar paths"))
    c.add_argument("file", metavar="FILE", type=Path)
    with_config(command("check", cmd_check, "validate the config and every rule"))
    c = with_config(command("status", cmd_status, "queue counts, recent failures, model state"))
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c = with_config(command("retry", cmd_retry, "put failed jobs back on the queue"))
    c.add_argument("--all", action="store_true", help="every failed job")
    c.add_argument("job_ids", nargs="*", metavar="JOB_ID", type=int)
    c = with_config(command("pull", cmd_pull, "download the model into the local Hugging Face cache (uses the network)"))
    c.add_argument("model", nargs="?", metavar="MODEL", help="model id (default: model.name of the config)")
    c = with_config(command("bench", cmd_bench, "measure the inference worker on this machine"))
    from daemon.bench import add_arguments

    add_arguments(c)
    return p


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if os.environ.get("VLWATCH_LOG_LEVEL"):
        level = getattr(logging, os.environ["VLWATCH_LOG_LEVEL"].upper(), level)
    # journald stamps each line itself; a terminal user wants the time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty() else "%(asctime)s "
    # Under systemd, a "<N>" prefix gives each line its syslog priority, so
    # `journalctl -p warning` works (sd-daemon(3), SyslogLevelPrefix=).
    prefix = "<%(priority)d>" if _stderr_is_journal() else ""
    logging.basicConfig(level=level, format=f"{prefix}{stamp}%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if prefix:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_syslog_priority)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "PIL", "apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _stderr_is_journal() -> bool:
    """Whether stderr is connected to journald ($JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _syslog_priority(record: logging.LogRecord) -> bool:
    record.priority = _PRIORITY.get(record.levelno, 6)
    return True


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    for warning in config.warnings:
        log.warning("%s", warning)
    return config


# ----------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found")
        return ExitCode.FAILED
    for warning in config.warnings:
        print(f"warning: {warning}")
    print(f"{config.source}: OK ({len(config.rules)} rules, {len(config.watch)} watched folders, backend {config.model.backend})")
    return ExitCode.OK


def cmd_explain(args: argparse.Namespace) -> int:
    from daemon.outputs import planned_sidecars
    from daemon.config import Snapshot
    from daemon.rules import match_file, render_prompt, watch_for
    from daemon.watching import ignore_reason

    config = _config(args)
    path = args.file.absolute()
    watch = watch_for(config, path)
    print(printable(path))
    print(f"  watched folder: {printable(watch.path) if watch else '(none: globs match the file name)'}")
    # The daemon's own filter, so explain and the daemon give one answer (issue 10.5).
    snapshot = Snapshot.of(config)
    _, root, skip = snapshot.find(path) or (None, path.parent, ())
    if (reason := ignore_reason(path, root, snapshot.rule_names, skip)) is not None:
        print(f"  ignored: {reason}; the daemon never processes it")
        return ExitCode.FAILED
    matches = match_file(config, path)
    if not matches:
        print("  no rule matches this file")
        return ExitCode.FAILED
    for m in matches:
        r = m.rule
        print(f"  rule {r.name} ({r.source}): task {r.task} -> {r.output}")
        if r.formats is not None or r.pages is not None:
            pages = ",".join(f"{a}" if a == b else f"{a}-{b or ''}" for a, b in r.pages or ())
            print(f"    takes: formats {', '.join(r.formats or ('any',))}; pages {pages or 'all'}")
        print("    prompt:")
        for line in render_prompt(r, path).splitlines():
            print(f"      {line}")
        for sidecar in planned_sidecars(m):
            print(f"    writes: {printable(sidecar)}")
    return ExitCode.OK


def cmd_process(args: argparse.Namespace) -> int:
    from daemon.backends import create_backend
    from daemon.rules import match_file
    from daemon.worker import Worker

    config = _config(args)
    if args.rule is not None and config.rule(args.rule) is None:
        names = ", ".join(r.name for r in config.rules)
        raise VlwatchError(f"no rule named {args.rule!r} (defined: {names})", ExitCode.USAGE)
    failed = 0
    matches = []
    for path in args.files:
        if (problem := _not_a_file(path)) is not None:
            print(f"error: {printable(path)}: {problem}", file=sys.stderr)
            failed += 1
            continue
        found = match_file(config, path, args.rule)
        if not found:
            hint = shlex.quote(printable(path))
            print(f"error: {printable(path)}: no rule matches; skipped (see `vlwatch explain -- {hint}`)",
                  file=sys.stderr)
            failed += 1
        matches.extend(found)
    if matches:
        worker = Worker(config, create_backend(config.model))
        try:
            outcomes = worker.process(matches)
        finally:
            worker.close()
        for outcome in outcomes:
            if outcome.ok:
                for sidecar in outcome.sidecars:
                    _print_path(sidecar)
            else:
                failed += 1
                print(f"error: {outcome.error}", file=sys.stderr)
    return ExitCode.FAILED if failed else ExitCode.OK


def _not_a_file(path: Path) -> str | None:
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return "is a symbolic link to a file that does not exist"
    if path.exists():
        return "is not a regular file"
    return "no such file"


def _print_path(path: Path) -> None:
    """One path per line, as the exact bytes of its name (a name need not be UTF-8)."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a test harness's text-only stdout
        print(printable(path))
        return
    buffer.write(os.fsencode(path) + b"\n")
    buffer.flush()


def cmd_pull(args: argparse.Namespace) -> int:
    from daemon.pull import pull

    name = args.model
    if name is None:
        name = _config(args).model.name
    path = pull(name)
    print(path)
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import run

    return run(args.config)


def cmd_scan(args: argparse.Namespace) -> int:
    from daemon.commands import scan

    return scan(_config(args), dry_run=args.dry_run)


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.commands import status

    return status(_config(args), as_json=args.json)


def cmd_retry(args: argparse.Namespace) -> int:
    from daemon.commands import retry

    if not args.all and not args.job_ids:
        raise VlwatchError("name the jobs to retry, or --all", ExitCode.USAGE)
    return retry(_config(args), None if args.all else args.job_ids)


def cmd_bench(args: argparse.Namespace) -> int:
    from daemon.bench import run_bench

    return run_bench(args)
