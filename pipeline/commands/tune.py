"""`capsnet tune`: argument parsing and hand-off to the search."""

from __future__ import annotations

import argparse

from pipeline import tune
from pipeline.commands import HelpFormatter, add_config_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune search over routing iterations, lr, ... (ASHA)",
        description=tune.__doc__,
        formatter_class=HelpFormatter,
    )
    add_config_options(p, "search")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted search: finished trials are kept, unfinished resume",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tc = tune.load_tune_config(args.config, args.overrides)  # errors surface before Ray starts
    try:
        # The config path and overrides go in so that an interrupt prints the --resume command.
        tune.run_tune(tc, config_path=args.config, overrides=args.overrides, resume=args.resume)
    except KeyboardInterrupt:  # Ctrl-C; run_tune has printed the --resume command
        return 130  # 128 + SIGINT, what a shell reports for Ctrl-C
    return 0
