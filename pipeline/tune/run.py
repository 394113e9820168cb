"""Running a search on Ray: the param space, the trial driver, starting or resuming, Ctrl-C.

Everything that can be checked is checked before `init_ray` (the data, whether the experiment
folder holds a search to resume); `TuneConfig.base` becomes plain data only here, at the Ray
boundary, and each trial parses it back on its first line.
"""

from __future__ import annotations

import logging
import math
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, absolute_path, parse_run_config
from pipeline.schema import Section
from pipeline.train.context import FATAL_KEY
from pipeline.tune.results import report
from pipeline.tune.space import SearchSection, TuneConfig, check_data, trial_config


def param_space(search: SearchSection) -> dict[str, Any]:
    from ray import tune

    def to_tune(spec: Section):
        kind, values = next(iter(spec.model_dump().items()))
        if kind == "choice":
            return tune.choice(values)
        if kind == "grid":
            return tune.grid_search(values)
        if kind == "uniform":
            return tune.uniform(*values)
        if kind == "loguniform":
            return tune.loguniform(*values)
        return tune.randint(values[0], values[1] + 1)  # inclusive high, like `choice`

    return {"params": {k: to_tune(v) for k, v in search.space.items()}}


def trial_driver(config: dict[str, Any]) -> None:
    """One Tune trial: the same TorchTrainer as `capsnet train`, reports forwarded to Tune.

    The trial's run name is its Tune trial id, which survives `Tuner.restore`, so a retried or
    restored trial finds its TorchTrainer's checkpoints and resumes instead of restarting.
    """
    from ray import tune

    from pipeline.train.trainer import build_trainer

    base = parse_run_config(config["base"])  # plain data across the Ray boundary
    cfg = trial_config(base, config["params"]).replace(
        run={"name": tune.get_context().get_trial_id(), "storage_path": config["trial_storage"]}
    )
    # A search saved before trials were told their metric resumes with the default one.
    metric = config.get("metric", SearchSection.model_fields["metric"].default)
    trainer = build_trainer(cfg, callbacks=[report_to_tune(metric)])
    trainer.fit()


