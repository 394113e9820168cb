"""The worker loop: one function, run by every Ray Train worker or by one local process.

Per epoch: train on this rank's share of the shards, evaluate exactly on the whole eval split,
write metrics (rank 0), checkpoint (rank 0), report. Resumes from the latest checkpoint at the
next epoch with the same data order (the loader's order is a function of seed and epoch).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from capscore import build_model
from pipeline.config import RunConfig, TrainSection, absolute_path, is_remote, parse_run_config
from pipeline.data import Batch, DatasetInfo, ShardLoader, load_dataset_info, make_loader
from pipeline.evaluate import EvalResult, IncompleteEvaluationError, evaluate, require_complete
from pipeline.figures import save_reconstructions
from pipeline.torch_utils import autocast_for, unwrap
from pipeline.train.checkpoint import (
    CheckpointError,
    CheckpointIndex,
    TrainState,
    checkpoint_name,
    load_checkpoint,
    resolve_checkpoint,
)
from pipeline.train.context import (
    LOG_FILE,
    RayContext,
    TrainingError,
    WorkerContext,
    limit_threads_to_env,
    write_fatal,
)
from pipeline.train.outputs import RunLog
from pipeline.train.storage import RAY_ENTRIES, RunStorage


class NonFiniteLossError(TrainingError):
    """The loss became NaN/inf; the message says at which step and in which part."""


@dataclass
class EpochStats:
    """What one rank's training pass over one epoch did."""

    steps: int
    samples: int
    """Images this rank trained on (padding repeats included: they were trained on)."""
    loss: float
    """Mean total loss per step."""
    parts: dict[str, float]
    """Mean of each named loss part per step."""
    seconds: float
    fingerprint: torch.Tensor = field(repr=False)
    """Sum of the first batch (images + labels): which data this rank saw."""
    samples_skipped: int = 0
    """Samples the loader could not use (corrupt shards, bad samples)."""


def metrics_row(
    epoch: int,
    stats: EpochStats,
    result: EvalResult,
    *,
    best_accuracy: float,
    lr: float,
    world_size: int,
    per_rank: dict[str, list],
) -> dict[str, Any]:
    """The one place an epoch's results become the metrics row (metrics.jsonl, Ray, Tune)."""
    return {
        "epoch": epoch + 1,
        "steps": stats.steps,
        "train_loss": stats.loss,
        **{f"train_{k}": v for k, v in stats.parts.items()},
        "test_accuracy": result.accuracy,
        "test_error": 1.0 - result.accuracy,
        "test_samples": result.total,
        "test_samples_expected": result.expected,
        "best_test_accuracy": best_accuracy,
        **{f"test_{k}": v for k, v in result.mean_losses().items()},
        "lr": lr,
        "epoch_time_s": stats.seconds,
        "images_per_s": stats.samples * world_size / max(stats.seconds, 1e-9),
        "skipped_samples": stats.samples_skipped + result.samples_skipped,
        **per_rank,
    }


def run_dir_for(cfg: RunConfig) -> Path:
    """Where metrics, TensorBoard events, figures and best/last checkpoints go.

    The run's own folder for local storage; for s3:// / gs:// storage a local staging folder
    (Ray uploads the checkpoints, which also carry the metrics), one per storage URI and run:
    `<tmp>/capsnet-runs/<name>-<hash of storage_path and name>`. Keyed by the name only, a run
    to another bucket found the old run's files (and was planned finished).
    """
    if is_remote(cfg.run.storage_path):
        uri = f"{cfg.run.storage_path}/{cfg.run.name}"  # the query too: another endpoint
        digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "capsnet-runs" / f"{cfg.run.name}-{digest}"
    return Path(absolute_path(cfg.run.storage_path)) / cfg.run.name


