"""`dataset.json`: what a shard directory holds, and the errors the data layer raises."""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import PureWindowsPath
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.data import urls
from pipeline.schema import Int, Str

FORMAT = "capsnet-shards/1"
INFO_NAME = "dataset.json"
IMAGE_FIELD = "img.u8"
LABEL_FIELDS = {"index": "cls", "multi-hot": "hot.u8"}
PART_META_FIELD = "json"
"""Per-sample metadata; for multi-object data its "classes" list names each part's class."""

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

    @property
    def part_fields(self) -> tuple[str, ...]:
        """Each object's own image (`rec0.u8`, `rec1.u8`, ...), in order, when the dataset
        stores them together with a `json` field naming their classes (MultiMNIST); else ()."""
        parts = []
        while f"rec{len(parts)}.u8" in self.extra_fields:
            parts.append(f"rec{len(parts)}.u8")
        return tuple(parts) if parts and PART_META_FIELD in self.extra_fields else ()

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
    def from_dict(cls, data: Any, base_url: str = "", *, source: str | None = None) -> DatasetInfo:
        """Build from parsed dataset.json; DataError naming `source` (the file) and the key of
        every problem (missing, wrong type, unknown, a shard name outside the folder)."""
        where = source or (f"{base_url.rstrip('/')}/{INFO_NAME}" if base_url else INFO_NAME)
        if not isinstance(data, dict):
            raise DataError(
                f"{where}: expected a JSON object at the top level, got {type(data).__name__}"
            )
        fmt = data.get("format")
        if fmt != FORMAT:
            raise DataError(
                f"{where}: unsupported dataset.json format {fmt!r} (expected {FORMAT!r})"
            )
        try:
            file = DatasetFile.model_validate(data)
        except ValidationError as err:
            lines = _error_lines(err)
            if len(lines) == 1:
                raise DataError(f"{where}: {lines[0]}") from None
            raise DataError(f"{where}: {len(lines)} problems:\n  " + "\n  ".join(lines)) from None
        splits = {
            name: SplitInfo(
                split.num_samples,
                tuple(ShardInfo(**shard.model_dump()) for shard in split.shards),
            )
            for name, split in file.splits.items()
        }
        try:
            return cls(
                name=file.name,
                image_shape=tuple(file.image_shape),  # type: ignore[arg-type]
                num_classes=file.num_classes,
                label_kind=file.label_kind,
                splits=splits,
                class_names=tuple(file.class_names),
                extra_fields=tuple(file.extra_fields),
                seed=file.seed,
                command=file.command,
                source=file.source,
                base_url=base_url,
            )
        except DataError as err:
            raise DataError(f"{where}: {err}") from None


# --- the file format, validated -------------------------------------------------------------


def _inside_folder(name: str) -> str:
    """A shard name must stay inside the folder of dataset.json (no path or URL tricks)."""
    if not name or "\0" in name:
        raise ValueError("must be a non-empty file name")
    if urlparse(name).scheme or PureWindowsPath(name).drive or name[0] in "/\\":
        raise ValueError(
            "must be a file name relative to the dataset folder, not an absolute path or URL"
        )
    if ".." in re.split(r"[/\\]", name):
        raise ValueError("must not leave the dataset folder ('..')")
    return name


_STRICT = ConfigDict(extra="forbid", strict=True)
Count = Annotated[Int, Field(ge=0)]


class ShardEntry(BaseModel):
    """One entry of `splits.<name>.shards` in dataset.json."""

    model_config = _STRICT
    name: Annotated[Str, AfterValidator(_inside_folder)]
    num_samples: Count
    bytes: Count
    sha256: Str


class SplitEntry(BaseModel):
    """`splits.<name>` in dataset.json."""

    model_config = _STRICT
    num_samples: Count
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _counts_add_up(self) -> SplitEntry:
        counted = sum(s.num_samples for s in self.shards)
        if counted != self.num_samples:
            raise ValueError(
                f"num_samples is {self.num_samples} but its shards hold {counted} samples"
            )
        return self


class DatasetFile(BaseModel):
    """The format of dataset.json (`capsnet-shards/1`), checked before DatasetInfo is built."""

    model_config = _STRICT
    format: Literal["capsnet-shards/1"]
    name: Annotated[Str, Field(min_length=1)]
    image_shape: Annotated[list[Annotated[Int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    num_classes: Annotated[Int, Field(ge=2)]
    label_kind: LabelKind
    splits: dict[Str, SplitEntry]
    class_names: list[Str] = []
    extra_fields: list[Str] = []
    seed: Int | None = None
    command: Str | None = None
    source: dict[Str, Any] = {}


def _error_lines(err: ValidationError) -> list[str]:
    """`dotted.key: what is wrong (got VALUE)`, one per problem, values shortened."""
    lines = []
    for e in err.errors(include_url=False):
        key = ".".join(str(part) for part in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        hidden = e["type"] in ("missing", "extra_forbidden") or isinstance(given, dict)
        shown = "" if hidden else f" (got {_short(given)})"
        lines.append(f"{key}: {msg}{shown}")
    return lines


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 60, 60, 4, 4
_short = _repr.repr


def load_dataset_info(
    source: str | os.PathLike[str] | DatasetInfo, *, timeout_s: float | None = None
) -> DatasetInfo:
    """Read `dataset.json` from a shard directory, or from a path/URL naming the file itself.

    `timeout_s`: the http(s) time limit (`data.url_timeout_s`; default urls.DEFAULT_TIMEOUT_S).
    """
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
        with urls.open_stream(source, timeout_s=timeout_s) as stream:
            text = stream.read()
        data = json.loads(text)
    except urls.TransferError as err:
        error = MissingDataError if err.http_status == 404 else DataError
        raise error(f"{err}; cannot read dataset info") from None
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{source}: cannot read dataset info ({err})") from err
    return DatasetInfo.from_dict(data, base_url=urls.parent(source), source=source)


def sha256_of(url: str, *, timeout_s: float | None = None) -> tuple[int, str]:
    """(byte count, sha256 hex digest) of a shard, streamed in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with urls.open_stream(url, timeout_s=timeout_s) as stream:
        while chunk := stream.read(urls.READ_BUFFER):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
