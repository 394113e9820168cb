"""`capsnet tune`: Ray Tune searches over run-config keys (routing iterations, lr, ...).

A search config is a run config (data/model/train/run sections, the base every trial starts
from) plus a `search:` section:

    search:
      name: tune-mnist            # experiment folder under storage_path; --resume continues it
      storage_path: runs
      space:                      # dotted run-config keys -> distributions
        model.routing.name: {choice: [dynamic, uniform, em, attention]}
        model.routing.iterations: {choice: [1, 2, 3]}   # only where the algorithm has it
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      num_samples: 8              # samples of the space (x grid size for grid entries)
      metric: test_accuracy
      mode: max
      scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: fifo}
      search_alg: random          # random (incl. grid entries) | optuna
      max_concurrent_trials: 0    # 0 = as many as the cluster's GPUs (or CPUs) fit
      max_failures: 1             # trial-level retries (each trial's TorchTrainer has run.max_failures)

Each trial is a small driver function that builds the *same* TorchTrainer as `capsnet train`
(Ray Train V2's Train+Tune pattern) and forwards its reports to Tune, so ASHA can stop it.

Registry-backed nested configs (``model.routing``) are searched by name: a sampled
``model.routing.name`` replaces the base's routing with that algorithm's defaults, and a
sampled key the chosen algorithm does not have (``iterations`` for ``uniform``) is left out of
that trial and shown as ``n/a`` in the results. The results table gives every trial's time per
training step and parameter count next to its metric, and a search over routing algorithms
also gets a per-algorithm summary (``routing-summary.csv``): better weighed against costlier.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import numbers
import shlex
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from capscore import MODELS
from pipeline.config import (
    ConfigError,
    RunConfig,
    absolute_path,
    apply_overrides,
    load_yaml,
    parse_run_config,
)
from pipeline.data import DataError, load_dataset_info
from pipeline.figures import save_search_plot
from pipeline.schema import Float, Int, Section, Str, error_lines, raise_config_error
from pipeline.train.context import FATAL_KEY

PositiveInt = Annotated[Int, Field(ge=1)]


class Choice(Section):
    choice: Annotated[list[Any], Field(min_length=1)]
    """Sample one of these values."""


class Grid(Section):
    grid: Annotated[list[Any], Field(min_length=1)]
    """Try every value (multiplies num_samples)."""


class _Range(Section):
    def bounds(self) -> list[Any]:
        return list(next(iter(self.model_dump().values())))

    @model_validator(mode="after")
    def _ordered(self):
        low, high = self.bounds()
        if not low < high:
            raise ValueError(f"low must be < high, got [{low}, {high}]")
        return self


class Uniform(_Range):
    uniform: tuple[Float, Float]
    """[low, high]"""


class LogUniform(_Range):
    loguniform: tuple[Annotated[Float, Field(gt=0)], Annotated[Float, Field(gt=0)]]
    """[low, high], both > 0"""


class RandInt(_Range):
    randint: tuple[Int, Int]
    """[low, high], both included"""


DISTRIBUTIONS = {
    "choice": Choice,
    "grid": Grid,
    "uniform": Uniform,
    "loguniform": LogUniform,
    "randint": RandInt,
}


def _kind(spec: Any) -> str:
    """The distribution's tag: its one key (a dict being validated, or a parsed model)."""
    keys = list(spec) if isinstance(spec, dict) else list(type(spec).model_fields)
    return f"<{keys[0]}>" if len(keys) == 1 else "<?>"


Distribution = Annotated[
    Union[tuple(Annotated[cls, Tag(f"<{k}>")] for k, cls in DISTRIBUTIONS.items())],  # noqa: UP007
    Discriminator(
        _kind,
        custom_error_type="distribution",
        custom_error_message=f"must be one of {{{' | '.join(DISTRIBUTIONS)}: ...}}",
    ),
]


class SchedulerSection(Section):
    type: Literal["asha", "fifo"] = "asha"
    """asha (stops weak trials early) or fifo (runs every trial to the end)."""
    grace_period: PositiveInt = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: Annotated[Int, Field(ge=2)] = 2
    """ASHA: keep 1 / reduction_factor of the trials at each rung."""


