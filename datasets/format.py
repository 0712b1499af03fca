"""The feature-shard format: parquet shards plus a JSON manifest, in a folder or object-store prefix.

    <prefix>/manifest.json
    <prefix>/<split>-00000.parquet ...

One row per video, readable by plain pyarrow:
    video_id    string
    split       string
    num_frames  int32
    label       int64 (class id) | float64 (regression target)
    features    large_binary: the video's (num_frames, tokens_per_frame, feature_dim) float16 values,
                little-endian, C order (format 2); format 1 stored list<fixed_size_list<halffloat>>

Format 2 stores the features as raw bytes because parquet decodes a nested list value by value
(0.06 GB/s for LVU-shaped data here) and a binary column near memory speed (3 GB/s). Plain pyarrow
and numpy read a video in three lines:

    t = pq.read_table(shard, columns=["num_frames", "features"])
    i, n = 0, t["num_frames"][0].as_py()
    x = np.frombuffer(t["features"][i].as_buffer(), "<f2").reshape(n, tokens_per_frame, feature_dim)

The manifest holds the format version, the task (type, classes, metric, windowing), tokens per
frame, feature dim, dtype, the feature extractor and its preprocessing, and every shard with its
split, row count, byte size and sha256. Readers check sizes and schemas against it when they open
a dataset; `verify` checks hashes and every value.

Writing is all-or-nothing: a write's shards get names of their own (`<split>-<write id>-<n>`), so
they never replace a file already there; the manifest is written last and is what publishes them.
On any error the new shards are deleted and the prefix holds what it held before (the previous
dataset, intact); after a successful --overwrite, the previous dataset's shards are deleted.

Every path a manifest lists is relative to the dataset's prefix, normalised and inside it
(`safe_relative`): a manifest cannot make a reader touch another folder or bucket.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vis4mer.datasets.errors import UserError
from vis4mer.datasets.storage import (
    Resolved,
    StorageError,
    StorageOptions,
    check_local_target,
    describe_error,
    filesystems,
    safe_relative,
    storage_failure,
)
from vis4mer.datasets.strict_json import parse_json
from vis4mer.datasets.tasks import INT32_MAX, TaskSpec

FORMAT_VERSION = 2  # what writers write
READABLE_VERSIONS = (1, 2)  # what readers read (1: nested lists of halffloat)
MANIFEST = "manifest.json"
SMALL_COLUMNS = ("video_id", "split", "num_frames", "label")
SPLITS = ("train", "val", "test")
MAX_VIDEO_BYTES = INT32_MAX  # one video is one parquet binary value, whose length is an int32


class DatasetError(UserError):
    """Bad or inconsistent data: one line naming the file, URI or video and what was expected."""


FRAME_SHAPE = b"vis4mer.frame_shape"  # format 2: the features field's metadata, e.g. b"197,1024" (tokens, dim)


def shard_schema(task: TaskSpec, version: int = FORMAT_VERSION) -> pa.Schema:
    label = pa.int64() if task.type == "classification" else pa.float64()
    shape = f"{task.tokens_per_frame},{task.feature_dim}".encode()
    features = (pa.field("features", pa.large_binary(), metadata={FRAME_SHAPE: shape, b"vis4mer.dtype": b"<f2"})
                if version == 2 else
                pa.field("features", pa.list_(pa.list_(pa.float16(), task.tokens_per_frame * task.feature_dim))))
    return pa.schema([("video_id", pa.string()), ("split", pa.string()), ("num_frames", pa.int32()),
                      ("label", label), features])


def shard_writer_options(version: int = FORMAT_VERSION) -> dict:
    """pq.ParquetWriter options of a shard. Format 2: no dictionary or statistics for the raw features
    (megabytes a value), statistics for the small columns (with one video a row group, the footer
    alone indexes a shard); written with row_group_size=1."""
    extra = dict(use_dictionary=["video_id", "split"], write_statistics=list(SMALL_COLUMNS)) if version == 2 else {}
    return {"compression": "none", **extra}


def _same_schema(got: pa.Schema, expected: pa.Schema) -> bool:
    """Types, and (format 2) the frame shape the features field says it holds."""
    if not got.equals(expected):
        return False
    meta = expected.field("features").metadata
    return not meta or (got.field("features").metadata or {}).get(FRAME_SHAPE) == meta[FRAME_SHAPE]


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def as_float16(x: np.ndarray, where: str) -> np.ndarray:
    """Features of any real numeric dtype (integers, floats) as float16, the one cast every writer goes
    through. Anything else (strings, complex numbers, booleans, records, objects, dates) is refused
    by its dtype, before a cast that would fail or silently drop a part; values that float16 cannot
    hold (NaN, inf, |x| > 65504) after the cast. Both are a DatasetError naming `where`."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iuf":
        what = f"dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"{where}: {what}: expected real numbers (an integer or float dtype)")
    if x.dtype == np.float16:
        out = x
    else:
        with np.errstate(all="ignore"):  # out-of-range values become inf, refused below (no warnings)
            out = x.astype(np.float16)
    if not np.isfinite(out).all():
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DatasetError(f"{where}: features contain NaN or inf")
        raise DatasetError(f"{where}: features contain values beyond float16's range: expected |x| <= "
                           f"{FLOAT16_MAX:g}")
    return out


