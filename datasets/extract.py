"""The Transformer encoder stage as a Ray Data job: videos -> float16 feature shards + manifest.

    videos (any URI) --list--> from_items --map_batches(decode, tasks)--> frame chunks
        --map_batches(Encode, actor pool; 1 GPU per actor when the cluster has GPUs)--> feature chunks
        --driver--> parts/<hash>/ (DatasetWriter: shards + the part's manifest, all-or-nothing)
        --end--> manifest.json over every part, failures.json beside it

Resumable and idempotent: finished videos live in parts; a part is named by a hash of its video ids
and is written all-or-nothing (its manifest last), so a part either exists whole or not at all.
A rerun reads the parts' video ids and encodes only the rest (a part without its manifest, left by a
killed run, is removed first); the top-level manifest is rewritten at the end over all parts. A rerun
with a different extractor, weights, preprocessing or task is refused (or --overwrite).

Labels: an optional CSV with a header `video_id,label[,split]` (split: train|val|test, default
train). Without it every video gets label 0 and split train (features only). With it, videos that
the CSV does not list are not encoded (counted in the summary). A rerun does not relabel videos
already written: after changing labels, use --overwrite.

A video that cannot be opened or decoded (corrupt, no video stream, no frames) is recorded in
failures.json with its reason; the job goes on. Imports ray; never orchestrator.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vis4mer.datasets.encoders import (
    EncoderError,
    EncoderSpec,
    check_weights,
    load_state_dict,
    weights_info,
    weights_layout,
)
from vis4mer.datasets.errors import UserError
from vis4mer.datasets.format import MANIFEST, SPLITS, DatasetError, DatasetWriter, Manifest, check_label, open_dataset
from vis4mer.datasets.storage import (
    Resolved,
    StorageError,
    StorageOptions,
    check_local_target,
    describe_error,
    filesystems,
    read_text,
)
from vis4mer.datasets.tasks import TaskSpec, get_task
from vis4mer.datasets.video import Sampling, VideoFile, list_videos

FAILURES = "failures.json"
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
PARTS = "parts"
DEFAULT_TASK = {"vit": "lvu_genre", "swin": "breakfast"}
# extractor keys that describe where it ran, not what it computes: not compared across reruns
_PROVENANCE = ("implementation", "decoder")


@dataclass
class ExtractConfig:
    videos: str
    out: str
    spec: EncoderSpec = field(default_factory=EncoderSpec)
    weights: str | None = None  # a local path or URI of a state dict; required unless random_init
    random_init: bool = False  # tests and benchmarks: meaningless features
    seed: int = 0
    task: str | None = None  # default: lvu_genre (vit) or breakfast (swin)
    labels: str | None = None  # CSV video_id,label[,split]
    batch_frames: int = 16  # frames per encoder forward (swin: rounded down to 32-frame segments, >= 1)
    dtype: str = "float32"  # encoder compute: float32, or float16 / bfloat16 under torch.autocast (GPU tensor cores)
    concurrency: int | None = None  # encoder actors; default: the cluster's GPUs, else 1
    actor_cpus: float = 1.0  # CPUs per encoder actor (its torch threads) when there is no GPU
    decode_tasks: int = 2  # concurrent decode tasks
    part_mb: float = 256.0  # videos are written in parts of about this many MB (resume granularity)
    fps: float = 1.0
    overwrite: bool = False
    storage: StorageOptions | None = None
    progress_s: float = 5.0  # seconds between progress lines


@dataclass
class ExtractResult:
    found: int
    skipped: int
    encoded: int
    failures: list[dict]
    unlabelled: int
    frames: int
    seconds: float
    manifest: Manifest | None

    def summary(self, out: str) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        see = f" (see {out.rstrip('/')}/{FAILURES})" if self.failures else ""
        unlabelled = f", {self.unlabelled} not in the labels" if self.unlabelled else ""
        return (f"extract: {self.encoded} encoded, {self.skipped} already there, {len(self.failures)} failed{see}"
                f"{unlabelled}; {self.frames} frames in {self.seconds:.1f} s ({fps:.1f} frames/s, start-up included)")


# --- preparation (all before anything is written) ----------------------------------------------


def read_labels(uri: str, task: TaskSpec, storage: StorageOptions | None) -> dict[str, tuple]:
    res = filesystems(uri, storage)
    text = read_text(res.path, "label file (CSV: video_id,label[,split])", fs=res.fs, where=res.uri(),
                     error=DatasetError)
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise DatasetError(f"{res.uri()}: not a readable CSV ({e})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    header = [c.strip() for c in rows[0]] if rows else []
    if "video_id" not in header or "label" not in header:
        raise DatasetError(f"{res.uri()}: header {','.join(header) or '(empty file)'}: expected video_id,label[,split]")
    iv, il, isp = header.index("video_id"), header.index("label"), header.index("split") if "split" in header else None
    out: dict[str, tuple] = {}
    for n, r in enumerate(rows[1:], start=2):
        where = f"{res.uri()}:{n}"
        try:
            vid, raw = r[iv].strip(), r[il].strip()
            split = r[isp].strip() if isp is not None else "train"
        except IndexError:
            raise DatasetError(f"{where}: {len(r)} fields: expected {len(header)}") from None
        if split not in SPLITS:
            raise DatasetError(f"{where}: split {split!r}: expected one of {', '.join(SPLITS)}")
        try:
            label = check_label(float(raw), task, where)
        except ValueError:
            raise DatasetError(f"{where}: label {raw!r}: expected a number") from None
        if vid in out:
            raise DatasetError(f"{where}: video {vid} listed twice")
        out[vid] = (label, split)
    return out


def read_weights(uri: str, storage: StorageOptions | None) -> tuple[bytes, str]:
    res = filesystems(uri, storage)
    try:
        with res.fs.open(res.path, "rb") as f:
            return f.read(), os.path.basename(res.path)
    except FileNotFoundError:
        raise EncoderError(f"--weights {res.uri()}: not found (weights are never downloaded: name a local "
                           "state-dict file, e.g. a timm checkpoint)") from None
    except IsADirectoryError:
        raise EncoderError(f"--weights {res.uri()}: is a folder: expected a .pth/.safetensors file") from None
    except Exception as e:
        raise StorageError(describe_error(res.uri(), e)) from None


def _task(cfg: ExtractConfig) -> TaskSpec:
    name = cfg.task or DEFAULT_TASK[cfg.spec.extractor]
    task = get_task(name)
    if task.tokens_per_frame != cfg.spec.tokens:
        raise EncoderError(f"task {name}: {task.tokens_per_frame} tokens per frame: --extractor {cfg.spec.extractor} "
                           f"gives {cfg.spec.tokens} (LVU tasks take vit, Breakfast/COIN take swin)")
    if task.feature_dim != cfg.spec.dim:
        task = replace(task, feature_dim=cfg.spec.dim)  # the test-only tiny arch
    return task


def _comparable(extractor: dict) -> dict:
    return {k: v for k, v in extractor.items() if k not in _PROVENANCE}


def _part_ids(res: Resolved, name: str, task: TaskSpec, extractor: dict, storage) -> list[str]:
    """Video ids of one complete part; DatasetError when it is damaged, EncoderError when it was
    written by another extractor setup."""
    ds = open_dataset(res.uri(PARTS, name), storage)
    m = ds.manifest
    if m.task != task or _comparable(m.extractor) != _comparable(extractor):
        raise EncoderError(f"{res.uri()} already holds features from another extractor setup or task "
                           f"(part {name}: {m.extractor.get('name')}, {m.extractor.get('weights')}, "
                           f"preprocess {m.extractor.get('preprocess')}, task {m.task.name}): use another --out, "
                           "or --overwrite")
    ids = []
    for s in m.shards:
        with res.pa.open_input_file(ds.res.join(s["path"])) as f:
            ids += pq.read_table(f, columns=["video_id"]).column("video_id").to_pylist()
    return ids


def _delete(res: Resolved, path: str, folder: bool = False) -> None:
    try:
        if folder:
            res.pa.delete_dir(path)
        else:
            res.pa.delete_file(path)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise StorageError(describe_error(path, e)) from None


def _exists(res: Resolved, path: str) -> bool:
    """Through pyarrow: no listing cache (s3fs caches listings, and parts are written meanwhile)."""
    try:
        return res.pa.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as e:
        raise StorageError(describe_error(res.uri(), e)) from None


def _listing(res: Resolved) -> list[str]:
    """What is under the output prefix (empty when there is nothing, or no prefix yet)."""
    try:
        infos = res.pa.get_file_info(pafs.FileSelector(res.path, allow_not_found=True))
    except Exception as e:
        raise StorageError(describe_error(res.uri(), e)) from None
    return [i.path for i in infos]


def _subfolders(res: Resolved, path: str) -> list[str]:
    try:
        infos = res.pa.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except Exception as e:
        raise StorageError(describe_error(res.uri(), e)) from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _scan_parts(res: Resolved, task, extractor, storage, log) -> dict[str, str]:
    """{video_id: part} over the complete parts; removes parts a killed run left without a manifest
    (they are incomplete by construction) and damaged ones (their videos are encoded again)."""
    done: dict[str, str] = {}
    root = res.join(PARTS)
    if not _exists(res, root):
        return done
    remove: list[tuple[str, str]] = []  # removed only once every complete part is known to fit this run
    for name in _subfolders(res, root):
        if not _exists(res, res.join(PARTS, name, MANIFEST)):
            remove.append((name, "left incomplete by an earlier run"))
            continue
        try:
            ids = _part_ids(res, name, task, extractor, storage)
        except DatasetError as e:
            remove.append((name, f"damaged ({e}); its videos are encoded again"))
            continue
        done.update({v: name for v in ids})
    for name, why in remove:
        log(f"extract: removing {res.uri(PARTS, name)}: {why}")
        _delete(res, res.join(PARTS, name), folder=True)
    return done


# --- the Ray Data stages -------------------------------------------------------------------------


def _decode_batch(batch: dict, videos_uri: str, storage: StorageOptions | None, sampling: Sampling,
                  chunk_items: int):
    """One video -> rows of frame chunks (uint8 bytes); `last` marks the final one; a video that
    fails gives one row with its `error` (earlier chunks of it are then dropped by the driver)."""
    from vis4mer.datasets.video import VideoError, iter_chunks

    res = filesystems(videos_uri, storage)
    for vid, path in zip(batch["video_id"], batch["path"]):
        vid, path = str(vid), str(path)
        held, index = None, 0
        t0 = time.perf_counter()

        def row(chunk: int, last: bool, frames: np.ndarray | None, error: str = "", vid=vid, t0=t0) -> dict:
            data = np.empty(1, dtype=object)
            data[0] = b"" if frames is None else frames.tobytes()
            return {"video_id": np.array([vid]), "chunk": np.array([chunk], np.int64), "last": np.array([last]),
                    "items": np.array([0 if frames is None else len(frames)], np.int64), "frames": data,
                    "error": np.array([error]), "decode_s": np.array([time.perf_counter() - t0])}
        try:
            for x in iter_chunks(res, path, sampling, chunk_items):
                if held is not None:
                    yield row(index, False, held)
                    index += 1
                held = x
        except VideoError as e:
            yield row(index, True, None, str(e))
            continue
        except Exception as e:  # anything else the decoder raises: still this video's failure
            yield row(index, True, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        yield row(index, True, held)


class _Encode:
    """The actor: one frozen encoder, loaded once, encoding frame chunks into float16 tokens."""

    def __init__(self, spec: EncoderSpec, weights: list, weights_name: str, seed: int, batch: int,
                 sampling: Sampling, threads: int, dtype: str = "float32"):
        import ray
        import torch

        from vis4mer.datasets.encoders import Encoder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        sd = ray.get(weights[0]) if weights else None
        self.encoder = Encoder(spec, sd, weights_name=weights_name, seed=seed, batch=batch,
                               autocast=None if dtype == "float32" else getattr(torch, dtype))
        s = sampling.size
        self.frame_shape = (s, s, 3) if sampling.mode == "fps" else (sampling.segment, s, s, 3)

    def __call__(self, batch: dict) -> dict:
        feats, secs = [], []
        for items, data, err in zip(batch["items"], batch["frames"], batch["error"]):
            t0 = time.perf_counter()
            if err or not items:
                feats.append(b"")
            else:
                frames = np.frombuffer(data, dtype=np.uint8).reshape(int(items), *self.frame_shape)
                feats.append(self.encoder.encode(frames).tobytes())
            secs.append(time.perf_counter() - t0)
        out = {k: batch[k] for k in ("video_id", "chunk", "last", "items", "error", "decode_s")}
        out["features"] = np.empty(len(feats), dtype=object)
        out["features"][:] = feats
        out["encode_s"] = np.array(secs)
        return out


# --- the driver ----------------------------------------------------------------------------------


class _Assembler:
    """Collects chunks per video (they may arrive in any order) into whole videos."""

    def __init__(self, tokens: int, dim: int):
        self.tokens, self.dim = tokens, dim
        self.chunks: dict[str, dict[int, np.ndarray]] = {}
        self.last: dict[str, int] = {}

    def add(self, vid: str, chunk: int, last: bool, features: bytes, items: int) -> np.ndarray | None:
        frames = np.frombuffer(features, np.float16).reshape(items, self.tokens, self.dim)
        self.chunks.setdefault(vid, {})[chunk] = frames
        if last:
            self.last[vid] = chunk
        if vid in self.last and len(self.chunks[vid]) == self.last[vid] + 1:
            parts = self.chunks.pop(vid)
            del self.last[vid]
            return np.concatenate([parts[i] for i in range(len(parts))])
        return None

    def drop(self, vid: str) -> None:
        self.chunks.pop(vid, None)
        self.last.pop(vid, None)


def part_name(video_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(video_ids)).encode()).hexdigest()[:16]


def _write_part(res: Resolved, task, extractor, storage, videos: list[tuple], part_bytes: int) -> str:
    name = part_name([v[0] for v in videos])
    with DatasetWriter(res.uri(PARTS, name), task, extractor, storage=storage, shard_bytes=2 * part_bytes + 2**20,
                       row_group_bytes=32 * 2**20) as w:
        for vid, x, label, split in videos:
            w.add(vid, x, label, split)
    return name


def _write_json(res: Resolved, name: str, text: str) -> None:
    try:
        if res.scheme == "file":
            os.makedirs(res.path, exist_ok=True)
        with res.pa.open_output_stream(res.join(name)) as f:
            f.write(text.encode())
    except Exception as e:
        raise StorageError(describe_error(res.uri(name), e)) from None


def _merge(res: Resolved, parts: set[str], task, extractor, storage) -> Manifest:
    shards = []
    for name in sorted(parts):
        m = open_dataset(res.uri(PARTS, name), storage, check_schema=False).manifest
        shards += [{**s, "path": f"{PARTS}/{name}/{s['path']}"} for s in m.shards]
    manifest = Manifest(task=task, extractor=extractor, shards=sorted(shards, key=lambda s: (s["split"], s["path"])))
    _write_json(res, MANIFEST, manifest.to_json())
    return manifest


def extract(cfg: ExtractConfig, log: Callable[[str], None] = print,
            start_ray: Callable[[], object] | None = None) -> ExtractResult:
    """Runs the whole stage. Every check (weights, task, labels, the videos, the output) comes first;
    then, when there is something to encode, `start_ray()` (or the Ray this process already joined)."""
    spec = cfg.spec
    spec.validate()
    if cfg.batch_frames < 1 or cfg.decode_tasks < 1 or (cfg.concurrency is not None and cfg.concurrency < 1):
        raise UserError("batch_frames, decode_tasks and concurrency: expected >= 1")
    if cfg.dtype not in COMPUTE_DTYPES:
        raise UserError(f"dtype {cfg.dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    # every check before anything is written or deleted
    if cfg.weights is None and not cfg.random_init:
        raise EncoderError("--weights PATH is required: a local state-dict file (.pth/.safetensors) of the "
                           f"{spec.describe()['name']} encoder; nothing is downloaded")
    data, wname = read_weights(cfg.weights, cfg.storage) if cfg.weights else (None, None)
    sd = load_state_dict(data, wname) if data is not None else None
    implementation = check_weights(spec, sd, f"--weights {wname}")
    task = _task(cfg)
    labels = read_labels(cfg.labels, task, cfg.storage) if cfg.labels else None
    videos_res, videos = list_videos(cfg.videos, cfg.storage)
    out = filesystems(cfg.out, cfg.storage)
    sampling = Sampling("fps", fps=cfg.fps) if spec.extractor == "vit" else Sampling("segments")
    import av

    layout = weights_layout(spec.extractor, sd) if sd is not None else None
    extractor = {**spec.describe(), **weights_info(data, wname, cfg.seed, layout), **sampling.describe(),
                 "implementation": implementation, "decoder": f"PyAV {av.__version__}"}
    if cfg.dtype != "float32":  # only then, so that float32 manifests stay as they were (and resume)
        extractor["compute_dtype"] = f"{cfg.dtype} (torch.autocast)"
    unlabelled = 0
    if labels is not None:
        unlabelled = sum(v.video_id not in labels for v in videos)
        videos = [v for v in videos if v.video_id in labels]
        if not videos:
            raise DatasetError(f"{cfg.labels}: lists none of the {unlabelled} videos under {cfg.videos}")

    # the output: start over, or resume; never into a file, or a folder of other things
    if out.scheme == "file":
        check_local_target(out.path, out.uri())
    others = {p.rstrip("/").rsplit("/", 1)[-1] for p in _listing(out)} - {MANIFEST, FAILURES, PARTS}
    if not cfg.overwrite and not _exists(out, out.join(PARTS)) and not _exists(out, out.join(MANIFEST)) and others:
        raise DatasetError(f"{out.uri()}: holds other files, not an extract output: expected an empty prefix, an "
                           "earlier extract output (to resume), or --overwrite")
    if cfg.overwrite:
        _delete(out, out.join(MANIFEST))
        _delete(out, out.join(FAILURES))
        if _exists(out, out.join(PARTS)):
            _delete(out, out.join(PARTS), folder=True)
        done: dict[str, str] = {}
    else:
        if _exists(out, out.join(MANIFEST)) and not _exists(out, out.join(PARTS)):
            raise DatasetError(f"{out.uri(MANIFEST)} already exists and was not written by extract: expected an "
                               "empty prefix, an earlier extract output (to resume), or --overwrite")
        done = _scan_parts(out, task, extractor, cfg.storage, log)
    todo = [v for v in videos if v.video_id not in done]
    skipped = len(videos) - len(todo)
    log(f"extract: {len(videos)} videos under {videos_res.uri()}, {skipped} already in {out.uri()} (skipped), "
        f"{len(todo)} to encode ({extractor['name']}, {implementation}, preprocess {spec.preprocess})")

    failures: list[dict] = []
    parts = set(done.values())
    frames = encoded = 0
    seconds = 0.0
    if todo:
        if start_ray is not None:
            start_ray()
        frames, encoded, seconds = _run(cfg, todo, labels, videos_res, out, task, extractor, sampling, sd, wname,
                                        failures, parts, log)
    result = ExtractResult(found=len(videos) + unlabelled, skipped=skipped, encoded=encoded, failures=failures,
                           unlabelled=unlabelled, frames=frames, seconds=seconds, manifest=None)
    if not parts:
        reasons = "; ".join(f"{f['video_id']}: {f['reason']}" for f in failures[:3])
        raise DatasetError(f"no video could be encoded ({len(failures)} failed: {reasons})")
    result.manifest = _merge(out, parts, task, extractor, cfg.storage)
    _write_json(out, FAILURES, json.dumps({"videos": videos_res.uri(), "created": time.time(),
                                            "failures": failures}, indent=2))
    return result


def _run(cfg, todo: list[VideoFile], labels, videos_res, out, task, extractor, sampling, sd, wname,
         failures: list[dict], parts: set[str], log) -> tuple[int, int, float]:
    """Returns (frames, videos encoded, seconds of the Ray Data job, actor start-up included)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    spec = cfg.spec
    chunk_items = cfg.batch_frames if sampling.mode == "fps" else max(1, cfg.batch_frames // sampling.segment)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = cfg.concurrency or max(1, gpus)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": cfg.actor_cpus}
    weights = [ray.put(sd)] if sd is not None else []
    ds = ray.data.from_items([{"video_id": v.video_id, "path": v.path} for v in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_decode_batch, batch_size=1, compute=TaskPoolStrategy(size=min(cfg.decode_tasks, len(todo))),
                        num_cpus=1,
                        fn_kwargs=dict(videos_uri=videos_res.uri(), storage=cfg.storage, sampling=sampling,
                                       chunk_items=chunk_items))
    ds = ds.map_batches(_Encode, batch_size=1, compute=ActorPoolStrategy(size=actors), **resources,
                        fn_constructor_kwargs=dict(spec=spec, weights=weights, weights_name=wname or "weights",
                                                   seed=cfg.seed, batch=chunk_items, sampling=sampling,
                                                   threads=int(cfg.actor_cpus), dtype=cfg.dtype))
    log(f"extract: {actors} encoder actor(s) on {'1 GPU' if gpus else f'{cfg.actor_cpus:g} CPU'} each, "
        f"{min(cfg.decode_tasks, len(todo))} decode task(s), {chunk_items} "
        f"{'frames' if sampling.mode == 'fps' else 'segments'} per batch")
    per_item = 1 if sampling.mode == "fps" else sampling.segment
    asm = _Assembler(spec.tokens, spec.dim)
    pending: list[tuple] = []
    pending_bytes, part_bytes = 0, int(cfg.part_mb * 2**20)
    frames = encoded = 0
    failed_ids: set[str] = set()
    t0 = last_print = time.perf_counter()
    t_first, frames_first = None, 0  # frames/s counts from the first result: actor start-up is not throughput
    by_id = {v.video_id: v for v in todo}

    def progress(final: bool = False) -> None:
        now = time.perf_counter()
        rate = (frames - frames_first) / (now - t_first) if t_first is not None and now > t_first else 0.0
        log(f"extract: {encoded + len(failures)}/{len(todo)} videos ({encoded} encoded, {len(failures)} failed), "
            f"{frames} frames, {rate:.1f} frames/s, {now - t0:.0f} s{' (done)' if final else ''}")

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            parts.add(_write_part(out, task, extractor, cfg.storage, pending, part_bytes))
            pending, pending_bytes = [], 0

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["video_id"])):
            vid = str(batch["video_id"][i])
            if vid in failed_ids:
                continue
            if batch["error"][i]:
                failed_ids.add(vid)
                asm.drop(vid)
                failures.append({"video_id": vid, "uri": videos_res.uri(by_id[vid].path[len(videos_res.path) + 1:]),
                                 "reason": str(batch["error"][i])})
                continue
            items = int(batch["items"][i])
            x = asm.add(vid, int(batch["chunk"][i]), bool(batch["last"][i]), batch["features"][i], items)
            frames += items * per_item
            if t_first is None:
                t_first, frames_first = time.perf_counter(), frames
            if x is None:
                continue
            label, split = labels[vid] if labels is not None else (0, "train")
            pending.append((vid, x, label, split))
            pending_bytes += x.nbytes
            encoded += 1
            if pending_bytes >= part_bytes:
                flush()
        if time.perf_counter() - last_print >= cfg.progress_s:
            progress()
            last_print = time.perf_counter()
    flush()
    progress(final=True)
    return frames, encoded, time.perf_counter() - t0
