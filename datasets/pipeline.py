"""Ray Data pipeline over feature shards: read, project, shuffle files, cut examples.

Driver side (the Ray seam):
    ds = open_dataset("s3://bucket/lvu/genre", storage)          # manifest + size/schema checks
    train = read_split(ds, "train", shuffle_files=True, seed=0)  # ray.data.Dataset
    TorchTrainer(..., datasets={"train": train})                 # Train splits it per rank (equal=True)

Worker side:
    it = ray.train.get_dataset_shard("train")
    for batch in train_batches(it, ds.task, batch_size=16, seed=0, epoch=e):   # {"x", "y"}
    for batch in eval_batches(it, ds.task, batch_size=32):                     # {"x", "y", "video_id"}

Examples are cut on the consumer, in the collate function, so that their randomness depends on
(seed, epoch, video) only. `drop_last=True` and Ray Train's equal split give every rank the same
number of training batches (uneven ranks would hang DDP's all-reduce).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from vis4mer.datasets.format import DatasetError, FeatureDataset, check_label, video_features
from vis4mer.datasets.tasks import TaskSpec
from vis4mer.datasets.windows import eval_examples, example_rng, train_example

COLUMNS = ["video_id", "label", "features"]


def read_split(ds: FeatureDataset, split: str, shuffle_files: bool = False, seed: int | None = None,
               override_num_blocks: int | None = None):
    """A lazy ray.data.Dataset of one split's videos (only the columns training needs)."""
    import ray.data

    paths = ds.shard_paths(split)
    shuffle = ray.data.FileShuffleConfig(seed=seed) if shuffle_files else None
    with _manifest_listed_parquet():
        rd = ray.data.read_parquet(paths, filesystem=ds.res.pa, shuffle=shuffle,
                                   override_num_blocks=override_num_blocks)
    return rd.select_columns(COLUMNS)


# Ray Data 2.60's default parquet reader (DataContext.use_datasource_v2) lists files anew in every
# execution, i.e. every epoch of every split, by reading their footers on a pool of new
# FooterReader actors (32 by default). Our splits are shards the manifest already lists: the
# classic reader (Ray's documented `use_datasource_v2=False`) reads their footers once, here, and
# each epoch only runs read tasks on pooled workers. On this 2-core machine a 2-epoch training run
# takes 3-5 s less (two footer-reader processes per epoch, each ~1.2 s of CPU on the critical path),
# and LVU-shaped ingest runs at 1.19x plain pyarrow, not 0.87x (benchmarks/ingest.py). Files are
# still reshuffled per epoch (FileShuffleConfig, seeded by the execution index).
PARQUET_LOGGER = "ray.data._internal.datasource.parquet_datasource"


@contextlib.contextmanager
def _manifest_listed_parquet():
    """read_parquet through the classic reader, without its two INFO lines per read (its encoding
    ratio and batch size estimates) on the driver's console."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    log = logging.getLogger(PARQUET_LOGGER)
    v2, level = ctx.use_datasource_v2, log.level
    ctx.use_datasource_v2 = False
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        ctx.use_datasource_v2 = v2
        log.setLevel(level)


def _videos(batch: pa.Table, task: TaskSpec) -> tuple[list[str], list[np.ndarray], list]:
    ids = batch.column("video_id").to_pylist()
    feats = video_features(batch.column("features"), task.tokens_per_frame, task.feature_dim)
    labels = [check_label(y, task, f"video {v}") for v, y in zip(ids, batch.column("label").to_pylist())]
    return ids, feats, labels


def _check_finite(x: np.ndarray, video_id: str) -> None:
    if not np.isfinite(x).all():
        raise DatasetError(f"video {video_id}: features contain NaN or inf")


def _label_tensor(labels: list, task: TaskSpec) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.long if task.type == "classification" else torch.float32)


class TrainCollate(ArrowBatchCollateFn):
    """Arrow batch of videos -> {"x": (B, L, D) float16, "y": (B,)}: one random example per video."""

    def __init__(self, task: TaskSpec, seed: int, epoch: int):
        super().__init__()
        self.task, self.seed, self.epoch = task, seed, epoch

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        ids, feats, labels = _videos(batch, self.task)
        xs = []
        for vid, x in zip(ids, feats):
            ex = train_example(x, self.task, example_rng(self.seed, self.epoch, vid))
            _check_finite(ex, vid)
            xs.append(ex)
        return {"x": torch.from_numpy(np.stack(xs)), "y": _label_tensor(labels, self.task)}


def train_batches(iterator, task: TaskSpec, batch_size: int, seed: int, epoch: int,
                  shuffle_buffer: int | None = None, drop_last: bool = True) -> Iterator[dict]:
    """Training batches from a Dataset or a Train worker's DataIterator."""
    yield from iterator.iter_torch_batches(
        batch_size=batch_size, collate_fn=TrainCollate(task, seed, epoch), drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=None if shuffle_buffer is None else seed + epoch)


def eval_batches(iterator, task: TaskSpec, batch_size: int, videos_per_read: int = 1) -> Iterator[dict]:
    """Every evaluation example of every video, `batch_size` at a time, tagged with its video id.

    Windows are cut lazily: a 2-minute LVU video has 61 windows of 24 MB each."""
    xs, ys, vids = [], [], []
    for batch in iterator.iter_batches(batch_size=videos_per_read, batch_format="pyarrow"):
        for vid, x, y in zip(*_videos(batch, task)):
            _check_finite(x, vid)
            for ex in eval_examples(x, task):
                xs.append(ex)
                ys.append(y)
                vids.append(vid)
                if len(xs) == batch_size:
                    yield {"x": torch.from_numpy(np.stack(xs)), "y": _label_tensor(ys, task), "video_id": vids}
                    xs, ys, vids = [], [], []
    if xs:
        yield {"x": torch.from_numpy(np.stack(xs)), "y": _label_tensor(ys, task), "video_id": vids}
