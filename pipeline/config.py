"""Run configs: YAML + dotted overrides -> one validated, typed object, before Ray starts.

A run config has five sections; every field is documented below (and shown by
`capsnet train --print-config`):

    data:  where the shards are and how they are read (pipeline.data.DataConfig)
    model: capscore's own config object (CapsNetConfig or BaselineCNNConfig), written in YAML
           as `type` (a capscore.MODELS name), an optional `preset` (a named config of that
           family) and any field of the config class, e.g. {type: capsnet, preset: tiny,
           routing: {iterations: 1}}
    train: optimisation, batch sizes (global), precision, epochs, seed
    run:   Ray assembly: name, storage, workers, GPUs, failures, checkpoints
    debug: test-only hooks (fault injection; not shown by --print-config)

The model fields that describe the data (image_size, in_channels, num_classes) come from the
shards' dataset.json unless the config gives them: `RunConfig.for_data` fills them, once, on
the driver. A setting changes form twice on its way to the model: YAML -> this object (parsed
once at the CLI), and `to_dict()` -> `parse_run_config` on each Ray worker.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from capscore import MODELS, model_kind
from pipeline.data.config import DataConfig
from pipeline.redact import redact_tree
from pipeline.schema import (
    RESUME_SAFE,
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
from pipeline.schema import resume_safe_keys as _resume_safe_keys

__all__ = [
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "absolute_path",
    "apply_overrides",
    "is_remote",
    "load_config",
    "load_yaml",
    "parse_run_config",
    "place",
    "resume_safe_keys",
]

Precision = Literal["fp32", "bf16", "fp16"]
PositiveInt = Annotated[Int, Field(ge=1)]

DATA_FIELDS = ("in_channels", "image_size", "num_classes")
"""Model config fields that describe the data: filled from the shards unless given."""


def is_remote(path: str) -> bool:
    """s3://, gs://, http(s)://, ... (anything with a scheme but file://)."""
    return "://" in path and not path.startswith("file://")


def absolute_path(path: str) -> str:
    """A local path (or file:// URI) made absolute; remote URIs and "" unchanged. Ray workers
    run in other directories, and Ray wants absolute storage paths."""
    if not path or is_remote(path):
        return path
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


# --- model: YAML form -> capscore's config object ----------------------------------------------


def _family_form(kind: str) -> Any:
    """The strict pydantic form of `model:` for one family: type, preset, typed fields (all
    optional: a field not given keeps the preset's value)."""
    spec = MODELS[kind]
    return create_model(
        f"{kind}_model",
        __base__=partial_model(spec.config),  # every config field, typed, optional
        type=(Literal[kind], kind),  # type: ignore[valid-type]
        preset=(Literal[("", *spec.presets)], ""),  # type: ignore[valid-type]
    )


def _model_tag(value: Any) -> str:
    kind = value.get("type", "capsnet") if isinstance(value, dict) else "capsnet"
    return f"<{kind}>"


_FAMILY_FORMS = {kind: _family_form(kind) for kind in MODELS}
_MODEL_FORM = TypeAdapter(
    Annotated[
        Union[tuple(Annotated[form, Tag(f"<{k}>")] for k, form in _FAMILY_FORMS.items())],  # noqa: UP007
        Discriminator(
            _model_tag,
            custom_error_type="unknown_model",
            custom_error_message=f"type must be one of {sorted(MODELS)}",
        ),
    ]
)


def _given(given: dict[str, Any], parsed: dict[str, Any]) -> dict[str, Any]:
    """Validated values (floats from '3e-4', ...) for exactly the keys the user gave, nested
    configs included."""
    out = {}
    for key in given:
        if key in ("type", "preset"):
            continue
        value = parsed.get(key)
        if isinstance(given[key], dict) and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in given[key]}
        out[key] = plain(value)
    return out


def parse_model(given: Any) -> tuple[Any, frozenset[str], str]:
    """The `model:` mapping -> (capscore config object, the fields it leaves to the data, the
    preset named).
    Types are checked strictly first (every error at once), then the config class validates
    the values it alone can judge (e.g. an image too small for the kernels)."""
    if not isinstance(given, dict):
        raise_config_error([f"model: must be a mapping, got {given!r}"])
    try:
        parsed = _MODEL_FORM.validate_python(given)
    except ValidationError as err:
        root = _FAMILY_FORMS.get(given.get("type", "capsnet"))
        raise_config_error(error_lines(err, ("model",), root=root))
    values = _given(given, parsed.model_dump(exclude_unset=True, exclude={"type", "preset"}))
    try:
        config = MODELS[parsed.type].make_config(parsed.preset or None, values)
    except (ValueError, TypeError) as err:
        raise_config_error([f"model: {err}"])
    return config, frozenset(f for f in DATA_FIELDS if f not in values), parsed.preset