def features_to_binary(videos: list[np.ndarray]) -> pa.Array:
    """[(frames, tokens, dim)] -> large_binary, one value per video: its float16 bytes (one copy)."""
    data = (np.concatenate([np.ascontiguousarray(v, dtype="<f2").reshape(-1) for v in videos]) if videos
            else np.zeros(0, "<f2"))
    offsets = np.zeros(len(videos) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([v.size * 2 for v in videos])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(videos), [None, pa.py_buffer(offsets),
                                                                            pa.py_buffer(data)])


def features_to_arrow(videos: list[np.ndarray], tokens: int, dim: int) -> pa.Array:
    """[(frames, tokens, dim)] -> list<fixed_size_list<halffloat>> without per-element Python work."""
    offsets = np.zeros(len(videos) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([v.shape[0] for v in videos])
    flat = (np.concatenate([np.ascontiguousarray(v, dtype=np.float16).reshape(-1) for v in videos]) if videos
            else np.zeros(0, np.float16))
    frames = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), tokens * dim)
    return pa.ListArray.from_arrays(pa.array(offsets), frames)


def video_features(column: pa.Array, tokens: int, dim: int, num_frames=None, video_ids=None) -> list[np.ndarray]:
    """A features column (either format, chunked or not) -> [(frames, tokens, dim) float16] views of
    its buffers, no copy. A value whose byte length is not frames x tokens x dim x 2 (the row's
    `num_frames` when given) is a DatasetError naming the video."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    frames = iter(num_frames.to_pylist() if hasattr(num_frames, "to_pylist") else num_frames or [])
    ids = iter(video_ids.to_pylist() if hasattr(video_ids, "to_pylist") else video_ids or [])
    out: list[np.ndarray] = []
    for chunk in chunks:
        if pa.types.is_large_binary(chunk.type) or pa.types.is_binary(chunk.type):
            out += _binary_videos(chunk, tokens, dim, frames, ids)
        else:  # format 1
            offsets = chunk.offsets.to_numpy()
            values = chunk.values.values.to_numpy(zero_copy_only=False).reshape(-1, tokens, dim)  # all frames
            out += [values[offsets[i] : offsets[i + 1]] for i in range(len(chunk))]
    return out


def _binary_videos(chunk: pa.Array, tokens: int, dim: int, frames, ids) -> list[np.ndarray]:
    _, offsets_buf, data_buf = chunk.buffers()
    wide = pa.types.is_large_binary(chunk.type)
    offsets = np.frombuffer(offsets_buf, np.int64 if wide else np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    frame_bytes = tokens * dim * 2
    videos = []
    for i in range(len(chunk)):
        start, end = int(offsets[i]), int(offsets[i + 1])
        n, expected = (end - start) // frame_bytes, next(frames, None)
        if (end - start) % frame_bytes or n < 1 or (expected is not None and n != expected):
            vid = next(ids, None)
            raise DatasetError(f"video {vid if vid is not None else f'#{i}'}: {end - start} bytes of features: "
                               f"expected {expected if expected is not None else 'frames'} x {tokens} tokens x "
                               f"{dim} dims x 2 bytes" + (f" = {expected * frame_bytes}" if expected else ""))
        next(ids, None)
        videos.append(data[start:end].view("<f2").reshape(n, tokens, dim))
    return videos


@dataclass
class Manifest:
    task: TaskSpec
    extractor: dict
    shards: list[dict] = field(default_factory=list)  # {path, split, rows, bytes, sha256}
    format_version: int = FORMAT_VERSION
    dtype: str = "float16"
    created: float = field(default_factory=time.time)

    @property
    def tokens_per_frame(self) -> int:
        return self.task.tokens_per_frame

    @property
    def feature_dim(self) -> int:
        return self.task.feature_dim

    def split_rows(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            out[s["split"]] = out.get(s["split"], 0) + s["rows"]
        return out

    def to_json(self) -> str:
        return json.dumps({
            "format_version": self.format_version, "task": self.task.to_dict(),
            "tokens_per_frame": self.tokens_per_frame, "feature_dim": self.feature_dim, "dtype": self.dtype,
            "extractor": self.extractor, "splits": self.split_rows(), "shards": self.shards,
            "created": self.created,
        }, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parses and checks a manifest: every field present with its type (a mismatch names the field
        and shows both types), every shard path safe, every split known, no shard listed twice."""
        d = parse_json(text, where, DatasetError)
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = _field(d, "format_version", int, where)
        if version not in READABLE_VERSIONS:
            raise DatasetError(f"{where}: format_version {version}: expected one of {READABLE_VERSIONS}")
        try:
            task = TaskSpec.from_dict(_field(d, "task", dict, where))
        except UserError as e:
            raise DatasetError(f"{where}: task: {e}") from None
        for key, value in (("tokens_per_frame", task.tokens_per_frame), ("feature_dim", task.feature_dim)):
            if _field(d, key, int, where) != value:
                raise DatasetError(f"{where}: {key} {d[key]}: expected {value}, as its task section says")
        if _field(d, "dtype", str, where) != "float16":
            raise DatasetError(f"{where}: dtype {d['dtype']!r}: expected 'float16'")
        extractor = _field(d, "extractor", dict, where)
        shards, seen = [], {}
        listed = _field(d, "shards", list, where)
        if not listed:  # what the writer refuses to write ("no videos were added")
            raise DatasetError(f"{where}: shards: empty list: expected at least one shard (a dataset holds videos)")
        for i, s in enumerate(listed):
            at = f"{where}: shards[{i}]"
            if not isinstance(s, dict):
                raise DatasetError(f"{at}: expected an object, got {type(s).__name__}")
            path = safe_relative(_field(s, "path", str, at), f"{at}.path", DatasetError)
            split = _field(s, "split", str, at)
            if split not in SPLITS:
                raise DatasetError(f"{at}: split {split!r}: expected one of {', '.join(SPLITS)}")
            if path in seen:
                raise DatasetError(f"{at}: {path} is listed twice (under {seen[path]!r} and {split!r}): "
                                   "expected each shard once")
            seen[path] = split
            for key in ("rows", "bytes"):
                if _field(s, key, int, at) < 0:
                    raise DatasetError(f"{at}: {key} {s[key]}: expected >= 0")
            if not re.fullmatch(r"[0-9a-f]{64}", _field(s, "sha256", str, at)):
                raise DatasetError(f"{at}: sha256: expected 64 hex digits")
            shards.append({"path": path, "split": split, "rows": s["rows"], "bytes": s["bytes"], "sha256": s["sha256"]})
        created = d.get("created", 0.0)
        created = float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else 0.0
        return cls(task=task, extractor=extractor, shards=shards, format_version=version, created=created)


