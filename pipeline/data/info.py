"""`dataset.json`: what a shard directory holds, and the errors the data layer raises."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.data import urls

FORMAT = "capsnet-shards/1"
INFO_NAME = "dataset.json"
IMAGE_FIELD = "img.u8"
LABEL_FIELDS = {"index": "cls", "multi-hot": "hot.u8"}

LabelKind = Literal["index", "multi-hot"]


class DataError(Exception):
    """A problem with the data a user pointed us at (message says what and how to fix it)."""


class MissingDataError(DataError, FileNotFoundError):
    """Files that should exist do not."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar file of a split."""

    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split (`train`, `test`, ...) as an ordered list of shards."""

    num_samples: int
    shards: tuple[ShardInfo, ...]

    def __post_init__(self) -> None:
        counted = sum(s.num_samples for s in self.shards)
        if counted != self.num_samples:
            raise DataError(
                f"split claims {self.num_samples} samples but its shards hold {counted}"
            )


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """The contents of `dataset.json`, plus `base_url`: where the shards live."""

    name: str
    image_shape: tuple[int, int, int]
    """(C, H, W) of every image, stored as raw uint8 bytes in C-major order."""
    num_classes: int
    label_kind: LabelKind
    """`index`: one class per image (`cls`, ASCII int); `multi-hot`: J bytes of 0/1 (`hot.u8`)."""
    splits: dict[str, SplitInfo]
    class_names: tuple[str, ...] = ()
    extra_fields: tuple[str, ...] = ()
    """Fields stored per sample beyond image and label (e.g. reconstruction targets)."""
    seed: int | None = None
    command: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    """The generator's parameters (dataset-specific, for provenance)."""
    base_url: str = ""
    """Directory (path or URL) holding the shards; not written to the file."""

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_FIELDS:
            raise DataError(
                f"label_kind must be one of {sorted(LABEL_FIELDS)}, got {self.label_kind!r}"
            )
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise DataError(
                f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}"
            )
        if self.num_classes < 2:
            raise DataError(f"num_classes must be >= 2, got {self.num_classes}")

    @property
    def label_field(self) -> str:
        return LABEL_FIELDS[self.label_kind]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"{self.name}: no split {name!r}; available: {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        return [urls.join(self.base_url, s.name) for s in self.split(split).shards]

    def to_json(self) -> str:
        data = asdict(self)
        del data["base_url"]
        return json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_url: str = "") -> DatasetInfo:
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != FORMAT:
            raise DataError(f"unsupported dataset.json format {fmt!r} (expected {FORMAT!r})")
        splits = {
            name: SplitInfo(s["num_samples"], tuple(ShardInfo(**sh) for sh in s["shards"]))
            for name, s in data.pop("splits").items()
        }
        return cls(
            **{
                **data,
                "image_shape": tuple(data["image_shape"]),
                "class_names": tuple(data.get("class_names", ())),
                "extra_fields": tuple(data.get("extra_fields", ())),
            },
            splits=splits,
            base_url=base_url,
        )


def load_dataset_info(source: str | os.PathLike[str] | DatasetInfo) -> DatasetInfo:
    """Read `dataset.json` from a shard directory, or from a path/URL naming the file itself."""
    if isinstance(source, DatasetInfo):
        return source
    source = os.fspath(source)
    path = urls.local_path(source)
    if path is not None and os.path.isdir(path):
        source = urls.join(source, INFO_NAME)
    elif not source.endswith(".json"):
        # A URL to a directory (s3://bucket/prefix/) rather than to the file.
        source = urls.join(source, INFO_NAME)
    path = urls.local_path(source)
    if path is not None and not os.path.exists(path):
        raise MissingDataError(
            f"{source}: no such file; write shards with `capsnet shards --out DIR`"
        )
    try:
        with urls.open_stream(source) as stream:
            data = json.loads(stream.read())
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{source}: cannot read dataset info ({err})") from err
    return DatasetInfo.from_dict(data, base_url=urls.parent(source))


def sha256_of(stream_or_path: str) -> tuple[int, str]:
    """(byte count, sha256 hex digest) of a shard, streamed in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with urls.open_stream(stream_or_path) as stream:
        while chunk := stream.read(urls.READ_BUFFER):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
