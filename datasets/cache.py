"""A node-local cache of a dataset's shards, so that later epochs read local disk, not object storage.

    fs = caching_filesystem(ds, ShardCache("/tmp/vis4mer-shards", max_bytes=200 * 2**30))
    ray.data.read_parquet(ds.shard_paths("train"), filesystem=fs)    # what read_split does

The filesystem answers listings and footers from the dataset's own storage, and serves a shard's
contents from the cache of the node the read runs on: the first read on a node fetches the whole
shard (parallel range requests), checks its sha256 against the manifest and renames it into
place; later reads open the local copy. Entries are keyed by the shard's sha256, so a changed
dataset never reads a stale copy; a copy whose size or modification time changed since it was
checked is hashed again, and fetched again when it does not match (a corrupted file is never
used). Workers on one node share one download through a lock file. The cache stays under
`max_bytes` by evicting the least recently used shards (never one being fetched).

In the driver (no Ray task), reads pass through to storage: read_parquet reads footers there, and
the driver's node should not fetch every shard for it.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from vis4mer.datasets.errors import UserError

RANGE_BYTES = 16 * 2**20  # one range request; several run at once (object stores serve them in parallel)
RANGE_THREADS = 8
_verified: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) hashed ok in this process
_lock = threading.Lock()


class CacheError(UserError):
    """A shard that cannot be cached: its download does not match the manifest's sha256."""


@dataclass(frozen=True)
class ShardCache:
    root: str  # a node-local folder (the same path on every node)
    max_bytes: int

    def path(self, sha256: str) -> Path:
        return Path(self.root) / sha256[:2] / f"{sha256}.parquet"

    def fetch(self, base: pafs.FileSystem, source: str, sha256: str, size: int) -> Path:
        """The local copy of `source` (fetched and checked first if absent or changed)."""
        local = self.path(sha256)
        if _checked(local, sha256):
            os.utime(local)  # recently used
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{local}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait, then read it
            try:
                if _checked(local, sha256):
                    return local
                self._make_room(size, keep=local)
                tmp = local.with_suffix(f".part.{os.getpid()}")
                try:
                    digest = _download(base, source, tmp, size)
                    if digest != sha256:
                        raise CacheError(f"{source}: sha256 {digest[:12]}.. after download: expected "
                                         f"{sha256[:12]}.. (manifest); the shard changed or is corrupt")
                    os.replace(tmp, local)
                finally:
                    tmp.unlink(missing_ok=True)
                st = local.stat()
                with _lock:
                    _verified[str(local)] = (st.st_size, st.st_mtime_ns)
                return local
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _make_room(self, size: int, keep: Path) -> None:
        entries = [p for p in Path(self.root).glob("*/*.parquet") if p != keep]
        used = sum(p.stat().st_size for p in entries)
        for p in sorted(entries, key=lambda p: p.stat().st_mtime):  # least recently used first
            if used + size <= self.max_bytes:
                break
            used -= p.stat().st_size
            p.unlink(missing_ok=True)
            with _lock:
                _verified.pop(str(p), None)


def _checked(local: Path, sha256: str) -> bool:
    """The local copy exists and matches sha256: hashed once per process while size and mtime stay."""
    try:
        st = local.stat()
    except FileNotFoundError:
        return False
    stamp = (st.st_size, st.st_mtime_ns)
    with _lock:
        if _verified.get(str(local)) == stamp:
            return True
    h = hashlib.sha256()
    with open(local, "rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    if h.hexdigest() != sha256:
        local.unlink(missing_ok=True)  # corrupt: fetched again
        return False
    with _lock:
        _verified[str(local)] = stamp
    return True


def _download(base: pafs.FileSystem, source: str, dest: Path, size: int) -> str:
    """Copies `source` to `dest` with parallel range requests; returns its sha256."""
    with base.open_input_file(source) as src, open(dest, "wb") as out:
        out.truncate(size)
        ranges = [(o, min(RANGE_BYTES, size - o)) for o in range(0, size, RANGE_BYTES)]

        def copy(offset_length):
            offset, length = offset_length
            data = src.read_at(length, offset)
            os.pwrite(out.fileno(), data, offset)

        with concurrent.futures.ThreadPoolExecutor(RANGE_THREADS) as pool:
            list(pool.map(copy, ranges))
    h = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def _in_a_ray_task() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None
    except Exception:  # noqa: BLE001 - outside Ray: the driver, a plain script
        return False


class CachingHandler(pafs.FileSystemHandler):
    """pyarrow filesystem handler: metadata from `base`, shard contents from the node's cache."""

    def __init__(self, base: pafs.FileSystem, cache: ShardCache, shards: dict[str, tuple[str, int]]):
        self.base, self.cache, self.shards = base, cache, shards  # path -> (sha256, bytes)

    def __reduce__(self):
        return CachingHandler, (self.base, self.cache, self.shards)

    def __eq__(self, other):
        return isinstance(other, CachingHandler) and (self.base, self.cache, self.shards) == (
            other.base, other.cache, other.shards)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "vis4mer-shard-cache"

    def normalize_path(self, path):
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def _local(self, path: str) -> str | None:
        if path in self.shards and _in_a_ray_task():
            sha256, size = self.shards[path]
            return str(self.cache.fetch(self.base, path, sha256, size))
        return None

    def open_input_file(self, path):
        local = self._local(path)
        return pafs.LocalFileSystem().open_input_file(local) if local else self.base.open_input_file(path)

    def open_input_stream(self, path):
        local = self._local(path)
        return pafs.LocalFileSystem().open_input_stream(local) if local else self.base.open_input_stream(path)

    # read-only: the dataset is never written through the cache
    def _read_only(self, *args, **kwargs):
        raise OSError("the shard cache is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = move = copy_file = \
        open_output_stream = open_append_stream = _read_only


def caching_filesystem(ds, cache: ShardCache) -> pafs.PyFileSystem:
    """A pyarrow filesystem for `ds`'s shards that reads them through `cache` on each node."""
    shards = {ds.res.join(s["path"]): (s["sha256"], s["bytes"]) for s in ds.manifest.shards}
    return pafs.PyFileSystem(CachingHandler(ds.res.pa, cache, shards))


def cache_stats(cache: ShardCache) -> dict:
    files = list(Path(cache.root).glob("*/*.parquet"))
    return {"shards": len(files), "bytes": sum(p.stat().st_size for p in files), "at": time.time()}