def train_loop(config: dict[str, Any], context: WorkerContext | None = None) -> None:
    """Train one run. `config` is RunConfig.to_dict(); `context` defaults to Ray's.

    A non-finite loss or an incomplete evaluation is deterministic: retrying from the last
    checkpoint would fail the same way. All ranks detect it at the same point; rank 0 writes
    it to the run folder's `fatal.json` (which the driver raises) and every rank ends
    normally, instead of failing the workers (which Ray would retry max_failures times)."""
    _train(parse_run_config(config), context or RayContext())


def _train(cfg: RunConfig, ctx: WorkerContext) -> None:
    limit_threads_to_env()
    rank0 = ctx.world_rank == 0
    run_dir = run_dir_for(cfg)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    if rank0:
        for path in ctx.clean_stale(run_dir):
            print(
                f"[capsnet] removed {path}, left by an earlier attempt that was killed", flush=True
            )
    storage = _storage(cfg, run_dir, ctx)
    storage.check()
    # metrics, config, index, figures (and local runs' checkpoints); the bucket is the truth:
    # staged files it lacks go, but the log the driver is writing (maybe in this folder)
    storage.pull(mirror=True, keep=[LOG_FILE])
    info = load_dataset_info(cfg.data.shards, timeout_s=cfg.data.url_timeout_s)
    # The driver filled the model from the data already (a Tune trial's may not have): a no-op
    cfg = cfg.for_data(tuple(info.image_shape), info.num_classes)
    state = TrainState.create(build_model(cfg.model), cfg.train, ctx.device)
    ckpt_path, ckpt = _newest_checkpoint(ctx, run_dir, cfg)
    if ckpt is not None:
        state.restore(ckpt)
        state.retune(cfg.train)
        if rank0:
            print(
                f"[capsnet] resuming {cfg.run.name} at epoch {state.next_epoch} from {ckpt_path}",
                flush=True,
            )
    state.model = ctx.prepare_model(state.model)  # moves to the device; DDP when world_size > 1
    log = RunLog(
        run_dir,
        enabled=rank0,
        report_to=cfg.run.report_to,
        name=cfg.run.name,
        config=cfg.to_record(),
    )
    try:
        with ExitStack() as stack:  # closed in reverse: loaders, then the log
            stack.callback(log.close)
            if ckpt is not None and ckpt_path != resume_from_path(cfg):
                log.resume(state.next_epoch, ckpt["metrics"])  # this run's own, not --resume-from
            if state.next_epoch >= cfg.train.epochs:  # finished: report its last metrics only
                ctx.report(dict(ckpt["metrics"], already_finished=True), None)
                return
            loaders = Loaders.open(cfg, info, ctx, state.next_epoch)
            stack.callback(loaders.close)
            run = Run(cfg, ctx, state, TrainStep(state, cfg.train, ctx.device), loaders, log)
            for epoch in range(state.next_epoch, cfg.train.epochs):
                _run_epoch(run, epoch, storage, run_dir)
    except (NonFiniteLossError, IncompleteEvaluationError) as err:  # the same on every rank
        if rank0:
            write_fatal(run_dir, err)
        storage.push()
        ctx.fail(err)
        return
    except BaseException:
        storage.push()  # best effort: what the run has so far (a warning if it fails)
        raise
    storage.push(strict=True)  # the run's artifacts must reach storage_path


@dataclass
class Run:
    """What a worker's epochs share: the config, the worker, the model's state and its step,
    the loaders and the log (rank 0's files; a no-op on other ranks)."""

    cfg: RunConfig
    ctx: WorkerContext
    state: TrainState
    step: TrainStep
    loaders: Loaders
    log: RunLog