class SearchSection(Section):
    name: Annotated[Str, Field(min_length=1, pattern=r"^[^/]+$")] = "tune"
    """Experiment name: <storage_path>/<name>/ holds Tune's state and every trial's run."""
    storage_path: Str = "runs"
    """Folder or s3:// / gs:// URI for the experiment."""
    space: dict[str, Distribution] = Field(default_factory=dict)
    """Dotted run-config keys -> {choice|grid: [...]} or {uniform|loguniform|randint: [lo, hi]}."""
    num_samples: PositiveInt = 4
    """Trials sampled from the space (each grid entry multiplies it)."""
    metric: Str = "test_accuracy"
    """Reported metric that ranks trials."""
    mode: Literal["max", "min"] = "max"
    """max or min."""
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    """Early stopping of weak trials."""
    search_alg: Literal["random", "optuna"] = "random"
    """random (Tune's variant generator; handles grid entries) or optuna (needs optuna)."""
    max_concurrent_trials: Annotated[Int, Field(ge=0)] = 0
    """0 = fit to the cluster: GPUs (or CPUs) / what one trial's workers need."""
    max_failures: Annotated[Int, Field(ge=-1)] = 1
    """Times Tune retries a failed trial; the retry resumes from the trial's checkpoint."""

    def values(self, key: str) -> list[Any]:
        """Values that every sample of `key` lies between: all choices, or both bounds."""
        spec = self.space[key]
        return (
            spec.bounds()
            if isinstance(spec, _Range)
            else list(next(iter(spec.model_dump().values())))
        )

    def space_dict(self) -> dict[str, dict[str, Any]]:
        return {k: v.model_dump(mode="json") for k, v in self.space.items()}


class TuneConfig(Section):
    base: dict[str, Any]
    """The run config every trial starts from (validated; plain data for Ray)."""
    search: SearchSection


def load_tune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TuneConfig:
    """Read and validate a search config; every corner of the space is validated as a run
    config too, so an unknown key, an empty choice or lr <= 0 fails before Ray starts."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    search_raw = raw.pop("search", None)
    if not isinstance(search_raw, dict):
        raise ConfigError(f"{path}: needs a `search:` section (see `capsnet tune --help`)")
    errors: list[str] = []
    search = None
    try:
        search = SearchSection.model_validate(search_raw)
    except ValidationError as err:
        errors += error_lines(err, ("search",), root=SearchSection)
    try:
        base = parse_run_config(raw).to_dict()
    except ConfigError as err:
        errors += err.lines
        base = None
    if search is not None and base is not None:
        for key in search.space:
            if key.split(".")[0] not in ("data", "model", "train", "run"):
                errors.append(f"search.space.{key}: must start with data., model., train. or run.")
                continue
            errors += _check_key(base, search, key)
    if search is not None:
        try:
            _check_search_alg(search)  # optuna missing, or grid entries it cannot take
        except ConfigError as err:
            errors.append(str(err))
    if errors:
        raise_config_error(errors, str(path))
    return TuneConfig(base=base, search=search)


def _check_key(base: dict[str, Any], search: SearchSection, key: str) -> list[str]:
    """Each value of `key` applied to the base, together with each registry entry the search
    can choose where `key` belongs to one (model.routing.iterations with every sampled
    model.routing.name that has iterations). A key that no such entry has is an error: a
    misspelt per-algorithm key would otherwise be left out of every trial."""
    *path, _ = key.split(".")
    switch = ".".join([*path, "name"])
    names = search.values(switch) if switch in search.space and switch != key else [None]
    errors, applied = [], False
    for name in names:
        for value in search.values(key):
            params = {key: value} if name is None else {switch: name, key: value}
            if not_applicable(base, params):
                continue
            applied = True
            try:
                parse_run_config(apply_params(base, params))
            except ConfigError as e:
                shown = "" if name is None else f" (with {switch}={name!r})"
                errors.append(f"search.space.{key}={value!r}{shown}: {e}")
    if not applied:
        chosen = "the base config's" if names == [None] else f"any of {switch}={names}"
        errors.append(f"search.space.{key}: {chosen} has no such key")
    return errors


def _history(result, trial: str, trial_storage: str) -> list[dict[str, Any]]:
    """Every epoch the trial's run reported: its metrics.jsonl when storage is local (complete
    even across restores), else what Tune recorded."""
    from pipeline.train.outputs import read_metrics

    if trial_storage and "://" not in trial_storage:
        rows = read_metrics(Path(trial_storage) / trial)
        if rows:
            return rows
    df = result.metrics_dataframe
    return df.to_dict("records") if df is not None else []


NOT_APPLICABLE = "n/a"
"""Results-table value of a sampled key that the trial's registry entry does not have."""


