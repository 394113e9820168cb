"""Ray assembly: the run config -> a TorchTrainer (Ray Train V2) -> a summary.

`build_trainer` is shared with Ray Tune: a Tune trial builds the same TorchTrainer.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, absolute_path, is_remote
from pipeline.train.checkpoint import INDEX_FILE, CheckpointIndex, resolve_checkpoint
from pipeline.train.console import DriverConsole, LocalConsole
from pipeline.train.context import (
    CHECKPOINT_FILE,
    FATAL_FILE,
    LOG_FILE,
    LocalContext,
    TrainingError,
    read_fatal,
)
from pipeline.train.lock import RunLock
from pipeline.train.loop import run_dir_for, train_loop
from pipeline.train.outputs import read_metrics
from pipeline.train.resume import CONFIG_FILE, check_resume, plan_resume, write_config
from pipeline.train.storage import RAY_ENTRIES, RunStorage


@dataclass
class Summary:
    name: str
    run_dir: Path
    epochs: int
    best_test_accuracy: float
    last_images_per_s: float
    checkpoint: str | None = None
    outputs: str = ""
    """Where the run's files are: the run folder, or its s3:// / gs:// URI."""

    def line(self) -> str:
        acc = self.best_test_accuracy
        where = self.outputs or str(self.run_dir)
        best = f"\n[capsnet] best checkpoint: {self.checkpoint}" if self.checkpoint else ""
        return (
            f"[capsnet] done: {self.name}: {self.epochs} epochs, best test accuracy "
            f"{acc:.4f} (error {100 * (1 - acc):.2f}%), {self.last_images_per_s:.0f} img/s; "
            f"outputs in {where}{best}\n"
            f"[capsnet] curves: tensorboard --logdir {where}/tensorboard"
        )


def resolve_use_gpu(setting: bool | str) -> bool:
    """auto: GPUs if the connected Ray cluster has any (or, before Ray starts, this machine)."""
    if setting != "auto":
        return bool(setting)
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except ImportError:
        pass
    import torch

    return torch.cuda.is_available()