_TYPE_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "a list"}


def _field(d: dict, key: str, kind: type, where: str):
    """d[key], which must be of `kind` (a bool is not an integer); else a DatasetError naming the field
    and both types (a string "8" where 8 is expected reads the same in a message)."""
    if key not in d:
        raise DatasetError(f"{where}: {key}: required field missing")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DatasetError(f"{where}: {key}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r:.60}")
    return value


# --- writing -------------------------------------------------------------------------------


class DatasetWriter:
    """Streams videos into shards of about `shard_bytes`, row groups of about `row_group_bytes`.

        with DatasetWriter("s3://bucket/lvu/genre", task, extractor={...}) as w:
            w.add("vid0", features, label=2, split="train")
    """

    def __init__(self, uri: str, task: TaskSpec, extractor: dict, storage: StorageOptions | None = None,
                 shard_bytes: int = 256 * 2**20, row_group_bytes: int = 32 * 2**20, overwrite: bool = False,
                 format_version: int = FORMAT_VERSION):
        task.validate()
        self.uri, self.task, self.extractor = uri, task, extractor
        self.res: Resolved = filesystems(uri, storage)
        self.shard_bytes, self.row_group_bytes = shard_bytes, row_group_bytes
        self.format_version = format_version  # 1 only to make old-format data (tests, benchmarks)
        self.schema = shard_schema(task, format_version)
        self.shards: list[dict] = []
        self.written: list[str] = []
        self._open: dict[str, tuple[pa.BufferOutputStream, pq.ParquetWriter, int]] = {}
        self._pending: dict[str, list] = {}
        self._pending_bytes: dict[str, int] = {}
        self._counter: dict[str, int] = {}
        self._ids: set[str] = set()
        self._made_dir = False
        self._write_id = secrets.token_hex(4)  # this write's shard names: never a file already there
        self._check_target(overwrite)

    def _check_target(self, overwrite: bool) -> None:
        """The target is empty, or holds a dataset that --overwrite replaces; the previous dataset's
        shards are noted, to be deleted once the new manifest is published."""
        res = self.res
        if res.scheme == "file":
            check_local_target(res.path, self.uri)
        try:
            exists = res.fs.exists(res.join(MANIFEST))
            entries = res.fs.ls(res.path, detail=False) if not exists and res.fs.isdir(res.path) else []
        except Exception as e:
            raise StorageError(describe_error(self.uri, e)) from None
        if exists and not overwrite:
            raise DatasetError(f"{res.uri(MANIFEST)} already exists: expected an empty prefix (or --overwrite)")
        if entries and not overwrite:
            raise DatasetError(f"{res.uri()}: not empty ({len(entries)} entries) and not a vis4mer dataset: "
                               "expected an empty folder or prefix (or --overwrite, which never deletes files it "
                               "did not write)")
        self.replaced: list[str] = []
        if exists:
            try:
                with res.pa.open_input_stream(res.join(MANIFEST)) as f:
                    old = Manifest.from_json(f.read().decode(), res.uri(MANIFEST))
                self.replaced = [s["path"] for s in old.shards]
            except (DatasetError, UnicodeDecodeError, OSError):
                pass  # a broken dataset: its files stay (nothing says which are its shards)

    def add(self, video_id: str, features: np.ndarray, label, split: str) -> None:
        t = self.task
        if split not in SPLITS:
            raise DatasetError(f"video {video_id}: split {split!r}: expected one of {', '.join(SPLITS)}")
        if video_id in self._ids:
            raise DatasetError(f"video {video_id}: added twice")
        if features.ndim != 3 or features.shape[1:] != (t.tokens_per_frame, t.feature_dim) or features.shape[0] < 1:
            raise DatasetError(f"video {video_id}: features of shape {features.shape}: expected "
                               f"(frames >= 1, {t.tokens_per_frame}, {t.feature_dim})")
        if features.size * 2 > MAX_VIDEO_BYTES:
            raise DatasetError(f"video {video_id}: {features.size * 2} bytes of float16 features: expected at most "
                               f"{MAX_VIDEO_BYTES} (one parquet value)")
        features = as_float16(features, f"video {video_id}")
        label = check_label(label, t, f"video {video_id}")
        self._ids.add(video_id)
        self._pending.setdefault(split, []).append((video_id, features, label))
        self._pending_bytes[split] = self._pending_bytes.get(split, 0) + features.size * 2
        if self._pending_bytes[split] >= self.row_group_bytes:
            self._flush_group(split)

    def _flush_group(self, split: str) -> None:
        rows = self._pending.pop(split, [])
        self._pending_bytes[split] = 0
        if not rows:
            return
        t = self.task
        table = pa.table({
            "video_id": pa.array([r[0] for r in rows], pa.string()),
            "split": pa.array([split] * len(rows), pa.string()),
            "num_frames": pa.array([r[1].shape[0] for r in rows], pa.int32()),
            "label": pa.array([r[2] for r in rows], self.schema.field("label").type),
            "features": (features_to_binary([r[1] for r in rows]) if self.format_version == 2
                         else features_to_arrow([r[1] for r in rows], t.tokens_per_frame, t.feature_dim)),
        }, schema=self.schema)
        if split not in self._open:
            buf = pa.BufferOutputStream()
            writer = pq.ParquetWriter(buf, self.schema, **shard_writer_options(self.format_version))
            self._open[split] = (buf, writer, 0)
        buf, writer, n = self._open[split]
        # format 2: one video a row group, so that a reader fetches one video's bytes and nothing else
        writer.write_table(table, row_group_size=1 if self.format_version == 2 else len(rows))
        self._open[split] = (buf, writer, n + len(rows))
        if buf.tell() >= self.shard_bytes:
            self._close_shard(split)

    def _close_shard(self, split: str) -> None:
        buf, writer, rows = self._open.pop(split)
        writer.close()
        data = buf.getvalue()
        index = self._counter.get(split, 0)
        self._counter[split] = index + 1
        name = f"{split}-{self._write_id}-{index:05d}.parquet"
        path = self.res.join(name)
        try:
            if self.res.scheme == "file" and not self._made_dir and not self.res.fs.exists(self.res.path):
                self.res.pa.create_dir(self.res.path, recursive=True)
                self._made_dir = True
            with self.res.pa.open_output_stream(path) as f:
                self.written.append(path)
                f.write(data)
        except Exception as e:
            raise StorageError(describe_error(self.res.uri(name), e)) from None
        self.shards.append({"path": name, "split": split, "rows": rows, "bytes": data.size,
                            "sha256": hashlib.sha256(memoryview(data)).hexdigest()})

    def close(self) -> Manifest:
        for split in list(self._pending):
            self._flush_group(split)
        for split in list(self._open):
            self._close_shard(split)
        if not self.shards:
            raise DatasetError(f"{self.uri}: no videos were added: nothing to write")
        manifest = Manifest(task=self.task, extractor=self.extractor, format_version=self.format_version,
                            shards=sorted(self.shards, key=lambda s: s["path"]))
        publish_manifest(self.res, manifest.to_json())
        self.written.clear()  # published: no longer this writer's to delete
        for path in self.replaced:  # the previous dataset's shards, now unreferenced
            try:
                self.res.pa.delete_file(self.res.join(path))
            except Exception:  # noqa: BLE001, S110 - a leftover file, never a broken dataset
                pass
        return manifest

    def abort(self) -> None:
        """Delete every shard this writer wrote (nothing half-written stays behind)."""
        for path in self.written:
            try:
                self.res.pa.delete_file(path)
            except Exception:
                pass
        self.written.clear()
        if self._made_dir:
            try:
                self.res.pa.delete_dir(self.res.path)
            except Exception:
                pass

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.manifest = self.close()
        except BaseException:
            self.abort()
            raise


