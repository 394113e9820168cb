"""Datasets → samples: torchvision datasets, IDX files and the offline synthetic generator.

Which dataset name maps to which of these is `pipeline.data.shards.DATASETS`.

A `Source` describes a dataset and, per split, how to fetch any subset of its samples as
arrays (`take(indices)`). The shard writer decides order and placement; sources only read.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.data.info import IMAGE_FIELD, LABEL_FIELDS, DataError, LabelKind, MissingDataError

Fields = dict[str, Any]
"""Per-sample field arrays of one subset: `img.u8` uint8 [n,C,H,W], `cls` int [n], ..."""


@dataclass(frozen=True)
class SplitSource:
    num_samples: int
    take: Callable[[np.ndarray], Fields]
    """indices → fields of those samples, in that order; deterministic."""


@dataclass(frozen=True, kw_only=True)
class Source:
    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    label_kind: LabelKind
    splits: dict[str, SplitSource]
    class_names: tuple[str, ...] = ()
    extra_fields: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


def array_split(
    images_NCHW: np.ndarray, labels: np.ndarray, label_kind: LabelKind = "index"
) -> SplitSource:
    """A split held in memory."""
    if images_NCHW.dtype != np.uint8 or images_NCHW.ndim != 4:
        raise DataError(
            f"images must be uint8 [N,C,H,W], got {images_NCHW.dtype} {images_NCHW.shape}"
        )
    if len(images_NCHW) != len(labels):
        raise DataError(f"{len(images_NCHW)} images but {len(labels)} labels")
    label_field = LABEL_FIELDS[label_kind]
    return SplitSource(
        len(images_NCHW), lambda idx: {IMAGE_FIELD: images_NCHW[idx], label_field: labels[idx]}
    )


def labelled_source(
    name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], **kw: Any
) -> Source:
    """A `Source` over in-memory (images uint8 [N,C,H,W], labels int [N]) per split."""
    first_images = next(iter(splits.values()))[0]
    all_labels = np.concatenate([labels for _, labels in splits.values()])
    num_classes = kw.pop("num_classes", None) or max(int(all_labels.max()) + 1, 2)
    return Source(
        name=name,
        image_shape=tuple(first_images.shape[1:]),
        num_classes=num_classes,
        label_kind="index",
        splits={
            split: array_split(images, labels.astype(np.int64))
            for split, (images, labels) in splits.items()
        },
        **kw,
    )


# --- IDX files (MNIST format) ------------------------------------------------------------

IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped or not, detected by content) as an array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(
            f"{path}: header says {dims} ({expected} bytes) but holds {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def find_idx_files(data_dir: str) -> dict[tuple[str, str], str]:
    """The four standard IDX files in `data_dir`, each raw or `.gz`, also as `train-images.idx3-ubyte`."""
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        dotted = stem.replace("-idx", ".idx")
        candidates = [os.path.join(data_dir, n + gz) for n in (stem, dotted) for gz in ("", ".gz")]
        hit = next((c for c in candidates if os.path.isfile(c)), None)
        if hit is None:
            missing.append(stem + "[.gz]")
        else:
            found[key] = hit
    if missing:
        raise MissingDataError(f"{data_dir}: missing IDX file(s): {', '.join(missing)}")
    return found


def load_idx_splits(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 [N,1,H,W], labels [N])} from MNIST-format IDX files.

    Labels are checked with `check_labels` (train and test together).
    """
    files = find_idx_files(data_dir)
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[split, "images"])
        labels = read_idx(files[split, "labels"])
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(
                f"{data_dir}: expected uint8 images [N,H,W] and labels [N], got "
                f"{images.dtype}{images.shape} and {labels.shape}"
            )
        splits[split] = (images[:, None], labels.astype(np.int64))
    check_labels({files[split, "labels"]: labels for split, (_, labels) in splits.items()})
    return splits


