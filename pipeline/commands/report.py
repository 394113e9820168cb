"""`capsnet report`: what a checkpoint's capsules learned, as report.md and PNGs (issue 12)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from pipeline.commands import HelpFormatter
from pipeline.config import ConfigError
from pipeline.data import DatasetInfo, load_dataset_info
from pipeline.evaluate import (
    IncompatibleDataError,
    check_compatible,
    checkpoint_file,
    resolve_device,
    training_label_kind,
)
from pipeline.report import SECTIONS, ReportModel, ReportSettings, write_report
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint

DEFAULTS = ReportSettings()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="what the capsules learned: report.md with figures, against a baseline CNN",
        description=(
            "Write report.md, report.json and PNGs for a checkpoint on a shard folder's test\n"
            "split, one section each (skipped, with the reason in report.md, where it does not\n"
            "apply to the checkpoint or the shards):\n"
            "  accuracy         accuracy, per-class accuracy, confusion matrix (whole split)\n"
            "  reconstructions  inputs above reconstructions from the longest capsule\n"
            "  perturbation     each pose dimension moved over [-0.25, 0.25] (paper Fig. 4)\n"
            "  equivariance     R² of pose (CapsNet) or penultimate features (CNN) against\n"
            "                   known shifts, rotations and scalings, vs its chance level\n"
            "  affine           accuracy by rotation and shear (affine-test shards only)\n"
            "  overlapping      two-object accuracy, each object decoded from its own\n"
            "                   capsule (MultiMNIST shards only)\n"
            "  routing          couplings; accuracy and time vs routing iterations 1-5\n"
            "The report's first lines give the exact command that produced every number."
        ),
        epilog="examples:\n  capsnet report --checkpoint runs/affine-capsnet --baseline "
        "runs/affine-cnn --shards shards/affine --out reports/affine\n  capsnet report "
        "--checkpoint runs/multimnist --shards shards/multimnist --samples 64",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint.pt, its folder, a run folder (its best), RUN/best or RUN/last",
    )
    p.add_argument(
        "--baseline",
        help="a CNN checkpoint (model.type=cnn) trained on the same data, measured beside it",
    )
    p.add_argument("--shards", required=True, help="shard folder (or URL) with dataset.json")
    p.add_argument(
        "--out", help="folder for report.md and the PNGs (none: report/ beside the checkpoint)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=DEFAULTS.samples,
        help="test images for the equivariance measure and the pictures",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=DEFAULTS.eval_samples,
        help="test samples for the routing sweep and the affine bins (0: all; accuracy and "
        "the confusion matrix always use the whole split)",
    )
    p.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="images per forward pass"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--sections",
        default="",
        metavar="NAME,...",
        help="write only these sections, comma-separated (default: all): "
        + ",".join(s.name for s in SECTIONS),
    )
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The invocation with every option spelt out: rerunning it reproduces the report."""
    words = ["capsnet", "report", "--checkpoint", args.checkpoint]
    if args.baseline:
        words += ["--baseline", args.baseline]
    words += ["--shards", args.shards, "--out", str(out)]
    words += ["--samples", str(args.samples), "--eval-samples", str(args.eval_samples)]
    words += ["--batch-size", str(args.batch_size), "--device", args.device]
    if args.sections:
        words += ["--sections", args.sections]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    settings = ReportSettings(
        samples=args.samples,
        eval_samples=args.eval_samples,
        batch_size=args.batch_size,
        sections=tuple(s.strip() for s in args.sections.split(",") if s.strip()),
    )
    device = resolve_device(args.device)  # before the (slow) checkpoint and data are read
    given = {"--checkpoint": args.checkpoint, "--baseline": args.baseline}
    payloads = {opt: read_checkpoint(path, opt) for opt, path in given.items() if path is not None}
    if "--baseline" in payloads and payloads["--baseline"][1]["model_kind"] != "cnn":
        raise ConfigError(
            f"--baseline {args.baseline}: a {payloads['--baseline'][1]['model_kind']} "
            "checkpoint; the baseline must be a CNN (trained with model.type=cnn)"
        )
    info = load_dataset_info(args.shards)
    info.split(settings.split)  # a DataError naming the splits there are
    models = [model_for(opt, *payloads[opt], args.shards, info) for opt in payloads]
    out = Path(args.out) if args.out else models[0].checkpoint.parent / "report"
    path = write_report(models, info, out, settings, command=command_line(args, out), device=device)
    print(f"report: {path}")
    return 0


def read_checkpoint(path: str, option: str) -> tuple[Path, dict[str, Any]]:
    """(the checkpoint.pt, its contents): a one-line error for an empty, missing or
    unreadable one."""
    ckpt = checkpoint_file(path, option)
    return ckpt, load_checkpoint(ckpt)


def model_for(
    option: str, ckpt: Path, payload: dict[str, Any], shards: str, info: DatasetInfo
) -> ReportModel:
    """The checkpoint's model, checked against the shards (a one-line error naming it)."""
    module = model_from_checkpoint(payload)
    try:
        check_compatible(
            module.config, info, shards=shards, trained_label_kind=training_label_kind(payload)
        )
    except IncompatibleDataError as err:
        raise IncompatibleDataError(f"{option} {ckpt}: {err}") from err
    trained_on = ((payload.get("run_config") or {}).get("data") or {}).get("shards")
    kind = "CapsNet" if payload["model_kind"] == "capsnet" else "CNN"
    return ReportModel(
        name=f"{kind} (baseline)" if option == "--baseline" else kind,
        module=module,
        checkpoint=ckpt,
        epochs=int(payload["next_epoch"]),
        trained_on=trained_on if isinstance(trained_on, str) else None,
    )