def report_to_tune(metric: str):
    """Tune's TuneReportCallback, with the search metric as NaN in a failed run's last report.

    A run that fails deterministically (a NaN loss) reports only `FATAL_KEY` and returns, so
    that Ray does not retry it. Tune's controller raises on a result without the search metric,
    which would end the whole search; with NaN there, the trial ends like any other, ASHA
    ignores it (nanpercentile), and the results table lists it with the fatal reason.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if FATAL_KEY in metrics[0]:
                metrics = [{metric: math.nan, **m} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return ReportToTune()


def max_concurrent(search: SearchSection, base: RunConfig) -> int:
    """As many trials as the cluster's GPUs (or, without GPUs, CPUs) can hold at once."""
    if search.max_concurrent_trials:
        return search.max_concurrent_trials
    import ray

    from pipeline.train.trainer import resolve_use_gpu

    resources = ray.cluster_resources()
    if resolve_use_gpu(base.run.use_gpu):
        return max(1, int(resources.get("GPU", 0)) // base.run.num_workers)
    per_trial = base.run.num_workers * base.run.cpus_per_worker
    return max(1, int(resources.get("CPU", 1)) // per_trial)


def _scheduler(tc: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = tc.search.scheduler
    if sched.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(tc.epochs()),  # the longest trial runs to its end
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


def _search_alg(search: SearchSection):
    if search.search_alg == "random":
        return None  # Tune's default variant generator: random sampling + grid entries
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch()


# --- the experiment folder: new or resumed, decided before Ray starts ------------------------


def experiment_dir(search: SearchSection) -> str:
    """<storage_path>/<name>, absolute when local (Ray wants absolute storage paths)."""
    return f"{absolute_path(search.storage_path).rstrip('/')}/{search.name}"


def check_experiment(exp_dir: str, resume: bool) -> None:
    """--resume needs a search saved at exp_dir, and a new search must not overwrite one.
    Tuner.can_restore only looks for Tune's state file (local or remote): no Ray started."""
    from ray.tune import Tuner

    exists = Tuner.can_restore(exp_dir)
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment to resume at {exp_dir}")
    if not resume and exists:
        raise ConfigError(
            f"{exp_dir} already holds this experiment: add --resume to continue it, "
            "or change search.name"
        )


def plan(tc: TuneConfig, resume: bool = False) -> str:
    """What `capsnet tune` would do (--dry-run), after the checks a real run makes before Ray;
    only --resume looks at the experiment folder (a plain dry run never imports Ray)."""
    check_data(tc)
    search = tc.search
    exp_dir = experiment_dir(search)
    if resume:
        check_experiment(exp_dir, resume=True)
        return f"[capsnet] dry run: would resume the search in {exp_dir}"
    return (
        f"[capsnet] dry run: would search {search.trials()} trial(s) of "
        f"{tc.base.train.epochs} epochs over {', '.join(search.space) or '(nothing)'}"
        f" ({search.scheduler.type}, {search.search_alg}), ranked by {search.metric} "
        f"({search.mode}); experiment {search.storage_path}/{search.name}"
    )


# --- Ctrl-C -----------------------------------------------------------------------------------


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the search after Tune saved its state; `capsnet tune --resume` goes on."""


def resume_command(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The command that continues this search: the same config and --set overrides."""
    args = ["capsnet", "tune", "--config", str(config_path)]
    for item in overrides:
        args += ["--set", item]
    return shlex.join([*args, "--resume"])


def interrupted(command: str) -> SearchInterrupted:
    """Say how to continue (instead of Tune's Tuner.restore hint); the exception to raise."""
    print(f"[capsnet] interrupted: continue with: {command}", flush=True)
    return SearchInterrupted(command)


class _InterruptWatch(logging.Filter):
    """Tune catches the first Ctrl-C itself: fit() returns normally and Tune logs how to resume
    through its Python API. Note the interrupt and drop that hint (ours names the CLI)."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "has been interrupted" in record.getMessage():
            self.seen = True
            return False
        return True


@contextmanager
def _watch_interrupt():
    watch = _InterruptWatch()
    logger = logging.getLogger("ray.tune.tune")  # where Tune logs the interrupt
    logger.addFilter(watch)
    try:
        yield watch
    finally:
        logger.removeFilter(watch)


def _unfinished(results) -> bool:
    """Trials neither terminated nor errored: the search stopped before it was done."""
    return results.num_terminated + results.num_errors < len(results)


# --- the search -------------------------------------------------------------------------------


def run_tune(
    tc: TuneConfig,
    *,
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
) -> Path:
    """Run (or with resume=True, continue) the search; returns the experiment folder. Raises
    SearchInterrupted (after printing how to resume) when Ctrl-C stops it."""
    check_data(tc)  # before Ray starts
    exp_dir = experiment_dir(tc.search)
    check_experiment(exp_dir, resume)
    command = resume_command(config_path, overrides)
    try:
        results, was_interrupted = _fit(tc, exp_dir, resume)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune's own handler is set
        raise interrupted(command) from None
    out_dir = Path(exp_dir) if "://" not in exp_dir else Path("tune-" + tc.search.name)
    if was_interrupted:
        if len(results):
            report(results, tc, out_dir)  # the trials so far
        raise interrupted(command)
    report(results, tc, out_dir)
    return Path(exp_dir)


def _fit(tc: TuneConfig, exp_dir: str, resume: bool):
    """The Ray part of run_tune: (results, whether Ctrl-C stopped the search)."""
    from ray import tune

    from pipeline.train.trainer import init_ray

    init_ray(dashboard=True)
    # The driver only waits on its TorchTrainer, whose workers reserve their own resources.
    trainable = tune.with_resources(trial_driver, {"CPU": 0.01})
    if resume:
        print(f"[capsnet] resuming the search in {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(
            exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = _new_tuner(tc, trainable, exp_dir)
    with _watch_interrupt() as watch:
        results = tuner.fit()
    return results, watch.seen or _unfinished(results)


def _new_tuner(tc: TuneConfig, trainable, exp_dir: str):
    from ray import tune

    from pipeline.train.trainer import with_absolute_paths

    search = tc.search
    base = with_absolute_paths(tc.base)
    space = param_space(search)
    space.update(  # the Ray boundary
        base=base.to_dict(), trial_storage=f"{exp_dir}/trial_runs", metric=search.metric
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=search.num_samples,
            scheduler=_scheduler(tc),
            search_alg=_search_alg(search),
            max_concurrent_trials=max_concurrent(search, base),
        ),
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=absolute_path(search.storage_path),
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
        ),
    )