@dataclass
class Loaders:
    """The run's loaders, opened once: their worker processes persist across epochs (shards
    are checked once, not per epoch)."""

    train: ShardLoader
    eval: ShardLoader
    preview: Batch | None
    """The first 8 eval images for the reconstructions figure (rank 0, decoder models)."""
    ahead: tuple[int, Iterator[Batch]] | None = None
    """(epoch, its train pass), started before that epoch (see start_ahead)."""

    def train_pass(self, epoch: int) -> Iterator[Batch]:
        """The train batches of `epoch` (the pass start_ahead began, if it was this one)."""
        if self.ahead is not None and self.ahead[0] == epoch:
            batches = self.ahead[1]
        else:
            self.train.set_epoch(epoch)
            batches = iter(self.train)
        self.ahead = None
        return batches

    def start_ahead(self, epoch: int) -> None:
        """Start `epoch`'s train pass now, so its loader workers fill their shuffle buffers
        and first batches while this epoch evaluates and checkpoints (off the critical path).
        Call after the finished pass's loader stats were read: starting resets them."""
        self.train.set_epoch(epoch)
        self.ahead = (epoch, iter(self.train))

    @classmethod
    def open(cls, cfg: RunConfig, info: DatasetInfo, ctx: WorkerContext, epoch: int) -> Loaders:
        train = _train_loader(cfg, info, ctx, epoch)
        evaluation = _eval_loader(cfg, info, ctx)
        preview = None
        if ctx.world_rank == 0:
            # In this process, 8 samples: no pass over the split, no worker processes.
            first = make_loader(
                cfg.data.model_copy(update={"loader_workers": 0}),
                cfg.data.eval_split,
                info=info,
                batch_size=8,
                training=False,
                verify_checksums=False,
                check_remote=False,
            )
            preview = next(iter(first), None)
        return cls(train, evaluation, preview)

    def close(self) -> None:
        self.train.close()
        self.eval.close()


def _run_epoch(run: Run, epoch: int, storage: RunStorage, run_dir: Path) -> None:
    """Train, evaluate, checkpoint (rank 0, when due), report, log and push one epoch."""
    cfg, ctx, state, loaders, log = run.cfg, run.ctx, run.state, run.loaders, run.log
    rank0, device = ctx.world_rank == 0, ctx.device
    _maybe_crash(cfg, epoch, rank0)
    stats = _train_epoch(run, epoch)
    if epoch + 1 < cfg.train.epochs:
        loaders.start_ahead(epoch + 1)
    result = evaluate(
        state.model,
        loaders.eval,
        device,
        autocast_for(cfg.train.precision, device),
        ctx.distributed,
    )
    # A partial evaluation (unreadable eval shards) is an error unless allowed; the result is
    # summed over ranks, so every rank decides the same way, at the same point.
    partial = require_complete(
        result,
        cfg.data.eval_split,
        allow_partial=cfg.data.allow_partial_eval,
        remedy="data.allow_partial_eval=true (with data.on_error=skip)",
    )
    if partial and rank0:
        print(f"[capsnet] warning: epoch {epoch + 1}: {partial}", flush=True)
    state.best_accuracy = max(state.best_accuracy, result.accuracy)
    state.next_epoch = epoch + 1
    metrics = metrics_row(
        epoch,
        stats,
        result,
        best_accuracy=state.best_accuracy,
        lr=state.scheduler.get_last_lr()[0],
        world_size=ctx.world_size,
        per_rank=_per_rank(stats, device, ctx),
    )
    folder = None
    if rank0:
        if _checkpoint_due(cfg, epoch):  # the figure too: both cost per epoch, not per step
            folder = ctx.checkpoint_folder(checkpoint_name(epoch + 1), run_dir)
            state.save(folder, run_config=cfg.to_record(), metrics=metrics)
            if loaders.preview is not None:
                _figures(unwrap(state.model), loaders.preview, device, run_dir)
                log.image("reconstructions", run_dir / "reconstructions.png", epoch + 1)
        print(
            f"[capsnet] epoch {epoch + 1}/{cfg.train.epochs} test acc {result.accuracy:.4f} "
            f"loss {stats.loss:.4f} {metrics['images_per_s']:.0f} img/s",
            flush=True,
        )
    ctx.report(metrics, folder)
    log.epoch(metrics)  # after the checkpoint is safe: a kill never leaves a row without one
    if folder is not None:  # persisted: now the index may name it
        index = CheckpointIndex.load(run_dir)
        for dropped in index.add(
            folder.name, epoch + 1, result.accuracy, keep=cfg.run.keep_checkpoints
        ):
            ctx.delete_checkpoint(dropped)
            if not ctx.persists_checkpoints:
                storage.remove(dropped)
        index.save(run_dir)
    storage.push()  # every epoch (a no-op for local runs); a failure is a warning, retried


