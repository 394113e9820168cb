"""`capsnet submit`: `capsnet train|tune` as a Ray Job on a running cluster (make train-cluster)."""

from __future__ import annotations

import argparse

from pipeline.commands import HelpFormatter
from pipeline.submit import HOW_TO_START, submit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit `capsnet train|tune` to a running Ray cluster as a Ray Job",
        description="Submit `capsnet train` or `capsnet tune` to a running Ray cluster as a Ray "
        "Job, follow its logs, and exit non-zero if it fails. The config is "
        "validated here first; the token is never uploaded.",
        epilog="examples:\n"
        "  make train-cluster RAY_ADDRESS=http://127.0.0.1:8265 "
        "CONFIG=configs/cluster/mnist-16gpu.yaml\n"
        "  capsnet submit train --config configs/smoke.yaml "
        "--address http://127.0.0.1:8265 --set train.epochs=1\n\n" + HOW_TO_START,
        formatter_class=HelpFormatter,
    )
    p.add_argument("command", choices=["train", "tune"], help="capsnet subcommand to run")
    p.add_argument("--config", required=True, help="YAML run (or search) config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override passed on (repeatable)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265 "
        "(none: $RAY_ADDRESS)",
    )
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir")
    p.add_argument(
        "--submission-id", default=None, help="job id (none: capsnet-<command>-<run name>-<time>)"
    )
    p.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=None,
        help="CPUs reserved for the driver process",
    )
    p.add_argument(
        "--pip-deps",
        action="store_true",
        help="install the project's dependencies (pyproject.toml, minus ray) on the "
        "nodes through the job's runtime env; for clusters whose image has only "
        "Ray (e.g. cluster/kuberay/raycluster.yaml)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and return; follow later with `ray job logs -f ID`",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the `ray job submit` command and exit (no cluster needed)",
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the cluster to answer"
    )
    p.add_argument(
        "--allow-plain-http",
        action="store_true",
        help="send the Ray token over plain http to a non-loopback address (a trusted network "
        "only; a tunnel is the documented way)",
    )
    p.set_defaults(func=submit)
