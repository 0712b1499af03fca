"""Ray Data pipeline over feature shards: read, project, shuffle files, cut examples.

Driver side (the Ray seam):
    ds = open_dataset("s3://bucket/lvu/genre", storage)          # manifest + size/schema checks
    train = read_split(ds, "train", shuffle_files=True, seed=0)  # ray.data.Dataset
    TorchTrainer(..., datasets={"train": train})                 # Train splits it per rank (equal=True)

Worker side:
    it = ray.train.get_dataset_shard("train")
    for batch in train_batches(it, ds.task, batch_size=16, seed=0, epoch=e, pin_memory=cuda):  # {"x", "y"}
    for video in eval_videos(it, ds.task):      # {"video_id", "x": (frames, tokens, dim), "y"}
        for x in device_windows(video["x"].to(device), ds.task, batch_size=32): ...

Examples are cut on the consumer, so that their randomness depends on (seed, epoch, video) only.
A training window is a view of its video's frames, copied once, into the batch (float16, in pinned
memory for a GPU: the copy to the device is asynchronous and the cast to the compute dtype happens
there; on a CPU in reused host memory, `HostBatches`). Evaluation windows (61 of 24 MB for a
2-minute LVU video) are cut on the device from the one video tensor. `drop_last=True` and Ray
Train's equal split give every rank the same number of training batches (uneven ranks would hang
DDP's all-reduce).

Host memory of a training worker, at most: 2 batches (the one training and the one being
collated: 2 x batch x window_frames x tokens x dim x 2 bytes) plus the videos in flight: format 2,
the READ_THREADS videos being read (from a local or cached shard, views of its memory map: page
cache); format 1, the block being cut and the next one Ray Data prefetches (2 x rows per block x
frames x tokens x dim x 2 bytes).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from vis4mer.datasets.format import DatasetError, FeatureDataset, check_label, video_features
from vis4mer.datasets.tasks import TaskSpec
from vis4mer.datasets.windows import example_rng, train_example

COLUMNS = ["video_id", "label", "num_frames", "features"]


def read_split(ds: FeatureDataset, split: str, shuffle_files: bool = False, seed: int | None = None,
               override_num_blocks: int | None = None, cache=None, index: bool = True):
    """A lazy ray.data.Dataset of one split's videos.

    Format 2 (and `index`): the split's video index (datasets.reader.video_index): Ray Data moves
    and splits index rows only, and each consumer reads its videos' features itself (`train_batches`
    and `eval_videos` with a `ShardReader`), once, from local disk, the node cache or a range request.
    Epochs are reshuffled on the consumer (`train_batches(shuffle=True)`), seeded by (seed, epoch).

    Format 1 (or `index=False`, e.g. to keep features in Ray's object store with materialize()):
    read_parquet of the shards with the features column, files reshuffled per epoch when
    `shuffle_files`; `cache` (a datasets.cache.ShardCache) serves them from each node's copy."""
    import ray.data

    if index and ds.manifest.format_version >= 2:
        from vis4mer.datasets.reader import video_index

        return ray.data.from_arrow(video_index(ds, split))
    import pyarrow.dataset as pds

    from vis4mer.datasets.cache import caching_filesystem

    paths = ds.shard_paths(split)
    shuffle = ray.data.FileShuffleConfig(seed=seed) if shuffle_files else None
    fs = caching_filesystem(ds, cache) if cache is not None else ds.res.pa
    # Pre-buffered column chunks: concurrent, coalesced range reads of a row group (object stores
    # serve ranges in parallel), instead of Ray's default of one 8-MiB buffered read after another.
    scan = pds.ParquetFragmentScanOptions(use_buffered_stream=False, pre_buffer=True)
    with _manifest_listed_parquet():
        rd = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle, override_num_blocks=override_num_blocks,
                                   fragment_scan_options=scan)
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


READ_THREADS = 4  # videos of one batch read at once (pyarrow and numpy release the GIL)
INDEX_SHUFFLE_ROWS = 1_000_000  # an index row is small: the whole shard of a rank fits the buffer