def publish_manifest(res: Resolved, text: str) -> None:
    """Writes manifest.json in one step, which publishes a dataset: locally a temporary file renamed over
    it, on an object store one PUT (atomic there)."""
    target = res.join(MANIFEST)
    tmp = res.join(f".{MANIFEST}.{secrets.token_hex(4)}") if res.scheme == "file" else target
    try:
        with res.pa.open_output_stream(tmp) as f:
            f.write(text.encode())
        if tmp != target:
            res.pa.move(tmp, target)
    except Exception as e:
        if tmp != target:
            try:
                res.pa.delete_file(tmp)
            except Exception:  # noqa: BLE001, S110
                pass
        raise StorageError(describe_error(res.uri(MANIFEST), e)) from None


def check_label(label, task: TaskSpec, where: str):
    """A label as the task needs it (an int class id in range, or a finite float); a DatasetError naming
    `where` for anything else, a missing (null) label included."""
    if not isinstance(label, (int, float, np.integer, np.floating)) or isinstance(label, (bool, np.bool_)):
        expected = (f"a class id in [0, {task.num_classes})" if task.type == "classification"
                    else "a finite regression target")
        got = "null (missing)" if label is None else f"{type(label).__name__} {label!r:.40}"
        raise DatasetError(f"{where}: label {got}: expected {expected}")
    if task.type == "classification":
        if isinstance(label, (float, np.floating)) and not float(label).is_integer():
            raise DatasetError(f"{where}: label {label}: expected a class id in [0, {task.num_classes})")
        label = int(label)
        if not 0 <= label < task.num_classes:
            raise DatasetError(f"{where}: label {label}: expected a class id in [0, {task.num_classes})")
        return label
    label = float(label)
    if not np.isfinite(label):
        raise DatasetError(f"{where}: label {label}: expected a finite regression target")
    return label


