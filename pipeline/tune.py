"""`capsnet tune`: Ray Tune searches over run-config keys (routing iterations, lr, ...).

A search config is a run config (data/model/train/run sections, the base every trial starts
from) plus a `search:` section:

    search:
      name: tune-mnist            # experiment folder under storage_path; --resume continues it
      storage_path: runs
      space:                      # dotted run-config keys -> distributions
        model.routing_iterations: {choice: [1, 2, 3]}
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
"""

from __future__ import annotations

import copy
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, RunConfig, absolute_path, apply_overrides

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
SEARCH_ALGS = ("random", "optuna")


@dataclass(kw_only=True)
class SearchSection:
    name: str = "tune"
    """Experiment name: <storage_path>/<name>/ holds Tune's state and every trial's run."""
    storage_path: str = "runs"
    """Folder or s3:// / gs:// URI for the experiment."""
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Dotted run-config keys -> {choice|grid: [...]} or {uniform|loguniform|randint: [lo, hi]}."""
    num_samples: int = 4
    """Trials sampled from the space (each grid entry multiplies it)."""
    metric: str = "test_accuracy"
    """Reported metric that ranks trials."""
    mode: str = "max"
    """max or min."""
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    """{type: asha, grace_period, reduction_factor} or {type: fifo}."""
    search_alg: str = "random"
    """random (Tune's variant generator; handles grid entries) or optuna (needs optuna)."""
    max_concurrent_trials: int = 0
    """0 = fit to the cluster: GPUs (or CPUs) / what one trial's workers need."""
    max_failures: int = 1
    """Times Tune retries a failed trial; the retry resumes from the trial's checkpoint."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"search.name: must be a plain name, got {self.name!r}")
        if self.num_samples < 1:
            raise ConfigError(f"search.num_samples: must be >= 1, got {self.num_samples}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"search.mode: must be max or min, got {self.mode!r}")
        kind = self.scheduler.get("type", "asha")
        if kind not in SCHEDULERS:
            raise ConfigError(f"search.scheduler.type: must be one of {SCHEDULERS}, got {kind!r}")
        extra = set(self.scheduler) - {"type", "grace_period", "reduction_factor"}
        if extra:
            raise ConfigError(f"search.scheduler: unknown key(s) {sorted(extra)}")
        for key in ("grace_period", "reduction_factor"):
            if key in self.scheduler and not (isinstance(self.scheduler[key], int) and self.scheduler[key] >= 1):
                raise ConfigError(f"search.scheduler.{key}: must be an integer >= 1")
        if self.search_alg not in SEARCH_ALGS:
            raise ConfigError(f"search.search_alg: must be one of {SEARCH_ALGS}, got {self.search_alg!r}")
        if self.max_concurrent_trials < 0:
            raise ConfigError("search.max_concurrent_trials: must be >= 0")
        if not isinstance(self.space, dict):
            raise ConfigError("search.space: must be a mapping of dotted keys to distributions")
        # YAML reads 1e-3 as a string and 1 as an int: bounds of continuous ranges are floats
        self.space = {k: _as_float_bounds(v) for k, v in self.space.items()}
        for key, spec in self.space.items():
            _check_distribution(key, spec)


@dataclass
class TuneConfig:
    base: dict[str, Any]
    """The run config every trial starts from (validated)."""
    search: SearchSection


def _check_distribution(key: str, spec: Any) -> None:
    where = f"search.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: must be one of {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: must be a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"{where}.{kind}: must be [low, high], got {values!r}")
        if not values[0] < values[1]:
            raise ConfigError(f"{where}.{kind}: low must be < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {values!r}")


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


def _corners(spec: dict[str, Any]) -> list[Any]:
    """Values that every sample lies between: all choices, or both bounds."""
    kind, values = next(iter(spec.items()))
    return list(values) if kind in ("choice", "grid") else [values[0], values[1]]


def _as_float_bounds(spec: Any) -> Any:
    """Bounds of continuous ranges as floats ('1e-3' and 1 included); anything else as is,
    for _check_distribution to judge."""
    if not (isinstance(spec, dict) and len(spec) == 1):
        return spec
    kind, values = next(iter(spec.items()))
    if kind not in ("uniform", "loguniform") or not isinstance(values, list):
        return spec
    try:
        return {kind: [float(v) for v in values]}
    except (TypeError, ValueError):
        return spec


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base run config with each dotted key set to its sampled value."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        *path, leaf = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def load_tune_config(path: str | Path, overrides: list[str] = ()) -> TuneConfig:
    """Read and validate a search config; every sampled corner of the space is validated as a
    run config too, so an unknown key, an empty choice or lr <= 0 fails before Ray starts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: search config file not found")
    raw = apply_overrides(yaml.safe_load(p.read_text()) or {}, list(overrides))
    search_raw = raw.pop("search", None)
    if not isinstance(search_raw, dict):
        raise ConfigError(f"{path}: needs a `search:` section (see `capsnet tune --help`)")
    known = set(SearchSection.__dataclass_fields__)
    unknown = sorted(set(search_raw) - known)
    if unknown:
        raise ConfigError(f"search: unknown key(s) {unknown}; known: {sorted(known)}")
    search_raw["space"] = search_raw.get("space") or {}
    search = SearchSection(**search_raw)
    base = RunConfig.from_dict(raw).to_dict()
    for key, spec in search.space.items():
        if key.split(".")[0] not in ("data", "model", "train", "run"):
            raise ConfigError(f"search.space.{key}: must start with data., model., train. or run.")
        for value in _corners(spec):
            try:
                RunConfig.from_dict(apply_params(base, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"search.space.{key}={value!r}: {e}") from None
    return TuneConfig(base=base, search=search)


def param_space(search: SearchSection) -> dict[str, Any]:
    from ray import tune

    def to_tune(spec: dict[str, Any]):
        kind, values = next(iter(spec.items()))
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
    cfg = RunConfig.from_dict(raw)
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
    if sched.get("type", "asha") == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                         grace_period=sched.get("grace_period", 1),
                         reduction_factor=sched.get("reduction_factor", 2))


def _search_alg(search: SearchSection):
    if search.search_alg == "random":
        return None  # Tune's default variant generator: random sampling + grid entries
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("search.search_alg=optuna needs optuna: pip install -e '.[optuna]'") from None
    if any("grid" in spec for spec in search.space.values()):
        raise ConfigError("search.search_alg=optuna does not take grid entries; use choice")
    return OptunaSearch()


def run_tune(tc: TuneConfig, *, resume: bool = False) -> Path:
    """Run (or with resume=True, continue) the search; returns the experiment folder."""
    from ray import tune

    from pipeline.train.trainer import init_ray, with_absolute_paths

    base = with_absolute_paths(RunConfig.from_dict(tc.base))
    search = tc.search
    storage = absolute_path(search.storage_path)
    exp_dir = f"{storage.rstrip('/')}/{search.name}"
    init_ray(dashboard=True)
    # The driver only waits on its TorchTrainer, whose workers reserve their own resources.
    trainable = tune.with_resources(trial_driver, {"CPU": 0.01})
    if resume:
        if not tune.Tuner.can_restore(exp_dir):
            raise ConfigError(f"--resume: no experiment to resume at {exp_dir}")
        print(f"[capsnet] resuming the search in {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        if tune.Tuner.can_restore(exp_dir):
            raise ConfigError(f"{exp_dir} already holds this experiment: add --resume to "
                              f"continue it, or change search.name")
        space = param_space(search)
        space.update(base=base.to_dict(), trial_storage=f"{exp_dir}/trial_runs")
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                scheduler=_scheduler(search, base.train.epochs), search_alg=_search_alg(search),
                max_concurrent_trials=max_concurrent(search, base)),
            run_config=tune.RunConfig(name=search.name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=search.max_failures)),
        )
    results = tuner.fit()
    report(results, tc, Path(exp_dir) if "://" not in exp_dir else Path("tune-" + search.name))
    return Path(exp_dir)