def model_to_dict(
    config: Any, leave_out: frozenset[str] = frozenset(), preset: str = ""
) -> dict[str, Any]:
    """The YAML form of a capscore config: its type and every field (the preset expanded), but
    the fields in `leave_out` (still to come from the data; the preset is kept for them only:
    it holds their values until the data replaces them)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in leave_out}
    head = {"type": model_kind(config)} | ({"preset": preset} if preset and leave_out else {})
    return head | plain(fields)


# --- sections ---------------------------------------------------------------------------------


class TrainSection(Section):
    epochs: Annotated[PositiveInt, RESUME_SAFE] = 10
    """Passes over the training split (a resumed run may extend or shorten it)."""
    batch_size: PositiveInt = 128
    """GLOBAL training batch size, split evenly over the workers (results do not depend on the
    worker count); the per-worker share is `local_batch_size`."""
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
    log_every: Annotated[PositiveInt, RESUME_SAFE] = 50
    """Steps between progress lines (and non-finite loss checks)."""
    max_steps_per_epoch: Annotated[Int, Field(ge=0)] = 0
    """Cap on steps per epoch for quick runs; 0 = the whole split."""

    def local_batch_size(self, world_size: int) -> int:
        """Each worker's training batch: the global batch_size split evenly (ValueError if it
        does not split: a remainder would change the optimisation with the worker count)."""
        if self.batch_size % world_size:
            raise ValueError(
                f"train.batch_size: {self.batch_size} must be divisible by "
                f"run.num_workers={world_size} (it is the global batch size)"
            )
        return self.batch_size // world_size

    def local_eval_batch_size(self, world_size: int) -> int:
        """Each worker's evaluation batch: the ceiling of eval_batch_size / world_size."""
        return -(-self.eval_batch_size // world_size)


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


def _count_or_auto(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("must be a whole number >= 1, or auto")


class RunSection(Section):
    name: Annotated[Str, AfterValidator(_plain_name)] = "capsnet"
    """Stable run name (no slashes): rerunning the same command resumes this run."""
    storage_path: Annotated[Str, RESUME_SAFE] = "runs"
    """Folder (or s3:// / gs:// URI) that holds <name>/ with checkpoints and metrics (a
    resumed run may find it moved or synced elsewhere)."""
    num_workers: Annotated[int | Literal["auto"], PlainValidator(_count_or_auto)] = "auto"
    """Training workers (DDP ranks), one GPU each when use_gpu; auto = every GPU of this
    machine, else one CPU worker (on a cluster, via RAY_ADDRESS, give the number)."""
    use_gpu: Annotated[Bool | Literal["auto"], PlainValidator(_bool_or_auto), RESUME_SAFE] = "auto"
    """Train on GPUs: true, false, or auto = if the cluster (or this machine) has any."""
    cpus_per_worker: Annotated[PositiveInt, RESUME_SAFE] = 1
    """CPUs reserved per worker (DataLoader workers run inside this budget)."""
    max_failures: Annotated[Int, Field(ge=-1), RESUME_SAFE] = 2
    """Worker/node failures Ray recovers from by restarting from the last checkpoint (-1 =
    unlimited)."""
    keep_checkpoints: Annotated[PositiveInt, RESUME_SAFE] = 2
    """Checkpoints kept, best by test accuracy (the latest is kept for resuming too)."""
    checkpoint_every: Annotated[PositiveInt, RESUME_SAFE] = 1
    """Epochs between checkpoints (the last epoch always gets one)."""
    report_to: Annotated[list[Tracker], AfterValidator(_installed), RESUME_SAFE] = Field(
        default_factory=lambda: ["tensorboard"]
    )
    """Trackers rank 0 reports to: tensorboard, wandb, mlflow (the last two need
    `pip install -e '.[trackers]'`; W&B reads WANDB_* (WANDB_MODE=offline works), MLflow
    MLFLOW_TRACKING_URI, default: a file store in the run folder's mlruns/)."""
    resume_from: Annotated[Str, RESUME_SAFE] = ""
    """A checkpoint.pt (or its folder) to start from when the run has no checkpoint yet."""


class DebugSection(Section):
    resume_safe = True

    crash_once_at_epoch: Int = -1
    """TEST ONLY: rank 0 exits hard once at the start of this epoch (fault-injection tests)."""
    crash_marker: Str = ""
    """TEST ONLY: file created on the crash so that it happens once."""
    nan_at_step: Int = -1
    """TEST ONLY: the loss becomes NaN at this global step (0-based) on every rank."""


def _model_object(value: Any) -> Any:
    if not any(type(value) is spec.config for spec in MODELS.values()):
        raise ValueError(f"must be a capscore config ({sorted(MODELS)}), got {value!r}")
    return value


class RunConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: Annotated[Any, PlainValidator(_model_object)] = Field(
        default_factory=lambda: parse_model({})[0]
    )
    """capscore's config object for the model (CapsNetConfig or BaselineCNNConfig)."""
    train: TrainSection = Field(default_factory=TrainSection)
    run: RunSection = Field(default_factory=RunSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    _from_data: frozenset[str] = PrivateAttr(default=frozenset(DATA_FIELDS))
    """Model fields not given by the config: `for_data` fills them from the shards."""
    _preset: str = PrivateAttr(default="")
    """The preset the model came from, while `_from_data` fields still hold its values."""

    @model_validator(mode="after")
    def _check_together(self) -> RunConfig:
        if self.run.num_workers != "auto":
            self.train.local_batch_size(self.run.num_workers)  # the global batch must split
        return self

    def for_data(self, image_shape: tuple[int, ...], num_classes: int) -> RunConfig:
        """This config for data of this shape: the model fields the config did not give
        (image size, channels, classes) taken from the data. Idempotent."""
        channels, size = int(image_shape[0]), int(image_shape[1])
        data = {"in_channels": channels, "image_size": size, "num_classes": int(num_classes)}
        values = {k: v for k, v in data.items() if k in self._from_data}
        try:
            model = dataclasses.replace(self.model, **values) if values else self.model
        except ValueError as err:
            raise ConfigError(f"model: {err} (with the data's {values})") from None
        out = self.model_copy(update={"model": model})
        out._from_data, out._preset = frozenset(), ""
        return out

    def build_model_config(
        self, image_shape: tuple[int, ...] | None = None, num_classes: int | None = None
    ) -> Any:
        """The capscore config of this run for data of this shape (see `for_data`)."""
        if image_shape is None or num_classes is None:
            return self.model
        return self.for_data(image_shape, num_classes).model

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-able), the form configs are written in; `parse_run_config`
        reads it back to an equal object. The model is written out in full."""
        out = plain(self.model_dump(exclude={"model"}))
        return {
            "data": out["data"],
            "model": model_to_dict(self.model, self._from_data, self._preset),
            **{k: out[k] for k in ("train", "run", "debug")},
        }

    def to_record(self) -> dict[str, Any]:
        """`to_dict()` as written to files and trackers (config.yaml, checkpoints, W&B,
        MLflow): credentials in URIs masked (`pipeline.redact`); the run itself keeps them."""
        return redact_tree(self.to_dict())

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with keys of data/train/run/debug changed, e.g. replace(run={"num_workers":
        1}), each changed section re-validated (what the data fills is kept)."""
        update = {}
        for name, values in sections.items():
            section = getattr(self, name)
            try:
                update[name] = type(section).model_validate({**section.model_dump(), **values})
            except ValidationError as err:
                raise_config_error(error_lines(err, (name,), root=type(section)))
        out = self.model_copy(update=update)
        try:
            out._check_together()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return out


def resume_safe_keys() -> list[str]:
    """The run-config keys a resumed run may change (fields marked RESUME_SAFE)."""
    return _resume_safe_keys(RunConfig)


# --- reading ----------------------------------------------------------------------------------


def parse_run_config(raw: Any, source: str = "") -> RunConfig:
    """Validate a run config given as plain data; every error in one ConfigError."""
    if not isinstance(raw, dict):
        raise_config_error([f"must be a mapping of sections, got {type(raw).__name__}"], source)
    raw = {k: {} if v is None else v for k, v in raw.items()}  # `debug:` alone = the defaults
    errors: list[str] = []
    model, from_data, preset = None, frozenset(DATA_FIELDS), ""
    try:
        model, from_data, preset = parse_model(raw.get("model", {}))
    except ConfigError as err:
        errors += err.lines
    rest = {k: v for k, v in raw.items() if k != "model"}
    config = None
    try:
        config = RunConfig.model_validate(rest if model is None else {**rest, "model": model})
    except ValidationError as err:
        errors += error_lines(err, root=RunConfig)
    if errors or config is None:
        raise_config_error(errors, source)
    config._from_data, config._preset = from_data, preset if from_data else ""
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
    name = (
        node.get("name", next(iter(registry))) if isinstance(node, dict) else next(iter(registry))
    )
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


def blame(lines: list[str], source: str, set_keys: list[str]) -> ConfigError:
    """One ConfigError whose lines say where each bad value came from: `--set KEY` for the
    keys given on the command line, the file otherwise."""
    out = []
    for line in lines:
        key = line.split(":", 1)[0]
        from_set = any(
            key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in set_keys
        )
        out.append(("--set " if from_set else "") + line if from_set or not source else line)
    from_file = [line for line in out if not line.startswith("--set ")]
    head = f"{source}: " if source and from_file else ""
    if len(out) == 1:
        return ConfigError(head + out[0], out)
    return ConfigError(f"{head}{len(out)} config errors:\n  " + "\n  ".join(out), out)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate everything."""
    raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    try:
        return parse_run_config(raw)
    except ConfigError as err:
        raise blame(err.lines, str(path or ""), list(parse_overrides(overrides))) from None