def _registry_keys(raw: dict[str, Any], path: list[str]) -> set[str] | None:
    """The fields of the registry entry that the nested config at `path` names (e.g. the
    routing algorithm at model.routing), or None when `path` is not a registry-backed field."""
    if len(path) != 2 or path[0] != "model":
        return None
    spec = MODELS.get(raw.get("model", {}).get("type", "capsnet"))
    field = spec and {f.name: f for f in dataclasses.fields(spec.config)}.get(path[1])
    registry = field.metadata.get("registry") if field else None
    if registry is None:
        return None
    node = raw["model"].get(path[1]) or {}
    entry = registry.get(node.get("name", next(iter(registry))))
    return {f.name for f in dataclasses.fields(entry.config)} if entry else None


def _place(raw: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """Set each dotted key of `params` in `raw` (in place); the keys left out as not
    applicable to the chosen registry entry."""
    skipped = []
    # Registry switches (model.routing.name) first: the other keys land on the chosen entry.
    for key in sorted(params, key=lambda k: not k.endswith(".name")):
        value = params[key]
        *path, leaf = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        keys = _registry_keys(raw, path)
        if keys is not None and leaf == "name" and node.get("name") != value:
            node.clear()  # another algorithm: the old one's keys mean nothing to it
        elif keys is not None and leaf not in keys:
            skipped.append(key)
            continue
        node[leaf] = value
    return skipped


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base run config with each dotted key set to its sampled value (keys that the
    chosen routing algorithm does not have are left out: see `not_applicable`)."""
    raw = copy.deepcopy(base)
    _place(raw, params)
    return raw


def not_applicable(base: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The sampled keys `apply_params` leaves out (e.g. model.routing.iterations for a
    routing algorithm without iterations)."""
    return _place(copy.deepcopy(base), params)


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
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.trainer import build_trainer

    raw = apply_params(config["base"], config["params"])
    raw["run"]["name"] = tune.get_context().get_trial_id()
    raw["run"]["storage_path"] = config["trial_storage"]
    cfg = parse_run_config(raw)
    trainer = build_trainer(cfg, callbacks=[TuneReportCallback()])
    trainer.fit()


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


def _scheduler(search: SearchSection, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = search.scheduler
    if sched.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


def _check_search_alg(search: SearchSection) -> None:
    """What the search algorithm needs, checked without importing Ray (load_tune_config)."""
    if search.search_alg != "optuna":
        return
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(
            "search.search_alg=optuna needs optuna: pip install -e '.[optuna]'"
        ) from None
    if any(isinstance(spec, Grid) for spec in search.space.values()):
        raise ConfigError("search.search_alg=optuna does not take grid entries; use choice")


def _search_alg(search: SearchSection):
    if search.search_alg == "random":
        return None  # Tune's default variant generator: random sampling + grid entries
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch()


DATA_KEYS = ("data.shards", "data.train_split", "data.eval_split")


def check_data(tc: TuneConfig) -> None:
    """The shards and splits every trial reads exist. Inside the trials a missing folder is
    found only after Ray starts, as one failed trial after another."""
    corners = [tc.base] + [
        apply_params(tc.base, {key: value})
        for key in tc.search.space
        if key in DATA_KEYS
        for value in tc.search.values(key)
    ]
    errors: list[str] = []
    for raw in corners:
        data = raw["data"]
        try:
            info = load_dataset_info(absolute_path(data["shards"]))
        except DataError as err:
            errors.append(f"data.shards: {err}")
            continue
        for key in ("train_split", "eval_split"):
            try:
                info.split(data[key])
            except DataError as err:
                errors.append(f"data.{key}: {err}")
    if errors:
        raise_config_error(list(dict.fromkeys(errors)))  # corners repeat the base's errors


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


def run_tune(
    tc: TuneConfig,
    *,
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
) -> Path:
    """Run (or with resume=True, continue) the search; returns the experiment folder. Raises
    SearchInterrupted (after printing how to resume) when Ctrl-C stops it."""
    from pipeline.train.trainer import with_absolute_paths

    check_data(tc)  # before Ray starts
    base = with_absolute_paths(parse_run_config(tc.base))
    storage = absolute_path(tc.search.storage_path)
    exp_dir = f"{storage.rstrip('/')}/{tc.search.name}"
    command = resume_command(config_path, overrides)
    try:
        results, was_interrupted = _fit(tc, base, storage, exp_dir, resume)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune's own handler is set
        raise interrupted(command) from None
    out_dir = Path(exp_dir) if "://" not in exp_dir else Path("tune-" + tc.search.name)
    if was_interrupted:
        if len(results):
            report(results, tc, out_dir)  # the trials so far
        raise interrupted(command)
    report(results, tc, out_dir)
    return Path(exp_dir)


def _fit(tc: TuneConfig, base: RunConfig, storage: str, exp_dir: str, resume: bool):
    """The Ray part of run_tune: (results, whether Ctrl-C stopped the search)."""
    from ray import tune

    from pipeline.train.trainer import init_ray

    search = tc.search
    init_ray(dashboard=True)
    # The driver only waits on its TorchTrainer, whose workers reserve their own resources.
    trainable = tune.with_resources(trial_driver, {"CPU": 0.01})
    if resume:
        if not tune.Tuner.can_restore(exp_dir):
            raise ConfigError(f"--resume: no experiment to resume at {exp_dir}")
        print(f"[capsnet] resuming the search in {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(
            exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        if tune.Tuner.can_restore(exp_dir):
            raise ConfigError(
                f"{exp_dir} already holds this experiment: add --resume to "
                f"continue it, or change search.name"
            )
        space = param_space(search)
        space.update(base=base.to_dict(), trial_storage=f"{exp_dir}/trial_runs")
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                num_samples=search.num_samples,
                scheduler=_scheduler(search, base.train.epochs),
                search_alg=_search_alg(search),
                max_concurrent_trials=max_concurrent(search, base),
            ),
            run_config=tune.RunConfig(
                name=search.name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=search.max_failures),
            ),
        )
    with _watch_interrupt() as watch:
        results = tuner.fit()
    return results, watch.seen or _unfinished(results)


