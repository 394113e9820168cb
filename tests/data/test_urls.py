"""Shard locations: brace patterns, file://, pipe:, object-store translation and http(s)."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator

import pytest

from pipeline.data import load_dataset_info, open_loader, urls
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
def http_root(synthetic_dir) -> Iterator[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (webdataset reads http(s) through curl)")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(synthetic_dir))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_http_dataset_reads_like_a_local_one(http_root, synthetic_dir):
    info = load_dataset_info(http_root)
    assert info.base_url == http_root.rstrip("/")
    assert info.splits == load_dataset_info(synthetic_dir).splits
    loader = open_loader(http_root, "test", batch_size=64, training=False)
    assert sum(len(y) for _, y in loader) == 250 and loader.stats.samples_skipped == 0
