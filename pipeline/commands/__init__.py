"""The `capsnet` subcommands: one module each, a thin parser + handler.

Each module has `add_parser(subparsers)`, which builds its parser and sets `func=` to a
handler `(args) -> int`. `pipeline.cli` lists them in COMMANDS order.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows every option's default (flags, empty
    lists and unset options have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_config_options(p: argparse.ArgumentParser, what: str = "run") -> None:
    """--config / --set, shared by train and tune."""
    p.add_argument(
        "--config",
        required=what == "search",
        metavar="YAML",
        help=f"YAML {what} config, e.g. configs/"
        f"{'tune-mnist' if what == 'search' else 'mnist'}.yaml",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, values parsed as YAML, e.g. --set train.lr=3e-4 (repeatable)",
    )
