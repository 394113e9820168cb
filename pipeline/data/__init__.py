"""Data layer: datasets → WebDataset shards → a streaming loader that feeds DDP ranks evenly."""

from pipeline.data.info import (
    DataError,
    DatasetInfo,
    MissingDataError,
    ShardInfo,
    SplitInfo,
    load_dataset_info,
)
from pipeline.data.loader import LoaderConfig, LoaderStats, ShardLoader, make_loader
from pipeline.data.partition import PartitionError, plan_epoch
from pipeline.data.shards import DATASETS, ShardsConfig, write_shards

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "LoaderConfig",
    "LoaderStats",
    "MissingDataError",
    "PartitionError",
    "ShardInfo",
    "ShardLoader",
    "ShardsConfig",
    "SplitInfo",
    "load_dataset_info",
    "make_loader",
    "plan_epoch",
    "write_shards",
]