def _trial_error(result) -> str:
    """Why a trial failed: Tune's error, or a deterministic failure its run reported."""
    if result.error is not None:
        return type(result.error).__name__
    fatal = (result.metrics or {}).get(FATAL_KEY)
    return str(fatal).split(":", 1)[0] if fatal else ""


def result_rows(results, tc: TuneConfig) -> list[dict[str, Any]]:
    """One row per trial: its parameters, best metric, epochs run, early stop, device time."""
    from pipeline.train.trainer import resolve_use_gpu

    search = tc.search
    parameters = _ParameterCounts()
    rows = []
    for result in results:
        params = result.config.get("params", {})
        trial = (result.metrics or {}).get("trial_id") or str(result.path).rsplit("/", 1)[-1]
        history = _history(result, trial, result.config.get("trial_storage", ""))
        # NaN epochs (diverged, or nothing evaluated yet) must not win max/min or hide the rest
        values = [v for h in history if _finite(v := h.get(search.metric))]
        best = (max(values) if search.mode == "max" else min(values)) if values else math.nan
        cfg = parse_run_config(apply_params(tc.base, params))
        skipped = not_applicable(tc.base, params)
        epochs = max((int(h.get("epoch", 0)) for h in history), default=0)
        seconds = sum(float(h.get("epoch_time_s", 0.0)) for h in history)
        rows.append(
            {
                "trial": trial,
                **{k: NOT_APPLICABLE if k in skipped else params.get(k) for k in search.space},
                f"best_{search.metric}": best,
                "epochs_run": epochs,
                "stopped_early": result.error is None and epochs < cfg.train.epochs,
                "error": _trial_error(result),
                "step_time_ms": _step_time_ms(history),
                "parameters": parameters.get(cfg),
                "device_hours": cfg.run.num_workers * seconds / 3600.0,
                "device": "GPU" if resolve_use_gpu(cfg.run.use_gpu) else "CPU",
            }
        )
    key = f"best_{search.metric}"
    rows.sort(key=lambda r: (math.isnan(r[key]), -r[key] if search.mode == "max" else r[key]))
    return rows


def _step_time_ms(history: list[dict[str, Any]]) -> float:
    """Median over epochs of the wall time per training step (loading included), in ms; the
    median, so a first epoch's start-up or a slow eval-heavy epoch does not dominate."""
    per_step = [
        1000.0 * float(h["epoch_time_s"]) / int(h["steps"])
        for h in history
        if h.get("steps") and _finite(h.get("epoch_time_s"))
    ]
    return statistics.median(per_step) if per_step else math.nan


