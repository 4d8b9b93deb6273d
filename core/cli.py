"""``distill-run``: run, validate and inspect distillation runs.

    distill-run run CONFIG [--set section.key=value]... [--unset section.key]... [--resume | --no-resume | --resume-anyway]
    distill-run validate CONFIG [--set ...] [--unset ...]
    distill-run plugins [--json]
    distill-run status RUN_DIR
    distill-run report RUN_DIR [RUN_DIR]... [--out DIR] [--format png|svg]

``--disable-plugin NAME`` (repeatable) or ``DISTILL_DISABLE_PLUGINS=a,b`` keeps plugins unloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import structlog

from distill.config import display_config, load_config
from distill.errors import ConfigError, DistillError
from distill.manager import PluginManager, disabled_from_env

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_CONFIG = 2


def _configure_logging(verbose: bool) -> None:
    """Human-readable logs on a terminal, one JSON object per line otherwise. Under torchrun only
    the main process (RANK 0) logs at info level; the others report warnings and errors."""
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.WARNING if os.environ.get("RANK", "0") != "0" else logging.DEBUG if verbose else logging.INFO),
        # look sys.stderr up per logger: it may be replaced (pytest capture, a redirecting host)
        logger_factory=lambda *_: structlog.PrintLogger(file=sys.stderr),
    )


def _quiet_transformers() -> None:
    """Our progress bar and logs say what happens; transformers' per-save bars would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value with a TOML value, e.g. --set train.steps=10 or "
                             "--set 'metrics.sinks=[\"jsonl\"]' (repeatable)")
    parser.add_argument("--unset", action="append", default=[], metavar="KEY",
                        help="remove a config key or table before the --set values apply (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-run", description="On-policy distillation of language models.")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="do not load this plugin (repeatable; also DISTILL_DISABLE_PLUGINS=a,b)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a distillation, resuming from the output_dir if it has checkpoints")
    run.add_argument("config", help="TOML run config")
    _add_overrides(run)
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_const", const="always", dest="resume",
                      help="require a checkpoint to resume from")
    mode.add_argument("--no-resume", action="store_const", const="never", dest="resume",
                      help="refuse to run if output_dir already has checkpoints")
    mode.add_argument("--resume-anyway", action="store_const", const="anyway", dest="resume",
                      help="resume the checkpoint even though this config changes what it trains "
                           "(seed, data, models, loss, ...); requires a checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar; log every step instead")
    run.add_argument("--nproc", type=_process_count, default=1, metavar="N",
                     help="run on N processes of this machine: starts torchrun --nproc_per_node N for you "
                          "(the student sharded with FSDP2, each process sampling and scoring a share of the step)")
    run.set_defaults(resume="auto")

    validate = commands.add_parser(
        "validate", help="check a config (and the tokenizers it names) and report every problem at once")
    validate.add_argument("config")
    _add_overrides(validate)

    status = commands.add_parser("status", help="print a run folder's status.json (state, step, tokens, error)")
    status.add_argument("run_dir")

    report = commands.add_parser("report", help="plot runs' metrics into PNG/SVG files and one index.html "
                                                "(needs the report extra: pip install 'distill[report]')")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders; several are overlaid")
    report.add_argument("--out", help="where to write (default: report/ in the first run folder)")
    report.add_argument("--format", choices=("png", "svg"), default="png", help="image format (default png)")

    plugins = commands.add_parser("plugins", help="list installed plugins and their components")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _plugins(manager: PluginManager, as_json: bool) -> None:
    infos = manager.plugins()
    if as_json:
        print(json.dumps([
            {"name": i.name, "distribution": i.distribution, "version": i.version,
             "components": [{"kind": k, "name": n} for k, n in i.components]}
            for i in infos
        ], indent=1))
        return
    for info in infos:
        origin = f"{info.distribution} {info.version}" if info.distribution else "in-process"
        print(f"{info.name}  ({origin})")
        for kind, name in info.components:
            summary = manager.components(kind)[name].summary
            print(f"    {kind:<18} {name:<20} {summary}")
    if manager.disabled:
        print(f"disabled: {', '.join(sorted(manager.disabled))}")


def _status(run_dir: str) -> int:
    from distill.status import read_status

    status = read_status(run_dir)
    if status is None:
        print(f"distill-run: {run_dir} has no status.json: not a run folder, or its run has not started",
              file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(status, indent=1))
    return 0


def _process_count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes, at least 1, got {value!r}")
    return int(value)


def _torchrun(nproc: int, argv: Sequence[str]) -> NoReturn:
    """This very command on ``nproc`` processes under torchrun (one machine), without ``--nproc``."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--nproc":
            del args[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del args[i]
            break
    # exec, not a child: signals (Ctrl-C, SIGTERM) reach torchrun, which passes them to every process
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", "-m", "distill.cli", *args])


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    _quiet_transformers()
    try:
        if args.command == "status":
            return _status(args.run_dir)
        if args.command == "report":
            from distill.plots import write_report

            print(write_report(args.run_dirs, out=args.out, image_format=args.format))
            return 0
        manager = PluginManager(disabled=set(args.disable_plugin) | disabled_from_env())
        if args.command == "plugins":
            _plugins(manager, args.json)
            return 0
        config = load_config(args.config, manager, args.overrides, args.unset)
        if args.command == "validate":
            from distill.preflight import preflight

            preflight(config, manager)
            print(json.dumps(display_config(config), indent=1))
            print(f"{args.config}: valid", file=sys.stderr)
            return 0
        if args.nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            from distill.preflight import preflight

            preflight(config, manager)  # its errors once, here, rather than once per process
            _torchrun(args.nproc, argv)
        from distill.loop import RunInterrupted, run

        try:
            summary = run(config, manager, resume=args.resume, progress=False if args.no_progress else None)
        except RunInterrupted as stopped:
            print(f"distill-run: {stopped}", file=sys.stderr)
            return 128 + stopped.signum
        print(json.dumps(summary, indent=1))
        return 0
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"distill-run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (DistillError, OSError) as exc:  # OSError: the disk or the network, not a bug of ours
        if args.debug:
            raise
        print(f"distill-run: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
