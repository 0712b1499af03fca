"""A trained model over a whole split, with the task's protocol: the evaluation behind
`vis4mer evaluate` and the batch inference behind `vis4mer predict`.

    table = predict_split(model, ds, "test", batch_size=32)
    # pyarrow Table, one row a video: video_id, label, prediction, scores, loss_sum, windows

Every evaluation window of a video (LVU: each 60-s window at a 1-s stride; Breakfast, COIN: the 64
evenly spaced segments) goes through the model; the video's scores are the mean softmax over its
windows (its prediction their argmax, i.e. the summed softmax's) or, for regression, the mean
output. On Ray Data: an actor pool of models (one GPU an actor when the cluster has GPUs) maps the
split's video index; each actor reads its videos itself (datasets/reader.py) and cuts the windows
on its device. `window_outputs` is the same per-video step the training loop's evaluation takes.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vis4mer.datasets.format import FeatureDataset
from vis4mer.datasets.tasks import TaskSpec
from vis4mer.datasets.windows import VideoAggregator, device_windows

OUTPUT_COLUMNS = ("video_id", "label", "prediction", "scores", "loss_sum", "windows")


def window_outputs(model, x: torch.Tensor, task: TaskSpec, batch_size: int, amp: bool) -> torch.Tensor:
    """The model's output for every evaluation window of one video x (frames, tokens, dim), on x's
    device: (windows, d_output) float32."""
    outs = []
    with torch.no_grad():
        for windows in device_windows(x, task, batch_size):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                outs.append(model(windows.float()).float())
    return torch.cat(outs)


def window_loss(out: torch.Tensor, label, task: TaskSpec) -> float:
    """Summed loss of a video's windows against its label (cross-entropy, or MSE of output[:, 0])."""
    if task.type == "classification":
        y = torch.full((len(out),), int(label), dtype=torch.long, device=out.device)
        return float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
    y = torch.full((len(out),), float(label), device=out.device)
    return float(torch.nn.functional.mse_loss(out[:, 0], y, reduction="sum"))


class VideoPredictor:
    """The Ray Data actor: a model on its device; index rows in, one prediction row a video out."""

    def __init__(self, model_cfg: dict, state_ref: list, task: dict, reader, batch_size: int):
        import ray

        from vis4mer.model import ViS4mer, ViS4merConfig

        state = ray.get(state_ref[0])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = ViS4mer(ViS4merConfig(**model_cfg)).to(self.device).eval()
        self.model.load_state_dict(state)
        self.task, self.reader, self.batch_size = TaskSpec.from_dict(task), reader, batch_size
        self.amp = self.device.type == "cuda"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vis4mer.datasets.pipeline import eval_videos

        rows = {c: [] for c in OUTPUT_COLUMNS}
        for video in eval_videos(_Rows(batch), self.task, self.reader):
            x = video["x"].pin_memory() if self.device.type == "cuda" else video["x"]
            x = x.to(self.device, non_blocking=True)  # float16 until on the device
            out = window_outputs(self.model, x, self.task, self.batch_size, self.amp)
            agg = VideoAggregator(self.task)
            agg.add([video["video_id"]] * len(out), out.cpu().numpy(), [video["y"]] * len(out))
            vid = video["video_id"]
            for key, value in zip(OUTPUT_COLUMNS, (vid, video["y"], agg.predictions()[vid],
                                                   (agg.sums[vid] / agg.counts[vid]).tolist(),
                                                   window_loss(out, video["y"], self.task), len(out))):
                rows[key].append(value)
        return _table(rows, self.task)


class _Rows:
    """One pyarrow batch as the iterator `eval_videos` reads."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, batch_size=None, batch_format=None):
        yield self.table


def _table(rows: dict, task: TaskSpec) -> pa.Table:
    classification = task.type == "classification"
    return pa.table({"video_id": pa.array(rows["video_id"], pa.string()),
                     "label": pa.array(rows["label"], pa.int64() if classification else pa.float64()),
                     "prediction": pa.array(rows["prediction"], pa.int64() if classification else pa.float64()),
                     "scores": pa.array(rows["scores"], pa.list_(pa.float64())),
                     "loss_sum": pa.array(rows["loss_sum"], pa.float64()),
                     "windows": pa.array(rows["windows"], pa.int64())})


def predict_split(model, ds: FeatureDataset, split: str, batch_size: int = 32, actors: int | None = None,
                  cache=None) -> pa.Table:
    """Every video of `split`, predicted on Ray Data by an actor pool (Ray must be initialised): one
    actor a GPU when the cluster has GPUs, else `actors` (default 1) CPU actors."""
    import ray
    from ray.data import ActorPoolStrategy

    from vis4mer.datasets.pipeline import read_split
    from vis4mer.datasets.reader import ShardReader

    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = actors or max(gpus, 1)
    index = read_split(ds, split)
    # The weights go to the object store once; each actor gets them by reference (wrapped in a list,
    # so that Ray passes the reference rather than inlining the weights into the constructor call).
    state_ref = [ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})]
    out = index.map_batches(
        VideoPredictor, batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=size),
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs={"model_cfg": model.cfg.to_dict(), "state_ref": state_ref, "task": ds.task.to_dict(),
                               "reader": ShardReader(ds, cache), "batch_size": batch_size})
    tables = [t for t in out.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    table = pa.concat_tables(tables) if tables else _table({c: [] for c in OUTPUT_COLUMNS}, ds.task)
    return table.sort_by("video_id")


def split_metrics(table: pa.Table, task: TaskSpec) -> dict[str, float]:
    """The task's metric over videos (top-1 accuracy or MSE) and the loss over windows."""
    pred, label = np.asarray(table["prediction"]), np.asarray(table["label"])
    metric = float(np.mean(pred == label)) if task.type == "classification" else float(np.mean((pred - label) ** 2))
    windows = int(np.sum(table["windows"]))
    return {task.metric: metric, "loss": float(np.sum(table["loss_sum"])) / max(windows, 1),
            "videos": table.num_rows}