def _videos(batch: pa.Table, task: TaskSpec, reader=None, pool=None) -> tuple[list[str], list[np.ndarray], list]:
    """The batch's video ids, features (frames, tokens, dim) and checked labels: decoded from the
    features column, or (index rows) read by `reader`."""
    ids = batch.column("video_id").to_pylist()
    if "features" in batch.column_names:
        feats = video_features(batch.column("features"), task.tokens_per_frame, task.feature_dim,
                               batch.column("num_frames"), ids)
    else:
        if reader is None:
            raise ValueError("index rows (format 2) need a ShardReader: train_batches/eval_videos(reader=...)")
        rows = zip(batch.column("shard").to_pylist(), batch.column("row_group").to_pylist(),
                   batch.column("row").to_pylist(), ids, batch.column("num_frames").to_pylist())
        feats = list(pool.map(lambda r: reader.video(*r), rows)) if pool else [reader.video(*r) for r in rows]
    labels = [check_label(y, task, f"video {v}") for v, y in zip(ids, batch.column("label").to_pylist())]
    return ids, feats, labels


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in x: min and max in one pass (NaN propagates through both), ~25x faster than
    isfinite(x).all() on float16 on a CPU."""
    lo, hi = torch.aminmax(x.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_finite(x: torch.Tensor, video_id: str) -> None:
    if not all_finite(x):
        raise DatasetError(f"video {video_id}: features contain NaN or inf")


def _label_tensor(labels: list, task: TaskSpec) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.long if task.type == "classification" else torch.float32)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor over a (read-only) view of Arrow's buffer, without a copy; vis4mer never writes to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


class HostBatches:
    """Host memory for training batches, reused once nothing refers to it.

    glibc hands every block above 32 MB (an LVU batch of 4 is 94 MB) back to the kernel when it is
    freed, so a batch allocated anew is fresh pages that the kernel zeroes on first touch: collating
    LVU-shaped batches that way runs at 1.6 GB/s here, into reused memory at 8.5 GB/s
    (benchmarks/ingest.py measures the whole path). A buffer is handed out again only when the pool
    holds the only reference to it (a tensor or any view over it keeps it out), so a consumer that
    keeps its batches gets new ones. Pinned batches (GPU) need none of this: PyTorch's caching host
    allocator reuses them."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._pool: list[np.ndarray] = []
        self._lock = threading.Lock()
        # the count of a buffer only the pool refers to, read the way `take` reads it (what
        # getrefcount counts of its own argument differs between Python versions)
        probe = [np.empty(0)]
        self._free_refs = sys.getrefcount(probe[0])

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised float16 tensor of `shape`, the caller's alone."""
        with self._lock:
            for i in range(len(self._pool)):
                if self._pool[i].shape == shape and sys.getrefcount(self._pool[i]) == self._free_refs:
                    return torch.from_numpy(self._pool[i])
            self._pool.append(np.empty(shape, np.float16))
            if len(self._pool) > self.keep:  # forget the oldest (it lives on while a batch uses it)
                self._pool.pop(0)
            return torch.from_numpy(self._pool[-1])


HOST_BATCHES = HostBatches()  # one per process, as PyTorch's host allocator


class TrainCollate(ArrowBatchCollateFn):
    """Arrow batch of videos (or of index rows, read with `reader`) -> {"x": (B, L, D) float16, "y":
    (B,)}: one random window per video, copied once from its video's frames into the batch (pinned
    memory when `pin_memory`)."""

    def __init__(self, task: TaskSpec, seed: int, epoch: int, pin_memory: bool = False, reader=None):
        super().__init__()
        self.task, self.seed, self.epoch, self.pin_memory, self.reader = task, seed, epoch, pin_memory, reader
        self._pool = None

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        t = self.task
        if self.reader is not None and self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS)
        ids, feats, labels = _videos(batch, t, self.reader, self._pool)
        shape = (len(ids), t.seq_len, t.feature_dim)
        x = (torch.empty(shape, dtype=torch.float16, pin_memory=True) if self.pin_memory
             else HOST_BATCHES.take(shape))
        rows = x.numpy()
        for i, (vid, video) in enumerate(zip(ids, feats)):
            np.copyto(rows[i], train_example(video, t, example_rng(self.seed, self.epoch, vid)))
        if not all_finite(x):  # name the video
            for vid, row in zip(ids, x):
                _check_finite(row, vid)
        return {"x": x, "y": _label_tensor(labels, t), "video_id": ids}


def train_batches(iterator, task: TaskSpec, batch_size: int, seed: int, epoch: int, shuffle_buffer: int | None = None,
                  drop_last: bool = True, pin_memory: bool = False, reader=None, shuffle: bool = False
                  ) -> Iterator[dict]:
    """Training batches from a Dataset or a Train worker's DataIterator. `reader`: a ShardReader for
    index rows (format 2); `shuffle`: reorder the index rows each epoch, seeded by (seed, epoch)."""
    if shuffle and reader is not None:
        shuffle_buffer = max(shuffle_buffer or 0, INDEX_SHUFFLE_ROWS)
    yield from iterator.iter_torch_batches(
        batch_size=batch_size, collate_fn=TrainCollate(task, seed, epoch, pin_memory, reader), drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=None if shuffle_buffer is None else seed + epoch)


def eval_videos(iterator, task: TaskSpec, reader=None, videos_per_read: int = 1) -> Iterator[dict]:
    """Every video of a split, one at a time: {"video_id", "x": (frames, tokens, dim) float16 (a view
    of the block or file, no copy), "y"}. Windows are cut from it on the device (`device_windows`)."""
    for batch in iterator.iter_batches(batch_size=videos_per_read, batch_format="pyarrow"):
        for vid, x, y in zip(*_videos(batch, task, reader)):
            video = as_tensor(x)
            _check_finite(video, vid)
            yield {"video_id": vid, "x": video, "y": y}
