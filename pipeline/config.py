"""Run configs: YAML + dotted overrides -> one validated, typed object, before Ray starts.

A run config has five sections; every field is documented below (and shown by
`capsnet train --print-config`):

    data:  where the shards are and how they are read (pipeline.data.DataConfig)
    model: `type` (a capscore.MODELS name), `preset` (a named config of that family) and any
           field of its config class as an override, e.g. {type: capsnet, preset: tiny,
           routing: {iterations: 1}}
    train: optimisation, batch sizes (global), precision, epochs, seed
    run:   Ray assembly: name, storage, workers, GPUs, failures, checkpoints
    debug: test-only hooks (fault injection)

Dicts exist only at the Ray boundary: ``RunConfig.to_dict()`` goes in, ``parse_run_config``
rebuilds (and re-validates) it on the worker's first line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from capscore import MODELS
from pipeline.data.config import DataConfig
from pipeline.schema import (
    Bool,
    ConfigError,
    Float,
    Int,
    Section,
    Str,
    error_lines,
    partial_model,
    plain,
    raise_config_error,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelSection",
    "RunConfig",
    "absolute_path",
    "apply_overrides",
    "is_remote",
    "load_config",
    "load_yaml",
    "parse_run_config",
]

Precision = Literal["fp32", "bf16", "fp16"]
PositiveInt = Annotated[Int, Field(ge=1)]


def is_remote(path: str) -> bool:
    """s3://, gs://, http(s)://, ... (anything with a scheme but file://)."""
    return "://" in path and not path.startswith("file://")


def absolute_path(path: str) -> str:
    """A local path (or file:// URI) made absolute; remote URIs and "" unchanged. Ray workers
    run in other directories, and Ray wants absolute storage paths."""
    if not path or is_remote(path):
        return path
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


# --- model ------------------------------------------------------------------------------------


