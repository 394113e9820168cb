"""Run configs: YAML + dotted overrides -> validated dataclasses, before Ray starts.

A run config has five sections; every field is documented below and in README.md:

    data:  where the shards are and how they are read
    model: `type` (capsnet | cnn) plus any field of capscore's CapsNetConfig / BaselineCNNConfig
    train: optimisation, precision, epochs, seed
    run:   Ray assembly: name, storage, workers, GPUs, failures, checkpoints
    debug: test-only hooks (fault injection)

Dicts exist only at the Ray boundary: ``RunConfig.to_dict()`` goes in, ``RunConfig.from_dict``
rebuilds (and re-validates) it on the worker's first line.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from capscore import MODELS

Precision = Literal["fp32", "bf16", "fp16"]


class ConfigError(ValueError):
    """A run config that cannot work; the message names the key to fix."""


def is_remote(path: str) -> bool:
    """s3://, gs://, http(s)://, ... (anything with a scheme but file://)."""
    return "://" in path and not path.startswith("file://")


def absolute_path(path: str) -> str:
    """A local path (or file:// URI) made absolute; remote URIs and "" unchanged. Ray workers
    run in other directories, and Ray wants absolute storage paths."""
    if not path or is_remote(path):
        return path
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def coerce_fields(config_cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """Convert YAML scalars to each field's type, judged by its default value.

    YAML 1.1 reads `3e-4` as a string and `1` where a float is meant; both are common in
    hand-written configs and --set overrides, so numbers are converted here, and anything that
    does not convert is an error naming the key.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    out = dict(values)
    for key, value in values.items():
        default = defaults.get(key, dataclasses.MISSING)
        try:
            if isinstance(default, bool) or isinstance(value, bool) or value is None:
                continue
            if isinstance(default, float) and isinstance(value, (int, str)):
                out[key] = float(value)
            elif isinstance(default, int) and isinstance(value, str):
                out[key] = int(value)
        except ValueError:
            raise ConfigError(f"{section}.{key}: expected a number, got {value!r}") from None
    return out


@dataclass(kw_only=True)
class DataSection:
    shards: str = "shards/mnist"
    """Shard folder (or URL) holding dataset.json, as written by `capsnet shards`."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "test"
    """Split evaluated exactly after every epoch."""
    loader_workers: int = 2
    """DataLoader worker processes per training worker."""
    shuffle_buffer: int = 2000
    """Samples held in each loader worker's shuffle buffer."""
    augment: bool = True
    """Random +-2 px shifts of training images (the paper's only augmentation)."""
    eval_batch_size: int = 500
    """Per-worker batch size for evaluation."""
    on_error: Literal["skip", "raise"] = "skip"
    """Corrupt samples/shards: skip and count them, or stop."""
    verify_checksums: bool = False
    """Check every shard's sha256 against dataset.json before training."""

    def __post_init__(self) -> None:
        _require(bool(self.shards), "data.shards", "must name a shard folder or URL")
        _require(self.loader_workers >= 0, "data.loader_workers", f"must be >= 0, got {self.loader_workers}")
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _require(self.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _require(self.on_error in ("skip", "raise"), "data.on_error", f"must be skip or raise, got {self.on_error!r}")


@dataclass(kw_only=True)
class TrainSection:
    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 128
    """GLOBAL batch size, split evenly over the workers (so results do not depend on the count)."""
    lr: float = 1e-3
    """Adam learning rate at step 0."""
    lr_decay: float = 0.96
    """Exponential decay factor: lr * lr_decay ** (step / lr_decay_steps) (official code: 0.96)."""
    lr_decay_steps: int = 2000
    """Optimizer steps per decay factor."""
    weight_decay: float = 0.0
    """Adam L2 weight decay."""
    precision: Precision = "fp32"
    """fp32, or autocast to bf16 / fp16 (fp16 adds a GradScaler)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 0
    """Seeds model init, data order and augmentation; a 1-worker CPU run is reproducible."""
    log_every: int = 50
    """Steps between progress lines (and non-finite loss checks)."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch for quick runs; 0 = the whole split."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "lr_decay_steps", "log_every"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(0 < self.lr_decay <= 1, "train.lr_decay", f"must be in (0, 1], got {self.lr_decay}")
        _require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.precision in ("fp32", "bf16", "fp16"), "train.precision",
                 f"must be fp32, bf16 or fp16, got {self.precision!r}")
        _require(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0")


@dataclass(kw_only=True)
class RunSection:
    name: str = "capsnet"
    """Stable run name: rerunning the same command resumes this run."""
    storage_path: str = "runs"
    """Folder (or s3:// / gs:// URI) that holds <name>/ with checkpoints and metrics."""
    num_workers: int = 1
    """Training workers (DDP ranks), one GPU each when use_gpu."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Train on GPUs; auto = if the cluster (or this machine) has any."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker (DataLoader workers run inside this budget)."""
    max_failures: int = 2
    """Worker/node failures Ray recovers from by restarting from the last checkpoint."""
    keep_checkpoints: int = 2
    """Checkpoints Ray keeps, best by test accuracy (the latest is kept for resuming too)."""
    resume_from: str = ""
    """A checkpoint.pt (or its folder) to start from when the run has no checkpoint yet."""

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "run.name", f"must be a plain name, got {self.name!r}")
        _require(self.num_workers >= 1, "run.num_workers", f"must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker >= 1, "run.cpus_per_worker", "must be >= 1")
        _require(self.max_failures >= -1, "run.max_failures", "must be >= -1 (-1 = unlimited)")
        _require(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        _require(self.use_gpu in (True, False, "auto"), "run.use_gpu", "must be true, false or auto")


@dataclass(kw_only=True)
class DebugSection:
    crash_once_at_epoch: int = -1
    """TEST ONLY: rank 0 exits hard once at the start of this epoch (fault-injection tests)."""
    crash_marker: str = ""
    """TEST ONLY: file created on the crash so that it happens once."""


@dataclass(kw_only=True)
class RunConfig:
    data: DataSection = field(default_factory=DataSection)
    model: dict[str, Any] = field(default_factory=lambda: {"type": "capsnet"})
    train: TrainSection = field(default_factory=TrainSection)
    run: RunSection = field(default_factory=RunSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        self.model = dict(self.model)
        kind = self.model.setdefault("type", "capsnet")
        _require(kind in MODELS, "model.type", f"must be one of {sorted(MODELS)}, got {kind!r}")
        self.model_config()  # validates the model keys and values now, not on a worker
        _require(self.train.batch_size % self.run.num_workers == 0, "train.batch_size",
                 f"{self.train.batch_size} must be divisible by run.num_workers={self.run.num_workers}")

    def model_config(self, image_shape: tuple[int, int, int] | None = None,
                     num_classes: int | None = None):
        """The capscore config; image shape and classes come from the data unless set."""
        params = {k: v for k, v in self.model.items() if k != "type"}
        if image_shape is not None:
            params.setdefault("in_channels", image_shape[0])
            params.setdefault("image_size", image_shape[1])
        if num_classes is not None:
            params.setdefault("num_classes", num_classes)
        config_cls = MODELS[self.model["type"]][1]
        params = coerce_fields(config_cls, params, "model")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(params) - known)
        _require(not unknown, "model", f"unknown key(s) {unknown} for type {self.model['type']!r}; "
                                       f"known: {sorted(known)}")
        try:
            return config_cls(**params)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        raw = copy.deepcopy(raw)
        _require(isinstance(raw, dict), "config", "must be a mapping of sections")
        sections = {"data": DataSection, "train": TrainSection, "run": RunSection, "debug": DebugSection}
        unknown = sorted(set(raw) - set(sections) - {"model"})
        _require(not unknown, "config", f"unknown section(s) {unknown}; known: data, model, train, run, debug")
        kwargs: dict[str, Any] = {}
        for name, section_cls in sections.items():
            values = raw.get(name) or {}
            _require(isinstance(values, dict), name, "must be a mapping")
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - known)
            _require(not bad, name, f"unknown key(s) {[f'{name}.{k}' for k in bad]}; known: {sorted(known)}")
            kwargs[name] = section_cls(**coerce_fields(section_cls, values, name))
        model = raw.get("model") or {}
        _require(isinstance(model, dict), "model", "must be a mapping")
        return cls(**kwargs, model=model)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        _require(bool(sep) and "." in key, item, "overrides look like section.key=value")
        *path, leaf = key.strip().split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), key, f"{part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        _require(p.is_file(), str(path), "config file not found")
        raw = yaml.safe_load(p.read_text()) or {}
    return RunConfig.from_dict(apply_overrides(raw, list(overrides)))
