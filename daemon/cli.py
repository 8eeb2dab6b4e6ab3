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
import sys
from pathlib import Path
from typing import Callable, Sequence

from daemon import __version__, env
from daemon.backends import DeviceLostError
from daemon.config import Config
from daemon.config_reader import load_config
from daemon.errors import ConfigError, ExitCode, VlwatchError, plural
from daemon.logs import setup_logging

log = logging.getLogger("vlwatch")


def main(argv: Sequence[str] | None = None) -> int:
    """``vlwatch``; a reader that goes away (``vlwatch search x | head``) ends it quietly, status 0 (issue 27)."""
    try:
        try:
            code = _main(argv)
        except SystemExit:  # --help, --version, a usage error: printed too
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, where a closed pipe can still be caught, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python's own advice (the signal docs, "Note on SIGPIPE"): point stdout at /dev/null so the
        # interpreter's last flush cannot fail again and print "Exception ignored".  The command did
        # its work; the reader chose to stop reading: nothing failed.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.OK


def _main(argv: Sequence[str] | None) -> int:
    env.cuda_allocator_defaults()  # before anything starts CUDA: the daemon, bench, engine processes
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (issue 11.12)
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    # -v counts before and after the subcommand alike (issue 11.8).
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    # The daemon and a scan report each file's life at INFO; the other commands print their results.
    setup_logging(verbose + (1 if args.command in ("run", "scan") else 0))
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
    except DeviceLostError as exc:  # a sticky CUDA error (`process`, `ask` without a daemon): one line, exit 1
        print(f"vlwatch: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlwatch", description="Watch folders for images and write Qwen2.5-VL answers beside them.")
    p.add_argument("--version", action="version", version=f"vlwatch {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    _add_completion(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every subcommand takes -v too, so `vlwatch run -v` works as well as `vlwatch -v run`.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=0,
                         help="more log output (-vv for debug)")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, parents=[verbose])
        c.set_defaults(handler=handler)
        return c

    def with_config(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
        a = c.add_argument("--config", metavar="PATH",
                           help="config file (default: $VLWATCH_CONFIG, then $XDG_CONFIG_HOME/vlwatch/config.yaml, then /etc/vlwatch/config.yaml)")
        _complete_file(a)
        return c

    c = command("init", cmd_init, "write a commented starter config and create its folders")
    _complete_dir(c.add_argument("dir", nargs="?", metavar="DIR", type=Path,
                                 help="where to put config.yaml and its folders (default: $XDG_CONFIG_HOME/vlwatch)"))
    c.add_argument("--model", metavar="NAME", help="model.name to write (a model id or a local directory)")
    c.add_argument("--force", action="store_true", help="overwrite an existing config.yaml")
    with_config(command("run", cmd_run, "run the daemon in the foreground: watch, queue, infer, write sidecars"))
    c = with_config(command("process", cmd_process, "run the matching (or named) rule on these files now, then exit"))
    _complete_file(c.add_argument("files", nargs="+", metavar="FILE", type=Path))
    _complete_rule(c.add_argument("--rule", metavar="NAME", help="use this rule instead of matching"))
    c.add_argument("--force", action="store_true", help="redo the file even if its sidecar is up to date")
    c.add_argument("--local", action="store_true",
                   help="load the model in this process even if a daemon runs (default: hand the files to it, "
                        "through its API for files inside a watched folder, else through its state file; "
                        "ahead of its folder backlog)")
    c.add_argument("--timeout", metavar="SECONDS", type=float, default=None,
                   help="with a running daemon: give up waiting after this long (default: wait until done)")
    c = with_config(command("scan", cmd_scan, "process files under the watched folders whose sidecars are missing or stale"))
    c.add_argument("--dry-run", action="store_true", help="only list the files")
    c.add_argument("--redo", action="store_true", help="also redo sidecars made by an older recipe (model, prompt, sizing)")
    _complete_rule(c.add_argument("--rule", metavar="NAME", help="with --redo: only this rule's sidecars"))
    c = with_config(command("explain", cmd_explain, "show which rules match FILE, their prompts and sidecar paths"))
    _complete_file(c.add_argument("file", metavar="FILE", type=Path))
    with_config(command("check", cmd_check, "validate the config and every rule"))
    c = with_config(command("status", cmd_status, "queue counts, recent failures, model state"))
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c = with_config(command("retry", cmd_retry, "put failed jobs back on the queue"))
    c.add_argument("--all", action="store_true", help="every failed job")
    c.add_argument("job_ids", nargs="*", metavar="JOB_ID", type=int)
    c = with_config(command("search", cmd_search, "full-text search over every sidecar: path, rule, sidecar and a snippet per hit"))
    c.add_argument("query", metavar="QUERY", help="words that must all occur (a trailing * searches a prefix)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--limit", metavar="N", type=int, default=20, help="at most N hits (default 20)")
    c.add_argument("--folder", metavar="DIR", type=Path, help="only files under this folder")
    c.add_argument("--rule", metavar="NAME", help="only sidecars of this rule")
    c.add_argument("--since", metavar="YYYY-MM-DD", help="only sidecars written on or after this day")
    c.add_argument("--until", metavar="YYYY-MM-DD", help="only sidecars written on or before this day")
    c = with_config(command("pull", cmd_pull, "download the model into the local Hugging Face cache (uses the network)"))
    c.add_argument("model", nargs="?", metavar="MODEL", help="model id (default: model.name of the config)")
    c = with_config(command("ask", cmd_ask, "ask anything about one or more images; through the running daemon "
                                            "when one answers, else the model is loaded here"))
    c.add_argument("question", metavar="QUESTION")
    c.add_argument("images", nargs="+", metavar="IMAGE", type=Path)
    c.add_argument("--json", action="store_true", help="print one JSON object with the answer at the end")
    c.add_argument("--max-tokens", type=int, metavar="N", help="longest answer in tokens (default: model.max_new_tokens)")
    c = with_config(command("plan", cmd_plan, "what fits: weights, activation reserve, KV per slot and slots for a "
                                              "model and precision on a card, offline (no GPU, no weights)"))
    c.add_argument("--gpu-memory", metavar="SIZE", help="the card's memory, e.g. 12GiB (default: model.max_gpu_memory "
                                                         "as a cap, else a 24 GiB card)")
    c.add_argument("--model", metavar="NAME", help="7b, 3b, a model id or a local model folder (default: model.name)")
    c.add_argument("--quantization", choices=("auto", "none", "fp8"),
                   help="auto | none | fp8 (default: model.quantization)")
    c.add_argument("--kv-cache-dtype", choices=("auto", "fp8"),
                   help="auto (the model's dtype) | fp8 (default: model.kv_cache_dtype)")
    c.add_argument("--max-pixels", type=int, metavar="N", help="largest image in pixels (default: model.max_pixels)")
    c.add_argument("--max-new-tokens", type=int, metavar="N", help="answer budget (default: model.max_new_tokens)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c = with_config(command("bench", cmd_bench, "measure the inference worker on this machine"))
    from daemon.bench.run import add_arguments

    add_arguments(c)
    return p


SHELLS = ("bash", "zsh", "fish")


def _add_completion(p: argparse.ArgumentParser) -> None:
    """``--print-completion SHELL``: the completion script for bash, zsh or fish (issue 11.12).

    Generated by argcomplete from this very parser, so it never drifts from
    ``--help``; at each Tab the shell asks ``vlwatch`` itself (``main`` calls
    ``argcomplete.autocomplete`` before parsing).
    """
    p.add_argument("--print-completion", choices=SHELLS, action=_PrintCompletion,
                   help="print the shell completion script for bash, zsh or fish and exit")


class _PrintCompletion(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        import argcomplete

        sys.stdout.write(argcomplete.shellcode([parser.prog], shell=str(values)))
        parser.exit()


def _complete_file(action: argparse.Action) -> argparse.Action:
    from argcomplete.completers import FilesCompleter

    action.completer = FilesCompleter()  # type: ignore[attr-defined]
    return action


def _complete_dir(action: argparse.Action) -> argparse.Action:
    from argcomplete.completers import DirectoriesCompleter

    action.completer = DirectoriesCompleter()  # type: ignore[attr-defined]
    return action


def _complete_rule(action: argparse.Action) -> argparse.Action:
    """Tab after ``--rule`` offers the rule names of the config in use."""
    def rules(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
        try:
            config = load_config(getattr(parsed_args, "config", None))
        except Exception:  # completing must never print a traceback into the prompt
            return []
        return [r.name for r in config.rules if r.name.startswith(prefix)]

    action.completer = rules  # type: ignore[attr-defined]
    return action


def _config(args: argparse.Namespace) -> Config:
    """The config, with its warnings summed up in one line: `check` and `run` list them (issue 11.8).

    The "model not downloaded" warning is left out: the commands that need the
    model stop with the full message, so it is said once.
    """
    config = load_config(args.config)
    if config.warnings:
        log.warning("%s has %s (`vlwatch check` lists them)", config.source, plural(len(config.warnings), "warning"))
    return config


# ----------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{plural(len(exc.problems), 'problem')} found")
        return ExitCode.FAILED
    for warning in (*config.warnings, *filter(None, [config.model_warning])):
        print(f"warning: {warning}")
    print(f"{config.source}: OK ({plural(len(config.rules), 'rule')}, {plural(len(config.watch), 'watched folder')}, "
          f"backend {config.model.backend}" + _quantization_note(config) + ")")
    print(f"engine: {config.engine.line()}")
    return ExitCode.OK


def _quantization_note(config: Config) -> str:
    """``, quantization fp8`` (and ``, kv cache fp8``) where the local backend runs the model (issue 23)."""
    if config.model.backend != "transformers":
        return ""
    kv = ", kv cache fp8" if config.model.kv_cache_dtype == "fp8" else ""
    return f", quantization {config.model.quantization}{kv}"


def cmd_init(args: argparse.Namespace) -> int:
    from daemon.config import local_model_path
    from daemon.init_config import init, next_steps

    done = init(args.dir, model=args.model, force=args.force)
    print(next_steps(done, local_model_path(args.model or load_config(done.config).model.name) is not None))
    return ExitCode.OK


def cmd_explain(args: argparse.Namespace) -> int:
    from daemon.commands import explain

    return explain(_config(args), args.file)


def cmd_process(args: argparse.Namespace) -> int:
    from daemon.process import process

    return process(_config(args), args.files, rule=args.rule, force=args.force, local=args.local,
                   timeout=args.timeout)


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

    if args.rule is not None and not args.redo:
        raise VlwatchError("--rule goes with --redo (a scan always looks at every rule)", ExitCode.USAGE)
    return scan(_config(args), dry_run=args.dry_run, redo=args.redo, rule=args.rule)


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.commands import status

    return status(_config(args), as_json=args.json)


def cmd_retry(args: argparse.Namespace) -> int:
    from daemon.commands import retry

    if not args.all and not args.job_ids:
        raise VlwatchError("name the jobs to retry, or --all", ExitCode.USAGE)
    return retry(_config(args), None if args.all else args.job_ids)


def cmd_search(args: argparse.Namespace) -> int:
    from daemon.commands import search

    return search(_config(args), args.query, as_json=args.json, limit=args.limit, folder=args.folder,
                  rule=args.rule, since=args.since, until=args.until)


def cmd_ask(args: argparse.Namespace) -> int:
    from daemon.asking import ask

    if args.max_tokens is not None and args.max_tokens < 1:
        raise VlwatchError("--max-tokens must be at least 1", ExitCode.USAGE)
    return ask(_config(args), args.question, args.images, max_tokens=args.max_tokens, as_json=args.json)




def cmd_plan(args: argparse.Namespace) -> int:
    from daemon.config import config_candidates
    from daemon.planning import PlanRequest, run_plan

    # Offline and before any setup: a config only fills in defaults, and none is needed.
    have = args.config is not None or any(p.is_file() for p in config_candidates())
    request = PlanRequest(model=args.model, gpu_memory=args.gpu_memory, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype, max_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens)
    return run_plan(request, _config(args) if have else None, as_json=args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    from daemon.bench.run import run_bench

    return run_bench(args)
