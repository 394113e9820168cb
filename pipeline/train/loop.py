"""The worker loop: one function, run by every Ray Train worker or by one local process.

Per epoch: train on this rank's share of the shards, evaluate exactly on the whole test split,
write metrics (rank 0), checkpoint (rank 0), report. Resumes from the latest checkpoint at the
next epoch with the same data order (the loader's order is a function of seed and epoch).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from capscore import MODELS
from pipeline.config import RunConfig, absolute_path, is_remote
from pipeline.data import load_dataset_info, make_loader
from pipeline.evaluate import evaluate
from pipeline.train.checkpoint import (
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from pipeline.train.context import RayContext, WorkerContext, limit_threads_to_env
from pipeline.train.outputs import RunLog, save_reconstructions


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message says at which step and in which part."""


def run_dir_for(cfg: RunConfig) -> Path:
    """Where metrics, TensorBoard events, figures and best/last checkpoints go.

    The run's own folder for local storage; for s3:// / gs:// storage a local staging folder
    (Ray uploads the checkpoints, which also carry the metrics).
    """
    if is_remote(cfg.run.storage_path):
        return Path(tempfile.gettempdir()) / "capsnet-runs" / cfg.run.name
    return Path(absolute_path(cfg.run.storage_path)) / cfg.run.name


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_loop(config: dict[str, Any], context: WorkerContext | None = None) -> None:
    """Train one run. `config` is RunConfig.to_dict(); `context` defaults to Ray's."""
    cfg = RunConfig.from_dict(config)
    ctx = context or RayContext()
    limit_threads_to_env()
    rank0 = ctx.world_rank == 0
    run_dir = run_dir_for(cfg)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    info = load_dataset_info(cfg.data.shards)
    kind = cfg.model["type"]
    model_config = cfg.model_config(tuple(info.image_shape), info.num_classes)
    model = MODELS[kind][0](model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay)
    decay, every = cfg.train.lr_decay, cfg.train.lr_decay_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decay ** (step / every))
    scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None

    start_epoch, best_acc = 0, -1.0
    ckpt_path, ckpt = _newest_checkpoint(ctx, run_dir, cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch = ckpt["next_epoch"]
        best_acc = ckpt["metrics"].get("best_test_accuracy", -1.0)
        if rank0:
            print(f"[capsnet] resuming {cfg.run.name} at epoch {start_epoch} from {ckpt_path}", flush=True)

    model = ctx.prepare_model(model)  # moves to the device; DDP when world_size > 1
    if cfg.train.compile:
        model = torch.compile(model)
    device = ctx.device
    autocast = autocast_for(cfg.train.precision, device)
    log = RunLog(run_dir, enabled=rank0)
    if start_epoch >= cfg.train.epochs:  # a finished run: report its last metrics, train nothing
        ctx.report(dict(ckpt["metrics"], already_finished=True), None)
        return

    per_rank_batch = cfg.train.batch_size // ctx.world_size
    for epoch in range(start_epoch, cfg.train.epochs):
        _maybe_crash(cfg, epoch, rank0)
        loader = make_loader(cfg.data.shards, cfg.data.train_split, batch_size=per_rank_batch,
                             rank=ctx.world_rank, world_size=ctx.world_size,
                             num_workers=cfg.data.loader_workers, epoch=epoch,
                             seed=cfg.train.seed, augment=cfg.data.augment, training=True,
                             shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
                             verify_checksums=cfg.data.verify_checksums and epoch == start_epoch)
        t0 = time.perf_counter()
        train_stats = _train_epoch(model, loader, optimizer, scheduler, scaler, autocast, device,
                                   cfg, epoch, ctx)
        train_time = time.perf_counter() - t0
        eval_loader = make_loader(cfg.data.shards, cfg.data.eval_split,
                                  batch_size=cfg.data.eval_batch_size, rank=ctx.world_rank,
                                  world_size=ctx.world_size, num_workers=cfg.data.loader_workers,
                                  training=False, augment=False, on_error=cfg.data.on_error)
        result = evaluate(model, eval_loader, device, info.num_classes, autocast, ctx.distributed)
        best_acc = max(best_acc, result.accuracy)
        metrics = {
            "epoch": epoch + 1, "steps": train_stats["steps"],
            "train_loss": train_stats["loss"], **{f"train_{k}": v for k, v in train_stats["parts"].items()},
            "test_accuracy": result.accuracy, "test_error": 1.0 - result.accuracy,
            "test_samples": result.total, "best_test_accuracy": best_acc,
            **{f"test_{k}": v for k, v in result.mean_losses().items()},
            "lr": scheduler.get_last_lr()[0], "epoch_time_s": train_time,
            "images_per_s": train_stats["samples"] * ctx.world_size / max(train_time, 1e-9),
            "skipped_samples": _skipped(loader) + _skipped(eval_loader),
            **_per_rank(train_stats, device, ctx),
        }
        ckpt_dir = None
        if rank0:
            log.epoch(metrics)
            ckpt_dir = _save(cfg, run_dir, model, optimizer, scheduler, scaler, epoch, metrics,
                             kind, model_config, is_best=result.accuracy >= best_acc)
            _figures(unwrap(model), cfg, device, run_dir)
            print(f"[capsnet] epoch {epoch + 1}/{cfg.train.epochs} test acc {result.accuracy:.4f} "
                  f"loss {train_stats['loss']:.4f} {metrics['images_per_s']:.0f} img/s", flush=True)
        ctx.report(metrics, ckpt_dir)
        if ckpt_dir is not None:  # reported (Ray has uploaded it) and copied to best/last
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.close()


def _train_epoch(model, loader, optimizer, scheduler, scaler, autocast, device, cfg: RunConfig,
                 epoch: int, ctx: WorkerContext) -> dict[str, Any]:
    """One pass over this rank's batches. Loss parts are accumulated on the device and checked
    for NaN/inf every `log_every` steps, so there is no host sync per step."""
    inner = unwrap(model)
    model.train()
    n_batches = len(loader)
    if cfg.train.max_steps_per_epoch:
        n_batches = min(n_batches, cfg.train.max_steps_per_epoch)
    pending: list[torch.Tensor] = []   # per-step [total, *parts] since the last check
    names: list[str] = []
    sums: torch.Tensor | None = None
    samples, step0 = 0, epoch * len(loader)
    bar = _progress(n_batches, epoch, cfg, ctx)
    step = -1
    fingerprint = torch.zeros((), device=device)
    for step, (images, targets) in enumerate(loader):
        if step >= n_batches:
            break  # the same cap on every rank, so DDP stays in step
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast:
            out = model(images, targets)
            loss = inner.loss(out, images, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss.total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.total.backward()
            optimizer.step()
        scheduler.step()
        names = ["total", *loss.parts]
        pending.append(torch.stack([loss.total.detach().float(),
                                    *[p.detach().float() for p in loss.parts.values()]]))
        samples += images.shape[0]
        if step == 0:  # which data this rank saw, for the run's per-rank summary
            fingerprint = images.detach().float().sum() + targets.float().sum()
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == n_batches:
            block = torch.stack(pending)
            _check_finite(block, names, step0 + step + 1 - len(pending))
            sums = block.sum(0) if sums is None else sums + block.sum(0)
            pending.clear()
            if bar is not None:
                bar.set_postfix(loss=f"{float(sums[0]) / (step + 1):.4f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    steps = min(n_batches, step + 1)
    means = (sums / max(steps, 1)).tolist() if sums is not None else [math.nan] * max(len(names), 1)
    return {"steps": steps, "samples": samples, "loss": means[0], "fingerprint": fingerprint,
            "parts": dict(zip(names[1:], means[1:], strict=True))}


def _per_rank(stats: dict[str, Any], device: torch.device, ctx: WorkerContext) -> dict[str, Any]:
    """Steps and a first-batch fingerprint of every rank, so a run shows that all ranks took
    the same number of steps on different data."""
    mine = torch.stack([torch.tensor(float(stats["steps"]), device=device),
                        stats["fingerprint"].to(device).float()])
    if ctx.distributed:
        gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(gathered, mine)
    else:
        gathered = [mine]
    return {"rank_steps": [int(g[0]) for g in gathered],
            "rank_first_batch_sums": [round(float(g[1]), 3) for g in gathered]}


def _check_finite(block: torch.Tensor, names: list[str], first_step: int) -> None:
    bad = ~torch.isfinite(block)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        part = names[col] if col else next((n for n, b in zip(names[1:], bad[row, 1:], strict=True) if b), "total")
        raise NonFiniteLossError(
            f"non-finite loss at global step {first_step + row} (0-based): part '{part}' = "
            f"{float(block[row, names.index(part)])}; lower train.lr or use train.precision=fp32")


def _progress(total: int, epoch: int, cfg: RunConfig, ctx: WorkerContext):
    if not (ctx.interactive and ctx.world_rank == 0):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch", leave=False)


def _save(cfg, run_dir, model, optimizer, scheduler, scaler, epoch, metrics, kind, model_config,
          is_best: bool) -> Path:
    """Rank 0: checkpoint for Ray (a temp folder it uploads) + best/last copies in the run dir."""
    staging = Path(tempfile.mkdtemp(prefix=f"capsnet-ckpt-e{epoch + 1}-"))
    path = save_checkpoint(staging, model=model, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, next_epoch=epoch + 1, run_config=cfg.to_dict(),
                           model_kind=kind, model_config=model_config, metrics=metrics)
    copy_checkpoint(path, run_dir / "checkpoints" / "last")
    if is_best:
        copy_checkpoint(path, run_dir / "checkpoints" / "best")
    return staging


@torch.no_grad()
def _figures(model, cfg: RunConfig, device, run_dir: Path) -> None:
    """reconstructions.png from the first 8 test images, decoder masked by the prediction.

    A streaming loader in this process stops after its first batch, so this reads 8 samples,
    not another pass (or another set of worker processes) over the eval split."""
    if getattr(model, "decoder", None) is None:
        return
    first = make_loader(cfg.data.shards, cfg.data.eval_split, batch_size=8, training=False,
                        augment=False, on_error=cfg.data.on_error)
    images, _ = next(iter(first))
    images = images.to(device)
    was_training = model.training
    model.eval()
    out = model(images)
    model.train(was_training)
    save_reconstructions(images, out.reconstructions, run_dir / "reconstructions.png",
                         out.scores.argmax(1))


def _skipped(loader) -> int:
    stats = getattr(loader, "stats", None)
    if stats is None:
        return 0
    if isinstance(stats, dict):
        return int(stats.get("skipped_samples", 0))
    return int(getattr(stats, "skipped_samples", 0))


def _newest_checkpoint(ctx: WorkerContext, run_dir: Path, cfg: RunConfig):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run.

    Ray's latest registered checkpoint, or the run folder's `last` copy if that is newer (a
    worker that dies right after reporting can leave Ray without the newest one); only when
    the run has neither, `run.resume_from`.
    """
    found = []
    for path in (ctx.latest_checkpoint(), run_dir / "checkpoints" / "last" / "checkpoint.pt"):
        if path is not None and path.is_file() and all(path != p for p, _ in found):
            found.append((path, load_checkpoint(path)))
    if found:
        return max(found, key=lambda pc: pc[1]["next_epoch"])
    if cfg.run.resume_from:
        path = Path(cfg.run.resume_from).expanduser()
        return path, load_checkpoint(path)
    return None, None


def _maybe_crash(cfg: RunConfig, epoch: int, rank0: bool) -> None:
    """TEST ONLY fault injection: die once, hard, at the start of debug.crash_once_at_epoch."""
    d = cfg.debug
    if not rank0 or epoch != d.crash_once_at_epoch or not d.crash_marker:
        return
    marker = Path(d.crash_marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"crashed at epoch {epoch}\n")
    print(f"[capsnet] debug: injected crash at epoch {epoch}", flush=True)
    os._exit(1)

