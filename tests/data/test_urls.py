"""Shard locations: brace patterns, file://, pipe:, object-store translation and http(s)."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.data import (
    DataConfig,
    DataError,
    DatasetInfo,
    MissingDataError,
    Pass,
    ShardLoader,
    SplitInfo,
    load_dataset_info,
    open_loader,
    urls,
)
from pipeline.data.tario import iter_samples


def test_expand_brace_patterns_and_lists():
    assert urls.expand("s/train-{000000..000002}.tar") == [
        f"s/train-00000{i}.tar" for i in range(3)
    ]
    assert urls.expand(["a-{0..1}.tar", "b.tar"]) == ["a-0.tar", "a-1.tar", "b.tar"]


def test_object_stores_become_cli_pipes():
    assert (
        urls.to_pipe("s3://bucket/p/train-000000.tar")
        == "pipe:aws s3 cp --quiet s3://bucket/p/train-000000.tar -"
    )
    assert urls.to_pipe("gs://bucket/x y.tar") == "pipe:gsutil -q cat 'gs://bucket/x y.tar'"
    assert urls.to_pipe("https://h/x.tar") == "https://h/x.tar"
    assert (
        urls.join("s3://bucket/prefix/", "train-000000.tar")
        == "s3://bucket/prefix/train-000000.tar"
    )
    assert urls.parent("gs://b/p/dataset.json") == "gs://b/p"
    assert (
        urls.local_path("file:///tmp/a.tar") == "/tmp/a.tar" and urls.local_path("s3://b/a") is None
    )


def test_pipe_and_file_urls_stream_a_shard(synthetic_dir):
    shard = synthetic_dir / "test-000000.tar"
    for url in (f"pipe:cat {shard}", f"file://{shard}", str(shard)):
        stream = urls.open_stream(url)
        try:
            assert sum(1 for _ in iter_samples(urls.raw_reader(stream))) == 100
        finally:
            stream.close()


@pytest.fixture
def http_root(synthetic_dir, serve_http) -> Iterator[str]:
    with serve_http(synthetic_dir) as url:
        yield url + "/"


def test_http_dataset_reads_like_a_local_one(http_root, synthetic_dir):
    info = load_dataset_info(http_root)
    assert info.base_url == http_root.rstrip("/")
    assert info.splits == load_dataset_info(synthetic_dir).splits
    loader = open_loader(http_root, "test", batch_size=64, training=False)
    assert sum(len(b) for b in loader) == 250 and loader.stats.samples_skipped == 0


# --- bad remote data: never a hang, never a raw traceback (issue 11) -------------------------


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections and never answers (it gives up after 30 s, so a
    missing time limit fails the test instead of hanging it)."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (webdataset reads http(s) through curl)")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


def _silent_info(synthetic_dir, url: str) -> DatasetInfo:
    return dataclasses.replace(load_dataset_info(synthetic_dir), base_url=url)


TIMEOUT = 1.0
WITHIN = 4 * TIMEOUT  # the documented bound is about 2 × url_timeout_s, plus process start-up


def test_a_silent_server_ends_the_read_within_the_time_limit(silent_url, synthetic_dir):
    start = time.monotonic()
    with pytest.raises(DataError, match=r"dataset\.json: no answer within 1 s"):
        load_dataset_info(silent_url, timeout_s=TIMEOUT)
    assert time.monotonic() - start < WITHIN

    info = _silent_info(synthetic_dir, silent_url)
    start = time.monotonic()  # the check before training lists every unreachable shard at once
    with pytest.raises(MissingDataError, match=r"test-000000\.tar.*test-000002\.tar"):
        open_loader(info, "test", batch_size=50, training=False, url_timeout_s=TIMEOUT)
    assert time.monotonic() - start < WITHIN

    # Reading (a shard that passed the check, then went silent): one shard is enough to time.
    test = info.split("test")
    one = dataclasses.replace(info, splits={"test": SplitInfo(100, test.shards[:1])})
    part = Pass(batch_size=50, training=False)
    skip = ShardLoader(one, "test", DataConfig(loader_workers=0, url_timeout_s=TIMEOUT), part)
    start = time.monotonic()
    assert list(skip) == [] and time.monotonic() - start < WITHIN
    assert skip.stats.bad_shards == 1 and skip.stats.lost_in_bad_shards == 100

    config = DataConfig(loader_workers=0, url_timeout_s=TIMEOUT, on_error="raise")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"test-000000\.tar: no answer within 1 s"):
        list(ShardLoader(one, "test", config, part))
    assert time.monotonic() - start < WITHIN


def test_url_time_limit_is_a_validated_config_field():
    assert 0 < DataConfig().url_timeout_s <= 60
    with pytest.raises(ValueError, match="url_timeout_s"):
        DataConfig(url_timeout_s=0)


@pytest.fixture
def http_copy(synthetic_copy, serve_http) -> Iterator[tuple[str, object]]:
    """(URL, folder): an http server over a private copy of the dataset."""
    with serve_http(synthetic_copy) as url:
        yield url, synthetic_copy


def test_missing_remote_shards_are_listed_before_training(http_copy):
    url, folder = http_copy
    (folder / "train-000001.tar").unlink()
    (folder / "train-000005.tar").unlink()
    with pytest.raises(MissingDataError) as err:
        open_loader(url, "train", batch_size=8)
    assert f"{url}/train-000001.tar (HTTP 404)" in str(err.value)
    assert f"{url}/train-000005.tar (HTTP 404)" in str(err.value)
    open_loader(url, "test", batch_size=8)  # other splits unaffected
    open_loader(url, "train", batch_size=8, check_remote=False)  # e.g. after the first epoch


def test_a_shard_gone_404_is_skipped_and_counted_or_raises_naming_it(http_copy):
    url, folder = http_copy
    skip = open_loader(url, "test", batch_size=50, training=False)
    strict = open_loader(url, "test", batch_size=50, training=False, on_error="raise")
    (folder / "test-000001.tar").unlink()  # disappears after the check, during the epoch
    assert sum(len(b) for b in skip) == 150
    assert skip.stats.bad_shards == 1 and skip.stats.lost_in_bad_shards == 100
    with pytest.raises(DataError, match=r"/test-000001\.tar: HTTP 404"):
        list(strict)


def test_a_missing_remote_dataset_json_is_a_missing_data_error(http_copy):
    url, folder = http_copy
    (folder / "dataset.json").unlink()
    with pytest.raises(MissingDataError, match=r"dataset\.json: HTTP 404"):
        load_dataset_info(url)


def test_a_failing_pipe_command_is_a_bad_shard_not_a_traceback(synthetic_dir, tmp_path):
    # What `aws s3 cp` / `gsutil cat` do for a missing object: print nothing, exit non-zero.
    info = load_dataset_info(synthetic_dir)
    part = Pass(batch_size=50, training=False)
    for on_error in ("skip", "raise"):
        loader = ShardLoader(info, "test", DataConfig(loader_workers=0, on_error=on_error), part)
        loader.dataset.urls[1] = f"pipe:cat {tmp_path / 'no-such-object'}"
        if on_error == "skip":
            assert sum(len(b) for b in loader) == 150
            assert loader.stats.bad_shards == 1 and loader.stats.lost_in_bad_shards == 100
        else:
            with pytest.raises(
                DataError, match=r"pipe:cat .*no-such-object: cat exited with status 1"
            ):
                list(loader)