def _storage(cfg: RunConfig, run_dir: Path, ctx: WorkerContext) -> RunStorage:
    """Rank 0's mirror of the run folder on s3:// / gs:// storage; for local storage, and on
    the other ranks, one whose every method does nothing."""
    if ctx.world_rank != 0 or not is_remote(cfg.run.storage_path):
        return RunStorage("", cfg.run.name, run_dir)
    # Ray uploads its checkpoints itself; a local run's checkpoints are pushed like any file.
    ignore = RAY_ENTRIES if ctx.persists_checkpoints else RAY_ENTRIES[1:]
    return RunStorage(cfg.run.storage_path, cfg.run.name, run_dir, ignore=ignore)


def _train_loader(cfg: RunConfig, info: DatasetInfo, ctx: WorkerContext, epoch: int) -> ShardLoader:
    return make_loader(
        cfg.data,
        cfg.data.train_split,
        info=info,
        batch_size=cfg.train.local_batch_size(ctx.world_size),
        rank=ctx.world_rank,
        world_size=ctx.world_size,
        epoch=epoch,
        seed=cfg.train.seed,
        training=True,
    )


def _eval_loader(cfg: RunConfig, info: DatasetInfo, ctx: WorkerContext) -> ShardLoader:
    return make_loader(
        cfg.data,
        cfg.data.eval_split,
        info=info,
        batch_size=cfg.train.local_eval_batch_size(ctx.world_size),
        rank=ctx.world_rank,
        world_size=ctx.world_size,
        training=False,
    )


class TrainStep:
    """One optimizer step on a loader batch, with no host sync: returns the [total, *parts]
    losses as a device tensor (the caller checks them every log_every steps).

    The fast paths live here, not in capscore: autocast by train.precision (capscore keeps
    squash, routing logits/softmax and the losses in fp32), and with train.compile the
    forward + loss compiled as one graph and, on CUDA, channels-last convolutions."""

    def __init__(self, state: TrainState, train: TrainSection, device: torch.device):
        self.state, self.device = state, device
        self.autocast = autocast_for(train.precision, device)
        self.channels_last = train.compile and device.type == "cuda"
        if self.channels_last:
            state.model.to(memory_format=torch.channels_last)
        self.losses = torch.compile(self._losses) if train.compile else self._losses
        self.names: list[str] = []

    def _losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        model = self.state.model
        with self.autocast:
            out = model(batch.images, batch.labels, part_classes=batch.part_classes)
            loss = unwrap(model).loss(out, batch.images, batch.labels, batch.parts)
        return {"total": loss.total, **loss.parts}

    def __call__(self, batch: Batch, poison: bool = False) -> torch.Tensor:
        """`poison`: TEST ONLY fault injection, the loss becomes NaN."""
        batch = batch.to(self.device, non_blocking=True)  # shifted, float, on the device
        if self.channels_last:
            batch = replace(
                batch, images=batch.images.contiguous(memory_format=torch.channels_last)
            )
        losses = self.losses(batch)
        if poison:
            losses["total"] = losses["total"] * float("nan")
        state = self.state
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(losses["total"]).backward()  # a no-op scale unless fp16
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        self.names = list(losses)
        return torch.stack([v.detach().float() for v in losses.values()])