def check_labels(labels_by_file: dict[str, np.ndarray]) -> None:
    """Raise DataError unless the labels (all files together) look like class indices 0..K-1.

    The number of classes is taken as the largest label + 1, so a stray value would
    silently add classes that never occur. Rule: every label is >= 0 and the largest
    label is below twice the number of distinct labels. A subset missing a few classes
    passes (0..9 without 3 and 7: 8 distinct, largest 9 < 16); one label of 200 among
    0..9 does not (11 distinct, 200 >= 22). The message names each file, each offending
    value (negative, or >= twice the distinct count) and how many samples carry it.
    """
    present = [labels for labels in labels_by_file.values() if len(labels)]
    if not present:
        return
    distinct = np.unique(np.concatenate(present))
    limit = 2 * len(distinct)
    if distinct[0] >= 0 and distinct[-1] < limit:
        return
    problems = []
    for path, labels in labels_by_file.items():
        values, counts = np.unique(labels, return_counts=True)
        for value, count in zip(values, counts, strict=True):
            if value < 0 or value >= limit:
                problems.append(f"{path}: label {int(value)} on {int(count)} sample(s)")
    shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
    raise DataError(
        f"labels must be class indices 0..K-1, but:\n  {shown}\n"
        f"the labels hold {len(distinct)} distinct values, so num_classes would be "
        f"{int(distinct[-1]) + 1}. Labels must be >= 0 and below twice the number of "
        f"distinct labels ({limit}); fix or drop those samples."
    )


def idx_source(data_dir: str, name: str | None = None) -> Source:
    splits = load_idx_splits(data_dir)
    name = name or f"idx:{os.path.basename(os.path.normpath(data_dir))}"
    return labelled_source(name, splits, params={"data_dir": os.path.abspath(data_dir)})


# --- torchvision datasets -----------------------------------------------------------------

TorchvisionLayout = Literal["idx", "cifar", "svhn"]
"""How a torchvision dataset lies under its root: the MNIST family's four IDX files in
`ROOT/<Class>/raw` ("idx"), CIFAR's pickled batches in `ROOT/<base_folder>` ("cifar"),
SVHN's `.mat` files in `ROOT` ("svhn")."""


def torchvision_source(
    name: str,
    data_dir: str,
    download: bool = False,
    *,
    class_name: str,
    layout: TorchvisionLayout,
) -> Source:
    """`torchvision.datasets.<class_name>` read from `data_dir`; fetched only when `download` is set.

    Without `download`, missing files raise MissingDataError naming them and the flag
    that fetches them, before torchvision is asked for anything.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, class_name)
    if download:
        for train in (True, False):
            _construct(cls, name, layout, data_dir, train, download=True)
    else:
        _check_present(name, cls, layout, data_dir)
    if layout == "idx":
        # Read the IDX files directly: also accepts a plain folder of them (gz or not).
        raw = data_dir if _has_idx(data_dir) else os.path.join(data_dir, cls.__name__, "raw")
        return labelled_source(
            name,
            load_idx_splits(raw),
            class_names=tuple(cls.classes),
            params={"data_dir": os.path.abspath(data_dir)},
        )
    splits = {}
    for split in ("train", "test"):
        ds = _construct(cls, name, layout, data_dir, split == "train", download=False)
        images = np.asarray(ds.data)
        if layout == "cifar":
            images = images.transpose(0, 3, 1, 2)  # stored NHWC
        labels = np.asarray(ds.labels if layout == "svhn" else ds.targets)
        splits[split] = (np.ascontiguousarray(images, dtype=np.uint8), labels)
    class_names = tuple(getattr(ds, "classes", [str(i) for i in range(10)]))
    return labelled_source(
        name,
        splits,
        num_classes=len(class_names),
        class_names=class_names,
        params={"data_dir": os.path.abspath(data_dir)},
    )


def _construct(
    cls: Any, name: str, layout: TorchvisionLayout, data_dir: str, train: bool, download: bool
) -> Any:
    if layout == "svhn":
        try:
            import scipy.io  # noqa: F401  (torchvision needs it for the .mat files)
        except ImportError:
            raise DataError(
                f"{name} needs scipy to read its .mat files: pip install -e '.[svhn]'"
            ) from None
        return cls(data_dir, split="train" if train else "test", download=download)
    return cls(data_dir, train=train, download=download)


def _has_idx(folder: str) -> bool:
    try:
        find_idx_files(folder)
    except MissingDataError:
        return False
    return True


def _check_present(name: str, cls: Any, layout: TorchvisionLayout, data_dir: str) -> None:
    """Raise MissingDataError listing the missing files and how to get them."""
    if layout == "idx":
        raw = os.path.join(data_dir, cls.__name__, "raw")
        if _has_idx(data_dir) or _has_idx(raw):
            return
        wanted = [os.path.join(raw, stem) for stem in IDX_FILES.values()]
    elif layout == "cifar":
        folder = os.path.join(data_dir, cls.base_folder)
        files = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        wanted = [os.path.join(folder, n) for n in files]
    else:
        wanted = [os.path.join(data_dir, cls.split_list[s][1]) for s in ("train", "test")]
    missing = [w for w in wanted if not (os.path.isfile(w) or os.path.isfile(w + ".gz"))]
    if not missing:
        return
    hint = f"\nGet them with: capsnet shards --dataset {name} --data-dir {data_dir} --download ..."
    if layout == "idx":
        hint += (
            "\nOr, if you already have the four IDX files (gzipped or not) in a folder, e.g. Debian's "
            "dataset-fashion-mnist in /usr/share/datasets/fashion-mnist, pass that folder: "
            f"--dataset {name} --data-dir FOLDER (or --dataset idx --data-dir FOLDER)"
        )
    raise MissingDataError(
        f"{name}: missing in --data-dir {data_dir}:\n  " + "\n  ".join(missing) + hint
    )


# --- synthetic ----------------------------------------------------------------------------


def synthetic_prototypes(num_classes: int, channels: int, size: int) -> np.ndarray:
    """One float pattern in [0, 1] per class [K,C,S,S]: a bar at angle πk/K plus a blob.

    Distinct orientations and blob positions make the classes separable by a small
    conv net in an epoch or two, which is all smoke tests need.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    width = max(size / 14, 0.8)
    protos = np.zeros((num_classes, channels, size, size))
    for k in range(num_classes):
        theta = math.pi * k / num_classes
        along = xx * math.cos(theta) + yy * math.sin(theta)
        across = -xx * math.sin(theta) + yy * math.cos(theta)
        bar = np.exp(-(across**2) / (2 * width**2)) * (np.abs(along) < 0.35 * size)
        phi = 2 * math.pi * k / num_classes
        by, bx = size / 3 * math.sin(phi), size / 3 * math.cos(phi)
        blob = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (1.5 * width) ** 2))
        pattern = np.clip(bar + blob, 0, 1)
        # Colour differs by class too when there are several channels.
        tint = 0.5 + 0.5 * np.cos(phi + 2 * math.pi * np.arange(channels) / max(channels, 1))
        protos[k] = pattern[None] * (tint[:, None, None] if channels > 1 else 1.0)
    return protos


