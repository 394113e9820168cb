"""Run integrity against a local moto S3 server (issue 19): what a bucket may make a pull write,
and a staging folder that belongs to one storage URI and run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.train.storage import RunStorage, StorageError

pytestmark = pytest.mark.slow  # a real S3 endpoint (moto's server) on loopback

BUCKET = "capsnet-test"  # the `s3` fixture (conftest.py) creates and empties it


@pytest.mark.parametrize(
    "key", ["runs/tiny/../escape.txt", "runs/tiny/sub/../../escape.txt", "runs/tiny//escape.txt"]
)
def test_pull_refuses_keys_that_leave_the_run_folder(s3, tmp_path: Path, key: str) -> None:
    """A key with `../` (or an absolute path after the prefix) must not write outside the run
    folder on rank 0's node: the pull fails naming the key, and writes nothing."""
    s3.put_object(Bucket=BUCKET, Key="runs/tiny/metrics.jsonl", Body=b'{"epoch": 1}\n')
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"outside\n")
    # Some clients normalise the path of a GET (AWS's C++ SDK, under pyarrow, does): then the
    # key's download fetches this object, which a pull must not write outside the folder.
    s3.put_object(Bucket=BUCKET, Key="runs/escape.txt", Body=b"outside\n")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert key in listed  # stored as given, not normalised by the server
    local = tmp_path / "stage" / "tiny"
    storage = RunStorage(f"s3://{BUCKET}/runs", "tiny", local)
    with pytest.raises(StorageError, match=re.escape(f"'{key.removeprefix('runs/tiny/')}'")):
        storage.pull()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert not any("escape" in p for p in written), written
    assert not Path("/escape.txt").exists()
