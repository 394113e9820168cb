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

# The package: space.py (the search config and every check before Ray), run.py (Ray: the
# param space, the trial driver, start/resume, Ctrl-C), results.py (rows, tables, report files).
from pipeline.tune.results import (
    NOT_APPLICABLE,
    ROUTING_KEY,
    format_table,
    report,
    result_rows,
    routing_summary,
)
from pipeline.tune.run import (
    SearchInterrupted,
    check_experiment,
    experiment_dir,
    param_space,
    plan,
    resume_command,
    run_tune,
    trial_driver,
)
from pipeline.tune.space import (
    DISTRIBUTIONS,
    Grid,
    SchedulerSection,
    SearchSection,
    TuneConfig,
    apply_params,
    check_data,
    load_tune_config,
    not_applicable,
    trial_config,
)

__all__ = [
    "DISTRIBUTIONS",
    "NOT_APPLICABLE",
    "ROUTING_KEY",
    "Grid",
    "SchedulerSection",
    "SearchInterrupted",
    "SearchSection",
    "TuneConfig",
    "apply_params",
    "check_data",
    "check_experiment",
    "experiment_dir",
    "format_table",
    "load_tune_config",
    "not_applicable",
    "param_space",
    "plan",
    "report",
    "result_rows",
    "resume_command",
    "routing_summary",
    "run_tune",
    "trial_config",
    "trial_driver",
]
