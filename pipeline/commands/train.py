"""`capsnet train`: argument parsing and hand-off to the trainer."""

from __future__ import annotations

import argparse
import time

import yaml

from pipeline.commands import HelpFormatter, add_config_options
from pipeline.config import DATA_FIELDS, RunConfig, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train CapsNet / the baseline CNN (Ray TorchTrainer or --local)",
        description="Train from a YAML run config. Runs on the local machine (embedded Ray) or "
        "on the cluster at $RAY_ADDRESS. Rerunning the same command (same run.name and "
        "run.storage_path) resumes the run, if its config is the same (keys that are safe to "
        "change, such as train.epochs, excepted).",
        epilog="examples:\n"
        "  capsnet train --config configs/mnist.yaml --set train.lr=3e-4\n"
        "  capsnet train --config configs/smoke.yaml --local\n"
        "  capsnet train --config configs/mnist.yaml --set train.epochs=80   # extend a run",
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
        help="start a new run from this checkpoint (a checkpoint.pt, its folder, or "
        "a run folder: its best); an error if the run has checkpoints already",
    )
    p.add_argument(
        "--new-run",
        action="store_true",
        help="start a new run: run.name gets a timestamp suffix (nothing is deleted)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config differs from the run's (the new values "
        "apply from the next epoch; config.yaml records them)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the effective config (YAML) and exit"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, check the data and say whether the run would start, resume "
        "or refuse, then exit (no Ray)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output too (it always goes to the run's log.txt)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"run.resume_from={args.resume_from}")
    cfg = load_config(args.config, overrides)  # every config error surfaces before Ray starts
    if args.new_run:
        cfg = cfg.replace(run={"name": f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"})
        print(f"[capsnet] new run: {cfg.run.name}", flush=True)
    if args.print_config:
        print(print_config(cfg), end="")
        return 0
    from pipeline.train.trainer import dry_run, train

    if args.dry_run:
        print(dry_run(cfg, local=args.local, allow_config_change=args.allow_config_change))
        return 0
    summary = train(
        cfg, local=args.local, allow_config_change=args.allow_config_change, verbose=args.verbose
    )
    print(summary.line())
    return 0


def print_config(cfg: RunConfig) -> str:
    """The effective config as YAML, the model written out in full; the test-only `debug:`
    section left out. Fields that come from the shards are named in a comment."""
    raw = cfg.to_dict()
    del raw["debug"]
    from_data = [k for k in DATA_FIELDS if k not in raw["model"]]
    note = (
        f"# model.{', model.'.join(from_data)}: from the shards' dataset.json at start\n"
        if from_data
        else ""
    )
    return note + yaml.safe_dump(raw, sort_keys=False)