def result_rows(results, tc: TuneConfig) -> list[dict[str, Any]]:
    """One row per trial: its parameters, best metric, epochs run, early stop, device time."""
    from pipeline.train.trainer import resolve_use_gpu

    search = tc.search
    rows = []
    for result in results:
        params = result.config.get("params", {})
        trial = (result.metrics or {}).get("trial_id") or str(result.path).rsplit("/", 1)[-1]
        history = _history(result, trial, result.config.get("trial_storage", ""))
        values = [h[search.metric] for h in history if search.metric in h]
        best = (max(values) if search.mode == "max" else min(values)) if values else math.nan
        cfg = RunConfig.from_dict(apply_params(tc.base, params))
        epochs = max((int(h.get("epoch", 0)) for h in history), default=0)
        seconds = sum(float(h.get("epoch_time_s", 0.0)) for h in history)
        rows.append({
            "trial": trial,
            **{k: params.get(k) for k in search.space},
            f"best_{search.metric}": best,
            "epochs_run": epochs,
            "stopped_early": result.error is None and epochs < cfg.train.epochs,
            "error": type(result.error).__name__ if result.error is not None else "",
            "device_hours": cfg.run.num_workers * seconds / 3600.0,
            "device": "GPU" if resolve_use_gpu(cfg.run.use_gpu) else "CPU",
        })
    key = f"best_{search.metric}"
    rows.sort(key=lambda r: (math.isnan(r[key]), -r[key] if search.mode == "max" else r[key]))
    return rows