def _train_epoch(run: Run, epoch: int) -> EpochStats:
    """One pass over this rank's batches. Loss parts are accumulated on the device and checked
    for NaN/inf every `log_every` steps, so there is no host sync per step."""
    cfg, ctx, state, log, step_fn = run.cfg, run.ctx, run.state, run.log, run.step
    batches, loader = run.loaders.train_pass(epoch), run.loaders.train
    device = ctx.device
    state.model.train()
    n_batches = len(loader)
    if cfg.train.max_steps_per_epoch:
        n_batches = min(n_batches, cfg.train.max_steps_per_epoch)
    pending: list[torch.Tensor] = []  # per-step [total, *parts] since the last check
    names: list[str] = []
    sums: torch.Tensor | None = None
    samples, step0, step = 0, epoch * len(loader), -1
    fingerprint = torch.zeros((), device=device)
    bar = _progress(n_batches, epoch, cfg, ctx)
    t0 = time.perf_counter()
    for step, batch in enumerate(batches):
        if step >= n_batches:
            break  # the same cap on every rank, so DDP stays in step
        batch = batch.to(device, non_blocking=True)  # shifted, float, on the device
        if step == 0:
            fingerprint = batch.images.float().sum() + batch.labels.float().sum()
        pending.append(step_fn(batch, poison=step0 + step == cfg.debug.nan_at_step))
        names = step_fn.names
        samples += len(batch)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == n_batches:
            block = torch.stack(pending)
            _check_finite(block, names, step0 + step + 1 - len(pending), ctx)
            sums = block.sum(0) if sums is None else sums + block.sum(0)
            pending.clear()
            mean_loss = float(sums[0]) / (step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            elif ctx.world_rank == 0:  # under Ray: a line per log_every steps, from rank 0
                _progress_line(
                    cfg,
                    epoch,
                    step + 1,
                    n_batches,
                    mean_loss,
                    samples * ctx.world_size,
                    time.perf_counter() - t0,
                )
            log.step(
                step0 + step + 1,
                {"loss": float(block[-1, 0]), "lr": state.scheduler.get_last_lr()[0]},
            )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    steps = min(n_batches, step + 1)
    means = (sums / max(steps, 1)).tolist() if sums is not None else [math.nan] * max(len(names), 1)
    return EpochStats(
        steps=steps,
        samples=samples,
        loss=means[0],
        parts=dict(zip(names[1:], means[1:], strict=True)),
        seconds=time.perf_counter() - t0,
        fingerprint=fingerprint,
        samples_skipped=loader.stats.samples_skipped,
    )


def _per_rank(stats: EpochStats, device: torch.device, ctx: WorkerContext) -> dict[str, list]:
    """Steps and a first-batch fingerprint of every rank, so a run shows that all ranks took
    the same number of steps on different data."""
    mine = torch.stack(
        [torch.tensor(float(stats.steps), device=device), stats.fingerprint.to(device).float()]
    )
    if ctx.distributed:
        gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(gathered, mine)
    else:
        gathered = [mine]
    return {
        "rank_steps": [int(g[0]) for g in gathered],
        "rank_first_batch_sums": [round(float(g[1]), 3) for g in gathered],
    }


def _check_finite(
    block: torch.Tensor, names: list[str], first_step: int, ctx: WorkerContext
) -> None:
    """Raise NonFiniteLossError on EVERY rank if any rank's loss went non-finite in this block
    (one small all-reduce at the check), so all ranks stop at the same point (no rank is left
    waiting in a collective) and the failure can be reported once, not retried."""
    bad = ~torch.isfinite(block)
    flag = bad.any().to(torch.int32).reshape(1)
    if ctx.distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if not bool(flag):
        return
    if not bad.any():
        raise NonFiniteLossError(
            f"non-finite loss on another rank between global steps {first_step} and "
            f"{first_step + len(block) - 1}; lower train.lr or use train.precision=fp32"
        )
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        part = (
            names[col]
            if col
            else next((n for n, b in zip(names[1:], bad[row, 1:], strict=True) if b), "total")
        )
        raise NonFiniteLossError(
            f"non-finite loss at global step {first_step + row} (0-based): part '{part}' = "
            f"{float(block[row, names.index(part)])}; lower train.lr or use train.precision=fp32"
        )


def _progress_line(
    cfg: RunConfig, epoch: int, step: int, n_batches: int, loss: float, images: int, seconds: float
) -> None:
    """`[capsnet] epoch 2/10 step 50/468 loss 0.1234 812 img/s ETA 1h02m`: this epoch's rate
    applied to the steps left in it and in the epochs after it (evaluation not counted)."""
    per_step = seconds / max(step, 1)
    left = (n_batches - step) + (cfg.train.epochs - epoch - 1) * n_batches
    eta = int(per_step * left)
    hours, rest = divmod(eta, 3600)
    eta_text = f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
    print(
        f"[capsnet] epoch {epoch + 1}/{cfg.train.epochs} step {step}/{n_batches} "
        f"loss {loss:.4f} {images / max(seconds, 1e-9):.0f} img/s ETA {eta_text}",
        flush=True,
    )


def _progress(total: int, epoch: int, cfg: RunConfig, ctx: WorkerContext):
    if not (ctx.interactive and ctx.world_rank == 0):
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch", leave=False
    )


