"""Runs on s3:// storage leave every artifact in the bucket and resume from it (moto on
127.0.0.1). Before, metrics, TensorBoard events, figures and best/last stayed in rank 0's
local temp folder and were lost with the cluster."""

from __future__ import annotations

import shutil
import uuid

import pytest

from pipeline.train.loop import run_dir_for
from pipeline.train.trainer import train

pytestmark = pytest.mark.slow  # a real S3 endpoint (moto's server) on loopback

BUCKET = "capsnet-test"  # created by the `s3` fixture (conftest.py)


def bucket_keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])}


def epochs_in_bucket(client, prefix: str) -> list[int]:
    import json

    body = client.get_object(Bucket=BUCKET, Key=prefix + "metrics.jsonl")["Body"].read()
    return [json.loads(line)["epoch"] for line in body.decode().splitlines() if line.strip()]


def expect_artifacts(keys: set[str], checkpoints: list[str]) -> None:
    for name in ("metrics.jsonl", "config.yaml", "checkpoints.json", "reconstructions.png"):
        assert name in keys, f"{name} missing from the bucket: {sorted(keys)}"
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in keys), sorted(keys)
    for name in checkpoints:
        assert f"{name}/checkpoint.pt" in keys, f"{name} missing: {sorted(keys)}"


def s3_config(tiny_config, tiny_shards, tmp_path, name, *extra):
    return tiny_config(
        tiny_shards, tmp_path, f"run.storage_path=s3://{BUCKET}/runs", f"run.name={name}", *extra
    )


def test_local_run_leaves_every_artifact_in_the_bucket_and_resumes_from_it(
    s3, tiny_shards, tiny_config, tmp_path
):
    name = f"local-{uuid.uuid4().hex[:8]}"
    cfg = s3_config(tiny_config, tiny_shards, tmp_path, name, "train.epochs=2")
    train(cfg, local=True)
    prefix = f"runs/{name}/"
    expect_artifacts(bucket_keys(s3, prefix), ["checkpoint_epoch-0001", "checkpoint_epoch-0002"])
    assert epochs_in_bucket(s3, prefix) == [1, 2]
    # The cluster is gone: nothing local is left. A rerun with more epochs resumes from S3.
    shutil.rmtree(run_dir_for(cfg))
    longer = s3_config(tiny_config, tiny_shards, tmp_path, name, "train.epochs=3")
    train(longer, local=True)
    assert epochs_in_bucket(s3, prefix) == [1, 2, 3]
    keys = bucket_keys(s3, prefix)
    # keep_checkpoints=2 (the default): the best two and the latest stay, the rest is deleted
    kept = {k.split("/")[0] for k in keys if k.startswith("checkpoint_epoch-")}
    assert "checkpoint_epoch-0003" in kept and len(kept) <= 3
    shutil.rmtree(run_dir_for(longer), ignore_errors=True)


def test_changed_config_on_a_bucket_run_is_refused_before_training(
    s3, tiny_shards, tiny_config, tmp_path
):
    from pipeline.config import ConfigError

    name = f"refuse-{uuid.uuid4().hex[:8]}"
    train(s3_config(tiny_config, tiny_shards, tmp_path, name, "train.epochs=1"), local=True)
    shutil.rmtree(run_dir_for(s3_config(tiny_config, tiny_shards, tmp_path, name)))
    changed = s3_config(tiny_config, tiny_shards, tmp_path, name, "train.lr=0.5")
    with pytest.raises(ConfigError, match="train.lr"):
        train(changed, local=True)
    shutil.rmtree(run_dir_for(changed), ignore_errors=True)


def test_missing_bucket_fails_before_training(s3, tiny_shards, tiny_config, tmp_path):
    from pipeline.train.storage import StorageError

    cfg = tiny_config(
        tiny_shards, tmp_path, "run.storage_path=s3://no-such-bucket/runs", "run.name=nobucket"
    )
    with pytest.raises(StorageError, match="no-such-bucket"):
        train(cfg, local=True)


@pytest.mark.ray
def test_ray_run_leaves_every_artifact_in_the_bucket_and_resumes_from_it(
    s3, tiny_shards, tiny_config, tmp_path
):
    ray = pytest.importorskip("ray")
    name = f"ray-{uuid.uuid4().hex[:8]}"
    prefix = f"runs/{name}/"
    try:
        cfg = s3_config(tiny_config, tiny_shards, tmp_path, name, "train.epochs=1")
        train(cfg)  # starts Ray here, after the endpoint is in the environment
        keys = bucket_keys(s3, prefix)
        expect_artifacts(keys, ["checkpoint_epoch-0001"])  # Ray's own upload, one copy
        shutil.rmtree(run_dir_for(cfg), ignore_errors=True)
        longer = s3_config(tiny_config, tiny_shards, tmp_path, name, "train.epochs=2")
        summary = train(longer)
        assert epochs_in_bucket(s3, prefix) == [1, 2] and summary.epochs == 2
        assert "checkpoint_epoch-0002/checkpoint.pt" in bucket_keys(s3, prefix)
    finally:
        ray.shutdown()
        shutil.rmtree(
            run_dir_for(s3_config(tiny_config, tiny_shards, tmp_path, name)), ignore_errors=True
        )
