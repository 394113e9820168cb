"""`capsnet`: one thin entry point that assembles the subcommands of `pipeline.commands`.

To add a subcommand, write `pipeline/commands/NAME.py` with `add_parser(subparsers)` (its
parser, `func=` a handler `(args) -> int`) and list the module in COMMANDS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from pipeline.commands import eval as eval_command
from pipeline.commands import report, shards, smoke, submit, train, tune
from pipeline.data.info import DataError
from pipeline.redact import redact
from pipeline.schema import ConfigError
from pipeline.submit import SubmitError
from pipeline.train.context import TrainingError

COMMANDS = (shards, train, eval_command, report, tune, smoke, submit)


def _version() -> str:
    try:
        return version("capsnet-cluster")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsnet",
        description="Capsule Networks at cluster scale: data, training, evaluation, search.",
    )
    parser.add_argument("--version", action="version", version=f"capsnet {_version()}")
    subparsers = parser.add_subparsers(dest="cli_command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, SubmitError, ValueError, OSError) as err:
        if os.environ.get("CAPSNET_DEBUG"):
            raise
        print(
            f"capsnet {args.cli_command}: error: {redact(str(err))}\n"
            "(set CAPSNET_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 2
    except TrainingError as err:  # the run itself failed (e.g. a non-finite loss)
        if os.environ.get("CAPSNET_DEBUG"):
            raise
        print(f"capsnet {args.cli_command}: training failed: {redact(str(err))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
