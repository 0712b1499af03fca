"""Decoding and sampling videos for the Transformer encoder stage (PyAV), from any URI the filesystem
factory serves.

Sampling, as ../shared/spec/vis4mer-model.md section 1 describes the released features:
* ViT (LVU): one frame per second. For each tick t = 0, 1/fps, 2/fps, ... (seconds from the first
  frame) the first decoded frame whose timestamp is >= t is taken; a gap in the stream longer than a
  tick repeats the frame after it, so a clip of d seconds gives floor(d * fps) + 1 frames at most.
* Video Swin (Breakfast, COIN): consecutive, non-overlapping 32-frame segments at the native frame
  rate; the last, partial segment is padded by repeating its final frame (a clip shorter than 32
  frames is one padded segment).
Every kept frame is converted to RGB and resized to 224 x 224 with area interpolation (swscale
SWS_AREA), no crop. Frames come out as uint8 (n, 224, 224, 3); the encoders scale and normalise.

Decoding streams: `iter_chunks` yields the sampled frames in chunks, so a long video never sits in
memory whole.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vis4mer.datasets.format import DatasetError
from vis4mer.datasets.storage import Resolved, StorageError, StorageOptions, describe_error, filesystems

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_SIZE = 224
SEGMENT_FRAMES = 32


@dataclass(frozen=True)
class Sampling:
    mode: str  # "fps" (ViT: frames at `fps`) | "segments" (Video Swin: `segment` consecutive frames)
    fps: float = 1.0
    segment: int = SEGMENT_FRAMES
    size: int = FRAME_SIZE

    def describe(self) -> dict:
        if self.mode == "fps":
            return {"sampling": f"{self.fps:g} frame(s) per second: the first frame at or after each tick",
                    "frames_per_second": self.fps, "frame_size": [self.size, self.size],
                    "resize": "area interpolation, no crop"}
        return {"sampling": f"consecutive {self.segment}-frame segments at the native frame rate; "
                            "the last one padded by repeating its final frame",
                "segment_frames": self.segment, "frame_size": [self.size, self.size],
                "resize": "area interpolation, no crop"}


class VideoError(Exception):
    """A video that cannot be decoded: its reason goes to failures.json, the job goes on."""


@dataclass(frozen=True)
class VideoFile:
    video_id: str
    path: str  # inside the filesystems of the videos' Resolved
    size: int


def list_videos(uri: str, storage: StorageOptions | None = None) -> tuple[Resolved, list[VideoFile]]:
    """Every video file under `uri` (recursively); its id is its path below `uri` without the
    extension. A missing folder or prefix, or one with no videos, is a one-line DatasetError."""
    res = filesystems(uri, storage)
    try:
        if not res.fs.exists(res.path):
            raise DatasetError(f"{res.uri()}: not found: expected a folder or prefix of videos "
                               f"({', '.join(VIDEO_EXTENSIONS)})")
        if res.fs.isfile(res.path):
            raise DatasetError(f"{res.uri()}: is a file: expected a folder or prefix of videos")
        found = res.fs.find(res.path, detail=True)
    except DatasetError:
        raise
    except Exception as e:
        raise StorageError(describe_error(res.uri(), e)) from None
    root = res.path.rstrip("/") + "/"
    videos: dict[str, VideoFile] = {}
    for path, info in sorted(found.items()):
        path = path if res.scheme == "file" else path.split("://", 1)[-1]
        stem, ext = os.path.splitext(path)
        if ext.lower() not in VIDEO_EXTENSIONS or not path.startswith(root):
            continue
        vid = stem[len(root):]
        if vid in videos:
            raise DatasetError(f"{res.uri()}: two videos with the id {vid!r} "
                               f"({os.path.basename(videos[vid].path)}, {os.path.basename(path)})")
        videos[vid] = VideoFile(vid, path, int(info.get("size") or 0))
    if not videos:
        raise DatasetError(f"{res.uri()}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return res, list(videos.values())


def _open(res: Resolved, path: str):
    import av

    if res.scheme == "file":
        return av.open(path, metadata_errors="ignore"), None
    f = res.fs.open(path, "rb")
    try:
        return av.open(f, metadata_errors="ignore"), f
    except BaseException:
        f.close()
        raise


def _rgb(frame, size: int) -> np.ndarray:
    return frame.reformat(width=size, height=size, format="rgb24", interpolation="AREA").to_ndarray()


def _sampled(container, sampling: Sampling) -> Iterator[np.ndarray]:
    streams = container.streams.video
    if not streams:
        raise VideoError("no video stream")
    stream = streams[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    if sampling.mode == "segments":
        for frame in container.decode(stream):
            yield _rgb(frame, sampling.size)
        return
    step, t0, tick = 1.0 / sampling.fps, None, 0.0
    for i, frame in enumerate(container.decode(stream)):
        t = frame.time if frame.time is not None else i / rate
        if t0 is None:
            t0 = t
        t -= t0
        if t + 1e-6 < tick:
            continue
        rgb = _rgb(frame, sampling.size)
        while tick <= t + 1e-6:  # a gap longer than a tick repeats the frame after it
            yield rgb
            tick += step


def iter_chunks(res: Resolved, path: str, sampling: Sampling, chunk_items: int) -> Iterator[np.ndarray]:
    """Sampled frames in chunks: (k <= chunk_items, size, size, 3) uint8 for fps sampling, or
    (k <= chunk_items, segment, size, size, 3) for segments. Raises VideoError with a one-line reason
    when the file cannot be opened or decoded, or holds no frames."""
    import av

    per = 1 if sampling.mode == "fps" else sampling.segment
    buf: list[np.ndarray] = []
    emitted = 0
    try:
        container, f = _open(res, path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot open: {_reason(e)}") from None
    try:
        for rgb in _sampled(container, sampling):
            buf.append(rgb)
            if len(buf) == chunk_items * per:
                yield _stack(buf, sampling)
                emitted += 1
                buf = []
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoError(f"cannot decode: {_reason(e)}") from None
    finally:
        container.close()
        if f is not None:
            f.close()
    if buf:
        if per > 1 and len(buf) % per:
            buf.extend([buf[-1]] * (per - len(buf) % per))
        yield _stack(buf, sampling)
    elif not emitted:
        raise VideoError("no video frames decoded")


def _stack(buf: list[np.ndarray], sampling: Sampling) -> np.ndarray:
    x = np.stack(buf)
    if sampling.mode == "segments":
        x = x.reshape(-1, sampling.segment, *x.shape[1:])
    return x


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:300]


def decode(uri_or_path: str, sampling: Sampling, storage: StorageOptions | None = None) -> np.ndarray:
    """All sampled frames of one video at once (tests, benchmarks, small clips)."""
    res = filesystems(uri_or_path, storage)
    return np.concatenate(list(iter_chunks(res, res.path, sampling, chunk_items=1 << 30)))
