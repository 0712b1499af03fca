"""Reading videos from format-2 shards without Ray: a split's index, and one video at a time.

    index = video_index(ds, "train")       # pyarrow Table: video_id, label, num_frames, shard, row_group, row
    reader = ShardReader(ds, cache=None)
    x = reader.video(row["shard"], row["row_group"], row["row"], row["video_id"], row["num_frames"])

The writer puts one video in a row group, and the footer's statistics name each row group's
video: the index of a split costs one footer read a shard (other shards: their small columns).
The training input moves only index rows through Ray Data; the consumer (the Train worker) reads
each video it needs straight from storage, once, into its batch: a local file (the dataset's own,
or the node's cached copy of an object-store shard, datasets/cache.py) is memory-mapped, an
object-store shard read with one range request a video. Nothing here imports Ray, so a plain
script (benchmarks/gpu_check.py) reads the same way.

The direct read: a format-2 video is one PLAIN-encoded, uncompressed binary value alone in its row
group, so its bytes are the last `frames x tokens x dim x 2` bytes of the column chunk, after their
4-byte little-endian length. The reader takes them from there (a view of the memory map, or one
range request), without parquet's decode, which copies the whole video once more (LVU-shaped
reads: 7.1 GB/s against 3.3 GB/s through pyarrow, one thread). Anything else (another writer's
layout, compression, a length that does not match the index) goes through pyarrow's reader, which
names a video whose bytes do not fit.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vis4mer.datasets.format import DatasetError, FeatureDataset, read_parquet, video_features

OPEN_FILES = 8  # parquet files a reader keeps open (footers parsed once)
INDEX_COLUMNS = ("video_id", "label", "num_frames")


def video_index(ds: FeatureDataset, split: str) -> pa.Table:
    """One row per video of `split`: video_id, label, num_frames, and where it is: shard (its path in
    storage), row_group, row (within the group)."""
    label_type = pa.int64() if ds.task.type == "classification" else pa.float64()
    cols: dict[str, list] = {"video_id": [], "label": [], "num_frames": [], "shard": [], "row_group": [], "row": []}
    for s in ds.shards(split):
        path = ds.res.join(s["path"])
        try:
            with ds.res.pa.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                rows = _from_statistics(pf.metadata) or _from_columns(pf)
        except DatasetError as e:
            raise DatasetError(f"shard {ds.res.uri(s['path'])}, {e}") from None
        except Exception as e:
            raise DatasetError(f"shard {ds.res.uri(s['path'])}: cannot read its index "
                               f"({str(e).splitlines()[0][:200]})") from None
        for vid, label, frames, group, row in rows:
            for key, value in zip(cols, (vid, label, frames, path, group, row)):
                cols[key].append(value)
    return pa.table({"video_id": pa.array(cols["video_id"], pa.string()), "label": pa.array(cols["label"], label_type),
                     "num_frames": pa.array(cols["num_frames"], pa.int32()), "shard": pa.array(cols["shard"]),
                     "row_group": pa.array(cols["row_group"], pa.int32()), "row": pa.array(cols["row"], pa.int32())})


def _from_statistics(meta) -> list[tuple] | None:
    """(video_id, label, num_frames, row_group, 0) per row group from the footer, when every row group
    holds one row with statistics (what the writer writes); else None."""
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    where = [names.index(c) for c in INDEX_COLUMNS]
    rows = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        if rg.num_rows != 1:
            return None
        values = []
        for i in where:
            st = rg.column(i).statistics
            if st is None or not st.has_min_max or st.min != st.max:
                return None
            values.append(st.min.decode() if isinstance(st.min, bytes) else st.min)
        rows.append((*values, g, 0))
    return rows


def _from_columns(pf: pq.ParquetFile) -> list[tuple]:
    out = []
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=list(INDEX_COLUMNS))
        for c in INDEX_COLUMNS:  # a shard's schema allows nulls; a vis4mer shard has none
            if t[c].null_count:
                raise DatasetError(f"row group {g}: column {c}: {t[c].null_count} null value(s): "
                                   "expected a value in every row")
        out += [(*(t[c][r].as_py() for c in INDEX_COLUMNS), g, r) for r in range(t.num_rows)]
    return out


class ShardReader:
    """One video's features, read by the process that uses them (from a memory map when the shard is
    local). `cache`: a datasets.cache.ShardCache for object-store shards. Thread-safe: each read gets
    its own parquet reader over the file's shared source and parsed footer."""

    def __init__(self, ds: FeatureDataset, cache=None):
        self.res, self.task, self.cache = ds.res, ds.task, cache
        self.shards = {ds.res.join(s["path"]): (s["sha256"], s["bytes"]) for s in ds.manifest.shards}
        self._open: OrderedDict[str, tuple] = OrderedDict()  # path -> (source, footer); a few, LRU
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}  # they stay in their process

    def __setstate__(self, state):
        self.__dict__.update(state, _open=OrderedDict(), _lock=threading.Lock())

    def _uri(self, path: str) -> str:
        return path if self.res.scheme == "file" else f"{self.res.scheme}://{path}"

    def _source(self, path: str) -> tuple:
        """(the shard's file: a memory map, or an object-store file read with range requests; its parsed
        footer; the memory map's whole-file buffer, or None). Files are shared by threads (their reads
        at offsets, and slices of the buffer, are thread-safe); parquet readers are not, so each read
        makes its own."""
        with self._lock:
            if path in self._open:
                self._open.move_to_end(path)
                return self._open[path]
        if path not in self.shards:
            raise DatasetError(f"{path}: not a shard of this dataset")
        sha256, size = self.shards[path]
        if self.res.scheme == "file":
            f = pa.memory_map(path)
        elif self.cache is not None:
            f = pa.memory_map(str(self.cache.fetch(self.res.pa, path, sha256, size)))
        else:
            f = self.res.pa.open_input_file(path)
        mapped = f.read_buffer() if isinstance(f, pa.MemoryMappedFile) else None  # zero-copy, at position 0
        entry = (f, read_parquet(lambda: pq.ParquetFile(f).metadata, f"shard {self._uri(path)}"), mapped)
        with self._lock:
            self._open[path] = entry
            if len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)
        return entry

    def video(self, shard: str, row_group: int, row: int, video_id: str, num_frames: int) -> np.ndarray:
        """(num_frames, tokens, dim) float16; a DatasetError naming the video if its bytes do not fit."""
        t = self.task
        f, footer, mapped = self._source(shard)
        direct = _direct_read(f, footer, mapped, row_group, row, num_frames * t.tokens_per_frame * t.feature_dim * 2)
        if direct is not None:
            return np.frombuffer(direct, "<f2").reshape(num_frames, t.tokens_per_frame, t.feature_dim)
        remote = mapped is None  # one coalesced range request for the video
        table = read_parquet(lambda: pq.ParquetFile(f, metadata=footer, pre_buffer=remote).read_row_group(
            row_group, columns=["features"]), f"shard {self._uri(shard)}, video {video_id}")
        column = table.column("features").slice(row, 1)
        try:
            return video_features(column, t.tokens_per_frame, t.feature_dim, [num_frames], [video_id])[0]
        except DatasetError as e:
            raise DatasetError(f"shard {self._uri(shard)}, {e}") from None


