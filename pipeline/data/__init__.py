"""Data layer: datasets → WebDataset shards → a streaming loader that feeds DDP ranks evenly."""

from pipeline.data.batch import Batch
from pipeline.data.config import DataConfig
from pipeline.data.info import (
    DataError,
    DatasetInfo,
    MissingDataError,
    ShardInfo,
    SplitInfo,
    load_dataset_info,
)
from pipeline.data.loader import (
    LoaderStats,
    Pass,
    ShardLoader,
    check_shards,
    check_splits,
    make_loader,
    open_loader,
)
from pipeline.data.partition import PartitionError, plan_epoch
from pipeline.data.shards import DATASETS, ShardsConfig, write_shards

__all__ = [
    "DATASETS",
    "Batch",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "LoaderStats",
    "MissingDataError",
    "PartitionError",
    "Pass",
    "ShardInfo",
    "ShardLoader",
    "ShardsConfig",
    "SplitInfo",
    "check_shards",
    "check_splits",
    "load_dataset_info",
    "make_loader",
    "open_loader",
    "plan_epoch",
    "write_shards",
]
