"""`capsnet train`: argument parsing and hand-off to the trainer."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import HelpFormatter, add_config_options
from pipeline.config import load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train CapsNet / the baseline CNN (Ray TorchTrainer or --local)",
        description="Train from a YAML run config. Runs on the local machine (embedded Ray) or "
        "on the cluster at $RAY_ADDRESS. Rerunning the same command (same run.name "
        "and run.storage_path) resumes the run.",
        epilog="examples:\n"
        "  capsnet train --config configs/mnist.yaml --set train.lr=3e-4\n"
        "  capsnet train --config configs/smoke.yaml --local",
        formatter_class=HelpFormatter,
    )
    add_config_options(p)
    p.add_argument(
        "--local",
        action="store_true",
        help="run the same worker loop in this process without Ray (1 worker)",
    )
    p.add_argument(
        "--resume-from",
        metavar="PATH",
        help="start from this checkpoint.pt when the run has no checkpoint yet",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"run.resume_from={args.resume_from}")
    cfg = load_config(args.config, overrides)  # every config error surfaces before Ray starts
    if args.local and cfg.run.num_workers != 1:
        print(
            f"[capsnet] --local runs one worker; ignoring run.num_workers={cfg.run.num_workers}",
            file=sys.stderr,
        )
        cfg = cfg.replace(run={"num_workers": 1})
    from pipeline.train.trainer import train

    summary = train(cfg, local=args.local)
    print(summary.line())
    return 0
