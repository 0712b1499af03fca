"""Synthetic long-range tasks, deterministic from a seed.

* ``synthetic_order`` (classification): two event patterns, a and b, are hidden at random,
  far-apart positions of a noise sequence; the label is 1 when a comes before b.
* ``synthetic_gap`` (regression): two copies of one event; the target is the distance between them
  as a fraction of the clip, standardised.

Both clips contain the same events whatever the label, so mean-pooled features carry nothing
about it (chance accuracy, or the target's variance as MSE); a model that reasons over time can
solve them. `write_synthetic` writes either task as feature shards (datasets/format.py).
"""
from __future__ import annotations

import numpy as np

from vis4mer.datasets.errors import UserError
from vis4mer.datasets.format import MAX_VIDEO_BYTES, DatasetWriter, Manifest
from vis4mer.datasets.storage import StorageOptions
from vis4mer.datasets.tasks import get_task

EVENT_LEN = 4
MIN_GAP = 0.25
_PATTERNS = np.random.default_rng(12345).standard_normal((2, EVENT_LEN, 4096)).astype(np.float32) * 2.0


def _positions(rng: np.random.Generator, length: int) -> tuple[int, int]:
    gap = int(MIN_GAP * length)
    if length < 2 * EVENT_LEN + gap + 1:
        raise UserError(f"length={length} is too short for two events of {EVENT_LEN} steps "
                         f"at least {MIN_GAP:.0%} of the clip apart")
    first = int(rng.integers(0, length - 2 * EVENT_LEN - gap))
    second = int(rng.integers(first + EVENT_LEN + gap, length - EVENT_LEN + 1))
    return first, second


def order_clip(rng: np.random.Generator, length: int, dim: int, noise: float = 1.0) -> tuple[np.ndarray, int]:
    """(length, dim) float32 and its label: 1 when pattern a comes first."""
    if dim > _PATTERNS.shape[-1]:
        raise UserError(f"dim={dim}: expected <= {_PATTERNS.shape[-1]}")
    x = rng.standard_normal((length, dim)).astype(np.float32) * noise
    first, second = _positions(rng, length)
    label = int(rng.integers(0, 2))
    a, b = (first, second) if label == 1 else (second, first)
    x[a : a + EVENT_LEN] += _PATTERNS[0, :, :dim]
    x[b : b + EVENT_LEN] += _PATTERNS[1, :, :dim]
    return x, label


def gap_clip(rng: np.random.Generator, length: int, dim: int, noise: float = 1.0) -> tuple[np.ndarray, float]:
    """(length, dim) float32 and its target: the events' distance / length, standardised."""
    x = rng.standard_normal((length, dim)).astype(np.float32) * noise
    first, second = _positions(rng, length)
    x[first : first + EVENT_LEN] += _PATTERNS[0, :, :dim]
    x[second : second + EVENT_LEN] += _PATTERNS[0, :, :dim]
    frac = (second - first) / length  # in (MIN_GAP, 1)
    return x, float((frac - 0.45) / 0.17)


def temporal_order(n: int, length: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """In-memory batch: x (n, length, dim) float32, y (n,) int64."""
    rng = np.random.default_rng(seed)
    clips = [order_clip(rng, length, dim) for _ in range(n)]
    return np.stack([c[0] for c in clips]), np.array([c[1] for c in clips], dtype=np.int64)


def write_synthetic(uri: str, task: str = "synthetic_order", videos: tuple[int, int, int] = (512, 128, 128),
                    frames: int = 64, tokens: int = 4, dim: int = 16, seed: int = 0, min_frames: int | None = None,
                    storage: StorageOptions | None = None, shard_bytes: int = 256 * 2**20,
                    overwrite: bool = False) -> Manifest:
    """Writes `videos` = (train, val, test) clips of min_frames..frames frames (tokens x dim each).

    The task's window covers the longest clip (shorter ones are zero-padded), so every example
    holds both events."""
    make = {"synthetic_order": order_clip, "synthetic_gap": gap_clip}
    if task not in make:
        raise UserError(f"task {task!r}: expected one of {', '.join(make)}")
    min_frames = min_frames or max(1, (3 * frames) // 4)
    if not 1 <= min_frames <= frames:
        raise UserError(f"min_frames={min_frames}: expected 1 <= min_frames <= frames={frames}")
    spec = get_task(task, tokens_per_frame=tokens, feature_dim=dim, window_frames=frames, eval_stride=frames)
    if frames * tokens * dim * 2 > MAX_VIDEO_BYTES:  # before generating them
        raise UserError(f"frames x tokens x dim = {frames} x {tokens} x {dim}: {frames * tokens * dim * 2} bytes a "
                        f"video in float16; expected at most {MAX_VIDEO_BYTES} (one parquet value)")
    rng = np.random.default_rng(seed)
    extractor = {"name": "synthetic", "task": task, "seed": seed, "preprocessing": "none",
                 "frames": [min_frames, frames], "tokens_per_frame": tokens, "feature_dim": dim}
    with DatasetWriter(uri, spec, extractor, storage=storage, shard_bytes=shard_bytes, overwrite=overwrite) as w:
        for split, n in zip(("train", "val", "test"), videos):
            for i in range(n):
                f = int(rng.integers(min_frames, frames + 1))
                x, y = make[task](rng, f * tokens, dim)
                w.add(f"{split}-{i:06d}", x.reshape(f, tokens, dim).astype(np.float16), y, split)
    return w.manifest