def report(results, tc: TuneConfig, out_dir: Path) -> list[dict[str, Any]]:
    """results.csv, the table printed, best-config.yaml and search.png in the experiment folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results, tc)
    if not rows:
        raise RuntimeError("the search produced no trials")
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(format_table(rows))
    best = rows[0]
    params = {k: best[k] for k in tc.search.space}
    best_cfg = apply_params(tc.base, params)
    best_cfg["run"]["name"] = f"{tc.search.name}-best"
    header = (f"# Best trial of search '{tc.search.name}' ({tc.search.metric} "
              f"{best[f'best_{tc.search.metric}']:.4f}): {params}\n"
              f"# Command: capsnet train --config {out_dir / 'best-config.yaml'}\n"
              f"# Expected runtime: like one trial of the search, for all {best_cfg['train']['epochs']} epochs.\n")
    (out_dir / "best-config.yaml").write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
    plot_search(rows, tc, out_dir / "search.png")
    print(f"[capsnet] results: {out_dir / 'results.csv'}; best config: "
          f"{out_dir / 'best-config.yaml'}; plot: {out_dir / 'search.png'}")
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
    """Best metric against routing iterations (and against lr), one point per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"best_{tc.search.metric}"
    axes_keys = [k for k in ("model.routing_iterations", "train.lr") if k in tc.search.space]
    axes_keys += [k for k in tc.search.space if k not in axes_keys][: max(0, 2 - len(axes_keys))]
    if not axes_keys:
        axes_keys = ["trial"]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(4.5 * len(axes_keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], axes_keys, strict=True):
        xs = [r[key] for r in rows]
        ys = [r[metric] for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        positions = xs if numeric else [sorted({str(x) for x in xs}).index(str(x)) for x in xs]
        colors = ["tab:orange" if r["stopped_early"] else "tab:blue" for r in rows]
        ax.scatter(positions, ys, c=colors)
        if not numeric:
            labels = sorted({str(x) for x in xs})
            ax.set_xticks(range(len(labels)), labels)
        if numeric and all(float(x).is_integer() for x in xs):
            ax.set_xticks(sorted(set(xs)))
        if key == "train.lr":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].set_title("blue: ran all epochs, orange: stopped early", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
