"""Write a dataset as WebDataset shards: `DIR/{split}-NNNNNN.tar` + `DIR/dataset.json`.

Samples are shuffled globally with the seed before they are cut into shards, because
sources are often sorted by class and a reader's shuffle buffer cannot repair a shard
that holds one class. Output is byte-reproducible, and `dataset.json` is written last,
atomically, so an interrupted run never leaves a file that claims incomplete shards.

The datasets it can write are the entries of `DATASETS` (name → `DatasetSpec`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, BinaryIO, Literal, get_args

import numpy as np
from tqdm import tqdm

from pipeline.data import generated, sources
from pipeline.data.info import (
    INFO_NAME,
    DataError,
    DatasetInfo,
    MissingDataError,
    ShardInfo,
    SplitInfo,
)
from pipeline.data.tario import TarWriter

SHARD_PATTERN = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
MAX_IMAGE_SIZE = 1024
MAX_CHANNELS = 16
TAKE_CHUNK = 1024  # samples rendered per `take` call: bounds memory of the generators

Reads = Literal["idx", "torchvision", "nothing"]
"""What a dataset's source reads: see `DatasetSpec.reads`."""

IDX_DIR_HELP = "a folder with the four MNIST-format IDX files"


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """One entry of DATASETS: all that `capsnet shards --dataset NAME` knows about NAME."""

    description: str
    """One line for `capsnet shards --help`."""
    reads: Reads
    """What the source reads. "idx": MNIST-format IDX files in --data-dir (gz or raw);
    "torchvision": a torchvision dataset under --data-dir, fetched only with --download;
    "nothing": generated from the seed alone. Tests choose how to exercise an entry by it."""
    build: Callable[[ShardsConfig], sources.Source]
    """The dataset described by a (validated) config, ready to be sharded."""
    needs_data_dir: bool = False
    """ShardsConfig refuses a config without --data-dir."""
    data_dir_help: str = ""
    """What --data-dir must hold, for the error when it is missing."""

    def __post_init__(self) -> None:
        if self.reads not in get_args(Reads):
            raise ValueError(f"reads must be one of {get_args(Reads)}, got {self.reads!r}")
        if self.needs_data_dir and not self.data_dir_help:
            raise ValueError("a dataset that needs --data-dir must say what it holds")


def _synthetic(config: ShardsConfig) -> sources.Source:
    return sources.synthetic_source(
        image_size=config.image_size,
        channels=config.channels,
        num_classes=config.num_classes,
        train_samples=config.train_samples or 1024,
        test_samples=config.test_samples or 256,
        label_kind="multi-hot" if config.multi_hot else "index",
        seed=config.seed,
    )


def _idx(config: ShardsConfig) -> sources.Source:
    if not config.data_dir:
        raise DataError(f"--dataset {config.dataset} needs --data-dir: {IDX_DIR_HELP}")
    return sources.idx_source(_idx_folder(config.data_dir), name=config.name)


def _multimnist(config: ShardsConfig) -> sources.Source:
    return generated.multimnist_source(
        _idx(config), pairs_per_digit=config.pairs_per_digit, seed=config.seed
    )


def _affine_test(config: ShardsConfig) -> sources.Source:
    return generated.affine_source(_idx(config), seed=config.seed)


def _torchvision(
    class_name: str, layout: sources.TorchvisionLayout
) -> Callable[[ShardsConfig], sources.Source]:
    def build(config: ShardsConfig) -> sources.Source:
        return sources.torchvision_source(
            config.dataset,
            config.data_dir or "data",
            config.download,
            class_name=class_name,
            layout=layout,
        )

    return build


def _torchvision_spec(
    description: str, class_name: str, layout: sources.TorchvisionLayout
) -> DatasetSpec:
    return DatasetSpec(
        description=f"{description} (torchvision: --download fetches it)",
        reads="torchvision",
        build=_torchvision(class_name, layout),
    )


