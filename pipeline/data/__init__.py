"""Shards -> batches: manifests, webdataset stages, the train and eval loaders (see loaders.py)."""

from pipeline.data.loaders import (
    CaptionIndex,
    EvalStream,
    StreamConfig,
    TrainStream,
    build_eval_loader,
    build_train_loader,
    caption_index,
)
from pipeline.data.manifest import Shard, Source, check_prep_folders, load_sources, read_manifest
from pipeline.data.stages import SkipCounter, TooManyBadSamples

__all__ = [
    "CaptionIndex",
    "EvalStream",
    "Shard",
    "SkipCounter",
    "Source",
    "StreamConfig",
    "TooManyBadSamples",
    "TrainStream",
    "build_eval_loader",
    "build_train_loader",
    "caption_index",
    "check_prep_folders",
    "load_sources",
    "read_manifest",
]