# --- opening and verifying -----------------------------------------------------------------


@dataclass
class FeatureDataset:
    """An opened dataset: its manifest, checked against what is in storage."""

    uri: str
    res: Resolved
    manifest: Manifest

    @property
    def task(self) -> TaskSpec:
        return self.manifest.task

    def shards(self, split: str | None = None) -> list[dict]:
        return [s for s in self.manifest.shards if split is None or s["split"] == split]

    def require_split(self, split: str, what: str) -> None:
        """A DatasetError naming `what` (the option or key that asked for it) when there is no such split."""
        if not self.shards(split):
            have = sorted(self.manifest.split_rows())
            raise DatasetError(f"{what}: {self.uri} has no {split!r} split (it has {have})")

    def shard_paths(self, split: str) -> list[str]:
        paths = [self.res.join(s["path"]) for s in self.shards(split)]
        if not paths:
            raise DatasetError(f"{self.uri}: no {split!r} shards (splits here: {self.manifest.split_rows()})")
        return paths


def open_dataset(uri: str, storage: StorageOptions | None = None, check_schema: bool = True) -> FeatureDataset:
    """Reads the manifest and checks every shard's presence, size and schema (footers only)."""
    res = filesystems(uri, storage)
    where = res.uri(MANIFEST)
    try:
        with res.pa.open_input_stream(res.join(MANIFEST)) as f:
            text = f.read().decode()
    except Exception as e:
        raise DatasetError(describe_error(where, e) + ("" if "not found" not in describe_error(where, e)
                                                       else ": expected a vis4mer dataset (manifest.json)")) from None
    manifest = Manifest.from_json(text, where)
    ds = FeatureDataset(uri, res, manifest)
    paths = [res.join(s["path"]) for s in manifest.shards]
    try:
        infos = res.pa.get_file_info(paths)
    except Exception as e:
        raise DatasetError(describe_error(uri, e)) from None
    expected = shard_schema(manifest.task, manifest.format_version)
    for s, info in zip(manifest.shards, infos):
        name = res.uri(s["path"])
        if info.type != pa.fs.FileType.File:
            raise DatasetError(f"missing shard {name}: listed in the manifest but not in storage")
        if info.size != s["bytes"]:
            raise DatasetError(f"shard {name}: {info.size} bytes: expected {s['bytes']} (manifest); "
                               "truncated or replaced")
        if check_schema:
            try:
                with res.pa.open_input_file(res.join(s["path"])) as f:
                    meta = pq.ParquetFile(f).metadata
                    schema = meta.schema.to_arrow_schema()
                    rows = meta.num_rows
            except Exception as e:
                reason = str(e).splitlines()[0][:200]
                raise DatasetError(f"shard {name}: not a readable parquet file ({reason})") from None
            if not _same_schema(schema, expected):
                got = schema.field("features").type if "features" in schema.names else "no features column"
                shape = ((schema.field("features").metadata or {}).get(FRAME_SHAPE, b"?").decode(errors="replace")
                         if "features" in schema.names else "")
                got = f"{got} of frames {shape.replace(',', ' x ')}" if shape else got
                raise DatasetError(f"shard {name}: schema {got}: expected {expected.field('features').type} "
                                   f"(format_version {manifest.format_version}, "
                                   f"tokens_per_frame={manifest.tokens_per_frame}, "
                                   f"feature_dim={manifest.feature_dim}) "
                                   f"and label {expected.field('label').type}")
            if rows != s["rows"]:
                raise DatasetError(f"shard {name}: {rows} rows: expected {s['rows']} (manifest)")
    return ds


