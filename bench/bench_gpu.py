"""Feeding a GPU (issue 13): one table of what one device does with the paper's MNIST CapsNet.

    bash bench/gpu.sh                      # on a GPU machine: torch, no network, no Ray
    .venv/bin/python bench/bench_gpu.py --quick --preset tiny   # CPU check (CUDA rows skipped)

Writes MNIST-sized synthetic shards (28x28x1, 10 classes) to a temp folder, then prints one
markdown table, rows in this order:

    loader      images/s of the streaming loader alone (shards -> finished batch on device)
    model       train steps on a batch already on the device (uint8 + shifts: the finishing
                shift + float op included), per precision mode and batch size
    end-to-end  the same step fed by the real loader from the shards (workers, pinned memory)
    fixed       per-epoch fixed cost of the real worker loop (no-Ray local mode): (wall of E
                epochs - wall of 1) / (E - 1) with train.max_steps_per_epoch=1

Modes: fp32; bf16 (autocast, capscore keeps squash/routing/losses fp32); bf16+compile
(train.compile: forward + loss compiled, channels-last on CUDA). torch.compile and CUDA
peak memory need CUDA: on CPU those rows say "skipped". Rows that would overrun --budget-s
are skipped and say so, so the script always ends inside its budget (default 420 s).
Ray is blocked on purpose (sys.modules): the no-Ray path must not import it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.modules.setdefault("ray", None)  # type: ignore[arg-type]  # any `import ray` now fails
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from capscore import CapsNet, CapsNetConfig  # noqa: E402
from pipeline.config import TrainSection, load_config  # noqa: E402
from pipeline.data import Batch, ShardsConfig, open_loader, write_shards  # noqa: E402
from pipeline.train.checkpoint import TrainState  # noqa: E402
from pipeline.train.loop import TrainStep  # noqa: E402
from pipeline.train.trainer import train  # noqa: E402

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}


class Clock:
    """Wall-clock budget for the whole script: rows that would overrun it are skipped."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f}"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def model_config(preset: str) -> CapsNetConfig:
    return CapsNetConfig.mnist() if preset == "mnist" else CapsNetConfig.tiny(image_size=28)


def step_for(mode: str, preset: str, device: torch.device) -> tuple[TrainStep, TrainState]:
    precision, compile = MODES[mode]
    torch.manual_seed(0)
    section = TrainSection(precision=precision, compile=compile)
    state = TrainState.create(CapsNet(model_config(preset)).to(device), section, device)
    return TrainStep(state, section, device), state