def value_span(footer, row_group: int, row: int, nbytes: int) -> int | None:
    """Where the features value of (row_group, row) starts in the file, if the writer's layout lets it
    be read directly (see the module's docstring): else None. `nbytes`: its expected length."""
    rg = footer.row_group(row_group)
    if rg.num_rows != 1 or row != 0:
        return None
    names = [footer.schema.column(i).name for i in range(footer.num_columns)]
    if "features" not in names:
        return None
    c = rg.column(names.index("features"))
    if (c.physical_type != "BYTE_ARRAY" or c.compression != "UNCOMPRESSED" or c.has_dictionary_page
            or set(c.encodings) - {"PLAIN", "RLE"} or c.total_compressed_size != c.total_uncompressed_size):
        return None
    start = c.data_page_offset + c.total_compressed_size - nbytes
    return start if start - 4 >= c.data_page_offset else None


def _direct_read(f, footer, mapped, row_group: int, row: int, nbytes: int):
    """The value's bytes (a zero-copy slice of `mapped`, or one range request), after checking the
    length written before them; None when the layout or the length does not allow it."""
    start = value_span(footer, row_group, row, nbytes)
    if start is None:
        return None
    if mapped is not None:
        if start + nbytes > mapped.size:
            return None
        prefix, value = mapped[start - 4 : start], mapped[start : start + nbytes]
    else:
        got = f.read_at(nbytes + 4, start - 4)
        if len(got) != nbytes + 4:
            return None
        prefix, value = memoryview(got)[:4], memoryview(got)[4:]
    return value if int.from_bytes(bytes(prefix), "little") == nbytes else None
