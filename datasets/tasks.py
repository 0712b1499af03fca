"""Task registry: what each benchmark's labels mean and how examples are cut from a video.

Facts from ../shared/spec/vis4mer-model.md (sections 1, 4, 5):
* LVU: 1 frame/s of 197 ViT tokens; a training example is a random 60-s window; evaluation takes
  every 60-s window at a 1-s stride and aggregates per video (summed softmax, or the mean
  prediction for regression).
* Breakfast, COIN: Video Swin segments of 49 tokens; 64 random sorted segment indices to train,
  64 evenly spaced ones to evaluate (indices repeat when a video has fewer segments).
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, fields, replace

from vis4mer.datasets.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str  # classification | regression
    num_classes: int  # 1 for regression
    metric: str  # top1 | mse
    tokens_per_frame: int  # tokens per frame (LVU) or per segment (Breakfast, COIN)
    window_frames: int  # frames (or segments) per example
    train_sampling: str  # random_window | random_segments
    eval_sampling: str  # sliding (every window at eval_stride) | even_segments (one example)
    eval_stride: int = 1  # frames between evaluation windows (sliding)
    aggregate: str = "sum_softmax"  # per-video aggregation: sum_softmax | mean
    feature_dim: int = 1024
    label_transform: str | None = None  # how raw labels became targets (regression)

    @property
    def seq_len(self) -> int:
        """Tokens per example: the model's l_max."""
        return self.window_frames * self.tokens_per_frame

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        """A task from its dict (a manifest's task section), every field checked for its type and value."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(d) - set(hints), key=str)
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}")
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING:
                    raise UserError(f"{f.name}: required field missing")
                continue
            value, want = d[f.name], hints[f.name]
            ok = (isinstance(value, int) and not isinstance(value, bool) if want is int
                  else isinstance(value, str) if want is str else value is None or isinstance(value, str))
            if not ok:
                expected = want.__name__ if isinstance(want, type) else "a string or null"
                raise UserError(f"{f.name}: expected {expected}, got {type(value).__name__} {value!r:.60}")
        task = cls(**d)
        task.validate()
        return task

    def validate(self) -> None:
        """Every field within what vis4mer can run (a field out of range, or a metric or aggregation it
        does not compute, is a UserError naming the field and what was expected)."""
        if self.type not in ("classification", "regression"):
            raise UserError(f"task {self.name}: type {self.type!r}: expected classification or regression")
        if self.type == "classification" and not 2 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"task {self.name}: num_classes {self.num_classes}: expected 2 <= num_classes <= "
                            f"{MAX_CLASSES}")
        if self.type == "regression" and self.num_classes != 1:
            raise UserError(f"task {self.name}: num_classes {self.num_classes}: expected 1 for a regression task")
        # the metric is computed from the type (accuracy, or mean squared error) and named by this field;
        # another name would report one under the other's name, and rank runs the wrong way (metric_mode)
        for f, supported in (("metric", METRICS), ("aggregate", AGGREGATES)):
            if getattr(self, f) != supported[self.type]:
                raise UserError(f"task {self.name}: {f} {getattr(self, f)!r:.60}: expected {supported[self.type]!r} "
                                f"for a {self.type} task")
        if self.train_sampling not in ("random_window", "random_segments"):
            raise UserError(f"task {self.name}: train_sampling {self.train_sampling!r:.60}: expected random_window "
                            "or random_segments")
        if self.eval_sampling not in ("sliding", "even_segments"):
            raise UserError(f"task {self.name}: eval_sampling {self.eval_sampling!r:.60}: expected sliding or "
                            "even_segments")
        for f in ("tokens_per_frame", "window_frames", "eval_stride", "feature_dim"):
            if not 1 <= getattr(self, f) <= INT32_MAX:
                raise UserError(f"task {self.name}: {f}={getattr(self, f)}: expected 1 <= {f} <= {INT32_MAX}")
        for what, value in (("window_frames x tokens_per_frame (the sequence length)", self.seq_len),
                            ("tokens_per_frame x feature_dim (the values of a frame)",
                             self.tokens_per_frame * self.feature_dim)):
            if value > INT32_MAX:
                raise UserError(f"task {self.name}: {what} = {value}: expected <= {INT32_MAX}")


# Limits of a task's fields. Frame counts are int32 in a shard (num_frames), and so is every size
# here: a longer window, or a larger frame, than any shard can hold is a mistake, not a task.
# INT32_MAX is vis4mer's one bound on counts and sizes (parquet values, Kubernetes and the cluster
# launcher's counts, CLI options).
INT32_MAX = 2**31 - 1
MAX_CLASSES = 100_000  # LVU's largest task has 10 classes, COIN 180
METRICS = {"classification": "top1", "regression": "mse"}  # what windows.VideoAggregator.metric computes
AGGREGATES = {"classification": "sum_softmax", "regression": "mean"}  # VideoAggregator's per-video aggregation


def _lvu(name: str, kind: str, classes: int, transform: str | None = None) -> TaskSpec:
    regression = kind == "regression"
    return TaskSpec(name=f"lvu_{name}", type=kind, num_classes=1 if regression else classes,
                    metric="mse" if regression else "top1", tokens_per_frame=197, window_frames=60,
                    train_sampling="random_window", eval_sampling="sliding", eval_stride=1,
                    aggregate="mean" if regression else "sum_softmax", label_transform=transform)


# log(views) and like ratio, shifted as the released code does
VIEW_COUNT_SHIFT = 11.76425435683139
LIKE_RATIO_SHIFT = 9.138220535629456

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _lvu("relationship", "classification", 4),
    _lvu("way_speaking", "classification", 5),
    _lvu("scene", "classification", 6),
    _lvu("like_ratio", "regression", 1, f"10 * like / (like + dislike) - {LIKE_RATIO_SHIFT}"),
    _lvu("view_count", "regression", 1, f"log(views) - {VIEW_COUNT_SHIFT}"),
    _lvu("director", "classification", 10),
    _lvu("genre", "classification", 4),
    _lvu("writer", "classification", 10),
    _lvu("year", "classification", 9),
    TaskSpec("breakfast", "classification", 10, "top1", tokens_per_frame=49, window_frames=64,
             train_sampling="random_segments", eval_sampling="even_segments"),
    TaskSpec("coin", "classification", 180, "top1", tokens_per_frame=49, window_frames=64,
             train_sampling="random_segments", eval_sampling="even_segments"),
    # synthetic long-range tasks (datasets/synthetic.py); sizes are set when they are written
    TaskSpec("synthetic_order", "classification", 2, "top1", tokens_per_frame=4, window_frames=64,
             train_sampling="random_window", eval_sampling="sliding", eval_stride=16, feature_dim=16),
    TaskSpec("synthetic_gap", "regression", 1, "mse", tokens_per_frame=4, window_frames=64,
             train_sampling="random_window", eval_sampling="sliding", eval_stride=16, aggregate="mean",
             feature_dim=16),
]}

LVU_TASKS = [n[len("lvu_"):] for n in TASKS if n.startswith("lvu_")]


def get_task(name: str, **overrides) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: expected one of {', '.join(sorted(TASKS))}")
    task = replace(TASKS[name], **overrides)
    task.validate()
    return task


def metric_mode(metric: str) -> str:
    """"max" when a larger value is better (accuracies: `top1`, `val_top1`, `train_acc`), else "min"
    (losses, MSE). Every ranking of runs and trials (the plateau schedule, the best checkpoint, Tune,
    `vis4mer best`) asks here."""
    return "max" if metric.endswith(("top1", "acc")) else "min"
