"""The search config: distributions, the `search:` section, and every check made before Ray.

`load_tune_config` validates the base run config, the search section and every corner of the
space (each sampled value applied to the base by `pipeline.config.place`, the same rule as
`--set`), the scheduler against the run's epochs and what the search algorithm needs, so a
bad search fails in one message before Ray starts, not as one failed trial after another.
"""

from __future__ import annotations

import copy
import numbers
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from pipeline.config import (
    ConfigError,
    RunConfig,
    absolute_path,
    apply_overrides,
    blame,
    load_yaml,
    parse_overrides,
    parse_run_config,
    place,
)
from pipeline.data import DataError, load_dataset_info
from pipeline.schema import Float, Int, Section, Str, error_lines, raise_config_error

PositiveInt = Annotated[Int, Field(ge=1)]
SECTIONS = ("data", "model", "train", "run")
"""The run-config sections a search may reach into."""


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
    """ASHA: epochs every trial runs before it can be stopped (at most train.epochs)."""
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

    def trials(self) -> int:
        """Trials Tune runs: num_samples times every grid entry's length."""
        count = self.num_samples
        for spec in self.space.values():
            count *= len(spec.grid) if isinstance(spec, Grid) else 1
        return count

    def space_dict(self) -> dict[str, dict[str, Any]]:
        return {k: v.model_dump(mode="json") for k, v in self.space.items()}


class TuneConfig(Section):
    base: RunConfig
    """The run config every trial starts from (`to_dict()` only at the Ray boundary)."""
    search: SearchSection

    def epochs(self) -> list[int]:
        """The values of train.epochs a trial may run (searched, or the base's): ASHA's
        grace period must fit the shortest, its max_t is the longest."""
        return _epochs(self.base, self.search)


def _epochs(base: RunConfig, search: SearchSection) -> list[int]:
    if "train.epochs" not in search.space:
        return [base.train.epochs]
    return [v for v in search.values("train.epochs") if isinstance(v, numbers.Integral)]


# --- a run config with sampled values ---------------------------------------------------------


def apply_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw run config with each dotted key set to its sampled value, by
    `pipeline.config.place` (keys the chosen routing algorithm lacks are left out)."""
    raw = copy.deepcopy(raw)
    place(raw, params)
    return raw


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """The run config of a trial that sampled `params` (validated: a ConfigError if not)."""
    return per_trial(parse_run_config(apply_params(base.to_dict(), params)))


def per_trial(cfg: RunConfig) -> RunConfig:
    """run.num_workers=auto in a search is one worker per trial: concurrent trials, not one
    trial's DDP ranks, fill the GPUs (see search.max_concurrent_trials)."""
    return cfg.replace(run={"num_workers": 1}) if cfg.run.num_workers == "auto" else cfg


def not_applicable(base: RunConfig | dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The sampled keys a trial leaves out (model.routing.iterations for a routing algorithm
    without iterations): shown as n/a in the results."""
    raw = base.to_dict() if isinstance(base, RunConfig) else copy.deepcopy(base)
    return place(raw, params)


# --- reading and checking ---------------------------------------------------------------------


def load_tune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TuneConfig:
    """Read and validate a search config; every corner of the space is validated as a run
    config too, so an unknown key, an empty choice or lr <= 0 fails before Ray starts."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    search_raw = raw.pop("search", None)
    if not isinstance(search_raw, dict):
        raise ConfigError(f"{path}: needs a `search:` section (see `capsnet tune --help`)")
    errors: list[str] = []
    search = base = None
    try:
        search = SearchSection.model_validate(search_raw)
    except ValidationError as err:
        errors += error_lines(err, ("search",), root=SearchSection)
    try:
        base = per_trial(parse_run_config(raw))
    except ConfigError as err:
        errors += err.lines
    if search is not None:
        errors += _check_search_alg(search)
    if search is not None and base is not None:
        errors += _check_space(base, search) + _check_scheduler(base, search)
    if errors:
        raise blame(errors, str(path), list(parse_overrides(overrides)))
    return TuneConfig(base=base, search=search)


def _check_space(base: RunConfig, search: SearchSection) -> list[str]:
    errors = []
    for key in search.space:
        if key.split(".")[0] not in SECTIONS:
            errors.append(f"search.space.{key}: must start with data., model., train. or run.")
        else:
            errors += _check_key(base, search, key)
    return errors


def _check_key(base: RunConfig, search: SearchSection, key: str) -> list[str]:
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
                trial_config(base, params)
            except ConfigError as e:
                shown = "" if name is None else f" (with {switch}={name!r})"
                errors.append(f"search.space.{key}={value!r}{shown}: {e}")
    if not applied:
        chosen = "the base config's" if names == [None] else f"any of {switch}={names}"
        errors.append(f"search.space.{key}: {chosen} has no such key")
    return errors


def _check_scheduler(base: RunConfig, search: SearchSection) -> list[str]:
    """ASHA's grace period fits in the shortest run: Ray checks grace_period <= max_t only
    once the search has started, with a bare AssertionError."""
    sched, epochs = search.scheduler, _epochs(base, search)
    if sched.type != "asha" or not epochs or sched.grace_period <= min(epochs):
        return []
    searched = "the shortest searched " if "train.epochs" in search.space else ""
    which = f"{searched}train.epochs={min(epochs)}"
    return [
        f"search.scheduler.grace_period={sched.grace_period} is longer than {which}: ASHA "
        "runs every trial for at least the grace period; lower it or run more epochs"
    ]


def _check_search_alg(search: SearchSection) -> list[str]:
    """What the search algorithm needs, checked without importing Ray."""
    if search.search_alg != "optuna":
        return []
    try:
        import optuna  # noqa: F401
    except ImportError:
        return ["search.search_alg=optuna needs optuna: pip install -e '.[optuna]'"]
    if any(isinstance(spec, Grid) for spec in search.space.values()):
        return ["search.search_alg=optuna does not take grid entries; use choice"]
    return []


DATA_KEYS = ("data.shards", "data.train_split", "data.eval_split")


def check_data(tc: TuneConfig) -> None:
    """The shards and splits every trial reads exist. Inside the trials a missing folder is
    found only after Ray starts, as one failed trial after another."""
    corners = [tc.base] + [
        trial_config(tc.base, {key: value})
        for key in tc.search.space
        if key in DATA_KEYS
        for value in tc.search.values(key)
    ]
    errors: list[str] = []
    for cfg in corners:
        try:
            info = load_dataset_info(absolute_path(cfg.data.shards))
        except DataError as err:
            errors.append(f"data.shards: {err}")
            continue
        for key in ("train_split", "eval_split"):
            try:
                info.split(getattr(cfg.data, key))
            except DataError as err:
                errors.append(f"data.{key}: {err}")
    if errors:
        raise_config_error(list(dict.fromkeys(errors)))  # corners repeat the base's errors
