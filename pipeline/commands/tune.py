"""`capsnet tune`: argument parsing and hand-off to the search."""

from __future__ import annotations

import argparse

import yaml

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
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective search config (YAML) and exit",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and every corner of the space, check the data, "
        "print the search (with --resume: check there is one to resume), then exit "
        "(Ray is not started)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tc = tune.load_tune_config(args.config, args.overrides)  # errors surface before Ray starts
    if args.print_config:
        search = {"search": tc.search.model_dump(mode="json")}
        print(yaml.safe_dump({**tc.base.to_dict(), **search}, sort_keys=False), end="")
        return 0
    if args.dry_run:
        print(tune.plan(tc, resume=args.resume))
        return 0
    try:
        # The config path and overrides go in so that an interrupt prints the --resume command.
        tune.run_tune(tc, config_path=args.config, overrides=args.overrides, resume=args.resume)
    except KeyboardInterrupt:  # Ctrl-C; run_tune has printed the --resume command
        return 130  # 128 + SIGINT, what a shell reports for Ctrl-C
    return 0