class ModelSection(Section):
    """The model family, its preset and the overrides, as given (resolved by `build_config`)."""

    type: Str = "capsnet"
    """A capscore.MODELS name: capsnet or cnn."""
    preset: Str = ""
    """A named config of that family (capsnet: mnist, multimnist, cifar10, tiny; cnn: mnist,
    tiny); empty = the paper's network for MNIST."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Fields of the family's config class that differ from the preset."""

    def build_config(
        self, image_shape: tuple[int, int, int] | None = None, num_classes: int | None = None
    ) -> Any:
        """The capscore config: the preset, the data's image shape and classes, then the
        overrides (an explicit override wins over the data)."""
        spec = MODELS[self.type]
        from_data: dict[str, Any] = {}
        if image_shape is not None:
            from_data.update(in_channels=image_shape[0], image_size=image_shape[1])
        if num_classes is not None:
            from_data.update(num_classes=num_classes)
        fields = spec.config.__dataclass_fields__
        values = {k: v for k, v in from_data.items() if k in fields} | self.overrides
        return spec.make_config(self.preset or None, values)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The form written in YAML: {type, preset, **overrides}."""
        out: dict[str, Any] = {"type": self.type}
        if self.preset:
            out["preset"] = self.preset
        return out | plain(self.overrides)


def _family_model(kind: str) -> Any:
    """The strict pydantic form of `model:` for one family: type, preset, typed overrides."""
    spec = MODELS[kind]
    return create_model(
        f"{kind}_model",
        __base__=partial_model(spec.config),  # every config field, typed, optional
        type=(Literal[kind], kind),  # type: ignore[valid-type]
        preset=(Literal[("", *spec.presets)], ""),  # type: ignore[valid-type]
    )


def _model_kind(value: Any) -> str:
    kind = value.get("type", "capsnet") if isinstance(value, dict) else "capsnet"
    return f"<{kind}>"


_family_forms = {kind: _family_model(kind) for kind in MODELS}
_MODEL_FORM = TypeAdapter(
    Annotated[
        Union[tuple(Annotated[form, Tag(f"<{k}>")] for k, form in _family_forms.items())],  # noqa: UP007
        Discriminator(
            _model_kind,
            custom_error_type="unknown_model",
            custom_error_message=f"type must be one of {sorted(MODELS)}",
        ),
    ]
)


# --- sections ---------------------------------------------------------------------------------


class TrainSection(Section):
    epochs: PositiveInt = 10
    """Passes over the training split."""
    batch_size: PositiveInt = 128
    """GLOBAL training batch size, split evenly over the workers (results do not depend on the
    worker count)."""
    eval_batch_size: PositiveInt = 500
    """GLOBAL evaluation batch size, split over the workers (each takes the ceiling of
    eval_batch_size / num_workers; the split does not change any result)."""
    lr: Annotated[Float, Field(gt=0)] = 1e-3
    """Adam learning rate at step 0."""
    lr_decay: Annotated[Float, Field(gt=0, le=1)] = 0.96
    """Exponential decay: lr * lr_decay ** (step / lr_decay_steps) (official code: 0.96)."""
    lr_decay_steps: PositiveInt = 2000
    """Optimizer steps per decay factor."""
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    """Adam L2 weight decay."""
    precision: Precision = "fp32"
    """fp32, or autocast to bf16 / fp16 (fp16 adds a GradScaler). capscore keeps squash,
    routing logits and softmax, and the losses in fp32 under autocast."""
    compile: Bool = False
    """The fast path (with precision=bf16 on a GPU): torch.compile of the train step's forward
    + loss as one graph, and channels-last convolutions on CUDA. The first steps compile
    (tens of seconds); evaluation runs the plain module."""
    seed: Int = 0
    """Seeds model init, data order and augmentation; a 1-worker CPU run is reproducible."""
    log_every: PositiveInt = 50
    """Steps between progress lines (and non-finite loss checks)."""
    max_steps_per_epoch: Annotated[Int, Field(ge=0)] = 0
    """Cap on steps per epoch for quick runs; 0 = the whole split."""


Tracker = Literal["tensorboard", "wandb", "mlflow"]


def _installed(trackers: list[str]) -> list[str]:
    import importlib.util

    modules = {"wandb": "wandb", "mlflow": "mlflow"}
    missing = [t for t in trackers if t in modules and importlib.util.find_spec(modules[t]) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed: pip install -e '.[trackers]'")
    return list(dict.fromkeys(trackers))


def _plain_name(value: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError("must be a plain name (no slashes, not . or ..)")
    return value


def _bool_or_auto(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError("must be true, false or auto")


class RunSection(Section):
    name: Annotated[Str, AfterValidator(_plain_name)] = "capsnet"
    """Stable run name (no slashes): rerunning the same command resumes this run."""
    storage_path: Str = "runs"
    """Folder (or s3:// / gs:// URI) that holds <name>/ with checkpoints and metrics."""
    num_workers: PositiveInt = 1
    """Training workers (DDP ranks), one GPU each when use_gpu."""
    use_gpu: Annotated[Bool | Literal["auto"], PlainValidator(_bool_or_auto)] = "auto"
    """Train on GPUs: true, false, or auto = if the cluster (or this machine) has any."""
    cpus_per_worker: PositiveInt = 1
    """CPUs reserved per worker (DataLoader workers run inside this budget)."""
    max_failures: Annotated[Int, Field(ge=-1)] = 2
    """Worker/node failures Ray recovers from by restarting from the last checkpoint (-1 =
    unlimited)."""
    keep_checkpoints: PositiveInt = 2
    """Checkpoints kept, best by test accuracy (the latest is kept for resuming too)."""
    checkpoint_every: PositiveInt = 1
    """Epochs between checkpoints (the last epoch always gets one)."""
    report_to: Annotated[list[Tracker], AfterValidator(_installed)] = Field(
        default_factory=lambda: ["tensorboard"]
    )
    """Trackers rank 0 reports to: tensorboard, wandb, mlflow (the last two need
    `pip install -e '.[trackers]'`; W&B reads WANDB_* (WANDB_MODE=offline works), MLflow
    MLFLOW_TRACKING_URI, default: a file store in the run folder's mlruns/)."""
    resume_from: Str = ""
    """A checkpoint.pt (or its folder) to start from when the run has no checkpoint yet."""


class DebugSection(Section):
    crash_once_at_epoch: Int = -1
    """TEST ONLY: rank 0 exits hard once at the start of this epoch (fault-injection tests)."""
    crash_marker: Str = ""
    """TEST ONLY: file created on the crash so that it happens once."""
    nan_at_step: Int = -1
    """TEST ONLY: the loss becomes NaN at this global step (0-based) on every rank."""


class RunConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    run: RunSection = Field(default_factory=RunSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    @model_validator(mode="after")
    def _check_together(self) -> RunConfig:
        workers = self.run.num_workers
        if self.train.batch_size % workers:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} must be divisible by "
                f"run.num_workers={workers} (it is the global batch size)"
            )
        try:
            self.model.build_config()  # values the model rejects fail now, not on a worker
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        return self

    def build_model_config(
        self, image_shape: tuple[int, int, int] | None = None, num_classes: int | None = None
    ) -> Any:
        """The capscore config of this run for data of this shape (see ModelSection)."""
        return self.model.build_config(image_shape, num_classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-able), the form configs are written in; parse_run_config
        reads it back."""
        out = plain(self.model_dump(exclude={"model"}))
        return {
            "data": out["data"],
            "model": self.model.to_yaml_dict(),
            **{k: out[k] for k in ("train", "run", "debug")},
        }

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some keys changed, e.g. replace(run={"num_workers": 1}), re-validated."""
        raw = self.to_dict()
        for section, values in sections.items():
            raw[section] = {**raw[section], **values}
        return parse_run_config(raw)