def _checkpoint_due(cfg: RunConfig, epoch: int) -> bool:
    """Every run.checkpoint_every epochs, and after the last one."""
    done = epoch + 1
    return done % cfg.run.checkpoint_every == 0 or done == cfg.train.epochs


@torch.no_grad()
def _figures(model, preview: Batch, device, run_dir: Path) -> None:
    """reconstructions.png from the first 8 eval images, decoder masked by the prediction."""
    if getattr(model, "decoder", None) is None:
        return
    images = preview.to(device).images
    was_training = model.training
    model.eval()
    out = model(images)
    model.train(was_training)
    save_reconstructions(
        images, out.reconstructions, run_dir / "reconstructions.png", out.scores.argmax(1)
    )


def _newest_checkpoint(ctx: WorkerContext, run_dir: Path, cfg: RunConfig):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run.

    The newest that loads of: Ray's latest registered checkpoint and the run folder's own
    checkpoint folders (a worker that dies right after reporting can leave Ray without the
    newest one; a truncated file is skipped with a warning naming it, an OSError fails). Only
    when the run has none, `run.resume_from`.
    """
    latest = ctx.latest_checkpoint()
    try:
        found = _load_checkpoints([latest, *sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))])
    finally:
        ctx.release_checkpoint(latest)  # read into memory: a download is not needed any more
    if found:
        return max(found.items(), key=lambda pc: pc[1]["next_epoch"])
    path = resume_from_path(cfg)
    if path is not None:
        return path, load_checkpoint(path)
    return None, None


def _load_checkpoints(candidates: list[Path | None]) -> dict[Path, dict[str, Any]]:
    found: dict[Path, dict[str, Any]] = {}
    for path in candidates:
        if path is None or path in found or not path.is_file():
            continue
        try:
            found[path] = load_checkpoint(path)
        except CheckpointError as err:  # truncated, empty or not a checkpoint: use an older one
            # (an OSError is the storage's, not the file's: it fails the run, since an older
            # checkpoint would drop the later epochs' metrics and overwrite their folders)
            print(
                f"[capsnet] warning: skipping checkpoint {path}: cannot load it "
                f"({type(err).__name__}: {err})",
                flush=True,
            )
    return found


def resume_from_path(cfg: RunConfig) -> Path | None:
    """The checkpoint.pt that run.resume_from names, if set."""
    return resolve_checkpoint(cfg.run.resume_from) if cfg.run.resume_from else None


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