def _idx_spec(description: str, build: Callable[[ShardsConfig], sources.Source]) -> DatasetSpec:
    return DatasetSpec(
        description=description,
        reads="idx",
        build=build,
        needs_data_dir=True,
        data_dir_help=IDX_DIR_HELP,
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": _torchvision_spec("MNIST digits, 1×28×28, 10 classes", "MNIST", "idx"),
    "fashion-mnist": _torchvision_spec(
        "Fashion-MNIST clothing, 1×28×28, 10 classes", "FashionMNIST", "idx"
    ),
    "kmnist": _torchvision_spec("Kuzushiji-MNIST kana, 1×28×28, 10 classes", "KMNIST", "idx"),
    "cifar10": _torchvision_spec("CIFAR-10 photos, 3×32×32, 10 classes", "CIFAR10", "cifar"),
    "svhn": _torchvision_spec(
        "SVHN house-number digits, 3×32×32, 10 classes, needs scipy", "SVHN", "svhn"
    ),
    "idx": _idx_spec("any four MNIST-format IDX files in --data-dir, as they are", _idx),
    "multimnist": _idx_spec(
        "MultiMNIST from IDX digits: two digits of different classes on 36×36, multi-hot",
        _multimnist,
    ),
    "affine-test": _idx_spec(
        "affNIST-style from IDX digits, 40×40: train shifted, test under random affine maps",
        _affine_test,
    ),
    "synthetic": DatasetSpec(
        description="offline class patterns + noise (--image-size, --channels, --num-classes)",
        reads="nothing",
        build=_synthetic,
    ),
}
"""Every dataset `capsnet shards` can write, by name: adding a dataset is adding an entry."""


def describe_datasets() -> str:
    """One line per entry of DATASETS, `name  description`, e.g. for an argparse epilog."""
    width = max(map(len, DATASETS))
    return "\n".join(f"  {name:<{width}}  {spec.description}" for name, spec in DATASETS.items())