class _ParameterCounts:
    """Parameters of each trial's model, built once per distinct model config on the driver
    (the model's shape needs the dataset's image shape and classes)."""

    def __init__(self) -> None:
        self._cache: dict[str, int | None] = {}
        self._infos: dict[str, Any] = {}

    def get(self, cfg: RunConfig) -> int | None:
        key = repr(cfg.to_dict()["model"]) + cfg.data.shards
        if key not in self._cache:
            self._cache[key] = self._count(cfg)
        return self._cache[key]

    def _count(self, cfg: RunConfig) -> int | None:
        from capscore import build_model

        try:
            if cfg.data.shards not in self._infos:
                self._infos[cfg.data.shards] = load_dataset_info(absolute_path(cfg.data.shards))
            info = self._infos[cfg.data.shards]
        except DataError:
            return None  # the table says "None": the shards are gone since the search ran
        model = build_model(cfg.build_model_config(info.image_shape, info.num_classes))
        return sum(p.numel() for p in model.parameters())


ROUTING_KEY = "model.routing.name"


def routing_summary(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per routing algorithm of a search over `model.routing.name`: trials, the best and the
    mean ± sample standard deviation of each trial's best metric (e.g. over seeds), median
    time per training step and parameters, in the rows' order of first appearance."""
    key = f"best_{metric}"
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[ROUTING_KEY]), []).append(row)
    out = []
    for name, group in groups.items():
        values = [r[key] for r in group if _finite(r[key])]
        times = [r["step_time_ms"] for r in group if _finite(r["step_time_ms"])]
        out.append(
            {
                "routing": name,
                "trials": len(group),
                f"best_{metric}": max(values) if values else math.nan,
                f"mean_{metric}": statistics.fmean(values) if values else math.nan,
                f"std_{metric}": statistics.stdev(values) if len(values) > 1 else math.nan,
                "step_time_ms": statistics.median(times) if times else math.nan,
                "parameters": group[0]["parameters"],
            }
        )
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)  # numpy floats too


def report(results, tc: TuneConfig, out_dir: Path) -> list[dict[str, Any]]:
    """results.csv, the table printed, best-config.yaml and search.png in the experiment folder;
    no best-config.yaml (and no plot) when no trial reported a finite metric."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results, tc)
    if not rows:
        raise RuntimeError("the search produced no trials")
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(format_table(rows))
    if ROUTING_KEY in tc.search.space:
        summary = routing_summary(rows, tc.search.metric)
        with open(out_dir / "routing-summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(summary[0]))
            writer.writeheader()
            writer.writerows(summary)
        print("\nper routing algorithm:\n" + format_table(summary))
    best = rows[0]  # sorted: finite values first
    if not _finite(best[f"best_{tc.search.metric}"]):
        print(
            f"[capsnet] results: {out_dir / 'results.csv'}; no trial reported a finite "
            f"{tc.search.metric}, so no best config was written"
        )
        return rows
    params = {k: best[k] for k in tc.search.space if best[k] != NOT_APPLICABLE}
    best_cfg = apply_params(tc.base, params)
    best_cfg["run"]["name"] = f"{tc.search.name}-best"
    header = (
        f"# Best trial of search '{tc.search.name}' ({tc.search.metric} "
        f"{best[f'best_{tc.search.metric}']:.4f}): {params}\n"
        f"# Command: capsnet train --config {out_dir / 'best-config.yaml'}\n"
        f"# Expected runtime: like one trial of the search, for all {best_cfg['train']['epochs']} epochs.\n"
    )
    (out_dir / "best-config.yaml").write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
    plot_search(rows, tc, out_dir / "search.png")
    print(
        f"[capsnet] results: {out_dir / 'results.csv'}; best config: "
        f"{out_dir / 'best-config.yaml'}; plot: {out_dir / 'search.png'}"
    )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def plot_search(rows: list[dict[str, Any]], tc: TuneConfig, path: Path) -> None:
    """Best metric against routing iterations and lr (or the first two keys of the space)."""
    preferred = ("model.routing.iterations", "train.lr")
    axes_keys = [k for k in preferred if k in tc.search.space]
    axes_keys += [k for k in tc.search.space if k not in axes_keys][: max(0, 2 - len(axes_keys))]
    save_search_plot(rows, f"best_{tc.search.metric}", axes_keys or ["trial"], path)
