"""Issue 19 item 10: a loader worker that hangs (a read that never returns) ends the pass
with a DataError naming data.loader_timeout_s, instead of the run waiting forever."""

from __future__ import annotations

import time

import pytest

from pipeline.data import DataConfig, DataError, make_loader
from pipeline.data import loader as loader_module


@pytest.mark.slow  # a loader worker process
def test_a_stuck_loader_worker_is_an_error_within_the_time_limit(tiny_shards, monkeypatch):
    def stuck(self):
        time.sleep(3600)
        yield from ()

    monkeypatch.setattr(loader_module.ShardStream, "__iter__", stuck)  # forked workers see it
    data = DataConfig(
        shards=str(tiny_shards), loader_workers=1, loader_timeout_s=2, persistent_workers=False
    )
    loader = make_loader(data, "train", batch_size=16, check_remote=False)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"data\.loader_timeout_s=2"):
        next(iter(loader))
    assert time.monotonic() - start < 30
    loader.close()


def test_the_time_limit_is_a_resume_safe_setting():
    from pipeline.config import resume_safe_keys

    assert DataConfig().loader_timeout_s == 600
    assert "data.loader_timeout_s" in resume_safe_keys()
    with pytest.raises(ValueError):
        DataConfig(loader_timeout_s=-1)
