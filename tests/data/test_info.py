"""dataset.json: every malformed file is a DataError naming the file and the key (issue 11)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.data import DataError, DatasetInfo, load_dataset_info


def _shard(raw: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return raw["splits"]["train"]["shards"][index]


def _set(key: str, value: Any):
    def edit(raw: dict[str, Any]) -> Any:
        raw[key] = value
        return raw

    return edit


def _drop(key: str):
    def edit(raw: dict[str, Any]) -> Any:
        del raw[key]
        return raw

    return edit


def _shard_edit(field: str, value: Any = None, delete: bool = False):
    def edit(raw: dict[str, Any]) -> Any:
        if delete:
            del _shard(raw, 2)[field]
        else:
            _shard(raw, 2)[field] = value
        return raw

    return edit


MALFORMED = {
    "no splits": (_drop("splits"), r"splits: Field required"),
    "splits a list": (_set("splits", []), r"splits: Input should be a valid dictionary"),
    "top level a list": (lambda raw: [raw], r"expected a JSON object at the top level, got list"),
    "num_classes a string": (_set("num_classes", "10"), r"num_classes: .*valid integer.*'10'"),
    "image_shape too short": (_set("image_shape", [1, 12]), r"image_shape: .*at least 3"),
    "image_shape of floats": (_set("image_shape", [1, 12.0, 12]), r"image_shape\.1: "),
    "unknown label kind": (_set("label_kind", "soft"), r"label_kind: .*'index' or 'multi-hot'"),
    "typo in a key": (_set("num_clases", 10), r"num_clases: unknown key"),
    "shard without sha256": (
        _shard_edit("sha256", delete=True),
        r"splits\.train\.shards\.2\.sha256: Field required",
    ),
    "shard size a string": (
        _shard_edit("num_samples", "100"),
        r"splits\.train\.shards\.2\.num_samples: ",
    ),
    "shard entry a string": (
        lambda raw: raw["splits"]["train"]["shards"].__setitem__(0, "train-000000.tar") or raw,
        r"splits\.train\.shards\.0: Input should be a valid dictionary",
    ),
    "counts disagree": (
        lambda raw: raw["splits"]["train"].__setitem__("num_samples", 5) or raw,
        r"splits\.train: num_samples is 5 but its shards hold 700",
    ),
    "wrong format": (_set("format", "capsnet-shards/9"), r"unsupported dataset\.json format"),
}

ESCAPES = {
    "parent folder": "../elsewhere/train-000002.tar",
    "parent folder inside": "sub/../../train-000002.tar",
    "absolute path": "/etc/passwd",
    "url": "https://example.com/train-000002.tar",
    "object store": "s3://bucket/train-000002.tar",
    "file url": "file:///etc/passwd",
    "windows drive": "C:\\shards\\train-000002.tar",
    "backslash": "\\\\host\\share\\train-000002.tar",
    "empty": "",
}


def _write(folder, edit) -> None:
    path = folder / "dataset.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_dataset_json_is_a_data_error_naming_file_and_key(synthetic_copy, case):
    edit, expected = MALFORMED[case]
    _write(synthetic_copy, edit)
    with pytest.raises(DataError, match=expected) as err:
        load_dataset_info(synthetic_copy)
    assert str(err.value).startswith(f"{synthetic_copy / 'dataset.json'}: ")


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_shard_names_must_stay_inside_the_folder(synthetic_copy, case):
    _write(synthetic_copy, _shard_edit("name", ESCAPES[case]))
    with pytest.raises(
        DataError, match=r"splits\.train\.shards\.2\.name: (.*dataset folder|must be a non-empty)"
    ):
        load_dataset_info(synthetic_copy)


def test_subfolders_and_every_problem_at_once(synthetic_copy):
    _write(synthetic_copy, _shard_edit("name", "sub/dir/train-000002.tar"))
    info = load_dataset_info(synthetic_copy)
    assert info.shard_urls("train")[2] == str(synthetic_copy / "sub/dir/train-000002.tar")

    def edits(raw):
        del raw["name"]
        _shard(raw, 1)["bytes"] = -1
        return raw

    _write(synthetic_copy, edits)
    with pytest.raises(DataError, match=r"2 problems:\n  name: Field required\n  splits"):
        load_dataset_info(synthetic_copy)


def test_not_json_and_from_dict_are_data_errors(synthetic_copy):
    (synthetic_copy / "dataset.json").write_bytes(b"\xff{not json")
    with pytest.raises(DataError, match="cannot read dataset info"):
        load_dataset_info(synthetic_copy)
    with pytest.raises(DataError, match=r"^dataset\.json: expected a JSON object"):
        DatasetInfo.from_dict(None)  # type: ignore[arg-type]
