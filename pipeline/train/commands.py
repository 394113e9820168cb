"""`capsnet train`, `capsnet eval` and `capsnet smoke`: argument parsing and hand-off only."""

from __future__ import annotations

import argparse
import sys


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train CapsNet / the baseline CNN (Ray TorchTrainer or --local)",
                       description="Train from a YAML run config. Runs on the local machine "
                       "(embedded Ray) or on the cluster at $RAY_ADDRESS. Rerunning the same "
                       "command (same run.name and run.storage_path) resumes the run.")
    p.add_argument("--config", help="YAML run config, e.g. configs/mnist.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--local", action="store_true",
                   help="run the same worker loop in this process without Ray (1 worker)")
    p.add_argument("--resume-from", metavar="PATH",
                   help="start from this checkpoint.pt when the run has no checkpoint yet")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"run.resume_from={args.resume_from}")
    cfg = load_config(args.config, overrides)  # every config error surfaces before Ray starts
    if args.local and cfg.run.num_workers != 1:
        print(f"[capsnet] --local runs one worker; ignoring run.num_workers={cfg.run.num_workers}",
              file=sys.stderr)
        cfg.run.num_workers = 1
    from pipeline.train.trainer import train

    summary = train(cfg, local=args.local)
    print(summary.line())
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact accuracy, per-class accuracy and confusion matrix",
                       description="Evaluate a checkpoint on every sample of a split exactly once.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt or the folder holding it")
    p.add_argument("--shards", required=True, help="shard folder (or URL) with dataset.json")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--out", help="folder for confusion-<split>.png (default: the checkpoint's)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.shards, args.split, batch_size=args.batch_size,
                        device=args.device, num_workers=args.loader_workers, out_dir=args.out)
    return 0


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline import tune

    p = sub.add_parser("tune", help="Ray Tune search over routing iterations, lr, ... (ASHA)",
                       description=tune.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="search config, e.g. configs/tune-mnist.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the base or the search, e.g. --set search.num_samples=16")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search: finished trials are kept, unfinished resume")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from pipeline.tune import load_tune_config, run_tune

    tc = load_tune_config(args.config, args.overrides)  # errors surface before Ray starts
    run_tune(tc, resume=args.resume)
    return 0
