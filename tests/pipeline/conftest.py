"""Shared fixtures: tiny synthetic shards and a tiny run config."""

from __future__ import annotations

import os

import pytest

from pipeline.config import load_config

TINY_MODEL = ["model.preset=tiny"]


@pytest.fixture
def tiny_config():
    """tiny_config(shards, storage, *overrides) -> a validated RunConfig for a tiny CPU run."""
    return make_tiny_config


def make_tiny_config(shards, storage, *extra: str):
    return load_config(
        None,
        [
            *TINY_MODEL,
            f"data.shards={shards}",
            f"run.storage_path={storage}",
            "data.loader_workers=0",
            "data.shuffle_buffer=64",
            "train.eval_batch_size=32",
            "train.batch_size=32",
            "train.epochs=2",
            "train.log_every=3",
            "run.use_gpu=false",
            "run.name=tiny",
            *extra,
        ],
    )


# --- a real S3 endpoint on loopback (moto's server mode) ------------------------------------

BUCKET = "capsnet-test"


@pytest.fixture(scope="session")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    """A moto S3 server on a free loopback port: yields its http:// endpoint."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The endpoint in the environment (as Ray and boto read it), fake credentials, and an
    empty bucket of this test's own; yields a boto3 client for checking what landed."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)  # no ~/.aws profile leaks in
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)
