"""The paper's example sampling, in plain numpy, plus per-video aggregation of window predictions.

Training: one example per video per epoch, a random window (LVU, synthetic) or 64 random sorted
segment indices (Breakfast, COIN). The randomness is a function of (seed, epoch, video_id) only, so
an epoch's examples do not depend on which worker reads which video, or in what order.
Evaluation: every window at the task's stride (LVU), or the 64 evenly spaced segments
(Breakfast, COIN); windows carry their video id and are aggregated per video (summed softmax,
or the mean prediction for regression).
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from vis4mer.datasets.tasks import TaskSpec


def example_rng(seed: int, epoch: int, video_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(video_id.encode())])


def _pad(x: np.ndarray, frames: int) -> np.ndarray:
    if x.shape[0] >= frames:
        return x
    out = np.zeros((frames,) + x.shape[1:], dtype=x.dtype)  # a clip shorter than the window: zeros
    out[: x.shape[0]] = x
    return out


def train_example(x: np.ndarray, task: TaskSpec, rng: np.random.Generator) -> np.ndarray:
    """x (frames, tokens, dim) -> (window_frames * tokens, dim)."""
    W, T = task.window_frames, x.shape[0]
    if task.train_sampling == "random_window":
        start = int(rng.integers(0, max(T - W, 0) + 1))
        window = _pad(x[start : start + W], W)
    else:  # random_segments: W sorted random indices, repeating when the video has fewer
        idx = np.sort(rng.choice(T, size=W, replace=T < W))
        window = x[idx]
    return window.reshape(W * task.tokens_per_frame, -1)


def eval_starts(num_frames: int, task: TaskSpec) -> list[int]:
    return list(range(0, max(num_frames - task.window_frames, 0) + 1, task.eval_stride))


def eval_examples(x: np.ndarray, task: TaskSpec) -> Iterator[np.ndarray]:
    """Every evaluation example of one video, each (window_frames * tokens, dim)."""
    W, T = task.window_frames, x.shape[0]
    if task.eval_sampling == "sliding":
        for s in eval_starts(T, task):
            yield _pad(x[s : s + W], W).reshape(W * task.tokens_per_frame, -1)
    else:  # even_segments
        idx = np.round(np.linspace(0, T - 1, W)).astype(np.int64)
        yield x[idx].reshape(W * task.tokens_per_frame, -1)


def device_windows(x, task: TaskSpec, batch_size: int):
    """Every evaluation example of one video, cut where `x` lives (the GPU): x (frames, tokens, dim)
    -> batches of (n <= batch_size, window_frames * tokens, dim). The same examples as
    `eval_examples`, from one tensor: sliding windows are a strided view (`unfold`), materialised a
    batch at a time."""
    import torch

    W, T = task.window_frames, x.shape[0]
    if task.eval_sampling != "sliding":  # even_segments: one example
        idx = torch.from_numpy(np.round(np.linspace(0, T - 1, W)).astype(np.int64)).to(x.device)
        yield x.index_select(0, idx).reshape(1, W * task.tokens_per_frame, -1)
        return
    if T < W:  # one window, zero-padded
        pad = x.new_zeros((W - T, *x.shape[1:]))
        yield torch.cat([x, pad]).reshape(1, W * task.tokens_per_frame, -1)
        return
    windows = x.unfold(0, W, task.eval_stride)  # (n, tokens, dim, W): a view
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i : i + batch_size].permute(0, 3, 1, 2)  # (b, W, tokens, dim)
        yield chunk.reshape(chunk.shape[0], W * task.tokens_per_frame, -1)


class VideoAggregator:
    """Accumulates window outputs per video: summed softmax (classification) or mean (regression)."""

    def __init__(self, task: TaskSpec):
        self.task = task
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.labels: dict[str, float] = {}

    def add(self, video_ids: list[str], outputs: np.ndarray, labels) -> None:
        outputs = np.asarray(outputs, dtype=np.float64)
        if self.task.type == "classification":
            e = np.exp(outputs - outputs.max(-1, keepdims=True))
            outputs = e / e.sum(-1, keepdims=True)  # softmax per window
        else:
            outputs = outputs.reshape(len(video_ids), -1)[:, :1]  # output[:, 0], as the released code
        for vid, out, y in zip(video_ids, outputs, np.asarray(labels).tolist()):
            self.sums[vid] = self.sums.get(vid, 0) + out
            self.counts[vid] = self.counts.get(vid, 0) + 1
            self.labels[vid] = y

    def merge(self, other: VideoAggregator) -> None:
        for vid, s in other.sums.items():
            self.sums[vid] = self.sums.get(vid, 0) + s
            self.counts[vid] = self.counts.get(vid, 0) + other.counts[vid]
            self.labels[vid] = other.labels[vid]

    def predictions(self) -> dict[str, float]:
        if self.task.type == "classification":
            return {v: int(np.argmax(s)) for v, s in self.sums.items()}
        return {v: float(s[0] / self.counts[v]) for v, s in self.sums.items()}

    def metric(self) -> float:
        """Top-1 accuracy over videos, or MSE over videos."""
        preds = self.predictions()
        if not preds:
            return float("nan")
        if self.task.type == "classification":
            return float(np.mean([preds[v] == int(self.labels[v]) for v in preds]))
        return float(np.mean([(preds[v] - self.labels[v]) ** 2 for v in preds]))