def build_trainer(
    cfg: RunConfig,
    *,
    storage_path: str | None = None,
    name: str | None = None,
    config_dict: dict[str, Any] | None = None,
    callbacks: list | None = None,
):
    """The TorchTrainer for this run (used by `capsnet train` and by every Tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    if cfg.run.num_workers == "auto":  # resolve_workers first: auto means this machine's
        raise ConfigError("run.num_workers=auto must be resolved before the trainer is built")
    use_gpu = resolve_use_gpu(cfg.run.use_gpu)
    return TorchTrainer(
        train_loop,
        train_loop_config=config_dict or cfg.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=name or cfg.run.name,
            storage_path=storage_path or absolute_path(cfg.run.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="test_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
        ),
    )


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join RAY_ADDRESS's cluster if set, else start Ray embedded in this process.

    An embedded instance always serves its dashboard (the state API), on 127.0.0.1 at a port
    that was free a moment before, and every process it starts (raylet, so every worker) gets
    RAY_API_SERVER_ADDRESS naming it. Ray Train V2's PlacementGroupCleaner, and its state actor,
    ask the state API whether the run's controller is alive; without that variable they look
    for it (ray.dashboard.utils.get_address_for_submission_client): /tmp/ray/ray_current_cluster,
    else the only raylet `ps` shows ("Found multiple active Ray instances": the cleaner's thread
    dies), then that instance's advertised dashboard address, which a dashboard-less instance
    sets to 127.0.0.1:8265 without serving it. A neighbour's dashboard there does not know the
    controller: "is dead", the cleaner removes the run's placement group, its workers die. Tune
    needs the cleaner too: it frees the placement group of a trial that ASHA stops.
    `dashboard` is kept for callers: an embedded instance needs its dashboard either way.
    """
    import socket

    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return

    def port_is_free(port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's own check
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    import ray._private.ray_constants as ray_constants

    key = "RAY_API_SERVER_ADDRESS"
    previous = {k: os.environ.get(k) for k in (key, _SINGLE_NODE)}
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    for attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Only for the processes ray.init starts: restored below, so that a later Ray
        # instance in this process never inherits an address that is gone (or someone else's).
        os.environ[key] = f"http://127.0.0.1:{port}"
        # Ray's single-machine mode (its default on macOS/Windows): the node's address is
        # 127.0.0.1, so the GCS, raylet, workers, agents and metrics bind to loopback instead
        # of every interface (Ray ignores _node_ip_address="127.0.0.1" otherwise and picks
        # the routable address). The started processes read the variable; this one the
        # constant.
        os.environ[_SINGLE_NODE] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            # address="local": always a fresh embedded instance, never whatever cluster another
            # `ray start` left on this machine (that is what RAY_ADDRESS is for). Loopback only.
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                _node_ip_address="127.0.0.1",
                log_to_driver=True,
            )
            return
        except Exception:
            ray.shutdown()
            if attempt == 2 or port_is_free(port):  # not a lost race for the port: a real error
                raise
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for its single-machine mode (everything on 127.0.0.1); "0" turns it on."""


def summarize(cfg: RunConfig) -> Summary:
    run_dir = run_dir_for(cfg)
    rows = read_metrics(run_dir)
    best = max((r["test_accuracy"] for r in rows), default=float("nan"))
    last = rows[-1] if rows else {}
    best_name = CheckpointIndex.load(run_dir).best
    ckpt = run_dir / str(best_name) / CHECKPOINT_FILE
    return Summary(
        name=cfg.run.name,
        run_dir=run_dir,
        epochs=int(last.get("epoch", 0)),
        best_test_accuracy=best,
        last_images_per_s=float(last.get("images_per_s", 0.0)),
        checkpoint=str(ckpt) if best_name and ckpt.is_file() else None,
    )


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_workers(cfg: RunConfig, *, local: bool = False) -> tuple[RunConfig, str]:
    """(the config with a number of workers, a line saying what was chosen and why).

    `auto` is every GPU of this machine (when GPUs are used), else one CPU worker; `--local`
    runs one. On a cluster (RAY_ADDRESS) auto is refused: what the cluster offers to this job
    is not guessed."""
    workers = cfg.run.num_workers
    if local:
        note = "" if workers in ("auto", 1) else f" (--local runs one; ignoring {workers})"
        return cfg.replace(run={"num_workers": 1}), f"1 worker, in this process{note}"
    if workers != "auto":
        return cfg, f"{workers} worker(s) (run.num_workers)"
    if os.environ.get("RAY_ADDRESS"):
        raise ConfigError(
            "run.num_workers=auto picks this machine's GPUs; on the cluster at RAY_ADDRESS "
            "set the number: --set run.num_workers=N (one GPU each)"
        )
    gpus = _local_gpus() if cfg.run.use_gpu is not False else 0
    n, why = (gpus, f"{gpus} local GPU(s)") if gpus else (1, "no GPU: one CPU worker")
    batch = cfg.train.batch_size
    if batch % n:
        fits = max(k for k in range(1, n + 1) if batch % k == 0)
        raise ConfigError(
            f"train.batch_size: {batch} must be divisible by run.num_workers={n} (auto: {why}); "
            f"set --set run.num_workers={fits}, or a train.batch_size divisible by {n}"
        )
    return cfg.replace(run={"num_workers": n}), f"{n} worker(s) (run.num_workers=auto: {why})"


def _check_resume_from(cfg: RunConfig) -> None:
    """--resume-from names a checkpoint that exists (checked before Ray, not on a worker)."""
    if not cfg.run.resume_from or is_remote(cfg.run.resume_from):
        return
    try:
        resolve_checkpoint(cfg.run.resume_from)
    except FileNotFoundError as err:
        raise ConfigError(f"run.resume_from (--resume-from): {err}") from None


def _prepare(cfg: RunConfig, allow_config_change: bool, held: ExitStack | None = None):
    """What `train` and `dry_run` check before Ray starts: the storage (s3:// / gs://: the
    bucket must exist; the run's small files come from it), the run's lock (pipeline/train/
    lock.py: with `held`, taken until that stack closes; without, a live holder only raises),
    the data (missing, empty or too small splits, missing shards, checksums if asked),
    --resume-from, and the resume decision (a refusal raises). The model fields the config
    leaves to the data are filled here, once.
    Returns (the filled config, dataset info, run folder, storage, plan)."""
    from pipeline.data import check_splits

    run_dir = run_dir_for(cfg)
    storage = RunStorage(cfg.run.storage_path, cfg.run.name, run_dir, ignore=RAY_ENTRIES)
    storage.check()
    lock = RunLock(storage)  # first: everything below reads what a live holder writes
    if held is not None:
        held.enter_context(lock.hold())
    elif note := lock.check():
        print(f"[capsnet] dry run: {note}", flush=True)
    workers = cfg.run.num_workers
    info = check_splits(
        cfg.data, batch_size=cfg.train.local_batch_size(workers), world_size=workers
    )
    cfg = cfg.for_data(tuple(info.image_shape), info.num_classes)
    _check_resume_from(cfg)
    # The bucket is the truth: the staging folder's files it lacks go (a run to an emptied
    # bucket must not find the old index and be planned finished, nor carry the old log on)
    storage.pull(only=[CONFIG_FILE, INDEX_FILE, "metrics.jsonl"], mirror=True)
    plan = plan_resume(cfg, run_dir)
    check_resume(plan, cfg, allow_config_change=allow_config_change)
    return cfg, info, run_dir, storage, plan


def dry_run(cfg: RunConfig, *, local: bool = False, allow_config_change: bool = False) -> str:
    """What `capsnet train` would do with this config, checked as far as possible without Ray:
    the workers, the data, the storage, a live holder of the run's lock (looked at, not
    taken), --resume-from and the resume decision (a refusal raises as it would)."""
    cfg, workers = resolve_workers(with_absolute_paths(cfg), local=local)
    cfg, info, run_dir, storage, plan = _prepare(cfg, allow_config_change)
    model = cfg.model
    filled = f"\n  filled with today's defaults: {', '.join(plan.filled)}" if plan.filled else ""
    return (
        f"[capsnet] dry run: would {_action(plan)}: {cfg.run.name} in {storage.uri}\n"
        f"  data: {info.name} {tuple(info.image_shape)}, {info.num_classes} classes, "
        f"{info.split(cfg.data.train_split).num_samples} train / "
        f"{info.split(cfg.data.eval_split).num_samples} eval samples\n"
        f"  model: {type(model).__name__}, {cfg.train.epochs} epochs, global batch "
        f"{cfg.train.batch_size} on {workers}{filled}"
    )


def _action(plan) -> str:
    return {
        "fresh": "start a new run",
        "resume": f"resume after epoch {plan.epochs_done}",
        "finished": "do nothing: the run has finished",
    }[plan.state]


def train(
    cfg: RunConfig, *, local: bool = False, allow_config_change: bool = False, verbose: bool = False
) -> Summary:
    """Run `capsnet train`: the TorchTrainer on Ray (default) or the same loop in-process.

    Before anything starts: no other live run may hold this run (pipeline/train/lock.py; the
    lock is held until this returns or raises), the data must be readable, and a run with
    checkpoints resumes only under the resume rules (pipeline/train/resume.py); a finished
    run trains nothing."""
    cfg, workers = resolve_workers(with_absolute_paths(cfg), local=local)
    with ExitStack() as held:  # the run's lock: released on any exit, Ctrl-C included
        # Data, storage, the lock and the resume decision now, not after Ray has started and
        # a whole training epoch has run.
        cfg, _, run_dir, storage, plan = _prepare(cfg, allow_config_change, held)
        return _train(cfg, workers, run_dir, storage, plan, local=local, verbose=verbose)


def _train(
    cfg: RunConfig,
    workers: str,
    run_dir: Path,
    storage: RunStorage,
    plan,
    *,
    local: bool,
    verbose: bool,
) -> Summary:
    """`train` after `_prepare`, under the run's lock."""
    if plan.state == "finished":
        print(
            f"[capsnet] run {cfg.run.name!r} already finished: {plan.epochs_done} of "
            f"train.epochs={cfg.train.epochs} epochs done, nothing to train. To train it "
            f"further: --set train.epochs=N (N > {plan.epochs_done}); for a new run: "
            f"--new-run or --set run.name=NEW",
            flush=True,
        )
        return summarize(cfg)
    write_config(cfg, run_dir)
    (run_dir / FATAL_FILE).unlink(missing_ok=True)  # a new attempt
    storage.remove(FATAL_FILE)
    storage.push([CONFIG_FILE], strict=True)  # rank 0, maybe on another node, pulls it
    filled = f"; filled with today's defaults: {', '.join(plan.filled)}" if plan.filled else ""
    print(
        f"[capsnet] run {cfg.run.name}: {plan.state} ({plan.epochs_done} epochs done) on "
        f"{workers}; effective config: {run_dir / CONFIG_FILE}{filled}",
        flush=True,
    )
    log_path = run_dir / LOG_FILE
    if local:  # the same loop in this process, rank 0 of 1
        with LocalConsole(log_path):
            train_loop(cfg.to_dict(), LocalContext(run_dir))
        storage.push([LOG_FILE], strict=True)
        return summarize(cfg)
    with DriverConsole(log_path, verbose=verbose):  # Ray's chatter: log.txt only
        init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else _local_cpus(cfg))
        try:
            result = build_trainer(cfg).fit()
        except Exception as err:  # Ray's TrainingFailedError: pages of worker tracebacks
            failure = err
        else:
            failure = result.error
    storage.push([LOG_FILE])
    if failure is not None:
        raise TrainingError(
            f"{_last_error_line(failure)} (the whole story: {log_path})"
        ) from failure
    storage.pull(only=[FATAL_FILE])
    fatal = read_fatal(run_dir)
    if fatal:  # deterministic: rank 0 wrote it, and the workers ended without a retry
        raise TrainingError(f"{fatal} (log: {log_path})")
    storage.pull(only=[INDEX_FILE, "metrics.jsonl"])  # written by rank 0, maybe elsewhere
    summary = summarize(cfg)
    if storage.remote:
        summary.outputs = storage.uri
        best = CheckpointIndex.load(run_dir).best
        summary.checkpoint = f"{storage.uri}/{best}/{CHECKPOINT_FILE}" if best else None
    if result.metrics and summary.epochs == 0:  # remote storage: metrics came back via Ray only
        summary.epochs = int(result.metrics.get("epoch", 0))
        summary.best_test_accuracy = float(result.metrics.get("best_test_accuracy", float("nan")))
        summary.last_images_per_s = float(result.metrics.get("images_per_s", 0.0))
    return summary


def _last_error_line(error: BaseException) -> str:
    """The worker's own error in one line, out of Ray's wrapped traceback text."""
    lines = [line.strip() for line in str(error).splitlines()]
    errors = [
        line
        for line in lines
        if ("Error" in line or "Exception" in line)
        and ": " in line
        and not line.startswith(("File ", "ray.train.", "Traceback"))
    ]
    return (errors[-1] if errors else (lines[0] if lines else type(error).__name__))[:500]


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths resolved against the driver's working directory: Ray workers run elsewhere."""
    return cfg.replace(
        data={"shards": absolute_path(cfg.data.shards)},
        run={
            "storage_path": absolute_path(cfg.run.storage_path),
            "resume_from": absolute_path(cfg.run.resume_from),
        },
    )


def _local_cpus(cfg: RunConfig) -> int:
    """Enough CPUs for the requested workers, at least what the machine has."""
    workers = cfg.run.num_workers if cfg.run.num_workers != "auto" else 1
    return max(os.cpu_count() or 1, workers * cfg.run.cpus_per_worker + 1)