def resident_batch(batch_size: int, device: torch.device) -> Batch:
    """A loader-shaped batch (uint8 pixels, pending shifts) already on the device."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8, generator=g)
    shifts = torch.randint(-2, 3, (batch_size, 2), generator=g)
    labels = torch.randint(0, 10, (batch_size,), generator=g)
    return Batch(images.to(device), labels.to(device), shifts=shifts.to(device), max_shift=2)


def model_row(mode, batch_size, args, device) -> tuple[float, str]:
    step, _ = step_for(mode, args.preset, device)
    batch = resident_batch(batch_size, device)
    for _ in range(args.warmup):  # compilation, cuDNN autotuning, Adam's lazy state
        step(batch)
    sync(device)
    reset_peak(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(batch)
    sync(device)
    return args.steps * batch_size / (time.perf_counter() - t), peak_mib(device)


def end_to_end_row(mode, batch_size, args, device, shards) -> tuple[float, str]:
    step, _ = step_for(mode, args.preset, device)
    loader = open_loader(
        shards,
        "train",
        batch_size=batch_size,
        loader_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    warm = resident_batch(batch_size, device)
    for _ in range(args.warmup):
        step(warm)
    sync(device)
    reset_peak(device)
    n, t = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if args.e2e_steps and i >= args.e2e_steps:
            break
        step(batch)
        n += len(batch)
    sync(device)
    rate = n / (time.perf_counter() - t)
    loader.close()
    return rate, peak_mib(device)


def loader_row(workers: int, batch_size: int, device, shards) -> float:
    loader = open_loader(
        shards,
        "train",
        batch_size=batch_size,
        loader_workers=workers,
        pin_memory=device.type == "cuda",
    )
    n, t = 0, time.perf_counter()
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        n += len(batch)
    sync(device)
    rate = n / (time.perf_counter() - t)
    loader.close()
    return rate


def fixed_cost(args, shards: str, work: Path, epochs: int) -> tuple[float, float]:
    """(per-epoch seconds beyond the first epoch, wall of the 1-epoch run)."""
    walls = []
    for n in (1, 1, epochs):  # the first run pays one-time costs (lazy imports, CUDA init)
        cfg = load_config(
            ROOT / "configs" / "mnist.yaml",
            [
                f"data.shards={shards}",
                f"data.loader_workers={args.workers}",
                "train.max_steps_per_epoch=1",
                f"train.batch_size={args.fixed_batch}",
                f"train.epochs={n}",
                f"run.storage_path={work}",
                f"run.name=fixed-{n}-{len(walls)}",
                "run.report_to=[]",
                f"run.checkpoint_every={args.checkpoint_every}",
                *([] if args.preset == "mnist" else ["model.preset=tiny"]),
            ],
        )
        t = time.perf_counter()
        train(cfg, local=True)
        walls.append(time.perf_counter() - t)
    return (walls[2] - walls[1]) / (epochs - 1), walls[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU check)")
    parser.add_argument("--preset", choices=("mnist", "tiny"), default="mnist")
    parser.add_argument("--batch-sizes", default="")
    parser.add_argument("--compile-batch-sizes", default="", help="compile is slow: fewer sizes")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--samples", type=int, default=0, help="synthetic train samples")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (default: by CPUs)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    args.batch_sizes = [
        int(b) for b in (args.batch_sizes or ("8" if quick else "128,256,512,1024")).split(",")
    ]
    compile_sizes = args.compile_batch_sizes or ("" if quick else "512,1024")
    args.compile_sizes = [int(b) for b in compile_sizes.split(",") if b]
    args.samples = args.samples or (1024 if quick else 60_000)
    args.workers = (
        args.workers if args.workers >= 0 else (1 if quick else min(8, (os.cpu_count() or 2) - 2))
    )
    args.steps, args.warmup = (2, 1) if quick else (20, 3)
    args.e2e_steps = 4 if quick else 0  # 0: the whole epoch
    args.fixed_batch, args.checkpoint_every = (8, 5) if quick else (128, 5)
    fixed_epochs = 3 if quick else 6
    clock = Clock(args.budget_s)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: TF32 matmuls, as in training
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory(prefix="capsnet-gpu-bench-") as tmp:
        work, shards = Path(tmp), str(Path(tmp) / "shards")
        t = time.perf_counter()
        write_shards(
            ShardsConfig(
                dataset="synthetic",
                out=shards,
                train_samples=args.samples,
                test_samples=64 if quick else 10_000,
                shard_size=10_000,
            )
        )
        print(
            f"# {device_name(device)}; torch {torch.__version__}; python {platform.python_version()}; "
            f"{os.cpu_count()} CPUs; {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
        )
        print(
            f"# model {args.preset}; shards: {args.samples} synthetic 28x28 train samples, "
            f"written in {time.perf_counter() - t:.1f} s; loader workers {args.workers}"
        )
        print("| what | mode | batch | images/s | peak MiB | note |")
        print("|---|---|---:|---:|---:|---|", flush=True)

        def row(what, mode, batch, fn, cost_s, note=""):
            if mode == "bf16+compile" and device.type != "cuda":
                return print(
                    f"| {what} | {mode} | {batch} | — | — | skipped: CUDA only |", flush=True
                )
            if clock.left() < cost_s:
                return print(
                    f"| {what} | {mode} | {batch} | — | — | skipped: time budget |", flush=True
                )
            rate, peak = fn()
            print(f"| {what} | {mode} | {batch} | {rate:,.0f} | {peak} | {note} |", flush=True)

        for workers in sorted({0, args.workers}):
            row(
                "loader",
                f"{workers} workers",
                512,
                lambda w=workers: (loader_row(w, 512, device, shards), "n/a"),
                20,
                "shards -> finished batch on the device",
            )
        modes = args.modes.split(",")
        for mode in modes:
            sizes = args.compile_sizes if MODES[mode][1] else args.batch_sizes
            for b in sizes:
                cost = 90 if MODES[mode][1] else 15
                row(
                    "model",
                    mode,
                    b,
                    lambda m=mode, b=b: model_row(m, b, args, device),
                    cost,
                    "batch on the device",
                )
                row(
                    "end-to-end",
                    mode,
                    b,
                    lambda m=mode, b=b: end_to_end_row(m, b, args, device, shards),
                    cost,
                    "one epoch from the shards"
                    if not args.e2e_steps
                    else f"{args.e2e_steps} steps from the shards",
                )
        if clock.left() > 60:
            per_epoch, first = fixed_cost(args, shards, work, fixed_epochs)
            print(
                f"| fixed | fp32 | {args.fixed_batch} | — | — | per-epoch fixed cost {per_epoch:.2f} s "
                f"((wall of {fixed_epochs} epochs - wall of 1) / {fixed_epochs - 1}, 1 step per epoch, "
                f"checkpoint every {args.checkpoint_every}; first epoch {first:.1f} s) |",
                flush=True,
            )
        else:
            print("| fixed | fp32 | — | — | — | skipped: time budget |")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"# wall {time.perf_counter() - clock.start:.0f} s; peak host RSS {peak_rss:,.0f} MiB; "
        f"ray imported: {sys.modules.get('ray') is not None}"
    )
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), CUDA rows skipped"


if __name__ == "__main__":
    sys.exit(main())