def synthetic_split(
    protos: np.ndarray, num_samples: int, rng: np.random.Generator, label_kind: LabelKind
) -> SplitSource:
    from pipeline.data.augment import random_shift

    num_classes = len(protos)
    first = rng.integers(0, num_classes, size=num_samples)
    images = protos[first] * rng.uniform(0.6, 1.0, size=(num_samples, 1, 1, 1))
    if label_kind == "multi-hot":
        # A second pattern of a different class, overlaid (as in MultiMNIST).
        second = (first + rng.integers(1, num_classes, size=num_samples)) % num_classes
        images = images + protos[second] * rng.uniform(0.6, 1.0, size=(num_samples, 1, 1, 1))
    images = images + rng.uniform(0, 0.3, size=images.shape)
    images_u8 = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    images_u8 = random_shift(images_u8, 2, rng)
    if label_kind == "index":
        return array_split(images_u8, first.astype(np.int64))
    hot = np.zeros((num_samples, num_classes), dtype=np.uint8)
    hot[np.arange(num_samples), first] = 1
    hot[np.arange(num_samples), second] = 1
    return array_split(images_u8, hot, label_kind="multi-hot")


def synthetic_source(
    *,
    image_size: int = 28,
    channels: int = 1,
    num_classes: int = 10,
    train_samples: int = 1024,
    test_samples: int = 256,
    label_kind: LabelKind = "index",
    seed: int = 0,
) -> Source:
    """A small, learnable, fully offline dataset (class patterns + noise + ±2 px jitter)."""
    protos = synthetic_prototypes(num_classes, channels, image_size)
    splits = {
        split: synthetic_split(protos, n, np.random.default_rng([seed, i]), label_kind)
        for i, (split, n) in enumerate((("train", train_samples), ("test", test_samples)))
    }
    params = {
        "image_size": image_size,
        "channels": channels,
        "train_samples": train_samples,
        "test_samples": test_samples,
    }
    return Source(
        name="synthetic" if label_kind == "index" else "synthetic-multi",
        image_shape=(channels, image_size, image_size),
        num_classes=num_classes,
        label_kind=label_kind,
        splits=splits,
        class_names=tuple(str(k) for k in range(num_classes)),
        params=params,
    )