def _given(given: dict[str, Any], parsed: dict[str, Any]) -> dict[str, Any]:
    """Validated override values (floats from '3e-4', ...) for exactly the keys the user gave,
    nested configs included."""
    out = {}
    for key in given:
        if key in ("type", "preset"):
            continue
        value = parsed.get(key)
        if isinstance(given[key], dict) and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in given[key]}
        out[key] = plain(value)
    return out


# --- reading ----------------------------------------------------------------------------------


def parse_run_config(raw: Any, source: str = "") -> RunConfig:
    """Validate a run config given as plain data; every error in one ConfigError."""
    if not isinstance(raw, dict):
        raise_config_error([f"must be a mapping of sections, got {type(raw).__name__}"], source)
    raw = {k: {} if v is None else v for k, v in raw.items()}  # `debug:` alone = the defaults
    errors: list[str] = []
    given = raw.get("model") or {}
    section = ModelSection()
    if not isinstance(given, dict):
        errors.append(f"model: must be a mapping, got {given!r}")
    else:
        try:
            parsed = _MODEL_FORM.validate_python(given)
            overrides = parsed.model_dump(exclude_unset=True, exclude={"type", "preset"})
            section = ModelSection(
                type=parsed.type, preset=parsed.preset, overrides=_given(given, overrides)
            )
        except ValidationError as err:
            errors += error_lines(
                err, ("model",), root=_family_forms.get(given.get("type", "capsnet"))
            )
    try:
        config = RunConfig.model_validate({**raw, "model": section})
    except ValidationError as err:
        errors += error_lines(err, root=RunConfig)
    if errors:
        raise_config_error(errors, source)
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; errors name the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _registry_entry(raw: dict[str, Any], path: list[str]) -> tuple[str, Any] | None:
    """(name, spec) of the registry entry the nested config at `path` names (e.g. the routing
    algorithm at model.routing; its default entry when no name is given), or None when `path`
    is not a registry-backed model field."""
    if len(path) != 2 or path[0] != "model":
        return None
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    spec = MODELS.get(model.get("type", "capsnet"))
    registry = spec.registries.get(path[1]) if spec else None
    if registry is None:
        return None
    node = model.get(path[1])
    name = node.get("name", next(iter(registry))) if isinstance(node, dict) else next(iter(registry))
    return (name, registry[name]) if name in registry else None


def place(raw: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """Set each dotted key of `params` in the raw config `raw` (in place), by the one rule for
    registry-backed model configs (`model.routing`), shared by `--set` and Tune searches:

    - a `name` that picks another entry (model.routing.name=uniform) replaces the whole nested
      config with that entry's defaults: the old algorithm's keys mean nothing to the new one;
    - a key the chosen entry does not have (model.routing.iterations for uniform) is not set.

    Switches are applied first, so the other keys land on the chosen entry. Returns the keys
    that were not set (the caller decides: an error for --set, "n/a" in a search's results).
    """
    skipped = []
    for key in sorted(params, key=lambda k: not k.endswith(".name")):  # stable: switches first
        *path, leaf = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        entry = _registry_entry(raw, path)
        if entry is not None and leaf == "name":
            if params[key] != entry[0]:
                node.clear()
        elif entry is not None and leaf not in entry[1].keys:
            skipped.append(key)
            continue
        node[leaf] = params[key]
    return skipped


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`section.key=value` strings -> {dotted key: value} (values parsed as YAML; a later
    repeat of a key wins). Under `search.space` the rest of the key is one run-config key:
    `search.space.train.lr={loguniform: [1e-4, 1e-2]}` sets the space's "train.lr"."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: overrides look like section.key=value")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse value {value!r} ({err})") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the raw config dict with `--set` overrides applied (see `place`); a key that
    the chosen routing algorithm does not have is an error naming the keys it has."""
    raw = copy.deepcopy(raw)
    params = parse_overrides(overrides)
    space = {k: v for k, v in params.items() if k.startswith("search.space.")}
    for key, value in space.items():
        raw.setdefault("search", {}).setdefault("space", {})
        if not isinstance(raw["search"]["space"], dict):
            raise ConfigError(f"{key}: search.space is not a section")
        raw["search"]["space"][key.removeprefix("search.space.")] = value
    errors = []
    for key in place(raw, {k: v for k, v in params.items() if k not in space}):
        name, spec = _registry_entry(raw, key.split(".")[:-1])  # type: ignore[misc]
        errors.append(
            f"--set {key}: routing {name!r} has no such key; its keys: {', '.join(spec.keys)}"
        )
    if errors:
        raise_config_error(errors)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate everything."""
    raw = load_yaml(path) if path is not None else {}
    return parse_run_config(apply_overrides(raw, list(overrides)), str(path or ""))