@dataclass(frozen=True, kw_only=True)
class ShardsConfig:
    """What `capsnet shards` writes; the same fields as its command-line flags."""

    dataset: str
    """One of DATASETS."""
    out: str
    """Output directory for the tar shards and dataset.json."""
    data_dir: str | None = None
    """Where the raw dataset lives (torchvision root, or a folder of IDX files)."""
    shard_size: int = 10_000
    """Samples per shard (the last shard of a split may hold fewer)."""
    seed: int = 0
    """Seeds the global shuffle and every generator: same inputs + seed → same bytes."""
    download: bool = False
    """Let torchvision download missing files into data_dir."""
    overwrite: bool = False
    """Replace shards already in `out` (otherwise refuse)."""
    train_samples: int | None = None
    """Synthetic: train samples to generate (default 1024); others: keep a random subset."""
    test_samples: int | None = None
    """Synthetic: test samples to generate (default 256); others: keep a random subset."""
    image_size: int = 28
    """Synthetic: image height and width."""
    channels: int = 1
    """Synthetic: image channels."""
    num_classes: int = 10
    """Synthetic: number of classes."""
    multi_hot: bool = False
    """Synthetic: overlay two classes per image with multi-hot labels (like MultiMNIST)."""
    pairs_per_digit: int = 1
    """MultiMNIST: overlaid pairs generated per source digit (the paper used 1000)."""
    name: str | None = None
    """Dataset name recorded in dataset.json (default: derived from the source)."""

    def __post_init__(self) -> None:
        spec = DATASETS.get(self.dataset)
        if spec is None:
            raise DataError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        if self.shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {self.shard_size}")
        for key in ("train_samples", "test_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DataError(f"{key} must be >= 1, got {value}")
        if self.image_size < 4 or self.channels < 1 or self.num_classes < 2:
            raise DataError("synthetic needs image_size >= 4, channels >= 1, num_classes >= 2")
        # Generous for capsule networks (the paper's largest input is 40x40), small enough that
        # a typo (--image-size 100000) is an error, not an attempt to allocate 149 GiB.
        if self.image_size > MAX_IMAGE_SIZE or self.channels > MAX_CHANNELS:
            raise DataError(
                f"synthetic: --image-size must be <= {MAX_IMAGE_SIZE} and --channels <= "
                f"{MAX_CHANNELS}, got {self.image_size} and {self.channels}"
            )
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise DataError(f"--out {self.out} is a file; give a folder (new or holding shards)")
        if self.pairs_per_digit < 1:
            raise DataError(f"pairs_per_digit must be >= 1, got {self.pairs_per_digit}")
        if spec.needs_data_dir and not self.data_dir:
            raise DataError(f"--dataset {self.dataset} needs --data-dir: {spec.data_dir_help}")

    @property
    def spec(self) -> DatasetSpec:
        """The DATASETS entry of `dataset`."""
        return DATASETS[self.dataset]


def build_source(config: ShardsConfig) -> sources.Source:
    """The dataset named by `config`, ready to be sharded."""
    return config.spec.build(config)


def _idx_folder(data_dir: str) -> str:
    """`data_dir` itself, or torchvision's `data_dir/MNIST/raw` layout."""
    for folder in (data_dir, os.path.join(data_dir, "MNIST", "raw")):
        try:
            sources.find_idx_files(folder)
            return folder
        except MissingDataError:
            continue
    sources.find_idx_files(data_dir)  # raises, naming what is missing
    return data_dir


def write_shards(
    config: ShardsConfig, *, progress: bool = False, command: str | None = None
) -> DatasetInfo:
    """Write the shards and dataset.json described by `config`; returns the written info."""
    source = build_source(config)
    _prepare_out_dir(config.out, config.overwrite)
    limits = {"train": config.train_samples, "test": config.test_samples}
    orders = {
        split: _sample_order(part.num_samples, limits.get(split), config.seed, i)
        for i, (split, part) in enumerate(source.splits.items())
    }
    splits = {}
    with tqdm(
        total=sum(len(o) for o in orders.values()),
        unit="img",
        disable=not progress,
        desc=f"shards {source.name}",
    ) as bar:
        for split, order in orders.items():
            shards = []
            for k, start in enumerate(range(0, len(order), config.shard_size)):
                indices = order[start : start + config.shard_size]
                name = f"{split}-{k:06d}.tar"
                shards.append(_write_shard(config.out, name, source.splits[split], indices, bar))
            splits[split] = SplitInfo(len(order), tuple(shards))
    info = DatasetInfo(
        name=config.name or source.name,
        image_shape=source.image_shape,
        num_classes=source.num_classes,
        label_kind=source.label_kind,
        splits=splits,
        class_names=source.class_names,
        extra_fields=source.extra_fields,
        seed=config.seed,
        command=command or f"write_shards({_config_repr(config)})",
        source={"dataset": config.dataset, "shard_size": config.shard_size, **source.params},
        base_url=os.path.abspath(config.out),
    )
    _atomic_write(os.path.join(config.out, INFO_NAME), info.to_json().encode())
    return info


def _config_repr(config: ShardsConfig) -> str:
    defaults = {f.name: f.default for f in fields(ShardsConfig)}
    changed = {k: v for k, v in asdict(config).items() if v != defaults[k]}
    return ", ".join(f"{k}={v!r}" for k, v in changed.items())


def _prepare_out_dir(out: str, overwrite: bool) -> None:
    os.makedirs(out, exist_ok=True)
    info_path = os.path.join(out, INFO_NAME)
    old_shards = [n for n in os.listdir(out) if SHARD_PATTERN.match(n)]
    if (os.path.exists(info_path) or old_shards) and not overwrite:
        raise DataError(f"{out} already holds shards; pass --overwrite to replace them")
    # dataset.json goes first: from here on no file claims the shards being replaced.
    if os.path.exists(info_path):
        os.remove(info_path)
    for name in old_shards:
        os.remove(os.path.join(out, name))


def _sample_order(num_samples: int, limit: int | None, seed: int, split_index: int) -> np.ndarray:
    order = np.random.default_rng([seed, 1000 + split_index]).permutation(num_samples)
    return order if limit is None else order[:limit]


class _HashingWriter:
    """Counts and hashes bytes on their way to the file, so shards are read only once."""

    def __init__(self, f: BinaryIO):
        self.f, self.size, self.digest = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def _write_shard(
    out: str, name: str, split: sources.SplitSource, indices: np.ndarray, bar: tqdm
) -> ShardInfo:
    partial = os.path.join(out, f".{name}.partial")
    with open(partial, "wb") as f:
        sink = _HashingWriter(f)
        with TarWriter(sink) as tar:  # type: ignore[arg-type]
            for key, fields in _serialised(split, indices):
                tar.write(key, fields)
                bar.update(1)
    os.replace(partial, os.path.join(out, name))
    return ShardInfo(name, len(indices), sink.size, sink.digest.hexdigest())


def _serialised(
    split: sources.SplitSource, indices: np.ndarray
) -> Iterator[tuple[str, dict[str, bytes]]]:
    for start in range(0, len(indices), TAKE_CHUNK):
        chunk = indices[start : start + TAKE_CHUNK]
        fields = split.take(chunk)
        for row, index in enumerate(chunk):
            yield (
                f"{int(index):09d}",
                {name: _encode(name, values[row]) for name, values in fields.items()},
            )


def _encode(field: str, value: Any) -> bytes:
    if field.endswith(".u8"):
        return np.ascontiguousarray(value, dtype=np.uint8).tobytes()
    if field == "cls":
        return b"%d" % int(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise DataError(f"don't know how to store field {field!r} of type {type(value).__name__}")


def _atomic_write(path: str, data: bytes) -> None:
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