def read_parquet(read, where: str):
    """read(): a pyarrow parquet read of a shard (a file, a footer, a row group). What pyarrow raises
    on bytes that are not what their footer says (a damaged page, a bad thrift header, a wrong
    length: OSError or an ArrowException) is the data's fault: a DatasetError naming `where`."""
    try:
        return read()
    except (OSError, pa.ArrowException) as e:
        failed = storage_failure(where, e)
        if failed:
            raise StorageError(failed) from None  # the storage failed (network, credentials), not the data
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DatasetError(f"{where}: not readable parquet data ({reason}): expected a shard as vis4mer "
                           "writes it") from None


def check_no_nulls(table: pa.Table, where: str) -> None:
    """Every value present: a shard's schema allows nulls, a vis4mer shard never has one."""
    for column in table.column_names:
        nulls = table.column(column).null_count
        if nulls:
            raise DatasetError(f"{where}: column {column}: {nulls} null value(s): expected a value in every row")


def verify(uri: str, storage: StorageOptions | None = None) -> dict:
    """Full check: hashes, then every value (finite features, labels in range, frame counts)."""
    ds = open_dataset(uri, storage)
    t = ds.task
    videos, seen = 0, {}
    for s in ds.manifest.shards:
        name = ds.res.uri(s["path"])
        with ds.res.pa.open_input_file(ds.res.join(s["path"])) as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != s["sha256"]:
            raise DatasetError(f"shard {name}: sha256 {digest[:12]}..: expected {s['sha256'][:12]}.. (manifest)")
        pf = read_parquet(functools.partial(pq.ParquetFile, pa.BufferReader(data)), f"shard {name}")
        for i in range(pf.num_row_groups):
            tbl = read_parquet(functools.partial(pf.read_row_group, i), f"shard {name}, row group {i}")
            check_no_nulls(tbl, f"shard {name}, row group {i}")
            try:
                feats = video_features(tbl.column("features"), t.tokens_per_frame, t.feature_dim,
                                       tbl.column("num_frames"), tbl.column("video_id"))
            except DatasetError as e:
                raise DatasetError(f"shard {name}, {e}") from None
            for vid, split, n, label, x in zip(tbl.column("video_id").to_pylist(), tbl.column("split").to_pylist(),
                                               tbl.column("num_frames").to_pylist(), tbl.column("label").to_pylist(),
                                               feats):
                where = f"shard {name}, video {vid}"
                if split != s["split"]:
                    raise DatasetError(f"{where}: split {split!r}, in a shard the manifest lists under {s['split']!r}")
                if vid in seen:  # e.g. evaluation on training videos
                    raise DatasetError(f"{where}: also in {seen[vid]}: expected each video once in a dataset")
                seen[vid] = f"split {split!r} ({name})"
                if x.shape[0] != n:
                    raise DatasetError(f"{where}: {x.shape[0]} frames: expected num_frames={n}")
                if not np.isfinite(x).all():
                    raise DatasetError(f"{where}: features contain NaN or inf")
                check_label(label, t, where)
                videos += 1
    return {"uri": uri, "shards": len(ds.manifest.shards), "videos": videos, "splits": ds.manifest.split_rows()}
